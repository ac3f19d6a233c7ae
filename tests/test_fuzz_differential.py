"""Differential checks on inputs derived from the committed fuzz seed corpora (docs/fuzzing.md).

Deterministic (a fixed RNG over tests/fuzz/corpus/*), bounded in time, run by scripts/test:

1. CONNECT: the compiled parser (fastproxy.mqtt.parse_connect) and the pure-Python reference
   (tests/mqtt_reference.py) reach the same verdict on mutated seeds.
2. PROXY v1/v2: the compiled parser (fastproxy.proxy_protocol.parse) and the reference
   (tests/pp_reference.py) agree on mutated seeds.
3. CONNECT against a real broker: every mutated CONNECT the parser accepts is sent, alone, to a
   real Mosquitto (Debian 12's 2.0), which must answer CONNACK 0 — the proxy never passes on
   a CONNECT the broker would choke on — unless the difference is one of DOCUMENTED_DIFFERENCES
   below (broker policy, not syntax). What the parser refuses is not asserted (it is stricter
   on purpose in places); the counts are printed.
"""
from __future__ import annotations

import random
import socket
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mqtt_reference as mref  # noqa: E402
import pp_reference as pref  # noqa: E402

from fastproxy import mqtt  # noqa: E402
from fastproxy import proxy_protocol as pp  # noqa: E402
from fastproxy.errors import InvalidProxyHeaderError, MQTTProtocolError  # noqa: E402

CORPUS = HERE / "fuzz" / "corpus"
SEED = 1306          # issue 13 part 6


def _connect_seeds() -> list[bytes]:
    """The packets of the CONNECT corpus (the harness's 3 parameter bytes stripped)."""
    return [p.read_bytes()[3:] for p in sorted((CORPUS / "connect").iterdir()) if p.is_file()]


def _proxy_seeds() -> list[bytes]:
    """The headers of the PROXY corpus's parse seeds (mode 0: the mode byte stripped)."""
    return [p.read_bytes()[1:] for p in sorted((CORPUS / "proxy").iterdir())
            if p.is_file() and p.read_bytes()[:1] == b"\x00"]


def _varint(n: int) -> bytes:
    return mref.varint(n)


def _split_fixed_header(pkt: bytes) -> tuple[int, bytes] | None:
    """(first byte, body) when pkt starts with a well-formed fixed header, else None."""
    if len(pkt) < 2:
        return None
    rl, mult, i = 0, 1, 1
    while i < len(pkt) and i <= 4:
        b = pkt[i]
        rl += (b & 0x7F) * mult
        mult *= 128
        i += 1
        if not b & 0x80:
            return pkt[0], pkt[i:i + rl]
    return None


_INTERESTING = [0x00, 0x01, 0x02, 0x04, 0x05, 0x10, 0x1F, 0x20, 0x23, 0x2B, 0x2F, 0x7F, 0x80, 0xC2,
                0xC0, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xFF, 0x26, 0x11, 0x15, 0x16, 0x18]


def mutate(rng: random.Random, pkt: bytes, *, fix_length: bool) -> bytes:
    """1-3 byte-level mutations of a packet's body; the Remaining Length is then recomputed
    when fix_length (so most mutants stay framed and reach the field checks)."""
    split = _split_fixed_header(pkt) if fix_length else None
    first, body = (split[0], bytearray(split[1])) if split else (None, bytearray(pkt))
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if not body:
            body.append(rng.randrange(256))
            continue
        i = rng.randrange(len(body))
        if op == 0:
            body[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            body[i] = rng.choice(_INTERESTING)
        elif op == 2:
            body[i] = rng.randrange(256)
        elif op == 3:
            body.insert(i, rng.choice(_INTERESTING))
        elif op == 4:
            del body[i]
        elif op == 5:       # a 16-bit length field nudged
            if i + 1 < len(body):
                v = ((body[i] << 8) | body[i + 1]) + rng.choice((-2, -1, 1, 2))
                body[i:i + 2] = (v & 0xFFFF).to_bytes(2, "big")
        elif op == 6:       # a range duplicated
            j = min(len(body), i + rng.randint(1, 8))
            body[i:i] = body[i:j]
        else:               # a printable or multi-byte UTF-8 character
            body[i:i + 1] = rng.choice(["a", "/", "+", "#", "$", "\u00e9", "\u20ac", "\U0001f600",
                                        "\ufeff", "\u200b"]).encode()
    if first is None:
        return bytes(body)
    return bytes([first]) + _varint(len(body)) + bytes(body)


def _mutants(n: int, seeds: list[bytes], salt: int) -> list[bytes]:
    rng = random.Random(SEED * 1000 + salt)
    out = []
    for k in range(n):
        s = seeds[k % len(seeds)]
        m = mutate(rng, s, fix_length=rng.random() < 0.8)
        if rng.random() < 0.05:         # cut short: the "need more" paths
            m = m[:rng.randrange(len(m) + 1)]
        out.append(m)
    return out


# ----------------------------------------------------------------------------- 1. CONNECT: C vs reference

def test_connect_compiled_matches_reference_on_corpus_mutants():
    seeds = _connect_seeds()
    assert len(seeds) >= 30
    verdicts = {"valid": 0, "invalid": 0, "need_more": 0}
    for i, pkt in enumerate(seeds + _mutants(4000, seeds, 1)):
        max_size = (65536, 65536, mqtt.MAX_PACKET_SIZE, 64)[i % 4]
        ours = mref.compiled_outcome(pkt, max_size)
        theirs = mref.reference_outcome(pkt, max_size)
        assert ours == theirs, f"compiled {ours!r} != reference {theirs!r} for {pkt.hex()}"
        verdicts[ours[0]] += 1
    # the mutants must exercise every verdict
    assert min(verdicts.values()) >= 50, verdicts


# ----------------------------------------------------------------------------- 2. PROXY: C vs reference

def _pp_outcome(fn, blob: bytes, max_length: int):
    try:
        return ("ok", fn(blob, max_length=max_length))
    except (InvalidProxyHeaderError, pref.Invalid):
        return ("invalid", None)


_PP_CHARS = b"0123456789abcdefABCDEF:. \r\nPTU"


def _pp_mutate(rng: random.Random, blob: bytes) -> bytes:
    """One or two edits; v1 lines mostly with characters of the v1 grammar, v2 headers with
    their length field then matched to the bytes present half of the time."""
    b = bytearray(blob)
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(b)) if b else 0
        op = rng.randrange(5)
        if op == 0 and b:
            b[i] = rng.choice(_PP_CHARS) if b[:1] == b"P" else rng.randrange(256)
        elif op == 1:
            b.insert(i, rng.choice(_PP_CHARS) if b[:1] == b"P" else rng.choice(_INTERESTING))
        elif op == 2 and b:
            del b[i]
        elif op == 3 and b:
            b[i] ^= 1 << rng.randrange(8)
        else:
            b = b[:rng.randrange(len(b) + 1)]
    if b[:1] == b"\r" and len(b) >= 16 and rng.random() < 0.5:
        b[14:16] = (len(b) - 16).to_bytes(2, "big")
    return bytes(b)


def test_proxy_compiled_matches_reference_on_corpus_mutants():
    seeds = _proxy_seeds()
    assert len(seeds) >= 20
    rng = random.Random(SEED)
    seen = {"ok": 0, "invalid": 0, "more": 0}
    for i, blob in enumerate(seeds + [_pp_mutate(rng, rng.choice(seeds)) for _ in range(3000)]):
        max_length = (4096, 4096, 232, 65551)[i % 4]
        ours = _pp_outcome(pp.parse, blob, max_length)
        theirs = _pp_outcome(pref.parse, blob, max_length)
        assert ours == theirs, f"compiled {ours!r} != reference {theirs!r} for {blob.hex()}"
        seen["more" if ours == ("ok", None) else ours[0]] += 1
    assert seen["ok"] >= 100 and seen["invalid"] >= 100, seen


# ----------------------------------------------------------------------------- 3. CONNECT: parser vs Mosquitto

# Accepted by the parser, refused by Mosquitto 2.0 for a reason that is broker policy or
# configuration, not packet syntax (the parser leaves these to the caller; docs/fuzzing.md).
# Each: (name, predicate on the ConnectInfo, the CONNACK codes Mosquitto may answer, why).
DOCUMENTED_DIFFERENCES = [
    ("empty ClientId, 3.1.1, Clean Session 0",
     lambda i: i.version == 4 and i.client_id == "" and not i.clean_start, {0x02},
     "[MQTT-3.1.3-8]: the server must refuse it (0x02); the parser leaves it to the caller, which "
     "may rewrite the ClientId to the certificate CN first (docs/mqtt-parser.md)"),
    ("empty ClientId, 3.1",
     lambda i: i.version == 3 and i.client_id == "", {0x02},
     "MQTT 3.1 wants 1-23 characters; left to the caller like the 3.1.1 case"),
    ("authentication method without a broker auth plugin",
     lambda i: i.version == 5 and i.auth_method is not None, {0x8C},
     "5.0 enhanced authentication: a broker without the method answers 0x8C (Bad authentication "
     "method); which methods exist is broker configuration"),
    ("Maximum Packet Size smaller than the CONNACK",
     lambda i: i.version == 5 and i.properties.get("maximum_packet_size", 1 << 28) < 64, {None},
     "the client's own limit: the broker may not send a CONNACK larger than it [MQTT-3.1.2-24] "
     "and closes the connection (\"oversize packet\"); nothing the proxy can check"),
]

# Real disagreements found by this test, reported and not yet resolved: each has its own
# strict-xfail test below, so the fix shows up as an XPASS to clean up.
#   - a Will Topic with more than 200 '/' (Mosquitto's TOPIC_HIERARCHY_LIMIT): the parser
#     accepts it, Mosquitto 2.0 closes the connection without a CONNACK ("protocol error").
WILL_TOPIC_201_SLASHES = mref.encode_connect(4, "w", will=mref.Will("/".join(["a"] * 202), b""))


def _edge_cases() -> list[bytes]:
    """Hand-picked valid CONNECTs around Mosquitto's own limits and checks."""
    E, W = mref.encode_connect, mref.Will
    return [
        E(3, "x" * 24), E(3, "y" * 100), E(3, ""), E(4, "k0", keepalive=0), E(5, "k0", keepalive=0),
        E(4, "z" * 65000), E(4, "a/+/#"), E(4, "\ufeffid"), E(4, "a\u200bb"), E(4, "\ue000"),
        E(4, "\U0010fffd"), E(4, "u", username="", password=b""), E(5, "p", password=b"x"),
        E(4, "w", will=W("$SYS/x", b"p")), E(4, "w", will=W("/", b"")),
        E(4, "w", will=W("a" * 65535, b"")), E(4, "w", will=W("/".join(["a"] * 201), b"")),
        E(4, "w", will=W("t", b"p", qos=2, retain=True)),
        E(5, "m", properties=[("maximum_packet_size", 5)]),
        E(5, "m", properties=[("maximum_packet_size", 20), ("receive_maximum", 1),
                              ("topic_alias_maximum", 0), ("session_expiry_interval", 0xFFFFFFFF),
                              ("request_response_information", 1), ("request_problem_information", 0),
                              ("user_property", ("", ""))]),
        E(5, "", clean_start=False),
        E(5, "m", will=W("t", b"\xff\xfe", properties=[("payload_format_indicator", 1)])),
        E(5, "m", will=W("t", b"", properties=[("response_topic", "/".join(["a"] * 300)),
                                              ("content_type", ""), ("correlation_data", b""),
                                              ("will_delay_interval", 10),
                                              ("message_expiry_interval", 0)])),
    ]


def _recv_connack(s: socket.socket, timeout: float = 3.0) -> bytes:
    s.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        buf += chunk
        if len(buf) >= 2 and len(buf) >= 2 + buf[1]:
            break
    return buf


def _broker_verdict(broker, pkt: bytes) -> tuple[str, int | None]:
    """('connack', code) or ('closed', None) for one connection carrying pkt."""
    with socket.create_connection((broker.host, broker.port), timeout=5) as s:
        s.sendall(pkt)
        got = _recv_connack(s)
    if len(got) >= 4 and got[0] == 0x20:
        return ("connack", got[3])
    return ("closed", None)


def _valid_mutants(target: int) -> list[tuple[bytes, mqtt.ConnectInfo]]:
    """Mutated seeds the parser accepts, up to `target`, deterministic."""
    seeds = _connect_seeds()
    rng = random.Random(SEED + 7)
    out: list[tuple[bytes, object]] = []
    seen: set[bytes] = set()
    # the hand-picked edge cases and the valid seeds first
    candidates = iter(_edge_cases() + seeds)
    tries = 0
    while len(out) < target and tries < 200 * target:
        tries += 1
        pkt = next(candidates, None)
        if pkt is None:
            pkt = mutate(rng, rng.choice(seeds), fix_length=True)
        try:
            info = mqtt.parse_connect(pkt, 65536)
        except MQTTProtocolError:
            continue
        if info is None:
            continue
        pkt = pkt[:info.packet_length]          # the CONNECT alone
        if pkt in seen:
            continue
        seen.add(pkt)
        out.append((pkt, info))
    return out


def test_mosquitto_accepts_every_connect_the_parser_accepts(mosquitto):
    cases = _valid_mutants(400)
    assert len(cases) >= 350, len(cases)
    t0 = time.monotonic()
    failures, documented = [], {}
    for pkt, info in cases:
        kind, code = _broker_verdict(mosquitto, pkt)
        if kind == "connack" and code == 0:
            continue
        for name, pred, codes, _why in DOCUMENTED_DIFFERENCES:
            if pred(info) and (code if kind == "connack" else None) in codes:
                documented[name] = documented.get(name, 0) + 1
                break
        else:
            failures.append(f"{pkt.hex()} -> {kind} {code!r} (v{info.version}, "
                            f"client_id={info.client_id!r})")
        assert time.monotonic() - t0 < 60, "the broker is too slow to answer"
    print(f"\n{len(cases)} parser-accepted CONNECTs: {len(cases) - len(failures) - sum(documented.values())} "
          f"CONNACK 0, documented differences {documented}")
    assert not failures, "Mosquitto refused CONNECTs the parser passes:\n" + "\n".join(failures[:20]) + \
        "\n--- mosquitto log tail ---\n" + mosquitto.log()[-3000:]


def test_will_topic_over_mosquittos_level_limit(mosquitto):
    """Mosquitto closes a client whose Will Topic has more than 200 levels without a CONNACK;
    the parser refuses it (5.0: 0x90), and exactly 200 levels pass both."""
    assert _broker_verdict(mosquitto, WILL_TOPIC_201_SLASHES) == ("closed", None)  # 2.0.11
    with pytest.raises(MQTTProtocolError):
        mqtt.parse_connect(WILL_TOPIC_201_SLASHES, 65536)
