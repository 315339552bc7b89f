"""Real stores on loopback for the remote-shard tests: an HTTP server that answers range requests
(and, on request, drops connections mid-body or answers 503), and moto's S3 server."""

from __future__ import annotations

import os
import re
import socket
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Faults:
    """Which range GETs misbehave: every ``drop_every``-th is cut after half its body, every
    ``busy_every``-th is answered 503; ``broken`` names files that always answer 503."""

    def __init__(self, drop_every: int = 0, busy_every: int = 0, broken: tuple[str, ...] = ()):
        self.drop_every, self.busy_every, self.broken = drop_every, busy_every, broken
        self.gets = self.dropped = self.busy = 0
        #: GETs of a file, with or without a range
        self.files = 0
        #: (file name, first byte) of every range GET
        self.ranges: list[tuple[str, int]] = []
        self.lock = threading.Lock()


def _handler(root: Path, faults: Faults):
    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = Path(self.translate_path(self.path))
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if path.is_file():
                with faults.lock:
                    faults.files += 1
            if not path.is_file() or m is None:
                return super().do_GET()
            with faults.lock:
                faults.gets += 1
                n = faults.gets
                faults.ranges.append((path.name, int(m.group(1))))
            if path.name in faults.broken or (faults.busy_every and n % faults.busy_every == 0):
                faults.busy += 1
                self.send_error(503, "busy")
                return
            data = path.read_bytes()
            lo = int(m.group(1))
            hi = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            body = data[lo:hi + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if faults.drop_every and n % faults.drop_every == 0 and len(body) > 1:
                faults.dropped += 1
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def http_server(root: Path, faults: Faults | None = None):
    """Serve ``root`` on a free loopback port; yields (base URL, faults)."""
    faults = faults or Faults()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, faults))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server():
    """moto's S3 on loopback, found by s3fs through the usual environment (``AWS_ENDPOINT_URL``
    and test credentials); yields the endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":  # python tests/servers.py ROOT: serve ROOT over HTTP (ranges) until killed
    import sys
    import time

    with http_server(Path(sys.argv[1])) as (base, _):
        print(base, flush=True)
        while True:
            time.sleep(3600)
