#!/usr/bin/env bash
# Render a report.html to a PNG with headless Chromium, to look at a report without a browser.
#   scripts/render_report.sh REPORT_HTML OUT_PNG [WIDTH,HEIGHT]     (default window 1400,3000)
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 REPORT_HTML OUT_PNG [WIDTH,HEIGHT]" >&2
    exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1400,3000}
[[ -f "$html" ]] || { echo "$0: $1: no such file" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n "$browser" ]] || { echo "$0: no chromium found (Debian: apt-get install chromium)" >&2; exit 1; }
# a throwaway profile: a headless run must not touch (or wait on) a user's browser profile
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out" --window-size="$size" "file://$html" >/dev/null 2>&1
[[ -s "$out" ]] || { echo "$0: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
