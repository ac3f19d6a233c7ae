"""The admin endpoint (JSON status, Prometheus metrics and the live sessions over loopback
HTTP) and the master<->worker channel.

One process: AdminServer serves the engine's status directly. Master with workers: the master's
AdminServer provider asks every worker over its WorkerLink (a socketpair made before fork) and
merges the answers with merge_worker_status. `fastproxy status` is fetch_status/status_command.
GET /metrics renders the same provider's answer (each worker's own status, kept under
"workers" by the merge) with fastproxy.metrics.render; see docs/metrics.md.
GET /sessions and POST /disconnect (the live view, `fastproxy top`) call Proxy.sessions() /
Proxy.disconnect() in one process; the master asks every worker over its link
(sessions_from_workers, disconnect_in_workers) and concatenates / sums the answers.

Nothing here runs per connection of the proxy; it is plain Python on its own threads.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Sequence, TextIO, Union, cast
from urllib.parse import parse_qs, quote, urlsplit

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
# GET /sessions: rows per answer unless ?limit= says otherwise, and the most it may ask for.
SESSIONS_LIMIT = 1000
SESSIONS_MAX = 100000
# The master waits this long for each worker's sessions / disconnect answer (the engine itself
# answers within 2 s or raises).
WORKER_TIMEOUT = 3.0

# sessions(limit, client_id): one process's rows (a list, Proxy.sessions) or a whole answer (a
# dict, the master's sessions_from_workers). disconnect(client_id, addr): a count
# (Proxy.disconnect) or a whole answer (disconnect_in_workers).
SessionsProvider = Callable[[int, Union[str, None]], Union[list, dict]]
DisconnectAction = Callable[[Union[str, None], Union[tuple, None]], Union[int, dict]]


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
        elif path == "/sessions":
            self._sessions()
        elif path == "/disconnect":
            self._reply_json(405, {"error": "method not allowed"}, {"Allow": "POST"})
        else:
            self._reply_json(404, {"error": "not found"})

    def _query(self, allowed: Sequence[str]) -> dict[str, str] | None:
        """The query string's parameters (each at most once, only those allowed); None after
        answering 400."""
        try:
            q = parse_qs(urlsplit(self.path).query, keep_blank_values=True, strict_parsing=False,
                         max_num_fields=len(allowed) + 1, errors="strict")
        except (ValueError, UnicodeDecodeError) as e:
            self._reply_json(400, {"error": f"bad query string: {e}"})
            return None
        unknown = sorted(set(q) - set(allowed))
        if unknown:
            self._reply_json(400, {"error": f"unknown parameter {unknown[0]!r} (known: {', '.join(allowed)})"})
            return None
        repeated = sorted(k for k, v in q.items() if len(v) > 1)
        if repeated:
            self._reply_json(400, {"error": f"parameter {repeated[0]!r} given more than once"})
            return None
        return {k: v[0] for k, v in q.items()}

    def _sessions(self) -> None:
        owner = cast(_HTTPServer, self.server).owner
        if owner.sessions is None:
            self._reply_json(501, {"error": "this process does not list sessions"})
            return
        q = self._query(("client_id", "limit"))
        if q is None:
            return
        limit = SESSIONS_LIMIT
        if "limit" in q:
            try:
                limit = int(q["limit"])
                if limit < 0:
                    raise ValueError
            except ValueError:
                self._reply_json(400, {"error": f"limit must be a whole number >= 0, not {q['limit'][:40]!r}"})
                return
            limit = min(limit, SESSIONS_MAX)
        try:
            doc = owner.sessions_answer(limit, q.get("client_id"))
        except Exception as e:
            log.exception("admin: the sessions could not be listed")
            self._reply_json(500, {"error": str(e) or type(e).__name__})
            return
        self._reply_json(200, doc)

    def _disconnect(self) -> None:
        owner = cast(_HTTPServer, self.server).owner
        if owner.disconnect is None:
            self._reply_json(501, {"error": "this process cannot disconnect sessions"})
            return
        q = self._query(("client_id", "addr"))
        if q is None:
            return
        addr = None
        if "addr" in q:
            try:
                addr = parse_client_addr(q["addr"])
            except ValueError as e:
                self._reply_json(400, {"error": str(e)})
                return
        client_id = q.get("client_id")
        if client_id is None and addr is None:
            self._reply_json(400, {"error": "POST /disconnect needs client_id=CLIENTID and/or addr=HOST:PORT"})
            return
        try:
            doc = owner.disconnect_answer(client_id, addr)
        except Exception as e:
            log.exception("admin: the disconnect failed")
            self._reply_json(500, {"error": str(e) or type(e).__name__})
            return
        log.info("admin: disconnect client_id=%r addr=%s: %d session(s)", client_id,
                 _display(*addr) if addr else "-", doc.get("disconnected", 0))
        self._reply_json(200, doc)

    def do_POST(self) -> None:
        # POST /reload: what SIGHUP does (`fastproxy reload --admin ADDR`). The endpoint listens
        # on loopback only; the request is answered before the reload runs.
        # POST /disconnect?client_id=X&addr=HOST:PORT ends those sessions (parameters in the URL).
        path = urlsplit(self.path).path
        if path == "/disconnect":
            self._disconnect()
            return
        if path != "/reload":
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
    the CLI's 5 s. GET /sessions?client_id=X&limit=N: sessions(limit, client_id) as
    {"sessions": [...], ...} (501 without it); POST /disconnect?client_id=X&addr=HOST:PORT:
    disconnect(client_id, addr) as {"disconnected": n}. These two may be called from several
    handler threads at once (Proxy's are safe so). POST /reload: reload(). Not
    access-controlled: bind it to loopback (the status names upstreams and counts, and
    /disconnect ends sessions). host "" means 127.0.0.1.
    """

    def __init__(self, host: str, port: int, provider: Callable[[], dict],
                 reload: Callable[[], None] | None = None, *,
                 sessions: SessionsProvider | None = None,
                 disconnect: DisconnectAction | None = None) -> None:
        self._provider = provider
        self.reload = reload
        self.sessions = sessions
        self.disconnect = disconnect
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

    def sessions_answer(self, limit: int, client_id: str | None) -> dict:
        """GET /sessions's document: {"sessions": rows (each with its process's "pid"), "count",
        "limit", "truncated" (more sessions than limit), "workers", "errors" (workers that did
        not answer)}."""
        assert self.sessions is not None
        got = self.sessions(limit + 1, client_id)  # one more than asked: says whether it was cut
        if isinstance(got, dict):
            rows = list(got.get("sessions") or [])
            workers, errors = int(got.get("workers", 1)), list(got.get("errors") or [])
        else:
            me = os.getpid()
            rows = [{**r, "pid": me} for r in got]
            workers, errors = 1, []
        truncated = len(rows) > limit
        rows = rows[:limit]
        return {"sessions": rows, "count": len(rows), "limit": limit, "truncated": truncated,
                "workers": workers, "errors": errors}

    def disconnect_answer(self, client_id: str | None, addr: tuple[str, int] | None) -> dict:
        """POST /disconnect's document: {"disconnected": n, "workers", "errors"}."""
        assert self.disconnect is not None
        got = _disconnect_any(self.disconnect, client_id, addr)
        if isinstance(got, dict):
            return {"disconnected": int(got.get("disconnected", 0)), "workers": int(got.get("workers", 1)),
                    "errors": list(got.get("errors") or [])}
        return {"disconnected": int(got), "workers": 1, "errors": []}

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


def parse_client_addr(text: str) -> tuple[str, int]:
    """A client address as /disconnect?addr= takes it: HOST:PORT or [IPv6]:PORT."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets: its port is ambiguous
    try:
        n = int(port) if sep and host else -1
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise ValueError(f"addr must be HOST:PORT (IPv6: [HOST]:PORT), not {text[:60]!r}")
    return host, n


def _disconnect_any(action: DisconnectAction, client_id: str | None,
                    addr: tuple[str, int] | None) -> int | dict:
    """action(client_id, addr); an IPv4 address that matched nothing is tried again as the
    IPv4-mapped IPv6 address a dual-stack listener sees (Proxy.sessions shows it as IPv4)."""
    got = action(client_id, addr)
    if isinstance(got, int) and got == 0 and addr is not None and addr[0].count(".") == 3 \
            and ":" not in addr[0]:
        got = action(client_id, ("::ffff:" + addr[0], addr[1]))
    return got


# ----------------------------------------------------------------------------- client


def fetch_status(address: str, timeout: float = 5.0) -> dict:
    """GET /status from a running fastproxy's admin endpoint; AdminError says why it could not."""
    return admin_request(address, "GET", "/status", timeout)


def fetch_sessions(address: str, *, client_id: str | None = None, limit: int | None = None,
                   timeout: float = 5.0) -> dict:
    """GET /sessions: {"sessions": [...], "count", "limit", "truncated", "workers", "errors"}."""
    params = []
    if client_id is not None:
        params.append("client_id=" + quote(client_id, safe=""))
    if limit is not None:
        params.append(f"limit={int(limit)}")
    doc = admin_request(address, "GET", "/sessions" + ("?" + "&".join(params) if params else ""), timeout)
    if not isinstance(doc.get("sessions"), list):
        raise AdminError(f"the admin endpoint at {address} answered no session list (is it fastproxy's?)")
    return doc


def request_disconnect(address: str, *, client_id: str | None = None, addr: tuple[str, int] | None = None,
                       timeout: float = 5.0) -> int:
    """POST /disconnect: end the sessions of this ClientId and/or client address; how many."""
    params = []
    if client_id is not None:
        params.append("client_id=" + quote(client_id, safe=""))
    if addr is not None:
        params.append("addr=" + quote(_display(addr[0], int(addr[1])), safe=""))
    if not params:
        raise ValueError("request_disconnect needs client_id and/or addr")
    doc = admin_request(address, "POST", "/disconnect?" + "&".join(params), timeout)
    return int(doc.get("disconnected", 0))


def admin_request(address: str, method: str, path: str, timeout: float = 5.0) -> dict:
    """One request to a running fastproxy's admin endpoint; its JSON object answer, or
    AdminError saying why not."""
    try:
        a = parse_admin_address(address)
    except ValueError as e:
        raise AdminError(f"bad admin address {address!r}: {e}") from None
    host, port = a.host, a.port
    where = _display(host, port)
    unreachable = f"cannot reach the admin endpoint at {where}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers={"Accept": "application/json"})
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
_MAX_REQUEST = 1 << 20  # a request line (a ClientId of 65535 bytes, JSON-escaped, fits)
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)  # a dead peer is EPIPE, never SIGPIPE


class WorkerLink:
    """One master<->worker status channel over a socketpair (created before fork).

    Protocol: the master writes one request line, the worker answers one line of JSON per
    request, in order. Requests: b"status" (the provider's status), or a JSON object
    {"op": "sessions", "limit": N, "client_id": X or null} (answer {"sessions": [...]}) or
    {"op": "disconnect", "client_id": X or null, "addr": [HOST, PORT] or null} (answer
    {"disconnected": n}); anything else, or an op the worker was given no function for, is
    answered {"error": ...}. A late answer is not lost or mistaken: ask() counts the requests still unanswered
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

    def serve(self, provider: Callable[[], dict], *, sessions: Callable[[int, str | None], list] | None = None,
              disconnect: Callable[[str | None, tuple | None], int] | None = None) -> threading.Thread:
        """Answer the master's requests on a daemon thread: status from provider(), the live
        sessions from sessions(limit, client_id) (Proxy.sessions), disconnect(client_id, addr)
        (Proxy.disconnect)."""
        sock = self._worker
        if sock is None:
            raise AdminError("WorkerLink.serve needs the worker end (call it in the worker)")
        sock.settimeout(None)
        t = threading.Thread(target=self._serve, args=(sock, provider, sessions, disconnect),
                             name="fastproxy-status-link", daemon=True)
        t.start()
        return t

    @staticmethod
    def _answer(request: bytes, provider: Callable[[], dict],
                sessions: Callable[[int, str | None], list] | None = None,
                disconnect: Callable[[str | None, tuple | None], int] | None = None) -> bytes:
        what = "status provider"
        try:
            if request == _REQUEST.strip():
                answer: Any = provider()
            else:
                try:
                    req = json.loads(request) if request.startswith(b"{") else None
                except ValueError:
                    req = None
                if not isinstance(req, dict):
                    req = {}
                op = req.get("op")
                if op == "sessions" and sessions is not None:
                    what = "sessions listing"
                    limit, cid = req.get("limit"), req.get("client_id")
                    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0 \
                            or not (cid is None or isinstance(cid, str)):
                        raise ValueError("bad sessions request")
                    answer = {"sessions": sessions(min(limit, SESSIONS_MAX + 1), cid)}
                elif op == "disconnect" and disconnect is not None:
                    what = "disconnect"
                    cid, addr = req.get("client_id"), req.get("addr")
                    if not (cid is None or isinstance(cid, str)) or not (
                            addr is None or (isinstance(addr, list) and len(addr) == 2
                                             and isinstance(addr[0], str) and isinstance(addr[1], int))):
                        raise ValueError("bad disconnect request")
                    answer = {"disconnected": _disconnect_any(disconnect, cid, None if addr is None else tuple(addr))}
                else:
                    return json.dumps({"error": f"unknown request {request[:40]!r}"}).encode() + b"\n"
            # No indent: JSON without indent has no raw newline, so one answer is one line.
            return json.dumps(answer).encode() + b"\n"
        except Exception as e:
            log.exception("worker: the %s failed", what)
            return json.dumps({"error": str(e) or type(e).__name__}).encode() + b"\n"

    @classmethod
    def _serve(cls, sock: socket.socket, provider: Callable[[], dict],
               sessions: Callable[[int, str | None], list] | None = None,
               disconnect: Callable[[str | None, tuple | None], int] | None = None) -> None:
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
                    sock.sendall(cls._answer(request, provider, sessions, disconnect), _SEND_FLAGS)
                except OSError:
                    return
            if len(buf) > _MAX_REQUEST:
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
        return self._ask(_REQUEST, timeout)

    def ask_sessions(self, limit: int, client_id: str | None = None, timeout: float = WORKER_TIMEOUT) -> dict | None:
        """The worker's {"sessions": [...]} (or {"error": ...}); None as for ask()."""
        return self._ask(_op_line({"op": "sessions", "limit": int(limit), "client_id": client_id}), timeout)

    def ask_disconnect(self, client_id: str | None = None, addr: tuple[str, int] | None = None,
                       timeout: float = WORKER_TIMEOUT) -> dict | None:
        """Have the worker end these sessions: {"disconnected": n} (or {"error": ...}); None as
        for ask()."""
        return self._ask(_op_line({"op": "disconnect", "client_id": client_id,
                                   "addr": None if addr is None else [addr[0], int(addr[1])]}), timeout)

    def _ask(self, request: bytes, timeout: float) -> dict | None:
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
                sock.sendall(request, _SEND_FLAGS)
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


def _op_line(req: dict) -> bytes:
    # ensure_ascii: any ClientId becomes one line of ASCII (no raw newline inside)
    return json.dumps(req, ensure_ascii=True).encode() + b"\n"


def ask_all(links: Sequence[WorkerLink], timeout: float = 2.0) -> list[dict | None]:
    """link.ask() for every link at once: the whole call takes at most about timeout."""
    return _each(links, lambda link: link.ask(timeout), timeout)


def sessions_from_workers(links: Mapping[int, WorkerLink], limit: int, client_id: str | None = None,
                          timeout: float = WORKER_TIMEOUT) -> dict:
    """The master's GET /sessions: every worker's sessions (asked at once), concatenated, each
    row with its worker's "pid" (at most limit per worker; AdminServer cuts the total);
    "errors" names the workers that did not answer."""
    items = sorted(list(links.items()))
    answers = _each([link for _, link in items], lambda link: link.ask_sessions(limit, client_id, timeout), timeout)
    rows: list[dict] = []
    errors: list[dict] = []
    for (pid, _), a in zip(items, answers):
        got = a.get("sessions") if isinstance(a, dict) else None
        if not isinstance(got, list):
            errors.append({"pid": pid, "error": str(a.get("error", "bad answer")) if isinstance(a, dict) else "no answer"})
            continue
        rows += [{**r, "pid": pid} for r in got if isinstance(r, dict)]
    return {"sessions": rows, "workers": len(items), "errors": errors}


def disconnect_in_workers(links: Mapping[int, WorkerLink], client_id: str | None = None,
                          addr: tuple[str, int] | None = None, timeout: float = WORKER_TIMEOUT) -> dict:
    """The master's POST /disconnect: every worker ends its matching sessions; the counts summed."""
    items = sorted(list(links.items()))
    answers = _each([link for _, link in items], lambda link: link.ask_disconnect(client_id, addr, timeout), timeout)
    n = 0
    errors: list[dict] = []
    for (pid, _), a in zip(items, answers):
        got = a.get("disconnected") if isinstance(a, dict) else None
        if not isinstance(got, int) or isinstance(got, bool):
            errors.append({"pid": pid, "error": str(a.get("error", "bad answer")) if isinstance(a, dict) else "no answer"})
            continue
        n += got
    return {"disconnected": n, "workers": len(items), "errors": errors}


def _each(links: Sequence[WorkerLink], ask: Callable[[WorkerLink], dict | None], timeout: float) -> list[dict | None]:
    """ask(link) for every link at once, each on its own thread; None for one that has not
    answered within about timeout."""
    results: list[dict | None] = [None] * len(links)

    def one(i: int) -> None:
        results[i] = ask(links[i])

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
