"""Real-browser helpers for tests/test_browser.py: headless Chromium driven over the DevTools
protocol, a static file server on loopback, and a tiny PNG decoder. Standard library only.

Chromium is driven with `--remote-debugging-pipe`: the DevTools protocol over two inherited
pipes (the browser reads commands on fd 3 and writes replies and events on fd 4, each message a
JSON text ended by a NUL byte). No WebSocket client, no debugging port, nothing but loopback.
Every wait is bounded.
"""
from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import http.server
import itertools
import json
import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("FASTPROXY_CACHE") or os.path.expanduser("~/.cache/fastproxy"))
MQTTJS_BUNDLE = Path(os.environ.get("FASTPROXY_MQTTJS") or CACHE / "mqttjs" / "mqtt.min.js")
MISSING_HINT = "run scripts/browser-deps"


def chromium_binary() -> str | None:
    """$FASTPROXY_CHROMIUM, else chromium / chromium-browser on PATH."""
    env = os.environ.get("FASTPROXY_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if chromium_binary() is None:
        return f"headless Chromium not installed: {MISSING_HINT}"
    if not MQTTJS_BUNDLE.is_file() or MQTTJS_BUNDLE.stat().st_size == 0:
        return f"mqtt.js browser bundle missing ({MQTTJS_BUNDLE}): {MISSING_HINT}"
    return None


def spki_sha256_b64(cert_pem_path: str) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate: the value Chromium's
    --ignore-certificate-errors-spki-list takes (the certificate's public-key pin)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(Path(cert_pem_path).read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


# ----------------------------------------------------------------------------- static server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extra_files: dict[str, Path] = {}

    def log_message(self, fmt, *args):  # keep pytest's output clean
        self.server.requests.append(self.path)  # type: ignore[attr-defined]

    def send_head(self):
        path = self.path.split("?", 1)[0]
        target = self.extra_files.get(path)
        if target is None:
            return super().send_head()
        try:
            f = open(target, "rb")
        except OSError:
            self.send_error(404)
            return None
        self.send_response(200)
        self.send_header("Content-Type", "application/javascript")
        self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
        self.end_headers()
        return f

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class StaticServer:
    """Serves a directory (plus extra URL path -> file mappings) on 127.0.0.1:<free port>."""

    def __init__(self, directory: str | Path, extra_files: dict[str, Path] | None = None) -> None:
        handler = type("Handler", (_QuietHandler,), {"extra_files": dict(extra_files or {})})
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        self.httpd.daemon_threads = True
        self.httpd.requests = []  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="static-server", daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[str]:
        return list(self.httpd.requests)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


# ----------------------------------------------------------------------------- Chromium over CDP


class BrowserError(AssertionError):
    pass


class Chromium:
    """One headless Chromium with one page, driven over the DevTools protocol on pipes.

    The page's console messages and uncaught exceptions are kept in .console for diagnostics.
    """

    def __init__(self, *, width: int = 800, height: int = 600, extra_flags: list[str] | None = None,
                 timeout: float = 20.0) -> None:
        binary = chromium_binary()
        if binary is None:
            raise BrowserError(f"no chromium: {MISSING_HINT}")
        self.width, self.height = width, height
        self.profile = tempfile.mkdtemp(prefix="fpchromium")
        self.console: list[str] = []
        self._ids = itertools.count(1)
        self._replies: dict[int, "queue.Queue[dict]"] = {}
        self._lock = threading.Lock()
        self._events: "queue.Queue[dict]" = queue.Queue()
        self.stderr_path = os.path.join(self.profile, "chromium.stderr")
        cmd_r, cmd_w = os.pipe()    # we write commands -> browser's fd 3
        out_r, out_w = os.pipe()    # browser's fd 4 -> we read
        flags = [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
            "--password-store=basic", "--use-mock-keychain",
            # Loopback only: never resolve or reach anything else.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
            *(extra_flags or []),
            "about:blank",
        ]

        def child_fds() -> None:  # in the child, before exec: the pipes become its fds 3 and 4
            hi_r = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)  # out of the way first: a pipe may be fd 3 or 4
            hi_w = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(hi_r, 3)  # os.dup2 makes the copy inheritable; every other fd of ours is not
            os.dup2(hi_w, 4)

        with open(self.stderr_path, "wb") as err:
            # close_fds=False: Python's own descriptors are non-inheritable (PEP 446) and close at
            # exec anyway; with close_fds=True the child would close fds 3 and 4 after preexec_fn.
            self.proc = subprocess.Popen([binary, *flags], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         preexec_fn=child_fds, close_fds=False)
        os.close(cmd_r)
        os.close(out_w)
        self._w = os.fdopen(cmd_w, "wb", buffering=0)
        self._r = os.fdopen(out_r, "rb", buffering=0)
        self._reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self._reader.start()
        self.session: str | None = None
        try:
            targets = self.call("Target.getTargets", timeout=timeout)["targetInfos"]
            pages = [t for t in targets if t.get("type") == "page"]
            target = pages[0]["targetId"] if pages else self.call("Target.createTarget", {"url": "about:blank"})[
                "targetId"]
            self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.call("Runtime.enable")
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    # -- protocol plumbing

    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self._r.read(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self._events.put({"method": "_closed"})
                with self._lock:
                    for q in self._replies.values():
                        q.put({"error": {"message": "browser pipe closed"}})
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if "id" in msg:
                    with self._lock:
                        q = self._replies.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                else:
                    self._on_event(msg)

    def _on_event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.console.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        self._events.put(msg)

    def call(self, method: str, params: dict | None = None, *, timeout: float = 15.0,
             browser_level: bool = False) -> dict:
        """Send one command and wait (bounded) for its reply; returns its result."""
        mid = next(self._ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if self.session and not browser_level:
            msg["sessionId"] = self.session
        q: "queue.Queue[dict]" = queue.Queue()
        with self._lock:
            self._replies[mid] = q
        try:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}: {self.stderr_tail()}")
            self._w.write(json.dumps(msg).encode() + b"\0")
            try:
                reply = q.get(timeout=timeout)
            except queue.Empty:
                raise BrowserError(f"no reply to {method} within {timeout}s; {self.diag()}") from None
        finally:
            with self._lock:
                self._replies.pop(mid, None)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}; {self.diag()}")
        return reply.get("result", {})

    # -- page helpers

    def navigate(self, url: str, timeout: float = 15.0) -> None:
        """Open url and wait for its load event."""
        while not self._events.empty():
            self._events.get_nowait()
        res = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if res.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {res['errorText']}")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{url} did not load within {timeout}s; {self.diag()}")
            try:
                ev = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("method") == "Page.loadEventFired":
                return
            if ev.get("method") == "_closed":
                raise BrowserError(f"chromium went away while loading {url}; {self.diag()}")

    def evaluate(self, expression: str, timeout: float = 10.0) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, timeout=timeout)
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression!r} threw: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str = "", interval: float = 0.1) -> Any:
        """Poll a JavaScript expression until it is truthy; returns its value (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.evaluate(expression)
            if v:
                return v
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out after {timeout}s waiting for {what or expression}; {self.diag()}")
            time.sleep(interval)

    def screenshot(self, path: str | Path) -> bytes:
        """A PNG of the viewport (width x height CSS pixels at scale 1), also written to path."""
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, timeout=20)["data"])
        Path(path).write_bytes(data)
        return data

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def diag(self) -> str:
        return "page console:\n  " + "\n  ".join(self.console[-30:] or ["(nothing)"])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5, browser_level=True)
            except Exception:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self._w, self._r):
            try:
                f.close()
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


# ----------------------------------------------------------------------------- PNG


def png_decode(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows) of an 8-bit, non-interlaced greyscale/RGB/RGBA PNG;
    each row is width*channels bytes. Enough for Chromium's screenshots."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0]:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None:
        raise ValueError("no IHDR")
    width, height, depth, ctype, _comp, _filt, interlace = ihdr
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {ctype}, interlace {interlace}")
    raw = zlib.decompress(b"".join(idat))
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        off = y * (stride + 1)
        ftype, line = raw[off], bytearray(raw[off + 1:off + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
            elif ftype != 0:
                raise ValueError(f"bad filter type {ftype} in row {y}")
        rows.append(bytes(line))
        prev = line
    return width, height, channels, rows


def png_pixel(decoded: tuple[int, int, int, list[bytes]], x: int, y: int) -> tuple[int, ...]:
    """(r, g, b) of one pixel of png_decode's result."""
    width, height, channels, rows = decoded
    px = rows[y][x * channels:(x + 1) * channels]
    if channels in (1, 2):
        return (px[0], px[0], px[0])
    return tuple(px[:3])
