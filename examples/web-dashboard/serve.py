#!/usr/bin/env python3
"""A tiny static server for the web dashboard: this directory, plus the mqtt.js browser bundle
that scripts/browser-deps caches, served as /mqtt.min.js. Loopback by default.

    python serve.py                      # http://127.0.0.1:8080/
    python serve.py --port 9000 --bundle /path/to/mqtt.min.js
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = Path(os.environ.get("FASTPROXY_CACHE") or Path.home() / ".cache" / "fastproxy") / "mqttjs" / "mqtt.min.js"


class Handler(http.server.SimpleHTTPRequestHandler):
    bundle: Path = DEFAULT_BUNDLE

    def send_head(self):
        if self.path.split("?", 1)[0] != "/mqtt.min.js":
            return super().send_head()
        try:
            f = open(self.bundle, "rb")
        except OSError:
            self.send_error(404, f"{self.bundle} missing: run scripts/browser-deps")
            return None
        self.send_response(200)
        self.send_header("Content-Type", "application/javascript")
        self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
        self.end_headers()
        return f

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, fmt, *args):
        if not getattr(self.server, "quiet", False):
            super().log_message(fmt, *args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"mqtt.min.js (default {DEFAULT_BUNDLE})")
    ap.add_argument("--quiet", action="store_true", help="no request log")
    args = ap.parse_args(argv)
    if not args.bundle.is_file():
        print(f"serve.py: {args.bundle} is missing: run scripts/browser-deps", file=sys.stderr)
        return 1
    handler = type("BoundHandler", (Handler,), {"bundle": args.bundle})
    httpd = http.server.ThreadingHTTPServer((args.host, args.port), functools.partial(handler, directory=str(HERE)))
    httpd.quiet = args.quiet  # type: ignore[attr-defined]
    print(f"serve.py: http://{args.host}:{httpd.server_address[1]}/ (mqtt.js: {args.bundle})", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
