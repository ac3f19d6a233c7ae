"""The MQTT gate: the client's first packet must be a valid CONNECT, read and checked before any
upstream connection exists (docs/CONTRACT.md, "MQTT awareness and device identity";
docs/mqtt-parser.md for what the peer is told).

Raw sockets through TLS and plain listeners, real Mosquitto upstream. Every refusal checks that
Mosquitto never saw a connection (its log has "New connection from" for each one) and that a
good client still gets through afterwards.
"""
from __future__ import annotations

import random
import socket
import ssl
import struct
import time

import pytest

import fastproxy
import proxyutil as U
from mqtt_reference import Will, encode_connect

MODES = ["tls", "plain"]


def proxy(start_proxy, upstream, mode: str, *flags: str, **kw):
    return start_proxy(upstream, *flags, tls=(mode == "tls"), **kw)


def ctx_of(certs, mode: str) -> ssl.SSLContext | None:
    return U.client_context(certs) if mode == "tls" else None


def prove_serving(fp, broker, certs, mode: str, before: int, client_id: str) -> None:
    """A good client connects after the refusals; it is the only new connection the broker saw."""
    o = U.try_connect(fp.port, U.connect_packet(client_id, keepalive=30), tls_ctx=ctx_of(certs, mode))
    assert o.code == 0, f"a good client was refused after the refusals: {o}\n{fp.stderr()[-2000:]}"
    U.wait_until(lambda: client_id in U.broker_client_ids(broker.log()), 10, what=f"{client_id} at the broker")
    log = broker.log()
    assert U.broker_connections(log) == before + 1, f"a refused client reached the broker:\n{log[-3000:]}"
    assert fp.proc.poll() is None


def v5_connack(code: int) -> bytes:
    return bytes([0x20, 3, 0, code, 0])


def v3_connack(code: int) -> bytes:
    return bytes([0x20, 2, 0, code])


# name -> (first bytes, expected CONNACK or None for "closed without CONNACK")
BAD_FIRST_PACKETS = {
    "publish-first": (U.publish_packet("t", b"hello"), None),
    "subscribe-first": (U.subscribe_packet(1, "t"), None),
    "connack-first": (b"\x20\x02\x00\x00", None),
    "pingreq-first": (U.PINGREQ, None),
    "http-request": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", None),
    "connect-flags-in-fixed-header": (b"\x12" + encode_connect(4, "x")[1:], None),
    "remaining-length-5-bytes": (b"\x10\xff\xff\xff\xff\x01", None),
    "wrong-protocol-name": (encode_connect(4, "x", protocol_name=b"MQTX"), None),
    "protocol-name-mqisdp-level-4": (encode_connect(4, "x", protocol_name=b"MQIsdp"), v3_connack(0x01)),
    "protocol-level-2": (encode_connect(4, "x", level=2), v3_connack(0x01)),
    # docs/mqtt-parser.md: a level >= 5 that is not 5.0 gets the 5.0 answer 0x84
    "protocol-level-6": (encode_connect(4, "x", level=6), v5_connack(0x84)),
    "v311-reserved-connect-flag": (encode_connect(4, "x", flags=0x03), None),
    "v311-password-without-username": (encode_connect(4, "x", flags=0x42) + b"\x00\x02pw", None),
    "v311-clientid-bad-utf8": (encode_connect(4, b"\xc0\x80"), None),
    "v311-trailing-bytes": (encode_connect(4, "x", extra=b"\x00"), None),
    "v5-reserved-connect-flag": (encode_connect(5, "x", flags=0x03), v5_connack(0x81)),
    "v5-trailing-bytes": (encode_connect(5, "x", extra=b"\x00"), v5_connack(0x81)),
    "v5-clientid-bad-utf8": (encode_connect(5, b"\xed\xa0\x80"), v5_connack(0x81)),
    # What Mosquitto refuses as malformed UTF-8 (controls, non-characters; STRICT_STRINGS below)
    "v311-clientid-del": (encode_connect(4, "dev\x7f"), v3_connack(0x02)),
    "v5-clientid-c1-control": (encode_connect(5, "dev\x85"), v5_connack(0x85)),
    "v311-will-topic-c1-control": (encode_connect(4, "x", will=Will("t/\x9f", b"")), None),
    "v5-will-topic-noncharacter": (encode_connect(5, "x", will=Will("t/\uffff", b"")), v5_connack(0x81)),
    "v311-username-escape": (encode_connect(4, "x", username="u\x1b"), None),
    "v5-username-fdd0": (encode_connect(5, "x", username="\ufdd0"), v5_connack(0x81)),
}
STRICT_STRINGS = ["v311-clientid-del", "v5-clientid-c1-control", "v311-will-topic-c1-control",
                  "v5-will-topic-noncharacter", "v311-username-escape", "v5-username-fdd0"]


@pytest.mark.parametrize("mode", MODES)
def test_invalid_first_packet_is_refused_before_the_broker(certs, mosquitto, start_proxy, mode):
    """Not a CONNECT, a 5-byte Remaining Length, a wrong protocol name, a malformed 3.1.1 CONNECT:
    closed without CONNACK. Unsupported protocol level: CONNACK 0x01 (3.1.1 format, level < 5) or
    0x84 (5.0 format, level 6). A malformed 5.0 CONNECT: CONNACK 0x81, then closed. All logged
    400 bad-connect; nothing reaches Mosquitto."""
    fp = proxy(start_proxy, mosquitto, mode)
    before = U.broker_connections(mosquitto.log())
    problems = []
    for name, (data, want) in BAD_FIRST_PACKETS.items():
        o = U.try_connect(fp.port, data, tls_ctx=ctx_of(certs, mode))
        if o.connack != want or not o.closed:
            problems.append(f"{name}: expected {want!r} then close, got connack={o.connack!r} "
                            f"closed={o.closed} error={o.error}")
    assert not problems, "\n".join(problems)
    entries = fp.wait_access(n=len(BAD_FIRST_PACKETS))
    assert all((e.status, e.reason) == (400, "bad-connect") for e in entries), [e.raw for e in entries]
    assert all(e.clientid == "-" for e in entries), [e.raw for e in entries]
    assert all(e.sent in (0, 4, 5) for e in entries), [e.raw for e in entries]
    assert "first packet is not CONNECT" in fp.stderr() or "bad-connect" in fp.stderr(), fp.stderr()
    prove_serving(fp, mosquitto, certs, mode, before, f"after-bad-{mode}")


def test_strings_the_broker_refuses_are_refused_by_the_proxy(mosquitto):
    """The strictness matches the broker: each STRICT_STRINGS CONNECT sent straight to Mosquitto
    is dropped by it (no CONNACK 0; the client would just see a close), which is why the proxy
    refuses it itself, with the CONNACK the table above expects."""
    for name in STRICT_STRINGS:
        data, _ = BAD_FIRST_PACKETS[name]
        o = U.try_connect(mosquitto.port, data, timeout=5)
        assert o.code != 0 and o.closed, f"{name}: Mosquitto accepted it: {o}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("version", [4, 5])
def test_second_connect_in_first_segment_is_refused(certs, mosquitto, start_proxy, mode, version):
    """[MQTT-3.1.0-2]: a second CONNECT is a protocol violation. Sent together with the first
    (directly behind it, or behind a PUBLISH), it refuses the client: 5.0 CONNACK 0x82, 3.1.1
    closed without CONNACK; 400 bad-connect with the first ClientId; nothing reaches the
    broker. A CONNECT followed by other packets is still relayed (pipelining is allowed)."""
    fp = proxy(start_proxy, mosquitto, mode)
    before = U.broker_connections(mosquitto.log())
    first = encode_connect(version, "first-id", keepalive=30)
    for tail in (encode_connect(version, "second-id"),
                 U.publish_packet("t", b"x", version=version) + encode_connect(version, "second-id")):
        o = U.try_connect(fp.port, first + tail, tls_ctx=ctx_of(certs, mode))
        assert o.closed and o.connack == (v5_connack(0x82) if version == 5 else None), o
    entries = fp.wait_access(n=2)
    assert [(e.status, e.reason, e.clientid) for e in entries] == [(400, "bad-connect", "first-id")] * 2, \
        [e.raw for e in entries]
    U.wait_until(lambda: "a second CONNECT follows the first" in fp.stderr(), 10, what="the log line")
    ids = U.broker_client_ids(mosquitto.log())
    assert "first-id" not in ids and "second-id" not in ids, ids
    prove_serving(fp, mosquitto, certs, mode, before, f"after-second-connect-{mode}-{version}")


@pytest.mark.parametrize("mode", MODES)
def test_max_connect_size(certs, mosquitto, start_proxy, mode):
    """--max-connect-size 1KiB: a CONNECT of exactly 1024 bytes is accepted; 1025 bytes is refused
    (5.0: CONNACK 0x95 then close; 3.1.1: closed without CONNACK), as is a 3 KiB one; 400 bad-connect."""
    fp = proxy(start_proxy, mosquitto, mode, "--max-connect-size", "1KiB")
    ctx = ctx_of(certs, mode)

    def sized(version: int, client_id: str, size: int) -> bytes:
        n = size - len(encode_connect(version, client_id, username=""))
        pkt = encode_connect(version, client_id, username="u" * n)
        pkt = encode_connect(version, client_id, username="u" * (n - (len(pkt) - size)))  # varint grew
        assert len(pkt) == size, len(pkt)
        return pkt

    for v in (4, 5):
        o = U.try_connect(fp.port, sized(v, f"exact-{v}-{mode}", 1024), tls_ctx=ctx)
        assert o.code == 0, (v, o)
    before = U.broker_connections(mosquitto.log())
    for size in (1025, 3072):
        o = U.try_connect(fp.port, sized(5, f"big5-{size}", size), tls_ctx=ctx)
        assert o.connack == v5_connack(0x95) and o.closed, (size, o)
        o = U.try_connect(fp.port, sized(4, f"big4-{size}", size), tls_ctx=ctx)
        assert o.connack is None and o.closed, (size, o)
    entries = fp.wait_access(n=6)
    assert [(e.status, e.reason) for e in entries[2:]] == [(400, "bad-connect")] * 4, [e.raw for e in entries]
    assert [e.status for e in entries[:2]] == [200, 200], [e.raw for e in entries]
    ids = U.broker_client_ids(mosquitto.log())
    assert f"exact-4-{mode}" in ids and f"exact-5-{mode}" in ids
    prove_serving(fp, mosquitto, certs, mode, before, f"after-big-{mode}")
    assert not any(i.startswith("big") for i in U.broker_client_ids(mosquitto.log()))


@pytest.mark.parametrize("mode", MODES)
def test_connect_split_one_byte_per_segment(certs, mosquitto, start_proxy, mode):
    """A CONNECT sent one byte per TCP segment (TCP_NODELAY; one TLS record per byte with TLS),
    short and longer than the engine's 64-byte early-parse window, is accepted."""
    fp = proxy(start_proxy, mosquitto, mode)
    short = encode_connect(5, f"split-short-{mode}", keepalive=30, properties=[("session_expiry_interval", 0)])
    long_ = encode_connect(4, f"split-long-{mode}", keepalive=30, username="user", password=b"pw" * 10,
                           will=Will("will/split", b"w" * 100))
    assert len(short) < 64 < len(long_)
    for pkt in (short, long_):
        o = U.try_connect(fp.port, pkt, tls_ctx=ctx_of(certs, mode), split=True)
        assert o.code == 0, o
    U.wait_until(lambda: {f"split-short-{mode}", f"split-long-{mode}"} <= set(U.broker_client_ids(mosquitto.log())),
                 10, what="both split clients at the broker")
    entries = fp.wait_access(n=2)
    assert [(e.status, e.clientid) for e in entries] == [(200, f"split-short-{mode}"), (200, f"split-long-{mode}")]


@pytest.mark.parametrize("mode", MODES)
def test_connect_coalesced_with_following_packets(certs, mosquitto, start_proxy, mode):
    """CONNECT + PUBLISH (QoS 1) + PUBLISH (QoS 0, 50 KiB) in one write: the packets behind the
    CONNECT reach the broker intact (a subscriber receives them, the client gets its PUBACK)."""
    fp = proxy(start_proxy, mosquitto, mode)
    sub = U.MosqSub(mosquitto.port, None, "gate/coalesced", count=2, client_id="direct-sub", qos=1, timeout=20)
    try:
        sub.wait_subscribed(mosquitto.log)
        big = bytes(random.Random(5).randrange(33, 127) for _ in range(50 * 1024))
        data = (U.connect_packet(f"coalesced-{mode}", keepalive=30)
                + U.publish_packet("gate/coalesced", b"first", qos=1, mid=7)
                + U.publish_packet("gate/coalesced", big))
        s = U.open_socket(fp.port, tls_ctx=ctx_of(certs, mode))
        try:
            s.sendall(data)
            ptype, _, body = U.read_packet(s)
            assert (ptype, body) == (2, b"\x00\x00")
            ptype, _, body = U.read_packet(s)
            assert (ptype, body) == (4, b"\x00\x07"), "no PUBACK for the PUBLISH coalesced with the CONNECT"
            s.sendall(U.DISCONNECT)
            U.wait_closed(s, 10)
        finally:
            s.close()
        rc, out, err = sub.result(timeout=20)
    finally:
        sub.kill()
    assert out == b"first\n" + big + b"\n", (rc, len(out), err)
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid) == (200, "ok", f"coalesced-{mode}"), e.raw
    assert e.received == len(data) + len(U.DISCONNECT), e.raw


@pytest.mark.parametrize("mode", MODES)
def test_large_valid_connect(certs, mosquitto, start_proxy, mode):
    """A 5.0 CONNECT of ~58 KiB (40 KiB of user properties, a 16 KiB will payload) fits the
    default --max-connect-size 64KiB and is forwarded intact, with a 100 KiB PUBLISH written
    right behind it: both are accepted and delivered, and when the client vanishes, the broker
    publishes the whole will."""
    fp = proxy(start_proxy, mosquitto, mode)
    will_payload = random.Random(9).randbytes(16 * 1024)
    props = [("user_property", (f"key{i}", "v" * 400)) for i in range(100)]
    pkt = encode_connect(5, f"large-{mode}", keepalive=60, properties=props,
                         will=Will(f"will/large-{mode}", will_payload, qos=1))
    assert 56 * 1024 < len(pkt) < 64 * 1024
    data = random.Random(10).randbytes(100 * 1024)
    publish = U.publish_packet(f"data/large-{mode}", data, qos=1, mid=9, version=5)
    sub = U.PahoClient(mosquitto.port, client_id="will-sub", version=5)
    sub.connect()
    try:
        sub.subscribe(f"will/large-{mode}", 1)
        sub.subscribe(f"data/large-{mode}", 1)
        s = U.open_socket(fp.port, tls_ctx=ctx_of(certs, mode))
        try:
            s.sendall(pkt + publish)  # and a 100 KiB PUBLISH right behind it, in the same write
            ptype, _, body = U.read_packet(s)
            assert ptype == 2 and body[1] == 0, body
            ptype, _, body = U.read_packet(s)
            assert ptype == 4 and body[:2] == b"\x00\x09", (ptype, body)
        finally:
            s.close()  # no DISCONNECT: the broker publishes the will
        got = sub.collect(2, timeout=15)
    finally:
        sub.close()
    assert [m.topic for m in got] == [f"data/large-{mode}", f"will/large-{mode}"], got
    assert got[0].payload == data, "the PUBLISH behind the large CONNECT did not arrive intact"
    assert got[1].payload == will_payload, "the will of the large CONNECT did not arrive intact"
    assert f"large-{mode}" in U.broker_client_ids(mosquitto.log())
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.clientid) == (200, f"large-{mode}") and e.received == len(pkt) + len(publish), e.raw


@pytest.mark.parametrize("mode", MODES)
def test_connect_timeout(certs, mosquitto, start_proxy, raw_sockets, mode):
    """--connect-timeout 1: a client that sends nothing, and one that stops half-way through its
    CONNECT, are closed after about a second (never before) and logged 400 connect-timeout."""
    fp = proxy(start_proxy, mosquitto, mode, "--connect-timeout", "1")
    before = U.broker_connections(mosquitto.log())
    ctx = ctx_of(certs, mode)
    silent = raw_sockets(U.open_socket(fp.port, tls_ctx=ctx))
    half = raw_sockets(U.open_socket(fp.port, tls_ctx=ctx))
    pkt = U.connect_packet("half-connect")
    half.sendall(pkt[: len(pkt) // 2])
    for name, s in (("silent", silent), ("half", half)):
        closed, data, waited = U.wait_closed(s, 10)
        assert closed, f"{name}: still open {waited:.1f}s after connecting, with --connect-timeout 1"
        assert data == b"", f"{name}: got {data!r}"
    entries = fp.wait_access(n=2)
    assert [(e.status, e.reason) for e in entries] == [(400, "connect-timeout")] * 2, [e.raw for e in entries]
    assert all(e.session_time >= 0.9 for e in entries), [e.raw for e in entries]
    prove_serving(fp, mosquitto, certs, mode, before, f"after-timeout-{mode}")


@pytest.mark.parametrize("mode", MODES)
def test_connect_trickle_is_cut_at_connect_timeout(certs, mosquitto, start_proxy, mode):
    """Slowloris: a CONNECT trickled one byte every 0.25 s (progress all along) is still cut when
    --connect-timeout 1 expires, not when the bytes stop."""
    fp = proxy(start_proxy, mosquitto, mode, "--connect-timeout", "1")
    before = U.broker_connections(mosquitto.log())
    pkt = U.connect_packet("trickle-" + "x" * 40)
    s = U.open_socket(fp.port, tls_ctx=ctx_of(certs, mode))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = 0
    try:
        for i in range(len(pkt) - 1):
            try:
                s.sendall(pkt[i:i + 1])
            except (OSError, ssl.SSLError):
                break
            sent += 1
            closed, _, _ = U.wait_closed(s, 0.25)
            if closed:
                break
        else:
            raise AssertionError("the trickling client was never cut")
    finally:
        s.close()
    assert sent < len(pkt) - 1
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (400, "connect-timeout"), e.raw
    prove_serving(fp, mosquitto, certs, mode, before, f"after-trickle-{mode}")


@pytest.mark.parametrize("limit,size", [("1KiB", 20 * 1024), ("64KiB", 100 * 1024)])
@pytest.mark.parametrize("mode", MODES)
def test_oversized_connect_in_one_read_is_bad_connect(certs, mosquitto, start_proxy, mode, limit, size):
    """A CONNECT declared larger than --max-connect-size and larger than one read (so the first
    read already holds more than its fixed header) is refused like any oversized CONNECT: 400
    bad-connect (not 500 internal-error), and a 5.0 client reads CONNACK 0x95."""
    fp = proxy(start_proxy, mosquitto, mode, "--max-connect-size", limit)
    n = size // 25000 + 1
    pkt = encode_connect(5, "huge", properties=[("user_property", ("k", "v" * (size // n)))] * n)
    assert len(pkt) >= size
    o = U.try_connect(fp.port, pkt, tls_ctx=ctx_of(certs, mode))
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (400, "bad-connect"), e.raw
    assert o.connack == v5_connack(0x95), f"the client never read CONNACK 0x95: {o}"


@pytest.mark.parametrize("mode", MODES)
def test_oversized_connect_sent_in_one_go_still_gets_connack(certs, mosquitto, start_proxy, mode):
    """A 5.0 client that writes a 200 KiB CONNECT at once (as clients do) to a listener with
    --max-connect-size 1KiB reads CONNACK 0x95 before the close: the proxy must not reset the
    connection while the rest of the packet is still arriving (lingering close)."""
    fp = proxy(start_proxy, mosquitto, mode, "--max-connect-size", "1KiB")
    pkt = encode_connect(5, "huge", properties=[("user_property", ("k", "v" * 25000))] * 8)
    assert len(pkt) > 200_000
    o = U.try_connect(fp.port, pkt, tls_ctx=ctx_of(certs, mode))
    assert o.connack == v5_connack(0x95), f"the client never read CONNACK 0x95: {o}"


def _close_quietly(s: socket.socket) -> None:
    """Close with a FIN: first let a TLS socket take the server's post-handshake messages (TLS 1.3
    session tickets), which would otherwise sit unread and turn close() into a reset."""
    if isinstance(s, ssl.SSLSocket):
        s.settimeout(0.2)
        try:
            s.recv(1)
        except (socket.timeout, TimeoutError, ssl.SSLError, OSError):
            pass
    s.close()


def _close_with_reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@pytest.mark.parametrize("how", ["fin", "reset"])
@pytest.mark.parametrize("mode", MODES)
def test_client_closes_before_whole_connect(certs, mosquitto, start_proxy, mode, how):
    """A client that goes away after part of a CONNECT, or after nothing at all, whether with a
    FIN or a reset: 400 no-connect (a session that was never established is not 200 client-reset)."""
    fp = proxy(start_proxy, mosquitto, mode)
    before = U.broker_connections(mosquitto.log())
    ctx = ctx_of(certs, mode)
    pkt = U.connect_packet("partial-connect")
    parts = (pkt[:1], pkt[:5], pkt[:-1], b"")
    for part in parts:
        s = U.open_socket(fp.port, tls_ctx=ctx)
        if part:
            s.sendall(part)
        if how == "fin":
            _close_quietly(s)
        else:
            time.sleep(0.1)  # let the proxy read what was sent
            _close_with_reset(s)
        fp.wait_access(n=parts.index(part) + 1)  # one at a time: the log order is the send order
    entries = fp.wait_access(n=4)
    assert [(e.status, e.reason) for e in entries] == [(400, "no-connect")] * 4, [e.raw for e in entries]
    assert [e.received for e in entries] == [len(p) for p in parts], [e.raw for e in entries]
    prove_serving(fp, mosquitto, certs, mode, before, f"after-partial-{mode}-{how}")


@pytest.mark.parametrize("mode", MODES)
def test_mqtt_off_relays_any_bytes(certs, echo_server, start_proxy, mode):
    """--mqtt off: the listener is a plain byte relay; non-MQTT bytes reach a (non-MQTT) echo
    upstream untouched and come back."""
    fp = proxy(start_proxy, f"127.0.0.1:{echo_server.port}", mode, "--mqtt", "off")
    blob = b"GET / HTTP/1.1\r\n\r\n" + random.Random(3).randbytes(200_000)
    s = U.open_socket(fp.port, tls_ctx=ctx_of(certs, mode))
    try:
        s.sendall(blob)
        got = bytearray()
        s.settimeout(10)
        while len(got) < len(blob):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    assert bytes(got) == blob
    assert echo_server.accepted == 1 and bytes(echo_server.received) == blob
    (e,) = fp.wait_access(n=1)
    assert e.status == 200 and e.sent == e.received == len(blob) and e.clientid == "-", e.raw


@pytest.mark.parametrize("mode", MODES)
def test_mqtt_on_never_connects_upstream_for_non_mqtt(certs, echo_server, start_proxy, mode):
    """The default (--mqtt on) with the same echo upstream: the non-MQTT client is closed, and the
    upstream never even sees a TCP connection."""
    fp = proxy(start_proxy, f"127.0.0.1:{echo_server.port}", mode)
    o = U.try_connect(fp.port, b"GET / HTTP/1.1\r\n\r\n", tls_ctx=ctx_of(certs, mode))
    assert o.connack is None and o.closed, o
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason) == (400, "bad-connect"), e.raw
    time.sleep(0.3)
    assert echo_server.accepted == 0


def test_idle_timeout_keepalive(certs, fake_broker, start_proxy, raw_sockets):
    """--idle-timeout keepalive: a session whose CONNECT says keepalive 1 and then stays silent is
    closed after ~1.5 s (200 idle-timeout); keepalive 10 and keepalive 0 (none) stay open through
    3 s of silence, and so does a keepalive-1 client that sends PINGREQ every 0.4 s.
    (A stand-in broker that never times anyone out, so that only the proxy can close.)"""
    fp = start_proxy(fake_broker.upstream, "--idle-timeout", "keepalive")
    ctx = U.client_context(certs)
    socks = {}
    t0 = {}
    for name, ka in (("ka1", 1), ("ka10", 10), ("ka0", 0), ("ka1-ping", 1)):
        s = raw_sockets(U.open_socket(fp.port, tls_ctx=ctx))
        assert U.mqtt_handshake(s, name, keepalive=ka) == 0
        t0[name] = time.monotonic()
        socks[name] = s
    # keep ka1-ping busy while the others are silent for 3 s
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        socks["ka1-ping"].sendall(U.PINGREQ)
        ptype, _, _ = U.read_packet(socks["ka1-ping"])
        assert ptype == 13
        time.sleep(0.4)
    closed, _, _ = U.wait_closed(socks["ka1"], 10)
    assert closed, "the keepalive-1 session was not closed"
    for name in ("ka10", "ka0", "ka1-ping"):
        s = socks[name]
        s.settimeout(5)
        s.sendall(U.PINGREQ)
        ptype, _, _ = U.read_packet(s)
        assert ptype == 13, f"{name}: no PINGRESP after 3 s"
    (e,) = fp.wait_access(n=1)
    assert (e.status, e.reason, e.clientid) == (200, "idle-timeout", "ka1"), e.raw
    assert 1.2 <= e.session_time, f"closed before 1.5 x keepalive: {e.raw}"
    assert e.session_time < 3.5, f"keepalive 1 must give an idle timeout of about 1.5 s, not the default: {e.raw}"


def test_idle_timeout_keepalive_needs_mqtt(certs):
    r = U.run_cli("check", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1883",
                  "--idle-timeout", "keepalive", "--mqtt", "off")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--idle-timeout" in lines[0], r.stderr


def test_gate_counters_in_process(mosquitto):
    """Proxy.stats() counts gate outcomes by reason: bad-connect, no-connect, connect-timeout."""
    records: list[dict] = []
    cfg = fastproxy.build_config({"listen": "127.0.0.1:0", "upstream": mosquitto.upstream, "access_log": "off",
                                  "connect_timeout": "500ms"})
    p = fastproxy.Proxy(cfg, on_record=records.append).start()
    try:
        (_, port), = p.addresses[0]
        o = U.try_connect(port, U.publish_packet("t", b"x"))
        assert o.connack is None and o.closed
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"\x10")
        s.close()
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        closed, _, _ = U.wait_closed(s, 10)
        s.close()
        assert closed
        o = U.try_connect(port, encode_connect(5, "x", flags=0x01))
        assert o.connack == v5_connack(0x81)
        assert U.try_connect(port, U.connect_packet("counted-ok")).code == 0
        U.wait_until(lambda: len(records) == 5, 10, what="five session records")
        st = p.stats()
    finally:
        p.stop()
    assert sorted(r["reason"] for r in records) == sorted(
        ["bad-connect", "no-connect", "connect-timeout", "bad-connect", "ok"]), records
    assert (st["closed_bad_connect"], st["closed_no_connect"], st["closed_connect_timeout"], st["closed_ok"]) == \
        (2, 1, 1, 1), st
    assert st["active"] == 0 and st["live_buffers"] == 0, st
    assert [r["client_id"] for r in records if r["reason"] == "ok"] == ["counted-ok"]
