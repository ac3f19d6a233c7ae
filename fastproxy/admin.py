"""The admin endpoint (JSON status and Prometheus metrics over loopback HTTP) and the
master<->worker status channel.

One process: AdminServer serves the engine's status directly. Master with workers: the master's
AdminServer provider asks every worker over its WorkerLink (a socketpair made before fork) and
merges the answers with merge_worker_status. `fastproxy status` is fetch_status/status_command.
GET /metrics renders the same provider's answer (each worker's own status, kept under
"workers" by the merge) with fastproxy.metrics.render; see docs/metrics.md.

Nothing here runs per connection of the proxy; it is plain Python on its own threads.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence, TextIO, cast
from urllib.parse import urlsplit

from .config import parse_admin_address
from .errors import FastproxyError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render as render_metrics

log = logging.getLogger("fastproxy")

# A request's head (request line and headers) must be complete within this many seconds, in
# total: a client trickling a byte at a time cannot hold a handler thread longer.
REQUEST_TIMEOUT = 5.0
# Handler threads at once; connections beyond are closed at accept, so a local flood of idle
# connections costs at most this many threads (each for at most REQUEST_TIMEOUT).
MAX_CONNECTIONS = 128
_MAX_HEAD = 16 * 1024
_DEFAULT_HOST = "127.0.0.1"


class AdminError(FastproxyError):
    """The admin endpoint cannot be reached or gave an unusable answer (fetch_status)."""


def _display(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _json_body(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# ----------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive
    default_request_version = "HTTP/1.0"  # answer even a malformed request with headers

    def setup(self) -> None:
        super().setup()
        owner = cast(_HTTPServer, self.server).owner
        # Read the whole head up front under one deadline, then parse from memory: the stock
        # handler's per-recv timeout alone would let a trickling client stay forever.
        self.rfile.close()
        self.rfile = io.BytesIO(self._read_head(owner.request_timeout))
        self.connection.settimeout(owner.request_timeout)  # for writing the answer

    def version_string(self) -> str:
        return "fastproxy-admin"

    def _read_head(self, limit: float) -> bytes:
        deadline = time.monotonic() + limit
        buf = b""
        while b"\r\n\r\n" not in buf and b"\n\n" not in buf and len(buf) <= _MAX_HEAD:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return b""  # too slow: close without an answer
            self.connection.settimeout(remaining)
            try:
                chunk = self.connection.recv(4096)
            except OSError:  # TimeoutError included
                return b""
            if not chunk:
                break  # client half-closed: answer what it sent
            buf += chunk
        return buf if len(buf) <= _MAX_HEAD else b""  # oversized: not a status request, close

    def _reply(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reply_json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._reply(code, _json_body(obj), "application/json", headers)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path in ("/status", "/"):
            owner = cast(_HTTPServer, self.server).owner
            try:
                body = owner._status_body()
            except Exception as e:
                log.exception("admin: the status provider failed")
                self._reply_json(500, {"error": str(e) or type(e).__name__})
                return
            self._reply(200, body, "application/json")
        elif path == "/metrics":
            owner = cast(_HTTPServer, self.server).owner
            try:
                body = owner._metrics_body()
            except Exception as e:
                log.exception("admin: the metrics could not be rendered")
                self._reply_json(500, {"error": str(e) or type(e).__name__})
                return
            self._reply(200, body, METRICS_CONTENT_TYPE)
        elif path == "/health":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        else:
            self._reply_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        # POST /reload: what SIGHUP does (`fastproxy reload --admin ADDR`). The endpoint listens
        # on loopback only; the request is answered before the reload runs.
        if urlsplit(self.path).path != "/reload":
            self._not_allowed()
            return
        owner = cast(_HTTPServer, self.server).owner
        if owner.reload is None:
            self._reply_json(501, {"error": "this process cannot reload"})
            return
        self._reply_json(202, {"reload": "requested"})
        owner.reload()

    def _not_allowed(self) -> None:
        self._reply_json(405, {"error": "method not allowed"}, {"Allow": "GET"})

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed requests (400, 414, 431, 501) get JSON like everything else, not HTML.
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.close_connection = True
        self._reply_json(code, {"error": message or phrase})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no per-request lines on stderr; the proxy's own logs are elsewhere

    def log_error(self, format: str, *args: Any) -> None:
        log.debug("admin: " + format, *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never delays shutdown
    request_queue_size = 16

    def __init__(self, addr: tuple[str, int], family: int, owner: AdminServer) -> None:
        self.address_family = family
        self.owner = owner
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # HTTPServer.server_bind would call socket.getfqdn (a DNS lookup) for nothing.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client that went away is not news.
        log.debug("admin: error while answering %s", client_address, exc_info=True)


class AdminServer:
    """HTTP/1.0 JSON on a loopback TCP address, served by one daemon thread.

    That thread accepts; each connection is answered on a short-lived daemon thread of its
    own (at most MAX_CONNECTIONS, each for at most request_timeout seconds), so an idle
    client does not delay the others. GET /status (or /): provider() as JSON. GET /metrics:
    provider() in the Prometheus text format (metrics_text). GET /health: "ok". provider()
    is called on a handler thread, never two calls at once, and should answer well within
    the CLI's 5 s. Not access-controlled: bind it to loopback (the status
    names upstreams and counts). host "" means 127.0.0.1.
    """

    def __init__(self, host: str, port: int, provider: Callable[[], dict],
                 reload: Callable[[], None] | None = None) -> None:
        self._provider = provider
        self.reload = reload
        self._provider_lock = threading.Lock()
        self.request_timeout = REQUEST_TIMEOUT
        self._thread: threading.Thread | None = None
        self._stopped = False
        host = host or _DEFAULT_HOST  # like fetch_status: ":port" is loopback, not every address
        where = _display(host, port)
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            self._server = _HTTPServer((str(sockaddr[0]), int(sockaddr[1])), family, self)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen for the admin endpoint on {where}: {e.strerror or e}") from None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _status_body(self) -> bytes:
        with self._provider_lock:  # providers need not be thread-safe against themselves
            return _json_body(self._provider())

    def _metrics_body(self) -> bytes:
        with self._provider_lock:
            status = self._provider()
        return metrics_text(status).encode("utf-8")

    def start(self) -> AdminServer:
        if self._thread is not None or self._stopped:
            raise AdminError("the admin endpoint was already started")
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="fastproxy-admin", daemon=True
        )
        self._thread.start()
        log.info("admin endpoint on http://%s/status (metrics: /metrics)", _display(*self.address))
        return self

    def stop(self) -> None:
        """Stop accepting and close the socket; returns within about a second.

        Requests already being answered finish on their own daemon threads (bounded by
        request_timeout); they do not delay stop().
        """
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._server.shutdown()  # the loop notices within poll_interval
            self._thread.join(timeout=2.0)
        self._server.server_close()

    def __enter__(self) -> AdminServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metrics_text(status: dict) -> str:
    """/metrics for a status as the provider gives it: one process's Proxy.status(), or the
    master's merge_worker_status() answer, whose "workers" hold each worker's own status
    (with its metrics snapshot); those are summed, a worker that did not answer is counted in
    fastproxy_workers_missing."""
    workers = status.get("workers") if isinstance(status, dict) else None
    if isinstance(workers, list):
        per = [w for w in workers if isinstance(w, dict) and "error" not in w]
        missing = len(workers) - len(per)
    else:
        per, missing = [status], 0
    return render_metrics([w.get("metrics") for w in per], per, missing_workers=missing)


# ----------------------------------------------------------------------------- client


def fetch_status(address: str, timeout: float = 5.0) -> dict:
    """GET /status from a running fastproxy's admin endpoint; AdminError says why it could not."""
    try:
        a = parse_admin_address(address)
    except ValueError as e:
        raise AdminError(f"bad admin address {address!r}: {e}") from None
    host, port = a.host, a.port
    where = _display(host, port)
    unreachable = f"cannot reach the admin endpoint at {where}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/status", headers={"Accept": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
    except ConnectionRefusedError:
        raise AdminError(
            f"{unreachable}: connection refused (is fastproxy serve running with --admin {where}?)"
        ) from None
    except TimeoutError:
        raise AdminError(f"{unreachable}: timed out after {timeout:g} s without an answer") from None
    except socket.gaierror as e:
        raise AdminError(f"{unreachable}: cannot resolve {host!r}: {e.strerror}") from None
    except http.client.HTTPException as e:
        raise AdminError(f"{unreachable}: not an HTTP answer ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise AdminError(f"{unreachable}: {e.strerror or e}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if resp.status != 200:
        detail = doc.get("error") if isinstance(doc, dict) else None
        raise AdminError(f"the admin endpoint at {where} answered HTTP {resp.status}: {detail or resp.reason}")
    if not isinstance(doc, dict):
        raise AdminError(f"the admin endpoint at {where} did not answer a JSON object (is it fastproxy's?)")
    return doc


def status_command(address: str, *, timeout: float = 5.0, out: TextIO | None = None) -> int:
    """`fastproxy status`: print the status JSON and return 0, or print why not and return 1.

    out defaults to sys.stdout as it is at call time (not at import, so redirections count).
    """
    out = sys.stdout if out is None else out
    try:
        status = fetch_status(address, timeout)
    except AdminError as e:
        print(f"fastproxy status: {e}", file=sys.stderr)
        return 1
    out.write(json.dumps(status, indent=1, sort_keys=True) + "\n")
    out.flush()
    return 0


# ----------------------------------------------------------------------------- master <-> worker

_REQUEST = b"status\n"
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)  # a dead peer is EPIPE, never SIGPIPE


class WorkerLink:
    """One master<->worker status channel over a socketpair (created before fork).

    Protocol: the master writes b"status\\n", the worker answers one line of JSON per request,
    in order. A late answer is not lost or mistaken: ask() counts the requests still unanswered
    and, on the next call, reads and drops their answers before taking its own. So a worker
    that was slow once answers again next time; a hung one costs each ask() its full timeout
    (ask_all asks every worker at once, so that is one timeout per status request, not N).
    A worker that is gone (EOF, reset, broken pipe) closes the link; later asks return None
    at once.

    After fork the child calls in_worker() on its own link and close() on every other
    worker's link it inherited (else a dead worker's end stays open in its siblings and the
    master waits for a timeout instead of seeing EOF); the master calls in_master() on each.
    """

    def __init__(self) -> None:
        self._master: socket.socket | None
        self._worker: socket.socket | None
        self._master, self._worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lock = threading.Lock()  # one ask at a time: two would read each other's lines
        self._buf = bytearray()
        self._pending = 0  # requests sent whose answers were not read yet

    @staticmethod
    def _close_sock(sock: socket.socket | None) -> None:
        # close, never shutdown: after fork the other process holds the same socket, and a
        # shutdown would cut the link for it too.
        if sock is not None:
            sock.close()

    def in_worker(self) -> None:
        self._close_sock(self._master)
        self._master = None

    def in_master(self) -> None:
        self._close_sock(self._worker)
        self._worker = None

    def close(self) -> None:
        # The master end first: a serve thread of this process blocked on the worker end then
        # sees EOF (when no other process still holds the master end) and ends.
        self._close_sock(self._master)
        self._close_sock(self._worker)
        self._master = self._worker = None

    # --- worker side

    def serve(self, provider: Callable[[], dict]) -> threading.Thread:
        sock = self._worker
        if sock is None:
            raise AdminError("WorkerLink.serve needs the worker end (call it in the worker)")
        sock.settimeout(None)
        t = threading.Thread(target=self._serve, args=(sock, provider), name="fastproxy-status-link", daemon=True)
        t.start()
        return t

    @staticmethod
    def _answer(request: bytes, provider: Callable[[], dict]) -> bytes:
        if request != _REQUEST.strip():
            return json.dumps({"error": f"unknown request {request[:40]!r}"}).encode() + b"\n"
        try:
            # No indent: JSON without indent has no raw newline, so one answer is one line.
            return json.dumps(provider()).encode() + b"\n"
        except Exception as e:
            log.exception("worker: the status provider failed")
            return json.dumps({"error": str(e) or type(e).__name__}).encode() + b"\n"

    @classmethod
    def _serve(cls, sock: socket.socket, provider: Callable[[], dict]) -> None:
        buf = bytearray()
        while True:
            try:
                chunk = sock.recv(4096)
            except OSError:
                return
            if not chunk:
                return  # the master end closed: master gone or link closed
            buf += chunk
            while (i := buf.find(b"\n")) >= 0:
                request = bytes(buf[:i]).strip()
                del buf[: i + 1]
                try:
                    sock.sendall(cls._answer(request, provider), _SEND_FLAGS)
                except OSError:
                    return
            if len(buf) > 4096:
                return  # not our protocol

    # --- master side

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes | None:
        """The next answer line, or None if the deadline passes; EOFError if the worker is gone."""
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                return None
            if not chunk:
                raise EOFError
            self._buf += chunk

    def ask(self, timeout: float = 2.0) -> dict | None:
        """The worker's status, or None if it is gone or has not answered within timeout."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=max(timeout, 0.0)):
            return None
        try:
            sock = self._master
            if sock is None:
                return None
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                # A send that times out may have written part of the line: treat as gone.
                sock.sendall(_REQUEST, _SEND_FLAGS)
                self._pending += 1
                line = b""
                while self._pending:
                    got = self._read_line(sock, deadline)
                    if got is None:
                        return None  # slow: its answer is dropped by a later ask
                    self._pending -= 1
                    line = got  # answers come in order: the last one is ours
            except (OSError, EOFError):
                self._close_sock(sock)
                self._master = None
                return None
            try:
                answer = json.loads(line)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                log.warning("worker status link: not a JSON object: %.80r", line)
                return None
            return answer
        finally:
            self._lock.release()


def ask_all(links: Sequence[WorkerLink], timeout: float = 2.0) -> list[dict | None]:
    """link.ask() for every link at once: the whole call takes at most about timeout."""
    results: list[dict | None] = [None] * len(links)

    def one(i: int) -> None:
        results[i] = links[i].ask(timeout)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(links))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 0.5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return list(results)


# ----------------------------------------------------------------------------- merging


def _merge_entry(acc: dict, entry: dict) -> None:
    """Fold one worker's entry into acc: ints summed, bools OR-ed, anything else first-seen."""
    for k, v in entry.items():
        if k not in acc:
            acc[k] = v
        elif isinstance(v, bool):
            if isinstance(acc[k], bool):
                acc[k] = acc[k] or v
        elif isinstance(v, int):
            if isinstance(acc[k], int) and not isinstance(acc[k], bool):
                acc[k] += v


def _dicts(value: Any) -> list[dict]:
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def merge_worker_status(per_worker: Sequence[tuple[int, dict | None]]) -> dict:
    """One status for the whole master from each worker's (pid, status or None).

    listeners are merged by name, servers by (pool, server), counters by key: ints summed,
    bools OR-ed, other values (strings, floats such as timestamps) from the first worker that
    has the entry. A server's "up" is true only if every answering worker that has it says
    so; "up_in_workers" counts those that do. Each worker's own status is kept under
    "workers" ({"pid", "error": "no answer"} for a worker that did not answer).
    """
    workers: list[dict] = []
    listeners: dict[Any, dict] = {}
    servers: dict[tuple[Any, Any], dict] = {}
    counters: dict[str, Any] = {}
    for pid, status in per_worker:
        if status is None:
            workers.append({"pid": pid, "error": "no answer"})
            continue
        workers.append({**status, "pid": pid})  # the master's pid for it is the authority
        for entry in _dicts(status.get("listeners")):
            key = entry.get("name")
            if key not in listeners:
                listeners[key] = {}
            _merge_entry(listeners[key], entry)
        for entry in _dicts(status.get("servers")):
            skey = (entry.get("pool"), entry.get("server"))
            up = bool(entry.get("up", False))
            acc = servers.get(skey)
            if acc is None:
                acc = servers[skey] = {"up": up, "up_in_workers": 0}
            _merge_entry(acc, {k: v for k, v in entry.items() if k not in ("up", "up_in_workers")})
            acc["up"] = acc["up"] and up
            acc["up_in_workers"] += int(up)
        c = status.get("counters")
        if isinstance(c, dict):
            _merge_entry(counters, c)
    return {
        "workers": workers,
        "listeners": list(listeners.values()),
        "servers": list(servers.values()),
        "counters": counters,
    }
