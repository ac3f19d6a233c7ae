"""The admin endpoint, `fastproxy status`, the master<->worker status link and the merge.

Real sockets on loopback, a real fork for the worker link; every wait is bounded.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import signal
import socket
import threading
import time

import pytest

from fastproxy.admin import (
    AdminError,
    AdminServer,
    WorkerLink,
    ask_all,
    fetch_status,
    merge_worker_status,
    status_command,
)
from fastproxy.errors import FastproxyError


@pytest.fixture
def served():
    """Start AdminServer(s) on 127.0.0.1:0 and stop them at the end."""
    servers: list[AdminServer] = []

    def make(provider, host="127.0.0.1"):
        srv = AdminServer(host, 0, provider).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()


def addr(srv: AdminServer) -> str:
    host, port = srv.address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request(srv: AdminServer, method: str, path: str) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection(*srv.address, timeout=3)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


class Counting:
    def __init__(self):
        self.n = 0

    def __call__(self) -> dict:
        self.n += 1
        return {"calls": self.n, "listeners": [{"name": "l0", "accepted": self.n}]}


# ----------------------------------------------------------------------------- AdminServer


def test_status_is_the_providers_current_value(served):
    srv = served(Counting())
    assert srv.address[0] == "127.0.0.1" and srv.address[1] > 0
    assert fetch_status(addr(srv))["calls"] == 1
    assert fetch_status(addr(srv))["calls"] == 2
    assert fetch_status(str(srv.address[1]))["calls"] == 3  # bare port means 127.0.0.1
    resp, body = request(srv, "GET", "/")
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
    doc = json.loads(body)
    assert doc["calls"] == 4
    assert body == (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    resp, body = request(srv, "GET", "/status?x=1")
    assert resp.status == 200 and json.loads(body)["calls"] == 5


def test_health_404_405(served):
    srv = served(lambda: {})
    resp, body = request(srv, "GET", "/health")
    assert (resp.status, body) == (200, b"ok\n")
    assert resp.getheader("Content-Type").startswith("text/plain")
    resp, body = request(srv, "GET", "/nope")
    assert resp.status == 404 and json.loads(body) == {"error": "not found"}
    assert resp.getheader("Content-Type") == "application/json"
    for method in ("POST", "PUT", "DELETE"):
        resp, body = request(srv, method, "/status")
        assert resp.status == 405 and json.loads(body) == {"error": "method not allowed"}
        assert resp.getheader("Allow") == "GET"
    resp, body = request(srv, "HEAD", "/status")
    assert resp.status == 405 and body == b""


def test_provider_error_is_500_and_logged_and_server_goes_on(served):
    calls = []

    def provider() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("engine state unavailable")
        return {"ok": True}

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("fastproxy")
    logger.addHandler(handler)
    try:
        srv = served(provider)
        resp, body = request(srv, "GET", "/status")
    finally:
        logger.removeHandler(handler)
    assert resp.status == 500 and json.loads(body) == {"error": "engine state unavailable"}
    assert b"Traceback" not in body
    assert any(r.exc_info and "engine state unavailable" in str(r.exc_info[1]) for r in records)
    assert fetch_status(addr(srv)) == {"ok": True}
    with pytest.raises(AdminError, match="HTTP 500: boom"):
        srv._provider = lambda: (_ for _ in ()).throw(ValueError("boom"))
        logging.getLogger("fastproxy").disabled = True
        try:
            fetch_status(addr(srv))
        finally:
            logging.getLogger("fastproxy").disabled = False


def test_unserialisable_status_is_500(served):
    srv = served(lambda: {"x": object()})
    resp, body = request(srv, "GET", "/status")
    assert resp.status == 500 and "not JSON serializable" in json.loads(body)["error"]


def test_bind_error_names_the_address():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            AdminServer("127.0.0.1", port, dict)


def test_stop_is_bounded_and_idempotent():
    srv = AdminServer("127.0.0.1", 0, dict).start()
    port = srv.address[1]
    t0 = time.monotonic()
    srv.stop()
    srv.stop()
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(AdminError, match="refused"):
        fetch_status(f"127.0.0.1:{port}", timeout=1)
    AdminServer("127.0.0.1", 0, dict).stop()  # never started: returns at once


def test_ipv6_loopback(served):
    try:
        srv = served(lambda: {"v6": True}, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert srv.address[0] == "::1"
    assert fetch_status(addr(srv)) == {"v6": True}


def test_silent_client_does_not_block_others(served):
    srv = served(lambda: {"up": 1})
    with socket.create_connection(srv.address, timeout=3) as idle, \
            socket.create_connection(srv.address, timeout=3) as partial:
        partial.sendall(b"GET /sta")
        time.sleep(0.1)
        t0 = time.monotonic()
        assert fetch_status(addr(srv), timeout=2) == {"up": 1}
        assert time.monotonic() - t0 < 2
        del idle


def test_trickling_client_is_cut_at_the_deadline(served):
    srv = served(lambda: {})
    srv.request_timeout = 0.5
    with socket.create_connection(srv.address, timeout=3) as s:
        t0 = time.monotonic()
        closed = False
        for ch in b"GET /status HTTP/1.0\r\nX-Slow: " + b"a" * 40:
            try:
                s.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            s.settimeout(0.1)
            try:
                if s.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
        assert closed, "the server kept a trickling client beyond its request timeout"
        assert time.monotonic() - t0 < 2.5


def test_malformed_and_unknown_requests_get_json_errors(served):
    srv = served(dict)

    def raw(data: bytes, half_close: bool = False) -> bytes:
        with socket.create_connection(srv.address, timeout=3) as s:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out

    out = raw(b"garbage\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 400 ") and b"application/json" in out
    out = raw(b"FOO /status HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.0 501 ") and b"Server: fastproxy-admin\r\n" in out
    assert raw(b"GET /" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n") == b""  # oversized head: closed
    # a client that sends its request and half-closes still gets the answer
    assert raw(b"GET /health HTTP/1.0\r\n", half_close=True).endswith(b"\r\n\r\nok\n")


def test_connection_cap(served, monkeypatch):
    import fastproxy.admin as admin

    monkeypatch.setattr(admin, "MAX_CONNECTIONS", 2)
    srv = served(lambda: {"ok": 1})
    idle = [socket.create_connection(srv.address, timeout=3) for _ in range(2)]
    try:
        time.sleep(0.2)  # both accepted and holding their slots
        with socket.create_connection(srv.address, timeout=3) as extra:
            extra.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            try:
                assert extra.recv(100) == b""  # closed at accept, not queued
            except ConnectionResetError:
                pass
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 2  # the slots come back as soon as the idle clients leave
    while True:
        try:
            assert fetch_status(addr(srv), timeout=1) == {"ok": 1}
            break
        except AdminError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# ----------------------------------------------------------------------------- fetch_status / status_command


def test_fetch_closed_port_names_the_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(AdminError) as ei:
        fetch_status(f"127.0.0.1:{port}", timeout=1)
    msg = str(ei.value)
    assert f"127.0.0.1:{port}" in msg and "connection refused" in msg and "\n" not in msg
    assert isinstance(ei.value, FastproxyError)


def test_fetch_from_a_silent_server_times_out():
    with socket.socket() as held:  # accepts (in the backlog) but never answers
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(AdminError, match="timed out") as ei:
            fetch_status(f"127.0.0.1:{port}", timeout=0.5)
        assert time.monotonic() - t0 < 2
        assert f"127.0.0.1:{port}" in str(ei.value)


def one_shot_server(answer: bytes) -> tuple[int, threading.Thread, socket.socket]:
    """A listener that answers one connection with fixed bytes (a non-fastproxy server)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    lst.settimeout(3)

    def run() -> None:
        try:
            c, _ = lst.accept()
        except OSError:
            return
        with c:
            c.settimeout(3)
            try:
                c.recv(4096)
                c.sendall(answer)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lst.getsockname()[1], t, lst


@pytest.mark.parametrize("answer, expected", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nnot json", "JSON object"),
    (b"HTTP/1.0 200 OK\r\n\r\n[1, 2]", "JSON object"),
    (b"SSH-2.0-OpenSSH\r\n", "not an HTTP answer"),
    (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", "HTTP 503: Service Unavailable"),
])
def test_fetch_unusable_answers(answer, expected):
    port, t, lst = one_shot_server(answer)
    try:
        with pytest.raises(AdminError, match=expected) as ei:
            fetch_status(f"127.0.0.1:{port}", timeout=2)
        assert f"127.0.0.1:{port}" in str(ei.value)
    finally:
        t.join(3)
        lst.close()


@pytest.mark.parametrize("bad", ["", "host", "::1:80", "[::1]80", "127.0.0.1:0", "127.0.0.1:99999", "x:y"])
def test_fetch_bad_address(bad):
    with pytest.raises(AdminError, match="bad admin address"):
        fetch_status(bad)


def test_status_command_prints_json(served, capsys):
    srv = served(lambda: {"b": 2, "a": {"z": 1}})
    out = io.StringIO()
    assert status_command(addr(srv), out=out) == 0
    assert json.loads(out.getvalue()) == {"a": {"z": 1}, "b": 2}
    assert out.getvalue() == json.dumps({"a": {"z": 1}, "b": 2}, indent=1, sort_keys=True) + "\n"
    assert status_command(addr(srv)) == 0  # default: sys.stdout
    assert json.loads(capsys.readouterr().out) == {"a": {"z": 1}, "b": 2}


def test_status_command_error(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = io.StringIO()
    assert status_command(str(port), timeout=1, out=out) == 1
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert err.startswith("fastproxy status: cannot reach the admin endpoint at 127.0.0.1:")
    assert err.count("\n") == 1


# ----------------------------------------------------------------------------- WorkerLink


def wait_exit(pid: int, limit: float = 5.0) -> int | None:
    """The child's exit code, or None if it has not exited within limit (then it is killed)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(st)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def fork_worker(link: WorkerLink) -> int:
    """A child that serves its pid over link until the master end closes (at most 10 s)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            link.in_worker()
            me = os.getpid()
            t = link.serve(lambda: {"pid": me, "listeners": [{"name": "l0", "accepted": 1}]})
            t.join(10)
            code = 0 if not t.is_alive() else 2
        finally:
            os._exit(code)
    link.in_master()
    return pid


def test_worker_link_across_fork():
    link = WorkerLink()
    pid = fork_worker(link)
    try:
        st = link.ask(timeout=3)
        assert st is not None and st["pid"] == pid and st["listeners"][0]["accepted"] == 1
        assert link.ask(timeout=3) == st  # repeatable
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
        t0 = time.monotonic()
        assert link.ask(timeout=1.0) is None
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert link.ask(timeout=1.0) is None  # the link is closed now: at once
        assert time.monotonic() - t0 < 0.2
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        link.close()


def test_worker_exits_its_serve_thread_when_the_master_closes():
    link = WorkerLink()
    pid = fork_worker(link)
    assert link.ask(timeout=3) is not None
    link.close()
    assert wait_exit(pid) == 0  # serve's thread saw EOF and ended


def test_worker_provider_error_is_an_answer():
    link = WorkerLink()
    try:
        link.serve(lambda: (_ for _ in ()).throw(KeyError("listener0")))
        logging.getLogger("fastproxy").disabled = True
        try:
            assert link.ask(timeout=2) == {"error": "'listener0'"}
        finally:
            logging.getLogger("fastproxy").disabled = False
    finally:
        link.close()


def test_late_answer_is_drained_not_mistaken():
    release = threading.Event()
    n = [0]

    def provider() -> dict:
        n[0] += 1
        if n[0] == 1:
            release.wait(3)
        return {"n": n[0]}

    link = WorkerLink()
    try:
        link.serve(provider)
        t0 = time.monotonic()
        assert link.ask(timeout=0.3) is None  # slow
        assert time.monotonic() - t0 < 1
        release.set()
        assert link.ask(timeout=2) == {"n": 2}  # answer 1 dropped, answer 2 is ours
        assert link.ask(timeout=2) == {"n": 3}
    finally:
        link.close()


def test_ask_all_is_one_timeout_not_n():
    hang = threading.Event()
    links = [WorkerLink() for _ in range(3)]
    try:
        links[0].serve(lambda: {"w": 0})
        links[1].serve(lambda: (hang.wait(3), {"w": 1})[1])
        links[2].serve(lambda: (hang.wait(3), {"w": 2})[1])
        t0 = time.monotonic()
        assert ask_all(links, timeout=0.5) == [{"w": 0}, None, None]
        assert time.monotonic() - t0 < 1.5
    finally:
        hang.set()
        for link in links:
            link.close()


def test_serve_needs_the_worker_end():
    link = WorkerLink()
    link.in_master()
    with pytest.raises(AdminError):
        link.serve(dict)
    link.close()
    assert link.ask(timeout=0.1) is None


def test_master_status_from_workers_end_to_end(served):
    """What serve() wires up in the master: admin endpoint -> ask every worker -> merge."""
    links = [WorkerLink() for _ in range(2)]
    try:
        for i, link in enumerate(links):
            link.serve(lambda i=i: {"pid": 100 + i, "listeners": [{"name": "l0", "accepted": i + 1}],
                                    "servers": [], "counters": {"accepted": i + 1}})
        pids = [100, 101]
        srv = served(lambda: merge_worker_status(list(zip(pids, ask_all(links, timeout=1)))))
        st = fetch_status(addr(srv))
        assert st["listeners"] == [{"name": "l0", "accepted": 3}]
        assert st["counters"] == {"accepted": 3}
        assert [w["pid"] for w in st["workers"]] == [100, 101]
    finally:
        for link in links:
            link.close()


# ----------------------------------------------------------------------------- merge


def test_merge_worker_status():
    w1 = {
        "pid": 11,
        "listeners": [{"name": "l0", "accepted": 5, "active": 2, "addr": "0.0.0.0:8883", "tls": True},
                      {"name": "l1", "accepted": 1, "active": 0}],
        "servers": [
            {"server": "127.0.0.1:1883", "pool": "l0", "up": True, "sessions": 3, "total": 9, "fails": 1,
             "weight": 1, "backup": False, "last_check": 10.5, "state": "up"},
            {"server": "127.0.0.1:1884", "pool": "l0", "up": True, "sessions": 0, "total": 0, "fails": 0,
             "weight": 1, "backup": True},
        ],
        "counters": {"accepted": 6, "refused": 1},
    }
    w2 = {
        "pid": 12,
        "listeners": [{"name": "l0", "accepted": 7, "active": 1, "addr": "0.0.0.0:8883", "tls": False}],
        "servers": [
            {"server": "127.0.0.1:1883", "pool": "l0", "up": False, "sessions": 1, "total": 4, "fails": 3,
             "weight": 1, "backup": False, "last_check": 11.0, "state": "down"},
            {"server": "127.0.0.1:1884", "pool": "l0", "up": True, "sessions": 2, "total": 2, "fails": 0,
             "weight": 1, "backup": True},
            {"server": "127.0.0.1:1883", "pool": "l1", "up": True, "sessions": 1, "total": 1, "fails": 0,
             "weight": 2, "backup": False},
        ],
        "counters": {"accepted": 7, "closed": 2},
    }
    m = merge_worker_status([(11, w1), (13, None), (12, w2)])
    assert m["workers"][0] == w1
    assert m["workers"][1] == {"pid": 13, "error": "no answer"}
    assert m["workers"][2] == w2
    assert m["listeners"] == [
        {"name": "l0", "accepted": 12, "active": 3, "addr": "0.0.0.0:8883", "tls": True},
        {"name": "l1", "accepted": 1, "active": 0},
    ]
    s = {(e["pool"], e["server"]): e for e in m["servers"]}
    assert len(m["servers"]) == 3
    a = s[("l0", "127.0.0.1:1883")]
    assert a["up"] is False and a["up_in_workers"] == 1
    assert (a["sessions"], a["total"], a["fails"], a["weight"]) == (4, 13, 4, 2)
    assert a["last_check"] == 10.5 and a["state"] == "up" and a["backup"] is False  # first worker's
    b = s[("l0", "127.0.0.1:1884")]
    assert b["up"] is True and b["up_in_workers"] == 2 and b["sessions"] == 2 and b["backup"] is True
    c = s[("l1", "127.0.0.1:1883")]
    assert c["up"] is True and c["up_in_workers"] == 1 and c["weight"] == 2
    assert m["counters"] == {"accepted": 13, "refused": 1, "closed": 2}
    json.dumps(m)  # serialisable as is


def test_merge_edge_cases():
    assert merge_worker_status([]) == {"workers": [], "listeners": [], "servers": [], "counters": {}}
    m = merge_worker_status([(1, None), (2, {"error": "provider failed"})])
    assert m["workers"] == [{"pid": 1, "error": "no answer"}, {"pid": 2, "error": "provider failed"}]
    assert m["listeners"] == [] and m["servers"] == [] and m["counters"] == {}
    # the master's pid for a worker wins over what the worker says; inputs are not modified
    w = {"pid": 999, "listeners": [{"name": "l0", "accepted": 1}]}
    m = merge_worker_status([(5, w), (6, {"pid": 6, "listeners": [{"name": "l0", "accepted": 2}]})])
    assert m["workers"][0]["pid"] == 5 and w["pid"] == 999
    assert m["listeners"] == [{"name": "l0", "accepted": 3}] and w["listeners"][0]["accepted"] == 1
