#!/usr/bin/env bash
# Rebuild data/starter/ (see scripts/build_starter_data.py and data/starter/SOURCES.md).
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq
$sudo apt-get install -y -qq dataset-fashion-mnist bible-kjv wordnet-base espeak-ng flite
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 >/dev/null)
python scripts/build_starter_data.py --emoji-tarball "$tmp/emoji-datasource-google-16.0.0.tgz" \
    --emoji-twitter-tarball "$tmp/emoji-datasource-twitter-16.0.0.tgz" --out data/starter "$@"
