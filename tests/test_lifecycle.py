"""Process lifecycle: SIGTERM/SIGINT drain, drain timeout, second signal, workers, Python API."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import proxyutil as U


def _refused(port: int) -> bool:
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((U.HOST, port))
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_drain_keeps_sessions_and_refuses_new(certs, mosquitto, start_proxy, paho_client, sig):
    """On SIGTERM/SIGINT: new connections are refused at once, established sessions keep relaying
    during the drain, and the process exits 0 within drain-timeout plus a margin."""
    drain = 6
    fp = start_proxy(mosquitto, "--drain-timeout", str(drain))
    sub = paho_client(fp.port, client_id="drain-sub")
    sub.subscribe("drain/t", 1)
    pub = paho_client(fp.port, client_id="drain-pub")
    pub.publish("drain/t", b"before", qos=1)
    assert [m.payload for m in sub.collect(1, 10)] == [b"before"]

    t0 = time.monotonic()
    fp.signal(sig)
    U.wait_until(lambda: _refused(fp.port), 3, interval=0.05, what="new connections to be refused")
    assert fp.proc.poll() is None, "the proxy exited although sessions were open"
    for i in range(5):
        pub.publish("drain/t", b"during %d" % i, qos=1, timeout=5)
    got = sub.collect(5, timeout=5)
    assert [m.payload for m in got] == [b"during %d" % i for i in range(5)]
    assert time.monotonic() - t0 < drain, "the drain test itself was too slow to mean anything"
    sub.close()
    pub.close()
    rc = fp.wait(max(0.0, drain + 5 - (time.monotonic() - t0)))
    assert rc == 0, f"exit status {rc} (None = still running {drain + 5}s after the signal)"
    # the two paho sessions ended by themselves during the drain: 200, not 503
    # (a refusal probe that got in before the listener closed shows up as a failed TLS handshake)
    entries = fp.wait_access(lambda e: e.protocol != "TLS", n=2, timeout=2)
    assert [e.status for e in entries] == [200, 200], [e.raw for e in entries]


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "tcp"])
def test_drain_timeout_cuts_held_session(certs, mosquitto, start_proxy, tls):
    """--drain-timeout 1: a session still open is closed about 1 s after SIGTERM, logged 503 shutdown;
    the process exits 0."""
    fp = start_proxy(mosquitto, "--drain-timeout", "1", tls=tls)
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs) if tls else None)
    assert U.mqtt_handshake(s, "holder", keepalive=0) == 0
    t0 = time.monotonic()
    fp.signal(signal.SIGTERM)
    closed, _, waited = U.wait_closed(s, 8)
    s.close()
    assert closed, "the held session was not closed after the drain timeout"
    assert 0.7 <= waited <= 4.0, f"held session closed {waited:.2f}s after SIGTERM with --drain-timeout 1"
    rc = fp.wait(max(0.0, 6 - (time.monotonic() - t0)))
    assert rc == 0, f"exit status {rc}"
    (e,) = fp.wait_access(n=1, timeout=2)
    assert (e.status, e.reason) == (503, "shutdown"), e.raw
    assert e.clientid in ("holder", "-")


def test_second_signal_stops_at_once(certs, mosquitto, start_proxy):
    fp = start_proxy(mosquitto, "--drain-timeout", "60")
    s = U.open_socket(fp.port, tls_ctx=U.client_context(certs))
    assert U.mqtt_handshake(s, "stubborn") == 0
    fp.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert fp.proc.poll() is None, "exited before the drain timeout with a session open"
    t0 = time.monotonic()
    fp.signal(signal.SIGTERM)
    rc = fp.wait(5)
    assert rc is not None, "a second SIGTERM did not stop the proxy within 5 s"
    closed, _, _ = U.wait_closed(s, 3)
    s.close()
    assert closed
    assert time.monotonic() - t0 < 8


def test_sigterm_idle_proxy_exits_quickly(mosquitto, start_proxy):
    """No sessions: SIGTERM exits 0 without waiting for the drain timeout."""
    fp = start_proxy(mosquitto, "--drain-timeout", "30")
    fp.signal(signal.SIGTERM)
    rc = fp.wait(10)
    assert rc == 0, f"exit status {rc} (None = still running 10 s after SIGTERM with no sessions)"
    assert "Traceback" not in fp.stderr()


# ----------------------------------------------------------------------------- workers


def _socket_owners(port: int) -> dict[int, int]:
    """For each established proxy-side socket on port (server side), the PID that holds it."""
    inodes: dict[str, int] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            next(f)
            for line in f:
                p = line.split()
                if p[3] == "01" and int(p[1].rsplit(":", 1)[1], 16) == port:
                    inodes[p[9]] = 0
    owners: dict[int, int] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    owners[int(pid)] = owners.get(int(pid), 0) + 1
        except OSError:
            continue
    return owners


def test_two_workers(certs, mosquitto, start_proxy):
    """--workers 2: two processes listen on the port, 20 concurrent sessions all succeed and are
    spread over both; SIGTERM stops every process."""
    fp = start_proxy(mosquitto, "--workers", "2")
    listeners = U.wait_until(lambda: (lambda p: p if len(p) >= 2 else None)(U.listening_pids(fp.port)), 10,
                             what="two processes listening on the port")
    family = {fp.pid} | U.descendants(fp.pid)
    assert listeners <= family, f"listening PIDs {listeners} are not the proxy's processes {family}"
    ctx = U.client_context(certs)
    socks = []
    try:
        for i in range(20):
            s = U.open_socket(fp.port, tls_ctx=ctx)
            socks.append(s)
            assert U.mqtt_handshake(s, f"w{i:02d}") == 0
        owners = _socket_owners(fp.port)
        assert sum(owners.values()) == 20, owners
        assert len(owners) >= 2, f"all 20 sessions were served by one process: {owners}"
        assert set(owners) <= family
    finally:
        for s in socks:
            s.close()
    fp.wait_access(n=20)
    all_pids = {fp.pid} | U.descendants(fp.pid)
    fp.signal(signal.SIGTERM)
    rc = fp.wait(15)
    assert rc == 0, f"exit status {rc}"
    U.wait_until(lambda: not any(U.pid_alive(p) for p in all_pids), 5, what="every worker to exit")
    assert not U.port_is_listening(fp.port)


def test_workers_drain_timeout(certs, mosquitto, start_proxy):
    """--workers 2 --drain-timeout 1: SIGTERM to the main process cuts held sessions in every worker
    after about 1 s (503 shutdown) and everything exits 0."""
    fp = start_proxy(mosquitto, "--workers", "2", "--drain-timeout", "1")
    U.wait_until(lambda: len(U.listening_pids(fp.port)) >= 2, 10, what="two listening processes")
    ctx = U.client_context(certs)
    socks = []
    for i in range(12):
        s = U.open_socket(fp.port, tls_ctx=ctx)
        socks.append(s)
        assert U.mqtt_handshake(s, f"held{i}") == 0
    owners = _socket_owners(fp.port)
    all_pids = {fp.pid} | U.descendants(fp.pid)
    t0 = time.monotonic()
    fp.signal(signal.SIGTERM)
    try:
        for s in socks:
            closed, _, _ = U.wait_closed(s, max(0.1, 8 - (time.monotonic() - t0)))
            assert closed, "a held session survived the drain timeout"
    finally:
        for s in socks:
            s.close()
    assert time.monotonic() - t0 < 5
    rc = fp.wait(10)
    assert rc == 0, f"exit status {rc}"
    U.wait_until(lambda: not any(U.pid_alive(p) for p in all_pids), 5, what="every worker to exit")
    entries = fp.wait_access(n=12, timeout=5)
    assert all((e.status, e.reason) == (503, "shutdown") for e in entries), [e.raw for e in entries]
    assert len(owners) >= 2, f"sessions were not spread over the workers: {owners}"


# ----------------------------------------------------------------------------- Python API


API_SCRIPT = r"""
import json, socket, sys, time
import fastproxy
broker_port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{broker_port}",
                              "tls_cert": cert, "tls_key": key, "access_log": "off"})
p = fastproxy.Proxy(cfg)
first = p.addresses[0]              # per listener: (host, port), or a list of them (one per --listen)
if first and isinstance(first[0], (list, tuple)):
    first = first[0]
host, port = first[0], first[1]
p.start()
print(json.dumps({"host": host, "port": port}), flush=True)
sys.stdin.readline()              # the test has run its clients
stats = p.stats()
t0 = time.monotonic()
p.stop(drain_timeout=0)
print(json.dumps({"stats": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
                  "stop_s": time.monotonic() - t0}), flush=True)
"""


def test_python_api(certs, mosquitto, paho_client, tmp_path):
    """build_config → Proxy (binds, port 0 resolved) → start() in a thread → relay → stats() → stop()."""
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(mosquitto.port), certs.server_cert, certs.server_key],
        cwd=str(U.REPO), env=U.proxy_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        import select

        r, _, _ = select.select([proc.stdout], [], [], 20)
        assert r, "Proxy did not report its address within 20 s"
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        addr = json.loads(first)
        assert addr["host"] == "127.0.0.1" and addr["port"] > 0
        sub = paho_client(addr["port"], client_id="api-sub")
        sub.subscribe("api/t", 1)
        pub = paho_client(addr["port"], client_id="api-pub")
        pub.publish("api/t", b"via the API", qos=1)
        got = sub.collect(1, timeout=10)
        assert got and got[0].payload == b"via the API"
        sub.close()
        pub.close()
        out, err = proc.communicate("go\n", timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stats"].get("accepted", 0) >= 2, result
    assert result["stop_s"] < 5, result
