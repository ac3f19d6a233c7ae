"""Admission control (issue 13, part 3 and 4): allow / deny networks and per-address limits
checked at accept, before any TLS work; the per-ClientId reconnect rate after the CONNECT and
its identity rules; max_connections auto; the memory a silent socket costs.

Clients connect from distinct loopback sources (127.0.0.2, 127.0.0.3) so that one address can
be limited while another is served. Real TLS, real Mosquitto; every wait is bounded.
"""
from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time

import pytest

import proxyutil as U
from mqtt_reference import encode_connect

A, B = "127.0.0.2", "127.0.0.3"


def connect_from(source: str, port: int, ctx: ssl.SSLContext | None, client_id: str, *, version: int = 4,
                 timeout: float = 10.0) -> tuple[socket.socket | None, int | None, str]:
    """TCP from source, TLS when ctx, a CONNECT: (socket kept open after CONNACK 0, the CONNACK
    code or None, what happened)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((U.HOST, port))
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname=U.HOST)
        s.sendall(encode_connect(version, client_id, keepalive=60))
        ptype, _, body = U.read_packet(s)
    except (OSError, ConnectionError, AssertionError) as e:
        s.close()
        return None, None, f"closed: {e!r}"
    if ptype != 2:
        s.close()
        return None, None, f"packet type {ptype}"
    code = body[1]
    if code != 0:
        s.close()
        return None, code, "refused"
    return s, 0, "ok"


def n_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def held():
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def test_deny_and_allow_networks_refuse_before_tls(certs, mosquitto, start_proxy):
    """--deny 127.0.0.2: that client is closed at accept (no TLS handshake: the client sees its
    handshake fail), logged 403 address-denied, never at the broker; 127.0.0.3 is served.
    --allow 127.0.0.3/32 on another listener: the reverse. One warning line says why."""
    ctx = U.client_context(certs)
    fp = start_proxy(mosquitto, "--deny", "127.0.0.2/32")
    before = U.broker_connections(mosquitto.log())
    s, code, what = connect_from(A, fp.port, ctx, "from-a")
    assert s is None and code is None, what
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.protocol) == (403, "address-denied", "TLS"), e.raw
    s, code, what = connect_from(B, fp.port, ctx, "from-b")
    assert code == 0, what
    s.close()
    U.wait_until(lambda: "outside allow / inside deny" in fp.stderr(), 10, what="the warning line")
    U.wait_until(lambda: "from-b" in U.broker_client_ids(mosquitto.log()), 10, what="from-b at the broker")
    assert U.broker_connections(mosquitto.log()) == before + 1

    fp2 = start_proxy(mosquitto, "--allow", "127.0.0.3,10.0.0.0/8")
    assert connect_from(A, fp2.port, ctx, "from-a")[1] is None
    s, code, what = connect_from(B, fp2.port, ctx, "from-b2")
    assert code == 0, what
    s.close()


def test_max_conns_per_ip(certs, mosquitto, start_proxy, held):
    """--max-conns-per-ip 3: three sessions from 127.0.0.2 are served and held; the fourth is
    refused at accept (429 too-many-connections) while 127.0.0.3 is still served; once one of
    the three ends, 127.0.0.2 is served again (the count follows the live sessions)."""
    ctx = U.client_context(certs)
    fp = start_proxy(mosquitto, "--max-conns-per-ip", "3")
    for i in range(3):
        s, code, what = connect_from(A, fp.port, ctx, f"a-{i}")
        assert code == 0, (i, what)
        held.append(s)
    s, code, what = connect_from(A, fp.port, ctx, "a-3")
    assert s is None and code is None, what
    (e,) = fp.wait_access(lambda e: e.status == 429, n=1)
    assert e.reason == "too-many-connections" and e.remote == A, e.raw
    s, code, what = connect_from(B, fp.port, ctx, "b-0")
    assert code == 0, what
    held.append(s)
    held.pop(0).close()
    U.wait_until(lambda: any(x.clientid == "a-0" for x in fp.wait_access(lambda e: e.status == 200, n=0)), 10,
                 what="a-0's session to end")
    s, code, what = connect_from(A, fp.port, ctx, "a-4")
    assert code == 0, what
    held.append(s)
    U.wait_until(lambda: "over max_conns_per_ip" in fp.stderr(), 10, what="the warning line")


def test_conn_rate_per_ip(mosquitto, start_proxy, held):
    """--conn-rate-per-ip 0.1/2 (a burst of two, then one per 10 s): a third connection from
    127.0.0.2 right after two is refused (429 rate-limited); 127.0.0.3 has its own bucket."""
    fp = start_proxy(mosquitto, "--conn-rate-per-ip", "0.1/2", tls=False)
    for i in range(2):
        s, code, what = connect_from(A, fp.port, None, f"ra-{i}")
        assert code == 0, (i, what)
        held.append(s)
    s, code, what = connect_from(A, fp.port, None, "ra-2")
    assert s is None and code is None, what
    (e,) = fp.wait_access(lambda e: e.status == 429, n=1)
    assert e.reason == "rate-limited", e.raw
    s, code, what = connect_from(B, fp.port, None, "rb-0")
    assert code == 0, what
    held.append(s)


@pytest.mark.parametrize("version,code", [(4, 0x03), (5, 0x89)])
def test_reconnect_rate_per_clientid(certs, identity_certs, mosquitto, start_proxy, version, code):
    """--reconnect-rate-per-clientid 0.05/2 behind --require-clientid-cn: thing001 connects
    twice; an impostor (thing002's certificate, ClientId thing001) is refused by the identity
    rule and spends none of thing001's tokens; thing001's third CONNECT gets CONNACK 0x89
    (3.1.1: 0x03) and never reaches the broker; thing002 has its own budget."""
    fp = start_proxy(mosquitto, "--client-ca", certs.ca_cert, "--require-clientid-cn",
                     "--reconnect-rate-per-clientid", "0.05/2")
    dev = U.client_context(certs, cert=certs.client_cert, key=certs.client_key)
    impostor = U.client_context(certs, cert=identity_certs.thing002_cert, key=identity_certs.thing002_key)
    pkt = encode_connect(version, "thing001", keepalive=30)
    assert U.try_connect(fp.port, pkt, tls_ctx=dev).code == 0
    for _ in range(3):
        o = U.try_connect(fp.port, pkt, tls_ctx=impostor)
        assert o.code in (0x02, 0x85), o
    assert U.try_connect(fp.port, pkt, tls_ctx=dev).code == 0
    U.wait_until(lambda: U.broker_client_ids(mosquitto.log()).count("thing001") == 2, 10,
                 what="two thing001 sessions at the broker")
    before = U.broker_connections(mosquitto.log())
    o = U.try_connect(fp.port, pkt, tls_ctx=dev)
    assert o.code == code and o.closed, o
    (e,) = fp.wait_access(lambda e: e.status == 429, n=1)
    assert (e.reason, e.clientid) == ("reconnect-too-fast", "thing001"), e.raw
    assert U.try_connect(fp.port, encode_connect(version, "thing002", keepalive=30), tls_ctx=impostor).code == 0
    U.wait_until(lambda: "thing002" in U.broker_client_ids(mosquitto.log()), 10, what="thing002 at the broker")
    assert U.broker_connections(mosquitto.log()) == before + 1    # thing002 only
    U.wait_until(lambda: "over reconnect_rate_per_clientid" in fp.stderr(), 10, what="the warning line")


def test_admission_flags_are_checked(certs):
    for flags, problem in [(["--conn-rate-per-ip", "fast"], "--conn-rate-per-ip: expected a rate"),
                           (["--conn-rate-per-ip", "5/0"], "burst >= 1"),
                           (["--max-conns-per-ip", "-1"], "--max-conns-per-ip: expected a number >= 0"),
                           (["--deny", "10.0.0.300/8"], "--deny: '10.0.0.300/8' is not an address"),
                           (["--reconnect-rate-per-clientid", "1", "--mqtt", "off"], "needs MQTT awareness"),
                           (["--max-connections", "many"], "--max-connections: expected a positive integer or 'auto'")]:
        r = U.run_cli("check", "--listen", "127.0.0.1:18830", "--upstream", "127.0.0.1:1883", *flags)
        line = U.one_error_line(r)
        assert problem in line, (flags, line)


def test_max_connections_auto_from_the_descriptor_limit(mosquitto, tmp_path):
    """max_connections auto (the default) is printed at start: with a descriptor limit of 1000
    (hard limit too, so it cannot be raised) it is (1000 - 64) / 2 = 468 per worker."""
    port = U.free_port()
    p = subprocess.Popen(["prlimit", "--nofile=1000:1000", sys.executable, "-m", "fastproxy", "serve",
                          "--listen", f"127.0.0.1:{port}", "--upstream", mosquitto.upstream, "--access-log", "off"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=U.proxy_env())
    try:
        U.wait_port(U.HOST, port, timeout=10, proc=p)
    finally:
        U.stop_process(p, timeout=10)
    out = p.stdout.read()
    m = re.search(r"max_connections auto: (\d+) per worker \(descriptors \(limit (\d+)\) allow (\d+)", out)
    assert m, out
    assert (int(m[1]), int(m[2]), int(m[3])) == (468, 1000, 468), out


def test_silent_sockets_cost_no_tls_object_and_memory_returns(certs, mosquitto, start_proxy):
    """A flood of sockets that send nothing costs each its descriptor and connection record,
    no TLS object and no buffer: under 4 KiB of proxy RSS per socket (measured over 6000).
    After they close, the memory is given back (the growth shrinks to under a third, with no
    connection left to wake the proxy), and a device is served throughout."""
    n = 6000
    U.raise_nofile(3 * n)
    fp = start_proxy(mosquitto, "--handshake-timeout", "60", "--access-log", "off", access_log=False)
    ctx = U.client_context(certs)
    s, code, what = connect_from(B, fp.port, ctx, "warm-up")     # TLS and the pools warmed up
    assert code == 0, what
    s.close()
    time.sleep(0.5)
    base = U.rss_kib(fp.pid)
    socks = []
    try:
        for _ in range(n):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.bind((A, 0))
            c.connect((U.HOST, fp.port))
            socks.append(c)
        U.wait_until(lambda: n_fds(fp.pid) >= n, 30, what=f"{n} accepted sockets")
        time.sleep(0.5)
        grown = U.rss_kib(fp.pid) - base
        assert grown * 1024 / n < 4096, f"{grown * 1024 / n:.0f} bytes per silent socket"
        s, code, what = connect_from(B, fp.port, ctx, "during-flood")
        assert code == 0, what
        s.close()
    finally:
        for c in socks:
            c.close()
    U.wait_until(lambda: n_fds(fp.pid) < 100, 30, what="the silent sockets closed")
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        return          # AddressSanitizer's allocator keeps freed memory (quarantine): no trim to see
    U.wait_until(lambda: U.rss_kib(fp.pid) - base < grown / 3, 20,
                 what=f"RSS back near {base} KiB after growing {grown} KiB (now {U.rss_kib(fp.pid)} KiB)")
