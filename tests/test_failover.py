"""End-to-end failover of upstream pools: real Mosquitto brokers behind `fastproxy serve`.

Brokers are stopped (SIGSTOP: the kernel still completes TCP handshakes, only an MQTT answer
shows the broker is alive) or killed (SIGKILL) under held sessions; the proxy's health checks,
its `on_marked_down shutdown-sessions`, its retry to the next server, its source-address pool
(in a private network namespace with 10 ephemeral ports) and the PROXY header of its checks are
observed from outside: client sockets, the brokers' logs, the access log, the error log and
`fastproxy status`.

Plain TCP listeners, loopback only, every wait bounded.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections import Counter
from contextlib import contextmanager

import pytest

import proxyutil as U
from fastproxy import proxy_protocol as pp

HOST = U.HOST
PINGRESP = U.PINGRESP
CONNACK_OK = b"\x20\x02\x00\x00"
CHECK_PREFIX = "fastproxy-check-"

# Fast checks: a stopped broker is DOWN after 2 failed checks (~2 x (0.3 + 0.5) s).
FAST_HEALTH = ("--health-interval", "0.3", "--health-timeout", "0.5", "--health-fall", "2", "--health-rise", "2")


# ----------------------------------------------------------------------------- helpers


def _listen_args() -> tuple[int, list[str]]:
    port = U.free_port()
    return port, ["--listen", f"{HOST}:{port}"]


def _pool(*brokers) -> list[str]:
    out: list[str] = []
    for b in brokers:
        out += ["--upstream", b if isinstance(b, str) else b.upstream]
    return out


def hold_session(port: int, client_id: str, track, *, timeout: float = 5.0) -> socket.socket:
    """A plain-TCP MQTT 3.1.1 session through the proxy (keepalive 0: the broker never times it
    out), CONNACK 0 checked; the socket is kept open (and closed at teardown by `track`)."""
    s = track(U.open_socket(port, timeout=timeout))
    code = U.mqtt_handshake(s, client_id)
    assert code == 0, f"{client_id}: CONNACK return code {code:#04x}"
    return s


def disconnect(sock: socket.socket, timeout: float = 5.0) -> None:
    """Say DISCONNECT and wait (bounded) for the broker/proxy to close."""
    try:
        sock.sendall(U.DISCONNECT)
        U.wait_closed(sock, timeout)
    except OSError:
        pass
    sock.close()


def client_ids(broker) -> list[str]:
    """ClientIds the broker accepted (health checks left out), in order, with repeats."""
    return [c for c in U.broker_client_ids(broker.log()) if not c.startswith(CHECK_PREFIX)]


def wait_in_log(broker, ids, timeout: float = 5.0, count: int = 1) -> None:
    ids = list(ids)
    U.wait_until(lambda: all(Counter(client_ids(broker))[c] >= count for c in ids), timeout,
                 what=f"{len(ids)} ClientId(s) x{count} in the log of the broker on port {broker.port}")


def admin_status(admin: str, timeout: float = 5.0) -> dict:
    """The proxy's status JSON, read the operator's way: `fastproxy status --admin ADDR`."""
    r = U.run_cli("status", "--admin", admin, "--timeout", str(timeout), timeout=timeout + 20)
    assert r.returncode == 0, f"fastproxy status failed ({r.returncode}): {r.stderr}"
    return json.loads(r.stdout)


def http_status(admin: str, timeout: float = 3.0) -> dict | None:
    """The same JSON straight over HTTP (cheap enough to poll); None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def server_entry(status: dict, server: str) -> dict:
    found = [s for s in status["servers"] if s["server"] == server]
    assert len(found) == 1, f"server {server} not (once) in status: {status['servers']}"
    return found[0]


def wait_server_up(admin: str, server: str, up: bool, timeout: float = 10.0) -> dict:
    def check():
        st = http_status(admin)
        return st if st is not None and any(s["server"] == server and s["up"] is up for s in st["servers"]) else None

    return U.wait_until(check, timeout, interval=0.1, what=f"status to show {server} up={up}")


def wait_stderr(proxy, pattern: str, timeout: float = 10.0) -> re.Match:
    rx = re.compile(pattern)
    return U.wait_until(lambda: rx.search(proxy.stderr()), timeout,
                        what=f"proxy stderr matching {pattern!r}; stderr so far:\n{proxy.stderr()[-2000:]}")


@contextmanager
def stopped(broker):
    """SIGSTOP the broker for the block; SIGCONT is always sent (even when the block fails)."""
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)


def split_by_broker(ids, a, b) -> tuple[list[str], list[str]]:
    la, lb = set(client_ids(a)), set(client_ids(b))
    on_a = [c for c in ids if c in la]
    on_b = [c for c in ids if c in lb]
    assert not set(on_a) & set(on_b), f"ClientIds on both brokers: {set(on_a) & set(on_b)}"
    assert len(on_a) + len(on_b) == len(ids), "some ClientId reached no broker"
    return on_a, on_b


def hold_spread(port: int, ids: list[str], a, b, track) -> tuple[dict[str, socket.socket], list[str], list[str]]:
    """A held session per ClientId (see hold_session), once all are in the logs of brokers a and b:
    the sockets by ClientId, and the ClientIds on a and on b (the hash must have used both)."""
    socks = {c: hold_session(port, c, track) for c in ids}
    U.wait_until(lambda: len(set(client_ids(a)) | set(client_ids(b))) >= len(ids), 5,
                 what=f"all {len(ids)} ClientIds in the brokers' logs")
    on_a, on_b = split_by_broker(ids, a, b)
    assert on_a and on_b, f"the ClientId hash put everything on one broker: A={on_a} B={on_b}"
    return socks, on_a, on_b


def reopen_on(broker, socks: dict[str, socket.socket], ids: list[str], port: int, track) -> None:
    """Close the sessions of ids and open them again (in socks): they must land on `broker` and
    carry MQTT (a PINGREQ answered)."""
    for c in ids:
        socks[c].close()
        socks[c] = hold_session(port, c, track)
    wait_in_log(broker, ids)
    for c in ids:
        assert U.ping_ok(socks[c])


# ----------------------------------------------------------------------------- 1. SIGSTOP + shutdown-sessions


def test_sigstop_marks_down_closes_its_sessions_and_clients_fail_over_and_return(
        mosquitto_factory, run_fastproxy, raw_sockets):
    a, b = mosquitto_factory(), mosquitto_factory()
    port, listen = _listen_args()
    admin = f"{HOST}:{U.free_port()}"
    proxy = run_fastproxy(*listen, *_pool(a, b), *FAST_HEALTH, "--on-marked-down", "shutdown-sessions",
                          "--admin", admin)
    wait_server_up(admin, a.upstream, True)

    ids = [f"fo-stop-{i:02d}" for i in range(20)]
    socks, on_a, on_b = hold_spread(port, ids, a, b, raw_sockets)

    with stopped(a):
        wait_stderr(proxy, rf"server {re.escape(a.upstream)} is DOWN after 2 failed checks")
        wait_stderr(proxy, rf"closing {len(on_a)} session\(s\) on {re.escape(a.upstream)}")

        # the sessions on A are closed by the proxy (A itself is frozen and cannot close anything)
        for c in on_a:
            closed, _, _ = U.wait_closed(socks[c], 5)
            assert closed, f"{c} (on the stopped broker) was not closed by the proxy"
        # the sessions on B are untouched and still carry MQTT both ways
        for c in on_b:
            assert U.ping_ok(socks[c]), f"{c} (on the healthy broker) lost its session"

        entries = proxy.wait_access(lambda e: e.reason == "upstream-down", n=len(on_a))
        assert sorted(e.clientid for e in entries) == sorted(on_a)
        assert {e.status for e in entries} == {502}

        st = admin_status(admin)
        assert server_entry(st, a.upstream)["up"] is False
        assert server_entry(st, b.upstream)["up"] is True
        assert st["counters"].get("closed_upstream_down") == len(on_a), st["counters"]

        # the clients of A come back at once and land on B
        reopen_on(b, socks, on_a, port, raw_sockets)

    # A runs again: after `rise` good checks it is UP, and its ClientIds return to it
    wait_stderr(proxy, rf"server {re.escape(a.upstream)} is UP after 2 good checks")
    assert server_entry(admin_status(admin), a.upstream)["up"] is True
    before = Counter(client_ids(a))
    for c in on_a:
        disconnect(socks[c])
        socks[c] = hold_session(port, c, raw_sockets)
    U.wait_until(lambda: all(Counter(client_ids(a))[c] == before[c] + 1 for c in on_a), 5,
                 what="the failed-over ClientIds back on broker A")
    on_b_log = Counter(client_ids(b))
    assert all(on_b_log[c] == 1 for c in on_a), f"a returning ClientId went to B again: {on_b_log}"
    for c in ids:
        assert U.ping_ok(socks[c]), f"{c}: session not working after A came back"


# ----------------------------------------------------------------------------- 2. broker killed


def test_broker_killed_mid_session_closes_client_and_retry_lands_on_the_other(
        mosquitto_factory, run_fastproxy, raw_sockets):
    a, b = mosquitto_factory(), mosquitto_factory()
    port, listen = _listen_args()
    proxy = run_fastproxy(*listen, *_pool(a, b), "--health-interval", "0")

    ids = [f"fo-kill-{i}" for i in range(8)]
    socks, on_a, on_b = hold_spread(port, ids, a, b, raw_sockets)

    a.proc.kill()
    a.proc.wait(5)
    for c in on_a:
        closed, _, _ = U.wait_closed(socks[c], 5)
        assert closed, f"{c}: the proxy kept the client open after its broker died"
    for c in on_b:
        assert U.ping_ok(socks[c])

    # no health checks: the reconnect is refused by A's dead port and retried on B
    reopen_on(b, socks, on_a, port, raw_sockets)
    assert "is DOWN" not in proxy.stderr()  # nothing was checked: this was the retry path


# ----------------------------------------------------------------------------- 3. no shutdown-sessions


def test_marked_down_without_shutdown_sessions_keeps_held_sessions(
        mosquitto_factory, run_fastproxy, raw_sockets):
    from fastproxy import _sim as _engine

    a, b = mosquitto_factory(), mosquitto_factory()
    port, listen = _listen_args()
    admin = f"{HOST}:{U.free_port()}"
    proxy = run_fastproxy(*listen, *_pool(a, b), *FAST_HEALTH, "--admin", admin)
    wait_server_up(admin, a.upstream, True)

    # ClientIds the engine's own choice puts on A while both are up
    keys = [a.upstream.encode(), b.upstream.encode()]
    cands = [f"fo-keep-{i}" for i in range(40)]
    picks = _engine.pick_many([c.encode() for c in cands], keys)
    for_a = [c for c, p in zip(cands, picks) if p == 0]
    assert len(for_a) >= 4
    held, fresh = for_a[:2], for_a[2:4]

    socks = {c: hold_session(port, c, raw_sockets) for c in held}
    wait_in_log(a, held)

    with stopped(a):
        wait_stderr(proxy, rf"server {re.escape(a.upstream)} is DOWN after 2 failed checks")
        assert server_entry(admin_status(admin), a.upstream)["up"] is False
        # ~1 s after the DOWN line, no EOF (1 s on the first socket, then a glance at the rest)
        for i, c in enumerate(held):
            closed, data, _ = U.wait_closed(socks[c], 1.0 if i == 0 else 0.05)
            assert not closed and data == b"", f"{c}: the proxy closed a session on a DOWN server (on_marked_down none)"
        assert "closing" not in proxy.stderr()
        assert not [e for e in proxy.access_entries() if e.reason == "upstream-down"]

        # new clients whose ClientId belongs to A are sent to B
        for c in fresh:
            s = hold_session(port, c, raw_sockets)
            assert U.ping_ok(s)
        wait_in_log(b, fresh)
    assert not set(fresh) & set(client_ids(a))


# ----------------------------------------------------------------------------- 4. source-address pool


def test_upstream_source_pool_round_robins_the_local_addresses(mosquitto, run_fastproxy, raw_sockets):
    port, listen = _listen_args()
    run_fastproxy(*listen, *_pool(mosquitto), "--upstream-source", "127.0.0.2-127.0.0.5")
    ids = [f"fo-src-{i:02d}" for i in range(12)]
    for c in ids:
        hold_session(port, c, raw_sockets)
    wait_in_log(mosquitto, ids)
    rx = re.compile(r"New client connected from (\d+\.\d+\.\d+\.\d+):\d+ as (fo-src-\d+) ")
    sources = {cid: addr for addr, cid in rx.findall(mosquitto.log())}
    assert set(sources) == set(ids)
    assert Counter(sources.values()) == {f"127.0.0.{i}": 3 for i in range(2, 6)}
    # round-robin, in connection order
    order = [sources[c] for c in ids]
    assert all(order[i] != order[i + 1] for i in range(len(order) - 1)), order


# ----------------------------------------------------------------------------- 5. ephemeral ports in a netns

NETNS_HELPER = r'''
import json, os, socket, subprocess, sys, time, urllib.request

REPO, MOSQUITTO, WORKDIR = sys.argv[1], sys.argv[2], sys.argv[3]
MQTT, PROXY, ADMIN = 1883, 18830, 18404
out = {}

def run(*cmd):
    subprocess.run(cmd, check=True, timeout=10)

run("ip", "link", "set", "lo", "up")
with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
    f.write("40000 40009")
with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
    out["port_range"] = f.read().split()

conf = os.path.join(WORKDIR, "ns-mosquitto.conf")
log = os.path.join(WORKDIR, "ns-mosquitto.log")
lines = [f"listener {MQTT} 127.0.0.1", "allow_anonymous true", f"log_dest file {log}", "log_type all",
         "max_connections -1", "persistence false"]
if os.geteuid() == 0:
    lines.append("user root")
open(conf, "w").write("\n".join(lines) + "\n")
procs = []
env = dict(os.environ)
env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")

def listening(port):
    with open("/proc/net/tcp") as f:
        next(f)
        return any(l.split()[3] == "0A" and int(l.split()[1].rsplit(":", 1)[1], 16) == port for l in f)

def wait_listening(port, proc, what):
    deadline = time.monotonic() + 10
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start listening on {port}")
        time.sleep(0.05)

mq = subprocess.Popen([MOSQUITTO, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
procs.append(mq)

_client_port = [20000]

def client_socket():
    # Clients bind an explicit port outside the 10-port range: their own connections must not
    # use up the ephemeral ports the proxy needs toward the broker.
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _client_port[0] += 1
    s.bind(("127.0.0.1", _client_port[0]))
    s.settimeout(5)
    return s

def connack(i, tag):
    """Open an MQTT session; returns (code or None, socket or None)."""
    s = client_socket()
    try:
        s.connect(("127.0.0.1", PROXY))
        cid = f"ns-{tag}-{i:02d}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
        s.sendall(b"\x10" + bytes([len(body)]) + body)
        data = b""
        while len(data) < 4:
            chunk = s.recv(4 - len(data))
            if not chunk:
                break
            data += chunk
        if len(data) == 4 and data[0] == 0x20 and data[3] == 0:
            return 0, s
        # refused: the proxy must close after its answer (bounded wait for EOF)
        closed = len(data) < 4
        deadline = time.monotonic() + 5
        while not closed and time.monotonic() < deadline:
            try:
                closed = s.recv(4096) == b""
            except socket.timeout:
                break
            except OSError:
                closed = True
        s.close()
        return (data[3] if len(data) == 4 and data[0] == 0x20 else None), ("closed" if closed else "open")
    except OSError:
        s.close()
        return None, None

def status():
    s = client_socket()
    s.connect(("127.0.0.1", ADMIN))
    s.sendall(b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])

def round_(tag, n, extra):
    errlog = os.path.join(WORKDIR, f"ns-proxy-{tag}.stderr")
    acclog = os.path.join(WORKDIR, f"ns-proxy-{tag}.access")
    with open(errlog, "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "fastproxy", "serve", "--listen", f"127.0.0.1:{PROXY}",
                              "--upstream", f"127.0.0.1:{MQTT}", "--admin", f"127.0.0.1:{ADMIN}",
                              "--access-log", acclog, *extra],
                             cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    procs.append(p)
    wait_listening(PROXY, p, "fastproxy")
    wait_listening(ADMIN, p, "fastproxy admin")
    codes, held, refused_end = [], [], []
    for i in range(n):
        code, s = connack(i, tag)
        codes.append(code)
        if code == 0:
            held.append(s)
        else:
            refused_end.append(s)
    time.sleep(0.2)
    st = status()
    # the sessions that got CONNACK 0 are alive: PINGREQ -> PINGRESP
    alive = 0
    for s in held:
        try:
            s.sendall(b"\xc0\x00")
            if s.recv(2) == b"\xd0\x00":
                alive += 1
        except OSError:
            pass
    for s in held:
        s.close()
    p.terminate()
    p.wait(10)
    procs.remove(p)
    return {"codes": codes, "alive": alive, "refused_end": refused_end, "counters": st["counters"],
            "stderr": open(errlog, errors="replace").read(),
            "access": open(acclog, errors="replace").read().splitlines()}

try:
    wait_listening(MQTT, mq, "mosquitto")
    out["plain"] = round_("plain", 15, [])
    out["pool"] = round_("pool", 25, ["--upstream-source", "127.0.0.2-127.0.0.4"])
    out["broker_sources"] = sorted(set(
        l.split(" from ", 1)[1].split(":", 1)[0]
        for l in open(log, errors="replace") if "New client connected from" in l and " as ns-pool-" in l))
finally:
    for p in procs:
        p.kill()
        p.wait(5)
print(json.dumps(out))
'''


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (unshare --net, the namespace's port-range sysctl)"
    try:
        r = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare --net unavailable: {e!r}"
    if r.returncode != 0:
        return f"unshare --net fails here: {r.stderr.decode(errors='replace').strip()}"
    return None


def test_source_pool_beats_ephemeral_port_exhaustion_in_a_netns(tmp_path):
    why = _netns_usable()
    if why:
        pytest.skip(why)
    from conftest import MOSQUITTO

    script = tmp_path / "netns_helper.py"
    script.write_text(textwrap.dedent(NETNS_HELPER))
    # its own process group: on a timeout the helper, its broker and its proxy are killed
    # together (the namespace ends with its last process)
    p = subprocess.Popen(["unshare", "--net", sys.executable, str(script), str(U.REPO), MOSQUITTO, str(tmp_path)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=U.proxy_env(), start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=10)
        pytest.fail(f"the netns helper did not finish in 90s:\nstdout:\n{stdout}\nstderr:\n{stderr}")
    assert p.returncode == 0, f"helper failed ({p.returncode}):\nstdout:\n{stdout}\nstderr:\n{stderr}"
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["port_range"] == ["40000", "40009"], "the namespace's ephemeral port range was not applied"

    plain = out["plain"]
    ok = plain["codes"].count(0)
    refused = [c for c in plain["codes"] if c != 0]
    # one source address, one broker address: 10 local ports, so at most 10 sessions
    assert 8 <= ok <= 10, plain
    assert plain["alive"] == ok, plain
    assert len(refused) == 15 - ok and all(c in (3, None) for c in refused), plain
    assert plain["refused_end"] == ["closed"] * len(refused), plain  # answered (or not), then closed
    acc = [U.parse_access_line(ln) for ln in plain["access"]]
    nsp = [e for e in acc if e.reason == "no-source-port"]
    assert len(nsp) == 15 - ok and {e.status for e in nsp} == {503}, plain["access"]
    assert plain["counters"].get("closed_no_source_port") == 15 - ok, plain["counters"]
    err = plain["stderr"]
    assert re.search(r"no-source-port 127\.0\.0\.1:1883.*add upstream_source addresses", err), err

    pool = out["pool"]
    assert pool["codes"] == [0] * 25, pool
    assert pool["alive"] == 25, pool
    assert not pool["counters"].get("closed_no_source_port"), pool["counters"]
    assert out["broker_sources"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"], out["broker_sources"]


# ----------------------------------------------------------------------------- 6. health checks + PROXY v2


class ProxyV2Broker(U.ThreadedServer):
    """A fake broker that wants a PROXY v2 header first: parses it with fastproxy.proxy_protocol,
    then the CONNECT; answers CONNACK 0, PINGRESP; records (header, ClientId) per connection."""

    def __init__(self) -> None:
        self.seen: list[tuple[pp.ProxyHeader | None, str | None, tuple[str, int]]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        super().__init__(HOST, backlog=64)

    def handle(self, conn: socket.socket, peer, state) -> None:
        conn.settimeout(10)
        header, cid = None, None
        with conn:
            try:
                buf = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise ConnectionError(f"EOF before a complete PROXY header ({buf!r})")
                    buf += chunk
                    header = pp.parse(buf)
                    if header is not None:
                        break
                rest = buf[header.length:]
                # the CONNECT (small: one-byte remaining length)
                while len(rest) < 2 or len(rest) < 2 + rest[1]:
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise ConnectionError("EOF before CONNECT")
                    rest += chunk
                assert rest[0] == 0x10, f"not a CONNECT: {rest!r}"
                body = rest[2:2 + rest[1]]
                pos = 2 + body[1] + 4  # protocol name, level, flags, keepalive
                n = int.from_bytes(body[pos:pos + 2], "big")
                cid = body[pos + 2:pos + 2 + n].decode()
                with self._lock:
                    self.seen.append((header, cid, peer))
                conn.sendall(CONNACK_OK)
                while not self._stop.is_set():
                    ptype, _, _ = U.read_packet(conn)
                    if ptype == 12:
                        conn.sendall(PINGRESP)
                    elif ptype == 14:
                        return
            except (OSError, ConnectionError, AssertionError, ValueError, pp.ProxyProtocolError) as e:
                if cid is None:
                    with self._lock:
                        self.errors.append(f"{peer}: {e!r}")

    def records(self):
        with self._lock:
            return list(self.seen)

    def checks(self):
        return [(h, c) for h, c, _ in self.records() if c and c.startswith(CHECK_PREFIX)]


@pytest.fixture
def pp_broker():
    srv = ProxyV2Broker()
    yield srv
    srv.close()


def test_health_checks_and_sessions_carry_the_per_server_proxy_header(
        pp_broker, mosquitto, run_fastproxy, raw_sockets):
    from fastproxy import _sim as _engine

    port, listen = _listen_args()
    admin = f"{HOST}:{U.free_port()}"
    proxy = run_fastproxy(*listen, "--upstream", f"{pp_broker.upstream},proxy-protocol=v2",
                          "--upstream", mosquitto.upstream, *FAST_HEALTH, "--admin", admin)

    # checks reach the fake broker with a PROXY (not LOCAL) header naming the checker's socket
    U.wait_until(lambda: len(pp_broker.checks()) >= 3, 10, what="3 health checks at the PROXY-v2 server")
    for h, cid in pp_broker.checks():
        assert h.version == 2 and h.command == "PROXY", h
        assert h.src_addr == HOST and h.dst == (HOST, pp_broker.port), h
    assert not pp_broker.errors, pp_broker.errors
    # Mosquitto (no option) gets plain checks: it answers them, so both servers stay UP
    U.wait_until(lambda: sum(1 for c in U.broker_client_ids(mosquitto.log()) if c.startswith(CHECK_PREFIX)) >= 3,
                 10, what="3 health checks at Mosquitto")
    st = admin_status(admin)
    for srv in (pp_broker.upstream, mosquitto.upstream):
        e = server_entry(st, srv)
        assert e["up"] is True and e["check"]["checks"] >= 3 and e["check"]["failed_checks"] == 0, e
    assert "is DOWN" not in proxy.stderr()

    # client sessions: those on the fake broker carry a header with the client's own address
    keys = [pp_broker.upstream.encode(), mosquitto.upstream.encode()]
    cands = [f"fo-pp-{i}" for i in range(30)]
    picks = _engine.pick_many([c.encode() for c in cands], keys)
    to_pp = [c for c, p in zip(cands, picks) if p == 0][:3]
    to_mq = [c for c, p in zip(cands, picks) if p == 1][:3]
    assert len(to_pp) == 3 and len(to_mq) == 3
    local_ports = {}
    for c in to_pp + to_mq:
        s = hold_session(port, c, raw_sockets)
        assert U.ping_ok(s)
        local_ports[c] = s.getsockname()[1]
    wait_in_log(mosquitto, to_mq)
    sessions = {cid: h for h, cid, _ in pp_broker.records() if cid and not cid.startswith(CHECK_PREFIX)}
    assert set(sessions) == set(to_pp)
    for c in to_pp:
        h = sessions[c]
        assert h.command == "PROXY" and h.src == (HOST, local_ports[c]) and h.dst == (HOST, port), h

    # --health-proxy-command local: the checks say LOCAL
    pp_broker2 = ProxyV2Broker()
    try:
        port2, listen2 = _listen_args()
        run_fastproxy(*listen2, "--upstream", f"{pp_broker2.upstream},proxy-protocol=v2",
                      "--upstream", mosquitto.upstream, *FAST_HEALTH, "--health-proxy-command", "local")
        U.wait_until(lambda: len(pp_broker2.checks()) >= 2, 10, what="2 health checks at the second server")
        for h, cid in pp_broker2.checks():
            assert h.version == 2 and h.command == "LOCAL", h
        assert not pp_broker2.errors, pp_broker2.errors
        # client sessions still carry PROXY with the client's address
        keys2 = [pp_broker2.upstream.encode(), mosquitto.upstream.encode()]
        picks2 = _engine.pick_many([c.encode() for c in cands], keys2)
        cid2 = next(c for c, p in zip(cands, picks2) if p == 0)
        s = hold_session(port2, cid2, raw_sockets)
        sessions2 = {cid: h for h, cid, _ in pp_broker2.records() if cid == cid2}
        assert set(sessions2) == {cid2}, pp_broker2.records()
        assert sessions2[cid2].command == "PROXY"
        assert sessions2[cid2].src == (HOST, s.getsockname()[1])
    finally:
        pp_broker2.close()


# ----------------------------------------------------------------------------- 7. workers


def test_status_with_two_workers_merges_them(mosquitto_factory, run_fastproxy, raw_sockets):
    a, b = mosquitto_factory(), mosquitto_factory()
    port, listen = _listen_args()
    admin = f"{HOST}:{U.free_port()}"
    proxy = run_fastproxy(*listen, *_pool(a, b), *FAST_HEALTH, "--workers", "2", "--admin", admin)

    def ready():
        st = http_status(admin)
        return st if st and len(st.get("workers", [])) == 2 and all(
            s.get("up_in_workers") == 2 for s in st["servers"]) else None

    U.wait_until(ready, 15, interval=0.2, what="status with 2 workers, both servers up in both")
    hold_session(port, "fo-workers-1", raw_sockets)
    st = admin_status(admin)
    workers = st["workers"]
    assert len(workers) == 2
    pids = [w["pid"] for w in workers]
    assert len(set(pids)) == 2 and proxy.pid not in pids
    assert set(pids) <= set(U.children_of(proxy.pid)), (pids, U.children_of(proxy.pid))
    servers = {s["server"]: s for s in st["servers"]}
    assert set(servers) == {a.upstream, b.upstream}
    for s in servers.values():
        assert s["up"] is True and s["up_in_workers"] == 2, s
    assert sum(s["sessions"] for s in servers.values()) == 1
    assert st["counters"]["active"] == 1, st["counters"]
