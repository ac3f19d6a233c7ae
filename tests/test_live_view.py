"""The live view (issue 12): Proxy.sessions() / Proxy.disconnect(), the admin endpoint's
GET /sessions and POST /disconnect (one process and --workers 2), the worker link's
sessions/disconnect requests, and `fastproxy top` drawn in a real terminal (tmux).

Real Mosquitto, real mutual TLS (the client certificate's CN is thing001), loopback only;
every wait is bounded.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

import fastproxy
import proxyutil as U
from fastproxy import admin as A
from fastproxy import top as T

CN = "thing001"


def mtls(certs) -> object:
    return U.client_context(certs, cert=certs.client_cert, key=certs.client_key)


def connect(port: int, certs, client_id: str) -> socket.socket:
    s = U.open_socket(port, tls_ctx=mtls(certs))
    try:
        assert U.mqtt_handshake(s, client_id) == 0
    except BaseException:
        s.close()
        raise
    return s


def http_json(port: int, method: str, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(U.HOST, port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def relaying(rows: list[dict]) -> dict[str, dict]:
    return {r["client_id"]: r for r in rows if r.get("state") == "relay" and r.get("client_id")}


def closed_by_proxy(s: socket.socket, timeout: float = 10.0) -> bool:
    closed, _, _ = U.wait_closed(s, timeout)
    return closed


# ----------------------------------------------------------------------------- the Python API


def test_api_sessions_and_disconnect(mosquitto, certs, tmp_path):
    log_path = tmp_path / "access.log"
    records: list[dict] = []
    cfg = fastproxy.build_config({
        "listen": "127.0.0.1:0", "upstream": mosquitto.upstream, "tls_cert": certs.server_cert,
        "tls_key": certs.server_key, "client_ca": certs.ca_cert, "access_log": str(log_path),
    })
    proxy = fastproxy.Proxy(cfg, on_record=records.append)
    ((_, port),) = proxy.addresses[0]
    proxy.start()
    socks = []
    try:
        s1 = connect(port, certs, "api-live-1")
        socks.append(s1)
        s2 = connect(port, certs, "api-live-2")
        socks.append(s2)
        s2.sendall(U.publish_packet("live/t", b"x" * 300))
        U.wait_until(lambda: set(relaying(proxy.sessions())) == {"api-live-1", "api-live-2"}, 10,
                     what="both sessions relaying")
        U.wait_until(lambda: relaying(proxy.sessions())["api-live-2"]["bytes_received"] > 300, 10,
                     what="the publish counted")
        rows = relaying(proxy.sessions())
        r1, r2 = rows["api-live-1"], rows["api-live-2"]
        assert (r1["addr"], r1["port"]) == ("127.0.0.1", s1.getsockname()[1])
        assert (r2["addr"], r2["port"]) == ("127.0.0.1", s2.getsockname()[1])
        assert r1["cn"] == r2["cn"] == CN
        assert str(mosquitto.port) in r1["upstream"]
        assert r1["bytes_sent"] >= 4 and r1["bytes_received"] > 0      # CONNACK out, CONNECT in
        assert 0 <= r1["age"] < 30 and 0 <= r1["idle"] <= r1["age"] + 1
        assert r1["websocket"] is False and r1["listener"]

        # filtered and bounded queries
        (only,) = proxy.sessions(client_id="api-live-2")
        assert only["port"] == s2.getsockname()[1]
        assert proxy.sessions(client_id="api-live") == []               # exact, not a prefix
        assert len(proxy.sessions(limit=1)) == 1

        # disconnect by ClientId: the client sees its connection closed, the log says why
        assert proxy.disconnect(client_id="nobody") == 0
        assert proxy.disconnect(client_id="api-live-2") == 1
        assert closed_by_proxy(s2)
        U.wait_until(lambda: any(r["client_id"] == "api-live-2" for r in records), 10, what="the record")
        rec = next(r for r in records if r["client_id"] == "api-live-2")
        assert rec["reason"] == "disconnected"
        U.wait_until(lambda: any("disconnected api-live-2" in ln for ln in log_path.read_text().splitlines()),
                     10, what="the access-log line")
        (line,) = [U.parse_access_line(ln) for ln in log_path.read_text().splitlines() if "api-live-2" in ln]
        assert (line.reason, line.clientid, line.cn) == ("disconnected", "api-live-2", CN)
        assert set(relaying(proxy.sessions())) == {"api-live-1"}
        assert not closed_by_proxy(s1, 0.3)                              # the other one lives on

        # disconnect by client address
        assert proxy.disconnect(addr=("127.0.0.1", s1.getsockname()[1])) == 1
        assert closed_by_proxy(s1)
        U.wait_until(lambda: proxy.sessions() == [], 10, what="no session left")
        with pytest.raises(ValueError):
            proxy.disconnect()
    finally:
        for s in socks:
            s.close()
        proxy.stop()
        proxy.close()


# ----------------------------------------------------------------------------- admin, one process


def test_admin_sessions_and_disconnect_single_process(mosquitto, certs, start_proxy):
    aport = U.free_port()
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--admin", f"127.0.0.1:{aport}")
    U.wait_port(U.HOST, aport, timeout=10, connect=False)
    socks = {cid: connect(fp.port, certs, cid) for cid in ("adm-a", "adm-b", "adm-c")}
    try:
        def listed() -> dict[str, dict]:
            code, doc = http_json(aport, "GET", "/sessions")
            assert code == 200, doc
            return relaying(doc["sessions"])

        U.wait_until(lambda: set(listed()) == set(socks), 10, what="three sessions listed")
        code, doc = http_json(aport, "GET", "/sessions")
        assert (doc["workers"], doc["errors"], doc["truncated"], doc["limit"]) == (1, [], False, 1000)
        assert doc["count"] == len(doc["sessions"]) == 3
        for r in doc["sessions"]:
            assert r["pid"] == fp.pid and r["cn"] == CN and r["addr"] == "127.0.0.1"
        code, doc = http_json(aport, "GET", "/sessions?client_id=adm-b")
        assert code == 200 and [r["client_id"] for r in doc["sessions"]] == ["adm-b"]
        code, doc = http_json(aport, "GET", "/sessions?limit=2")
        assert code == 200 and doc["count"] == 2 and doc["truncated"] is True
        code, doc = http_json(aport, "GET", "/sessions?limit=999999999")
        assert code == 200 and doc["limit"] == A.SESSIONS_MAX and doc["count"] == 3
        for bad in ("/sessions?limit=-1", "/sessions?limit=x", "/sessions?clientid=adm-b",
                    "/sessions?limit=1&limit=2"):
            code, doc = http_json(aport, "GET", bad)
            assert code == 400 and doc["error"], bad
        assert http_json(aport, "GET", "/disconnect?client_id=adm-a")[0] == 405
        code, doc = http_json(aport, "POST", "/disconnect")
        assert code == 400 and "client_id" in doc["error"]
        assert http_json(aport, "POST", "/disconnect?addr=nonsense")[0] == 400

        # by ClientId
        code, doc = http_json(aport, "POST", "/disconnect?client_id=adm-a")
        assert (code, doc["disconnected"], doc["workers"]) == (200, 1, 1)
        assert closed_by_proxy(socks["adm-a"])
        # by address (IPv4 in the URL)
        port_b = socks["adm-b"].getsockname()[1]
        code, doc = http_json(aport, "POST", f"/disconnect?addr=127.0.0.1:{port_b}")
        assert (code, doc["disconnected"]) == (200, 1)
        assert closed_by_proxy(socks["adm-b"])
        code, doc = http_json(aport, "POST", "/disconnect?client_id=adm-a")
        assert (code, doc["disconnected"]) == (200, 0)
        entries = fp.wait_access(lambda e: e.reason == "disconnected", n=2)
        assert sorted(e.clientid for e in entries) == ["adm-a", "adm-b"] and {e.cn for e in entries} == {CN}
        assert set(listed()) == {"adm-c"}

        # `fastproxy top --once` (no terminal here): the table as text
        r = U.run_cli("top", "--once", "--admin", f"127.0.0.1:{aport}")
        assert r.returncode == 0, r.stderr
        head, titles, *rows = r.stdout.splitlines()
        assert "1 session," in head and "1 worker" in head
        assert titles.split()[:4] == ["REMOTE", "CLIENTID*", "CN", "UPSTREAM"]
        (row,) = rows
        port_c = socks["adm-c"].getsockname()[1]
        assert row.split()[:3] == [f"127.0.0.1:{port_c}", "adm-c", CN]
        assert row.split()[-1] == str(fp.pid)
        # a ClientId that matches nothing
        r = U.run_cli("top", "--once", "--filter", "zzz", "--admin", f"127.0.0.1:{aport}")
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 2 and "0 matching" in r.stdout
    finally:
        for s in socks.values():
            s.close()


def test_top_once_without_a_proxy_says_why():
    port = U.free_port()
    r = U.run_cli("top", "--once", "--admin", f"127.0.0.1:{port}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"fastproxy top: cannot reach the admin endpoint at 127.0.0.1:{port}")
    r = U.run_cli("top", "--once", "--interval", "0")
    assert r.returncode == 2 and "--interval" in r.stderr


# ----------------------------------------------------------------------------- admin, two workers


def test_admin_sessions_and_disconnect_with_two_workers(mosquitto, certs, run_fastproxy):
    port, aport = U.free_port(), U.free_port()
    fp = run_fastproxy("--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream,
                       "--tls-cert", certs.server_cert, "--tls-key", certs.server_key,
                       "--client-ca", certs.ca_cert, "--workers", "2", "--admin", f"127.0.0.1:{aport}")
    U.wait_port(U.HOST, aport, timeout=10, connect=False)

    def status_workers() -> list[int]:
        code, doc = http_json(aport, "GET", "/status")
        return [w["pid"] for w in doc.get("workers", []) if "error" not in w]

    U.wait_until(lambda: len(status_workers()) == 2, 10, what="two workers answering")
    workers = set(status_workers())
    socks: dict[str, socket.socket] = {}
    try:
        holder: dict[str, int] = {}
        # SO_REUSEPORT spreads connections by their addresses: connect until both hold some
        for i in range(40):
            cid = f"wk-{i}"
            socks[cid] = connect(port, certs, cid)
            U.wait_until(lambda: cid in relaying(http_json(aport, "GET", "/sessions")[1]["sessions"]), 10,
                         what=f"{cid} listed")
            if i >= 3:
                doc = http_json(aport, "GET", "/sessions")[1]
                holder = {r["client_id"]: r["pid"] for r in doc["sessions"] if r.get("client_id")}
                if set(holder.values()) == workers:
                    break
        assert set(holder.values()) == workers, f"all sessions landed in one worker: {holder}"
        code, doc = http_json(aport, "GET", "/sessions")
        assert code == 200 and (doc["workers"], doc["errors"]) == (2, [])
        assert sorted(r["client_id"] for r in doc["sessions"]) == sorted(socks)
        assert all(r["cn"] == CN for r in doc["sessions"])
        code, doc = http_json(aport, "GET", "/sessions?limit=2")
        assert doc["count"] == 2 and doc["truncated"] is True
        # a filtered query finds the session whichever worker holds it
        for cid in list(socks)[:2]:
            code, doc = http_json(aport, "GET", f"/sessions?client_id={cid}")
            assert [(r["client_id"], r["pid"]) for r in doc["sessions"]] == [(cid, holder[cid])]
        # disconnect one session held by each worker, by ClientId
        gone = []
        for pid in sorted(workers):
            cid = next(c for c, p in holder.items() if p == pid)
            code, doc = http_json(aport, "POST", f"/disconnect?client_id={cid}")
            assert (code, doc["disconnected"], doc["workers"], doc["errors"]) == (200, 1, 2, []), doc
            assert closed_by_proxy(socks[cid]), f"{cid} (worker {pid}) not closed"
            gone.append(cid)
        entries = fp.wait_access(lambda e: e.reason == "disconnected", n=2)
        assert sorted(e.clientid for e in entries) == sorted(gone)
        left = relaying(http_json(aport, "GET", "/sessions")[1]["sessions"])
        assert set(left) == set(socks) - set(gone)
        # by address, in whichever worker
        cid = next(iter(left))
        code, doc = http_json(aport, "POST", f"/disconnect?addr=127.0.0.1:{socks[cid].getsockname()[1]}")
        assert (code, doc["disconnected"]) == (200, 1)
        assert closed_by_proxy(socks[cid])
        # `top --once` shows both workers
        r = U.run_cli("top", "--once", "--admin", f"127.0.0.1:{aport}")
        assert r.returncode == 0 and "2 workers" in r.stdout.splitlines()[0], r.stdout + r.stderr
    finally:
        for s in socks.values():
            s.close()


# ----------------------------------------------------------------------------- the worker link


def test_worker_link_carries_sessions_and_disconnect():
    calls: list[tuple] = []

    def sessions(limit, cid):
        calls.append(("sessions", limit, cid))
        rows = [{"client_id": "a", "addr": "127.0.0.1", "port": 1}, {"client_id": "b", "addr": "127.0.0.1", "port": 2}]
        return [r for r in rows if cid is None or r["client_id"] == cid][:limit]

    def disconnect(cid, addr):
        calls.append(("disconnect", cid, addr))
        return 1 if addr == ("::ffff:127.0.0.1", 2) or cid == "a" else 0

    links = {101: A.WorkerLink(), 102: A.WorkerLink(), 103: A.WorkerLink()}
    try:
        links[101].serve(lambda: {"w": 1}, sessions=sessions, disconnect=disconnect)
        links[102].serve(lambda: {"w": 2})                      # knows no sessions
        links[103].in_master()                                  # nobody serves this one
        links[103].close()
        link = links[101]
        assert link.ask_sessions(10, "b\n\u00e9\"") == {"sessions": []}   # any ClientId is one line
        assert link.ask(timeout=2) == {"w": 1}                  # status still works in between
        assert link.ask_sessions(1) == {"sessions": [{"client_id": "a", "addr": "127.0.0.1", "port": 1}]}
        assert link.ask_disconnect("a") == {"disconnected": 1}
        # an IPv4 address that matched nothing is tried again IPv4-mapped
        assert link.ask_disconnect(None, ("127.0.0.1", 2)) == {"disconnected": 1}
        assert calls[-2:] == [("disconnect", None, ("127.0.0.1", 2)), ("disconnect", None, ("::ffff:127.0.0.1", 2))]
        assert "error" in links[102].ask_sessions(5)
        assert links[102].ask(timeout=2) == {"w": 2}

        doc = A.sessions_from_workers(links, 10)
        assert [(r["pid"], r["client_id"]) for r in doc["sessions"]] == [(101, "a"), (101, "b")]
        assert doc["workers"] == 3
        assert [e["pid"] for e in doc["errors"]] == [102, 103]
        assert [e["error"] for e in doc["errors"]][1] == "no answer"
        doc = A.disconnect_in_workers(links, "a")
        assert doc["disconnected"] == 1 and [e["pid"] for e in doc["errors"]] == [102, 103]
    finally:
        for link in links.values():
            link.close()


def test_admin_server_answers_for_one_process_and_for_a_master():
    rows = [{"client_id": f"c{i}", "addr": "127.0.0.1", "port": 1000 + i} for i in range(5)]
    srv = A.AdminServer("127.0.0.1", 0, dict, sessions=lambda limit, cid: rows[:limit],
                        disconnect=lambda cid, addr: 2 if cid == "c1" else 0).start()
    bare = A.AdminServer("127.0.0.1", 0, dict).start()
    master = A.AdminServer("127.0.0.1", 0, dict,
                           sessions=lambda limit, cid: {"sessions": [{"pid": 7, **r} for r in rows[:limit]],
                                                        "workers": 2, "errors": [{"pid": 8, "error": "no answer"}]},
                           disconnect=lambda cid, addr: {"disconnected": 3, "workers": 2, "errors": []}).start()
    try:
        addr = f"127.0.0.1:{srv.address[1]}"
        doc = A.fetch_sessions(addr, limit=3)
        assert doc["count"] == 3 and doc["truncated"] and {r["pid"] for r in doc["sessions"]} == {os.getpid()}
        doc = A.fetch_sessions(addr, limit=5)
        assert doc["count"] == 5 and not doc["truncated"]
        assert A.request_disconnect(addr, client_id="c1") == 2
        assert A.request_disconnect(addr, addr=("::1", 5)) == 0
        with pytest.raises(ValueError):
            A.request_disconnect(addr)
        code, doc = http_json(bare.address[1], "GET", "/sessions")
        assert code == 501
        code, doc = http_json(bare.address[1], "POST", "/disconnect?client_id=x")
        assert code == 501
        assert http_json(bare.address[1], "POST", "/status")[0] == 405
        maddr = f"127.0.0.1:{master.address[1]}"
        doc = A.fetch_sessions(maddr)
        assert doc["workers"] == 2 and doc["errors"] == [{"pid": 8, "error": "no answer"}]
        assert {r["pid"] for r in doc["sessions"]} == {7}
        assert A.request_disconnect(maddr, client_id="x") == 3
    finally:
        for s in (srv, bare, master):
            s.stop()


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:1883", ("127.0.0.1", 1883)), ("[::1]:5", ("::1", 5)), ("localhost:0", ("localhost", 0)),
])
def test_parse_client_addr(text, expected):
    assert A.parse_client_addr(text) == expected


@pytest.mark.parametrize("bad", ["", "1.2.3.4", ":80", "::1:80", "h:x", "h:70000", "[::1]"])
def test_parse_client_addr_refuses(bad):
    with pytest.raises(ValueError):
        A.parse_client_addr(bad)


# ----------------------------------------------------------------------------- the view model


def test_view_sorts_filters_and_keeps_the_selection():
    assert (T.SESSIONS_LIMIT, T.SESSIONS_MAX) == (A.SESSIONS_LIMIT, A.SESSIONS_MAX)
    rows = [
        {"pid": 1, "addr": "127.0.0.1", "port": 9, "client_id": "beta", "cn": "x", "age": 5.0, "idle": 1.0,
         "bytes_received": 10, "bytes_sent": 2000, "upstream": "u"},
        {"pid": 1, "addr": "10.0.0.2", "port": 7, "client_id": "Alpha", "cn": None, "age": 50.0, "idle": 0.5,
         "bytes_received": 3 << 20, "bytes_sent": 1, "upstream": "u"},
        {"pid": 2, "addr": "::1", "port": 8, "client_id": None, "cn": None, "age": 0.2, "idle": 0.2,
         "bytes_received": 0, "bytes_sent": 0, "upstream": None},
    ]
    v = T.View()
    v.update({"sessions": rows, "workers": 2}, None)
    assert [r["client_id"] for r in v.rows] == ["Alpha", "beta", None]    # None sorts last
    v.move(1)
    assert v.selected_row()["client_id"] == "beta"
    v.cycle_sort()                                                         # cn
    assert v.sort == "cn" and v.selected_row()["client_id"] == "beta"      # the selection follows
    v.sort = "age"
    v.toggle_reverse()
    assert [r["client_id"] for r in v.rows] == ["Alpha", "beta", None]
    v.sort = "remote"
    v.toggle_reverse()
    assert [r["addr"] for r in v.rows] == ["10.0.0.2", "127.0.0.1", "::1"]
    v.set_filter("ALP")                                                    # substring, any case
    assert [r["client_id"] for r in v.rows] == ["Alpha"] and v.selected == 0
    assert "1 matching" in v.summary() and "2 workers" in v.summary()
    v.set_filter("")
    head, lines = v.table(None)
    assert head.split() == ["REMOTE*", "CLIENTID", "CN", "UPSTREAM", "AGE", "IN", "OUT", "IDLE", "PID"]
    assert lines[0].split() == ["10.0.0.2:7", "Alpha", "-", "u", "50s", "3.0M", "1", "0.5s", "1"]
    assert lines[2].split()[0] == "[::1]:8"
    head, lines = v.table(60)
    assert all(len(ln) <= 60 for ln in [head, *lines])
    v.update(None, "cannot reach")                                         # the last table stays
    assert v.error == "cannot reach" and len(v.rows) == 3
    v.update({"sessions": []}, None)
    assert v.rows == [] and v.selected_row() is None


def test_formatting():
    assert [T.fmt_duration(s) for s in (0.25, 42, 192, 7500, 3 * 86400 + 4000, None)] == \
        ["0.2s", "42s", "3m12s", "2h05m", "3d01h", "-"]
    assert [T.fmt_bytes(n) for n in (512, 1536, 5 << 20, 300 << 30, None)] == ["512", "1.5K", "5.0M", "300G", "-"]
    assert T.View.key({"pid": 1, "addr": "a", "port": 2}) == (1, "a", 2)
    assert T._text("a\x1b[2Jb") == "a?[2Jb"


# ----------------------------------------------------------------------------- `fastproxy top` in tmux


class Tmux:
    """A tmux server of its own (-L), one detached session; killed at the end."""

    def __init__(self) -> None:
        self.sock = f"fp-live-{uuid.uuid4().hex[:10]}"
        self.env = U.proxy_env({"TERM": "xterm-256color", "LANG": os.environ.get("LANG", "C.UTF-8")})
        self.env.pop("TMUX", None)
        self.started = False

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args], env=self.env, cwd=str(U.REPO),
                              capture_output=True, text=True, timeout=10, check=check)

    def start(self, command: str, width: int = 160, height: int = 30) -> None:
        # the pane stays after the command ends, saying how it ended (and what it printed)
        shell = f"{command}; echo \"EXITED $?\"; sleep 60"
        self.run("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), "-c", str(U.REPO), shell)
        self.started = True

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", "-t", "top", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def wait(self, pred, what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if pred(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"tmux: {what} not seen within {timeout}s; the screen:\n{text}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.started:
            self.run("kill-server", check=False)


@pytest.fixture
def tmux():
    if shutil.which("tmux") is None:
        try:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=180)
            subprocess.run(["apt-get", "install", "-y", "tmux"], capture_output=True, timeout=180, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"tmux is not installed and apt-get install -y tmux failed ({e}): "
                        "`fastproxy top` needs a real terminal to be tested")
        if shutil.which("tmux") is None:
            pytest.skip("tmux is not installed and could not be installed")
    t = Tmux()
    yield t
    t.close()


def table_rows(screen: str) -> list[str]:
    """The lines of the table (those that start with a remote address)."""
    return [ln for ln in screen.splitlines() if ln.startswith("127.0.0.1:")]


def test_top_in_a_terminal_filters_and_disconnects(mosquitto, certs, start_proxy, tmux):
    aport = U.free_port()
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--admin", f"127.0.0.1:{aport}")
    U.wait_port(U.HOST, aport, timeout=10, connect=False)
    live = connect(fp.port, certs, "top-live-1")
    other = connect(fp.port, certs, "other-2")
    live_port = live.getsockname()[1]
    try:
        tmux.start(f"{sys.executable} -m fastproxy top --admin 127.0.0.1:{aport} --interval 0.3")
        screen = tmux.wait(lambda s: any("top-live-1" in r and CN in r for r in table_rows(s))
                           and any("other-2" in r for r in table_rows(s)), "both sessions with their CN")
        assert "2 sessions" in screen and "1 worker" in screen
        row = next(r for r in table_rows(screen) if "top-live-1" in r)
        assert row.split()[:3] == [f"127.0.0.1:{live_port}", "top-live-1", CN]
        assert "CLIENTID*" in screen

        # s: the next sort column
        tmux.keys("s")
        tmux.wait(lambda s: "CN*" in s and "CLIENTID*" not in s, "the sort moved to CN")

        # / and a filter: only the matching session is left
        tmux.keys("/")
        tmux.wait(lambda s: "filter ClientId" in s, "the filter prompt")
        tmux.keys("top-live", literal=True)
        tmux.keys("Enter")
        screen = tmux.wait(lambda s: "filter 'top-live'" in s and len(table_rows(s)) == 1, "the filtered view")
        (row,) = table_rows(screen)
        assert "top-live-1" in row and "other-2" not in screen and "1 matching" in screen

        # select it, d, y: the session ends and the row goes away
        tmux.keys("Down")
        tmux.keys("d")
        tmux.wait(lambda s: f"disconnect top-live-1 at 127.0.0.1:{live_port}" in s and "y/n" in s,
                  "the y/n question")
        tmux.keys("y")
        assert closed_by_proxy(live), "the client was not disconnected"
        (e,) = fp.wait_access(lambda e: e.clientid == "top-live-1")
        assert (e.reason, e.cn) == ("disconnected", CN)
        screen = tmux.wait(lambda s: table_rows(s) == [], "the row gone")
        assert f"disconnected 127.0.0.1:{live_port}" in screen
        assert not closed_by_proxy(other, 0.2)

        # Esc clears the filter: the other session is back
        tmux.keys("Escape")
        tmux.wait(lambda s: [r.split()[1] for r in table_rows(s)] == ["other-2"], "the unfiltered view")

        # the proxy goes away: top says so and keeps trying
        other.close()
        fp.stop()
        tmux.wait(lambda s: "cannot reach the admin endpoint" in s and "retrying" in s, "the unreachable message")
        assert "EXITED" not in tmux.screen()
        tmux.keys("q")
        tmux.wait(lambda s: "EXITED 0" in s, "top ending with status 0")
    finally:
        live.close()
        other.close()


def test_top_in_a_terminal_too_small(tmux):
    tmux.start(f"{sys.executable} -m fastproxy top --admin 127.0.0.1:{U.free_port()}", width=30, height=5)
    tmux.wait(lambda s: "terminal too small" in s.replace("\n", ""), "the too-small message")
    tmux.run("resize-window", "-t", "top", "-x", "120", "-y", "20")
    tmux.wait(lambda s: "cannot reach the admin endpoint" in s, "the table view after the resize")
    tmux.keys("q")
    tmux.wait(lambda s: "EXITED 0" in s, "top ending with status 0")
