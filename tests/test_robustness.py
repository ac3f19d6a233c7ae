"""Failure handling and resource bounds: dead upstream, slow consumers, many connections,
idle timeout, resets from either side."""
from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time

import pytest

import proxyutil as U

MODES = [pytest.param(True, id="tls"), pytest.param(False, id="tcp")]


def _session(fp, certs, tls: bool, client_id: str, keepalive: int = 0) -> socket.socket:
    ctx = U.client_context(certs) if tls else None
    s = U.open_socket(fp.port, tls_ctx=ctx)
    assert U.mqtt_handshake(s, client_id, keepalive=keepalive) == 0
    return s


def _relay_works(port: int, paho_client, tag: str, tls: bool = True) -> None:
    sub = paho_client(port, client_id=f"{tag}-sub", tls=tls)
    sub.subscribe(f"{tag}/t", 1)
    pub = paho_client(port, client_id=f"{tag}-pub", tls=tls)
    pub.publish(f"{tag}/t", b"ok", qos=1)
    got = sub.collect(1, timeout=10)
    assert got and got[0].payload == b"ok"


# ----------------------------------------------------------------------------- upstream failures


@pytest.mark.parametrize("tls", MODES)
def test_upstream_refused(certs, start_proxy, tls):
    """Nothing listens upstream: the client hears CONNACK 0x03 Server unavailable (nothing of its
    reached a broker), is closed promptly, and the line says 502 upstream-refused."""
    dead = U.free_port()
    fp = start_proxy(f"127.0.0.1:{dead}", tls=tls)
    for i in range(3):
        t0 = time.monotonic()
        s = socket.create_connection((U.HOST, fp.port), timeout=10)
        try:
            if tls:
                try:
                    s = U.client_context(certs).wrap_socket(s, server_hostname=U.HOST)
                    s.sendall(U.connect_packet(f"refused-{i}"))
                except (ssl.SSLError, OSError):
                    pass  # closed during the handshake: fine
            else:
                try:
                    s.sendall(U.connect_packet(f"refused-{i}"))
                except OSError:
                    pass
            closed, data, _ = U.wait_closed(s, 10)
            elapsed = time.monotonic() - t0
        finally:
            s.close()
        assert closed, "the client connection stayed open although the upstream refused"
        assert data == b"\x20\x02\x00\x03", f"expected CONNACK 0x03 Server unavailable, got {data!r}"
        assert elapsed < 3.0, f"closed only after {elapsed:.2f}s"
    entries = fp.wait_access(n=3)
    for e in entries:
        assert (e.status, e.reason) == (502, "upstream-refused"), e.raw
    assert fp.proc.poll() is None


def test_upstream_unix_socket_missing(certs, start_proxy, tmp_path):
    """--upstream unix:/missing: the client is closed promptly, logged 502."""
    fp = start_proxy(f"unix:{tmp_path}/nobody.sock")
    s = socket.create_connection((U.HOST, fp.port), timeout=10)
    t0 = time.monotonic()
    try:
        s = U.client_context(certs).wrap_socket(s, server_hostname=U.HOST)
        s.sendall(U.connect_packet("unix-missing"))
    except (ssl.SSLError, OSError):
        pass
    closed, _, _ = U.wait_closed(s, 10)
    s.close()
    assert closed and time.monotonic() - t0 < 3.0
    (e,) = fp.wait_access(n=1)
    assert e.status == 502 and e.reason in ("upstream-refused", "upstream-unreachable"), e.raw


def _stuck_listener():
    """A loopback listener whose accept queue is full, so new SYNs are dropped and connects hang."""
    lst = socket.socket()
    lst.bind((U.HOST, 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue (backlog 0 holds one; extra ones sit in SYN-SENT)
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect((U.HOST, port))
        except BlockingIOError:
            pass
        fillers.append(c)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(1.0)
    try:
        probe.connect((U.HOST, port))
        hangs = False
    except (TimeoutError, socket.timeout):
        hangs = True
    except OSError:
        hangs = False
    finally:
        probe.close()
    return lst, fillers, port, hangs


def test_upstream_connect_timeout(certs, start_proxy):
    """An upstream that never completes the TCP handshake: closed after --upstream-connect-timeout, 504."""
    lst, fillers, port, hangs = _stuck_listener()
    try:
        if not hangs:
            pytest.skip("this kernel completes connects to a full accept queue; cannot make a hanging upstream")
        fp = start_proxy(f"127.0.0.1:{port}", "--upstream-connect-timeout", "1", tls=False)
        t0 = time.monotonic()
        s = socket.create_connection((U.HOST, fp.port), timeout=10)
        s.sendall(U.connect_packet("slow-upstream"))
        closed, _, _ = U.wait_closed(s, 10)
        elapsed = time.monotonic() - t0
        s.close()
        assert closed, "client left hanging although the upstream connect timed out"
        assert 0.5 <= elapsed < 6, f"closed after {elapsed:.2f}s with --upstream-connect-timeout 1"
        (e,) = fp.wait_access(n=1)
        assert (e.status, e.reason) == (504, "upstream-timeout"), e.raw
    finally:
        for c in fillers:
            c.close()
        lst.close()


@pytest.mark.parametrize("tls", MODES)
def test_upstream_dies_mid_session(certs, mosquitto, start_proxy, tls):
    """The broker is killed: the client's connection is closed promptly, logged 200 upstream-reset."""
    fp = start_proxy(mosquitto, tls=tls)
    s = _session(fp, certs, tls, "orphan")
    mosquitto.proc.kill()
    mosquitto.proc.wait(5)
    closed, _, waited = U.wait_closed(s, 10)
    s.close()
    assert closed, "the client connection stayed open after the broker died"
    assert waited < 3.0, f"closed {waited:.2f}s after the broker died"
    (e,) = fp.wait_access(n=1)
    # a killed process's sockets end with a FIN, indistinguishable from a normal close
    assert e.status == 200 and e.reason in ("ok", "upstream-reset"), e.raw
    assert fp.proc.poll() is None


class _ResettingUpstream:
    """A loopback 'broker' that answers CONNECT with CONNACK, then resets the connection (RST)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((U.HOST, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(15)
        self.reset = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                ptype, _, _ = U.read_packet(conn)
                if ptype == 1:
                    conn.sendall(b"\x20\x02\x00\x00")
                time.sleep(0.3)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.reset.set()

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("tls", MODES)
def test_upstream_reset_mid_session(certs, start_proxy, tls):
    """The upstream resets an established session: the client is closed promptly, logged 200 upstream-reset."""
    up = _ResettingUpstream()
    try:
        fp = start_proxy(f"127.0.0.1:{up.port}", tls=tls)
        s = _session(fp, certs, tls, "reset-by-upstream")
        assert up.reset.wait(10)
        closed, _, waited = U.wait_closed(s, 10)
        s.close()
        assert closed, "the client connection stayed open after the upstream reset"
        assert waited < 3.0, f"closed {waited:.2f}s after the upstream reset"
        (e,) = fp.wait_access(n=1)
        assert (e.status, e.reason) == (200, "upstream-reset"), e.raw
    finally:
        up.close()


@pytest.mark.parametrize("tls", MODES)
def test_client_reset_mid_session(certs, mosquitto, start_proxy, paho_client, tls):
    """The client vanishes with a TCP RST: the upstream side is closed too (broker sees the client go),
    logged 200 client-reset."""
    fp = start_proxy(mosquitto, tls=tls)
    s = _session(fp, certs, tls, "rst-client")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # no close_notify, no FIN: an RST
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (200, "client-reset"), e.raw
    U.wait_until(lambda: "Client rst-client closed its connection" in mosquitto.log()
                 or "Client rst-client disconnected" in mosquitto.log(), 10,
                 what="the broker to notice that rst-client is gone")
    _relay_works(fp.port, paho_client, "after-rst", tls=tls)


@pytest.mark.parametrize("tls", MODES)
def test_clean_disconnect_is_ok(certs, mosquitto, start_proxy, tls):
    """DISCONNECT followed by close: 200 ok, and the broker logs a clean disconnect."""
    fp = start_proxy(mosquitto, tls=tls)
    s = _session(fp, certs, tls, "polite")
    s.sendall(U.DISCONNECT)
    closed, _, _ = U.wait_closed(s, 10)  # the broker ends the session; read to EOF so close() sends no RST
    s.close()
    assert closed
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (200, "ok"), e.raw
    U.wait_until(lambda: "Client polite disconnected" in mosquitto.log(), 10, what="broker to log DISCONNECT")


# ----------------------------------------------------------------------------- idle timeout


@pytest.mark.parametrize("tls", MODES)
def test_idle_timeout(certs, mosquitto, start_proxy, tls):
    """--idle-timeout 1: an idle session is closed after about 1 s and logged 200 idle-timeout;
    a session with traffic every 0.3 s stays open."""
    fp = start_proxy(mosquitto, "--idle-timeout", "1", tls=tls)
    busy = _session(fp, certs, tls, "busy")
    idle = _session(fp, certs, tls, "idle")
    t0 = time.monotonic()
    closed = False
    # keep `busy` alive with PINGREQ for 3 s; `idle` must be closed meanwhile
    while time.monotonic() - t0 < 3.0:
        busy.sendall(U.PINGREQ)
        busy.settimeout(5)
        ptype, _, _ = U.read_packet(busy)
        assert ptype == 13, "PINGRESP expected on the busy session"
        if not closed:
            c, _, _ = U.wait_closed(idle, 0.3)
            if c:
                closed = True
                idle_closed_after = time.monotonic() - t0
        else:
            time.sleep(0.3)
    assert closed, "the idle session was not closed within 3 s with --idle-timeout 1"
    assert idle_closed_after >= 0.7, f"idle session closed too early ({idle_closed_after:.2f}s)"
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (200, "idle-timeout"), e.raw
    assert e.clientid in ("idle", "-")
    assert 0.8 <= e.session_time < 5, e.raw
    # the busy session survived; once it stops talking it is cut too
    closed, _, waited = U.wait_closed(busy, 6)
    assert closed, "busy session not closed after going idle"
    idle.close()
    busy.close()
    entries = fp.wait_access(n=2)
    assert [x.reason for x in entries] == ["idle-timeout", "idle-timeout"]


@pytest.mark.parametrize("direction", ["to-client", "from-client"])
def test_idle_timeout_one_way_traffic_keeps_session(certs, mosquitto, start_proxy, paho_client, direction):
    """Idle means idle in both directions: traffic flowing only one way keeps a session open."""
    fp = start_proxy(mosquitto, "--idle-timeout", "1")
    s = _session(fp, certs, True, f"oneway-{direction}")
    if direction == "to-client":
        s.sendall(U.subscribe_packet(1, "oneway/t", qos=0))
        s.settimeout(5)
        assert U.read_packet(s)[0] == 9
        feeder = paho_client(mosquitto.port, client_id="feeder", tls=False)  # straight to the broker
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        if direction == "to-client":
            feeder.publish("oneway/t", b"tick", qos=0)
            s.settimeout(5)
            ptype, _, _ = U.read_packet(s)
            assert ptype == 3, "the subscriber's session was cut although messages kept flowing to it"
        else:
            s.sendall(U.publish_packet("oneway/nobody", b"tick"))
        time.sleep(0.3)
    s.sendall(U.PINGREQ)
    s.settimeout(5)
    assert U.read_packet(s)[0] == 13, "session cut although traffic flowed one way every 0.3 s"
    s.close()


# ----------------------------------------------------------------------------- slow consumer


def test_slow_subscriber_memory_bounded(certs, mosquitto, start_proxy, paho_client, raw_sockets):
    """A subscriber that never reads while ~50 MB are published: the proxy's RSS stays bounded
    (backpressure instead of buffering), and other sessions keep flowing."""
    fp = start_proxy(mosquitto)
    ctx = U.client_context(certs)
    # the stuck subscriber: small receive buffer, subscribes, then never reads again
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    raw.settimeout(10)
    raw.connect((U.HOST, fp.port))
    slow = raw_sockets(ctx.wrap_socket(raw, server_hostname=U.HOST))
    assert U.mqtt_handshake(slow, "stuck-sub") == 0
    slow.sendall(U.subscribe_packet(1, "flood/#", qos=0))
    ptype, _, _ = U.read_packet(slow)
    assert ptype == 9, "SUBACK expected"

    pub = raw_sockets(U.open_socket(fp.port, tls_ctx=ctx, timeout=60))
    assert U.mqtt_handshake(pub, "flood-pub") == 0
    chunk = U.publish_packet("flood/x", b"\xab" * (64 * 1024 - 16))
    for _ in range(4):  # warm-up: buffers and pools the engine keeps anyway
        pub.sendall(chunk)
    time.sleep(0.5)
    base = U.rss_kib(fp.pid)
    peak = base
    total = 50 * 1024 * 1024
    sent = 0
    t0 = time.monotonic()
    while sent < total:
        pub.sendall(chunk)  # socket timeout 60 s: a stalled publisher fails here
        sent += len(chunk)
        if (sent // len(chunk)) % 25 == 0:
            peak = max(peak, U.rss_kib(fp.pid))
        assert time.monotonic() - t0 < 120, "publishing 50 MB took more than 120 s"
    # give the broker time to push what it can towards the stuck subscriber
    for _ in range(20):
        time.sleep(0.1)
        peak = max(peak, U.rss_kib(fp.pid))
    growth_mib = (peak - base) / 1024
    print(f"proxy RSS base {base / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB; broker RSS "
          f"{U.rss_kib(mosquitto.proc.pid) / 1024:.1f} MiB after {sent / 2**20:.0f} MiB published")
    assert growth_mib < 30, f"proxy RSS grew by {growth_mib:.1f} MiB (base {base / 1024:.1f} MiB)"
    # the event loop is not blocked by the stuck session
    _relay_works(fp.port, paho_client, "beside-stuck")
    assert fp.proc.poll() is None


# ----------------------------------------------------------------------------- many connections


def test_2000_concurrent_connections(mosquitto, start_proxy):
    """2000 simultaneous plain-TCP sessions, each with a CONNECT/CONNACK round trip; all are logged."""
    n = 2000
    limit = U.raise_nofile(n * 2 + 500)
    if limit < n + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit too low ({limit}) for {n} connections")
    fp = start_proxy(mosquitto, tls=False)
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 120
        for i in range(n):
            s = socket.socket()
            socks.append(s)
            s.settimeout(20)
            s.connect((U.HOST, fp.port))
            s.sendall(U.connect_packet(f"c{i:05d}", keepalive=0))
            assert time.monotonic() < deadline, f"only {i} connections opened in 120 s"
        bad = []
        for i, s in enumerate(socks):
            s.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                ptype, _, body = U.read_packet(s)
                if ptype != 2 or body[1] != 0:
                    bad.append((i, ptype, body))
            except OSError as e:
                bad.append((i, repr(e)))
        assert not bad, f"{len(bad)} of {n} sessions failed, e.g. {bad[:5]}"
        # all are open at once: a client fd and an upstream fd each in the proxy
        nfds = len(os.listdir(f"/proc/{fp.pid}/fd"))
        assert nfds >= 2 * n, f"proxy holds only {nfds} fds with {n} sessions open"
    finally:
        for s in socks:
            s.close()
    fp.wait_access(n=n, timeout=60)
    time.sleep(0.3)
    assert len(fp.access_log()) == n, "not exactly one access-log line per connection"
    assert fp.proc.poll() is None


def test_300_concurrent_tls_sessions(certs, mosquitto, start_proxy):
    """300 TLS sessions held open at once; each then does a PINGREQ/PINGRESP round trip."""
    n = 300
    U.raise_nofile(n * 2 + 200)
    fp = start_proxy(mosquitto)
    ctx = U.client_context(certs)
    socks = []
    try:
        for i in range(n):
            s = U.open_socket(fp.port, tls_ctx=ctx)
            socks.append(s)
            s.sendall(U.connect_packet(f"t{i:04d}"))
        for s in socks:
            ptype, _, body = U.read_packet(s)
            assert ptype == 2 and body[1] == 0
        for s in socks:
            s.sendall(U.PINGREQ)
        for s in socks:
            ptype, _, _ = U.read_packet(s)
            assert ptype == 13
    finally:
        for s in socks:
            s.close()
    entries = fp.wait_access(n=n, timeout=30)
    assert all(e.status == 200 and e.protocol == "TLSv1.3" for e in entries)


# ----------------------------------------------------------------------------- leaks and backpressure


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_fd_leak_after_aborted_connections(certs, mosquitto, start_proxy, paho_client):
    """Connections aborted at every stage (before/mid handshake, after CONNECT, by RST or FIN) leave
    no file descriptor behind, and each one gets exactly one access-log line."""
    fp = start_proxy(mosquitto)
    time.sleep(0.3)
    base = _fd_count(fp.pid)
    ctx = U.client_context(certs)
    linger0 = struct.pack("ii", 1, 0)
    n = 0
    for i in range(40):
        kind = i % 4
        s = socket.create_connection((U.HOST, fp.port), timeout=10)
        n += 1
        if kind == 0:  # connect and vanish with RST
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            s.close()
        elif kind == 1:  # half a ClientHello, then FIN
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            s.close()
        elif kind == 2:  # full session, RST after CONNACK
            t = ctx.wrap_socket(s, server_hostname=U.HOST)
            assert U.mqtt_handshake(t, f"abort{i}") == 0
            t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
            t.close()
        else:  # TLS handshake done, FIN before any MQTT byte
            t = ctx.wrap_socket(s, server_hostname=U.HOST)
            t.close()
    fp.wait_access(n=n, timeout=20)
    U.wait_until(lambda: _fd_count(fp.pid) <= base, 10,
                 what=f"proxy fds to return to {base} (now {_fd_count(fp.pid)})")
    time.sleep(0.3)
    assert len(fp.access_log()) == n
    _relay_works(fp.port, paho_client, "after-aborts")


class _DeafUpstream:
    """A loopback 'broker' that answers CONNECT with CONNACK and then never reads again."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # inherited by accepted sockets
        self.sock.bind((U.HOST, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(15)
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self.conns.append(conn)
        conn.settimeout(10)
        try:
            if U.read_packet(conn)[0] == 1:
                conn.sendall(b"\x20\x02\x00\x00")
        except OSError:
            return
        self.ready.set()

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()
        self.thread.join(5)


@pytest.mark.parametrize("tls", MODES)
def test_upstream_not_reading_memory_bounded(certs, start_proxy, tls):
    """The upstream stops reading while a client pushes ~50 MB: the proxy stops reading the client
    (the client's send blocks) instead of buffering; RSS stays bounded."""
    up = _DeafUpstream()
    try:
        fp = start_proxy(f"127.0.0.1:{up.port}", tls=tls)
        s = _session(fp, certs, tls, "pusher")
        assert up.ready.wait(10)
        time.sleep(0.3)
        base = peak = U.rss_kib(fp.pid)
        chunk = U.publish_packet("push/x", b"\xcd" * (64 * 1024 - 16))
        s.settimeout(3)
        sent, blocked = 0, False
        t0 = time.monotonic()
        while sent < 50 * 1024 * 1024 and time.monotonic() - t0 < 60:
            try:
                s.sendall(chunk)
            except (TimeoutError, socket.timeout):
                blocked = True
                break
            sent += len(chunk)
            if (sent // len(chunk)) % 25 == 0:
                peak = max(peak, U.rss_kib(fp.pid))
        peak = max(peak, U.rss_kib(fp.pid))
        growth_mib = (peak - base) / 1024
        assert blocked, f"the client could push {sent / 2**20:.0f} MiB into a proxy whose upstream reads nothing"
        assert growth_mib < 30, f"proxy RSS grew by {growth_mib:.1f} MiB while the upstream was not reading"
        assert fp.proc.poll() is None
        s.close()
    finally:
        up.close()


def test_half_closed_session_ends_after_grace(mosquitto, start_proxy):
    """A client that sends DISCONNECT but never closes its socket: the broker closes, the proxy
    passes the FIN on, and ends the session after the half-closed grace (5 s), not the 60 s idle
    timeout; it is logged as an ordinary end (200 ok)."""
    fp = start_proxy(mosquitto, tls=False)
    s = U.open_socket(fp.port)
    try:
        assert U.mqtt_handshake(s, "half-open") == 0
        s.sendall(b"\xe0\x00")  # DISCONNECT; the socket stays open
        t0 = time.monotonic()
        assert s.recv(10) == b""  # FIN relayed from the broker's close
        entries = fp.wait_access(lambda e: True, n=1, timeout=15)
        waited = time.monotonic() - t0
        assert 3.0 <= waited <= 12.0, waited
        assert entries[0].status == 200 and entries[0].reason == "ok", entries[0].raw
    finally:
        s.close()
