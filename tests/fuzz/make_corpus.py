#!/usr/bin/env python3
"""Writes the committed seed corpora of the libFuzzer harnesses (docs/fuzzing.md):

    tests/fuzz/corpus/connect/   for ext/src/fuzz_mqtt_connect.c
    tests/fuzz/corpus/proxy/     for ext/src/fuzz_proxy_v2.c
    tests/fuzz/corpus/ws/        for ext/src/fuzz_ws.c

    .venv/bin/python tests/fuzz/make_corpus.py [--check]

Deterministic: the same files every time (names are the seeds' descriptions). --check only
compares and exits 1 when a file would change (so a stale corpus is noticed). The few inputs
kept from fuzzing runs (named by their SHA-1, as libFuzzer names them) are left alone.

Input formats (see the harnesses' header comments):
  connect: byte 0 picks max_size (& 3: MQTT max, 65536, 64, 16), bytes 1..2 the length of a
           replacement ClientId (% 300), the rest is the packet;
  proxy:   byte 0 low 2 bits = mode, high 6 bits = parameter; mode 0 parses the rest with the
           default cap, 1 with a cap from the parameter, 2 builds from a description, 3 puts
           the rest behind a v2 preamble (parameter: family, LOCAL, CRC32C fix-up).
  ws:      byte 0 even: an upgrade request follows, odd: client frames; byte 1 the decoder's
           chunk size and max_frame.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))      # tests/: mqtt_reference
sys.path.insert(0, str(REPO))

import mqtt_reference as ref  # noqa: E402
from mqtt_reference import Will, encode_connect  # noqa: E402

CORPUS = HERE / "corpus"


def connect_seeds() -> dict[str, bytes]:
    """name -> packet (without the harness's 3 parameter bytes)."""
    s: dict[str, bytes] = {}
    s["v311_minimal"] = encode_connect(4, "c")
    s["v311_empty_id"] = encode_connect(4, "")
    s["v311_empty_id_persistent"] = encode_connect(4, "", clean_start=False)
    s["v311_user_pass"] = encode_connect(4, "sensor-1", username="alice", password=b"secret")
    s["v311_will_qos1_retain"] = encode_connect(
        4, "dev", will=Will("status/dev", b"offline", qos=1, retain=True), username="u", password=b"p")
    s["v311_will_qos2"] = encode_connect(4, "dev2", will=Will("a/b/c", b"", qos=2), keepalive=0)
    s["v311_utf8_id"] = encode_connect(4, "gr\u00fc\u00dfe-\u6771\u4eac-\U0001f600")
    s["v311_keepalive_max"] = encode_connect(4, "k", keepalive=65535)
    s["v311_with_next_packets"] = encode_connect(4, "p") + bytes.fromhex("c000") + bytes.fromhex(
        "820600010001610001")  # PINGREQ, SUBSCRIBE
    s["v311_second_connect"] = encode_connect(4, "p") + encode_connect(4, "q")
    s["v31_minimal"] = encode_connect(3, "mosq-31")
    s["v31_user_will"] = encode_connect(3, "old", will=Will("lwt", b"gone"), username="u", password=b"pw")
    s["v31_id_23"] = encode_connect(3, "x" * 23)
    s["v5_minimal"] = encode_connect(5, "c5")
    s["v5_empty_id"] = encode_connect(5, "")
    s["v5_all_connect_props"] = encode_connect(5, "props", properties=[
        ("session_expiry_interval", 3600), ("receive_maximum", 20),
        ("maximum_packet_size", 1 << 20), ("topic_alias_maximum", 10),
        ("request_response_information", 1), ("request_problem_information", 0),
        ("user_property", ("region", "eu")), ("user_property", ("region", "us")),
        ("authentication_method", "SCRAM-SHA-1"), ("authentication_data", b"\x00\x01\x02")])
    s["v5_will_props"] = encode_connect(5, "w5", will=Will("dev/w5/state", b"\x01\x02", qos=1, properties=[
        ("will_delay_interval", 30), ("payload_format_indicator", 1), ("message_expiry_interval", 60),
        ("content_type", "application/json"), ("response_topic", "reply/w5"),
        ("correlation_data", b"corr"), ("user_property", ("k", "v"))]), username="u5", password=b"p5")
    s["v5_password_only"] = encode_connect(5, "po", password=b"token")
    s["v5_long_id"] = encode_connect(5, "i" * 200, properties=[("user_property", ("a" * 40, "b" * 40))])
    s["v5_large_payload_will"] = encode_connect(5, "big", will=Will("t", bytes(range(256)) * 2))
    # malformed ones (the parser's rejection paths)
    s["bad_first_byte_publish"] = b"\x30\x05\x00\x01t\x00x"
    s["bad_fixed_flags"] = encode_connect(4, "c", first_byte=0x12)
    s["bad_rl_5_bytes"] = b"\x10\xff\xff\xff\xff\x01"
    s["bad_rl_not_minimal"] = b"\x10\x80\x00"
    s["bad_protocol_name"] = encode_connect(4, "c", protocol_name=b"MQTX")
    s["bad_level_6"] = encode_connect(4, "c", level=6)
    s["bad_mqisdp_level_4"] = encode_connect(4, "c", protocol_name=b"MQIsdp")
    s["bad_reserved_flag"] = encode_connect(4, "c", flags=0x03)
    s["bad_will_qos3"] = encode_connect(4, "c", flags=0x1E)
    s["bad_password_without_user_v311"] = encode_connect(4, "c", password=b"x")
    s["bad_dup_property"] = encode_connect(5, "c", properties=[
        ("receive_maximum", 1), ("receive_maximum", 2)])
    s["bad_receive_max_0"] = encode_connect(5, "c", properties=[("receive_maximum", 0)])
    s["bad_auth_data_without_method"] = encode_connect(5, "c", properties=[("authentication_data", b"x")])
    s["bad_property_not_allowed"] = encode_connect(5, "c", raw_properties=b"\x02\x01\x01")
    s["bad_id_nul"] = encode_connect(4, b"a\x00b")
    s["bad_id_control"] = encode_connect(5, b"a\x01b")
    s["bad_id_surrogate"] = encode_connect(4, b"\xed\xa0\x80")
    s["bad_id_overlong"] = encode_connect(4, b"\xc0\xaf")
    s["bad_id_noncharacter"] = encode_connect(4, "\ufdd0")
    s["bad_will_topic_wildcard"] = encode_connect(4, "c", will=Will("a/#", b"x"))
    s["bad_will_topic_empty"] = encode_connect(5, "c", will=Will("", b"x"))
    s["bad_trailing_bytes"] = encode_connect(4, "c", extra=b"\x00")
    s["bad_length_past_end"] = encode_connect(4, "c", remaining_length=40)
    s["bad_tls_client_hello"] = bytes.fromhex("160301020001")
    s["truncated_v5"] = encode_connect(5, "trunc", username="u")[:-3]
    return s


# (byte 0, bytes 1..2) per seed: mostly the 64 KiB limit, some with the others
CONNECT_PARAMS = [(1, 0), (0, 23), (1, 5), (2, 0), (3, 7), (1, 299)]


def proxy_seeds() -> dict[str, bytes]:
    from fastproxy import proxy_protocol as pp

    ssl_full = pp.SSLInfo(client=7, verify=0, version="TLSv1.3", cn="sensor-1", key_alg="EC256",
                          sig_alg="ecdsa-with-SHA256", cipher="TLS_AES_256_GCM_SHA384")
    h: dict[str, bytes] = {}
    h["v1_tcp4"] = pp.build_v1(("192.0.2.1", 56324), ("198.51.100.2", 443))
    h["v1_tcp4_zeros"] = b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n"
    h["v1_tcp6"] = pp.build_v1(("2001:db8::1", 1), ("2001:db8:0:0:1:0:0:1", 8883))
    h["v1_tcp6_mapped"] = b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n"
    h["v1_tcp6_longest"] = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    h["v1_unknown"] = pp.build_v1(None, None) if _v1_unknown_ok(pp) else b"PROXY UNKNOWN\r\n"
    h["v1_unknown_rest"] = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"
    h["v1_with_payload"] = pp.build_v1(("10.0.0.1", 1), ("10.0.0.2", 2)) + b"\x10\x0c\x00\x04MQTT"
    h["v1_bad_leading_zero"] = b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n"
    h["v1_bad_lf_only"] = b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n"
    h["v2_tcp4"] = pp.build_v2(("192.0.2.1", 1), ("192.0.2.2", 2))
    h["v2_tcp6"] = pp.build_v2(("2001:db8::1", 51000), ("2001:db8::2", 8883))
    h["v2_udp4"] = pp.build_v2(("192.0.2.1", 53), ("192.0.2.2", 53), transport="dgram")
    h["v2_unix"] = pp.build_v2("/run/a.sock", "/run/b.sock")
    h["v2_local"] = pp.build_v2()
    h["v2_all_tlvs_crc"] = pp.build_v2(
        ("2001:db8::1", 1), ("2001:db8::2", 2), crc32c=True, alpn=b"mqtt", authority="a.example",
        unique_id=b"u1", netns="ns0", ssl=ssl_full, tlvs=((0xE0, b"custom"),), noop=3)
    h["v2_ssl_cn_crc"] = pp.build_v2(("203.0.113.7", 51000), ("127.0.0.1", 8883), crc32c=True,
                                     ssl=pp.SSLInfo(client=7, verify=0, version="TLSv1.2", cn="thing001"))
    h["v2_ssl_no_cert"] = pp.build_v2(("203.0.113.7", 51000), ("127.0.0.1", 8883),
                                      ssl=pp.SSLInfo(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256"))
    h["v2_local_with_tlvs"] = pp.build_v2(command="LOCAL", alpn=b"h2", noop=0) if _local_tlvs_ok(pp) \
        else pp.build_v2()
    h["v2_with_payload"] = pp.build_v2(("10.0.0.1", 1), ("10.0.0.2", 2)) + b"\x10\x0c\x00\x04MQTT"
    h["v2_bad_version"] = b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + bytes(12)
    h["v2_bad_family"] = b"\r\n\r\n\x00\r\nQUIT\n\x21\x41\x00\x00"
    h["v2_bad_short_len"] = b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x0c" + bytes(12)
    h["v2_bad_truncated_tlv"] = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0e" + bytes(12) + b"\x04\x00"
    crc = bytearray(h["v2_ssl_cn_crc"])
    crc[-1] ^= 1
    h["v2_bad_crc"] = bytes(crc)
    h["v2_bad_authority_256"] = pp.build_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=((0x02, b"a" * 256),),
                                            max_length=4096)
    h["v2_bad_ssl_short"] = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x10" + bytes(12) + b"\x20\x00\x01\x01"

    seeds: dict[str, bytes] = {}
    for name, hdr in h.items():
        seeds[f"parse_{name}"] = b"\x00" + hdr
    # mode 1 (caps: 16 28 52 100 232 500 4096 65551, by parameter & 7)
    seeds["cap100_v2_all_tlvs_crc"] = bytes([(3 << 2) | 1]) + h["v2_all_tlvs_crc"]
    seeds["cap232_v2_unix"] = bytes([(4 << 2) | 1]) + h["v2_unix"]
    seeds["cap65551_v2_tcp6"] = bytes([(7 << 2) | 1]) + h["v2_tcp6"]
    # mode 2: builder descriptions (see check_build): d0 command/family, d1 flags, d2 client,
    # d3..5 verify, d6..7 port, up to 32 address bytes, then length-prefixed string fields
    # (alpn, authority, unique_id, ssl version, cn, key_alg, sig_alg, cipher, netns, extras)
    addr = bytes(range(1, 33))

    def lp(b: bytes | None) -> bytes:
        return b"\xff" if b is None else bytes([len(b)]) + b

    fields = [b"mqtt", b"broker.example", b"uid-1", b"TLSv1.3", b"sensor-1", b"EC256",
              b"ecdsa-with-SHA256", b"TLS_AES_256_GCM_SHA384", b"ns", b"\xe0\x00\x02hi"]
    desc = b"".join(lp(f) for f in fields) + b"\x05"
    # d0: bits 2-3 + d1 bit 0 pick the family (0x00 0x11 0x12 0x21 / 0x22 0x31 0x32 bad)
    seeds["build_tcp4_ssl_crc"] = bytes([2]) + bytes([0x05, 0x06, 0x07, 0, 0, 0, 0x1F, 0x90]) + addr + desc
    seeds["build_tcp6_all"] = bytes([2]) + bytes([0x0D, 0x06, 0x07, 0, 0, 0x32, 0xC3, 0x50]) + addr + desc
    seeds["build_unix"] = bytes([2]) + bytes([0x15, 0x01, 0x00, 0, 0, 0, 0, 0]) + b"/run/mosq.sock" + bytes(18) \
        + b"\xff" * 9 + b"\x80"
    seeds["build_huge_field_tcp4"] = bytes([2 | (0x07 << 2)]) + bytes([0x05, 0x02, 0x07, 0, 0, 0, 0x1F, 0x90]) \
        + addr + b"\xff" * 10 + b"\x08\x21"
    seeds["build_local"] = bytes([2]) + bytes([0x00, 0x00, 0, 0, 0, 0, 0, 0]) + bytes(32) + b"\xff" * 10
    seeds["build_sockaddrs_v4_v6"] = bytes([2 | (0x20 << 2)]) + bytes([0x00, 0x04]) + \
        b"\x1f\x90\xc0\x00\x02\x01" + bytes(34) + b"\x22\xb3" + bytes(4) + bytes(range(16))
    seeds["build_sockaddrs_unix"] = bytes([2 | (0x21 << 2)]) + bytes([0x08, 0x08]) + b"/tmp/a.sock" + bytes(29) \
        + b"/tmp/b.sock"
    # mode 3: behind a v2 preamble; parameter bits 0-2 family (0x11 0x21 0x31 0x00 ...),
    # 0x10 LOCAL, 0x20 fix up the CRC32C
    tlvs_crc = b"\x03\x00\x04\x00\x00\x00\x00" + b"\x01\x00\x04mqtt" + \
        b"\x20\x00\x14\x07\x00\x00\x00\x00\x21\x00\x07TLSv1.3\x22\x00\x02cn" + b"\x04\x00\x00"
    seeds["tmpl_tcp4_tlvs_crcfix"] = bytes([3 | (0x20 << 2)]) + bytes(12) + tlvs_crc
    seeds["tmpl_tcp6_tlvs"] = bytes([3 | (1 << 2)]) + bytes(36) + tlvs_crc[7:]
    seeds["tmpl_local_unspec"] = bytes([3 | ((0x10 | 3) << 2)]) + b"\x05\x00\x03abc"
    return seeds


def _ws_request(path: str = "/mqtt", *, key: str = "dGhlIHNhbXBsZSBub25jZQ==", version: str = "13",
                protocols: str | None = "mqtt", extra: tuple[str, ...] = (), method: str = "GET",
                upgrade: str = "websocket", connection: str = "Upgrade") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: broker.example:8083", f"Upgrade: {upgrade}",
             f"Connection: {connection}", f"Sec-WebSocket-Key: {key}", f"Sec-WebSocket-Version: {version}"]
    if protocols is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocols}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _ws_frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\x37\xfa\x21\x3d",
              rsv: int = 0, len_form: int | None = None) -> bytes:
    """A client frame (masked unless mask is None); len_form forces the 7/16/64-bit length."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    form = len_form if len_form is not None else (7 if n < 126 else 16 if n <= 0xFFFF else 64)
    m = 0x80 if mask is not None else 0
    if form == 7:
        head = bytes([b0, m | n])
    elif form == 16:
        head = bytes([b0, m | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, m | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload))


def ws_seeds() -> dict[str, bytes]:
    """fuzz_ws.c: byte 0 even = upgrade request, odd = frames; byte 1 = the decoder's chunk
    size (low 4 bits) and max_frame (bit 7: (byte & 0x7F) * 16, else no limit)."""
    s: dict[str, bytes] = {}
    req = {
        "req_mqtt": _ws_request(),
        "req_mqttv31_origin_xff": _ws_request("/", protocols="mqttv3.1, mqtt", extra=(
            "Origin: https://app.example", "X-Forwarded-For: 203.0.113.7, 10.0.0.1",
            "User-Agent: fuzz", "Sec-WebSocket-Extensions: permessage-deflate")),
        "req_query_folded_case": _ws_request("/mqtt?token=abc", connection="keep-alive, Upgrade",
                                             upgrade="WebSocket", extra=("sec-websocket-protocol: mqtt",)),
        "req_no_protocol": _ws_request(protocols=None),
        "req_other_protocol": _ws_request(protocols="wamp"),
        "req_version_8": _ws_request(version="8"),
        "req_bad_key": _ws_request(key="short"),
        "req_post": _ws_request(method="POST"),
        "req_not_upgrade": _ws_request(upgrade="h2c"),
        "req_partial": _ws_request()[:60],
        "req_with_frame_after": _ws_request() + _ws_frame(2, b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"),
        "req_http10": _ws_request().replace(b"HTTP/1.1", b"HTTP/1.0"),
        "req_lf_only": _ws_request().replace(b"\r\n", b"\n"),
        "req_too_large": b"GET /mqtt HTTP/1.1\r\nX-Filler: " + b"a" * 8200,
    }
    for name, r in req.items():
        s[name] = b"\x00\x05" + r
    connect = bytes.fromhex("101000044d5154540402003c000474657374")
    frames = {
        "frm_binary_connect": (0x03, _ws_frame(2, connect)),
        "frm_fragmented": (0x02, _ws_frame(2, connect[:5], fin=False) + _ws_frame(0, connect[5:])),
        "frm_ping_in_fragments": (0x07, _ws_frame(2, connect[:5], fin=False) + _ws_frame(9, b"hb")
                                  + _ws_frame(0, connect[5:])),
        "frm_pong_close": (0x01, _ws_frame(10, b"") + _ws_frame(8, (1000).to_bytes(2, "big") + b"bye")),
        "frm_len16": (0x0F, _ws_frame(2, bytes(300))),
        "frm_len64_small": (0x04, _ws_frame(2, b"abc", len_form=64)),
        "frm_len16_nonminimal": (0x04, _ws_frame(2, b"abc", len_form=16)),
        "frm_max_frame_1009": (0x80 | 0x02, _ws_frame(2, bytes(200))),
        "frm_unmasked": (0x03, _ws_frame(2, b"abc", mask=None)),
        "frm_text": (0x03, _ws_frame(1, b"hello")),
        "frm_rsv1": (0x03, _ws_frame(2, b"abc", rsv=4)),
        "frm_control_fragmented": (0x03, _ws_frame(9, b"x", fin=False)),
        "frm_control_126": (0x03, _ws_frame(9, bytes(126), len_form=16)),
        "frm_cont_without_start": (0x03, _ws_frame(0, b"abc")),
        "frm_unknown_opcode": (0x03, _ws_frame(3, b"abc")),
        "frm_close_1byte": (0x03, _ws_frame(8, b"\x03")),
        "frm_close_bad_utf8": (0x03, _ws_frame(8, b"\x03\xe8\xff")),
        "frm_len64_top_bit": (0x03, bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"\x00" * 4),
    }
    for name, (knob, f) in frames.items():
        s[name] = b"\x01" + bytes([knob]) + f
    return s


def _v1_unknown_ok(pp) -> bool:
    try:
        return pp.build_v1(None, None) == b"PROXY UNKNOWN\r\n"
    except Exception:
        return False


def _local_tlvs_ok(pp) -> bool:
    try:
        pp.build_v2(command="LOCAL", alpn=b"h2", noop=0)
        return True
    except Exception:
        return False


def all_files() -> dict[Path, bytes]:
    files: dict[Path, bytes] = {}
    for i, (name, pkt) in enumerate(connect_seeds().items()):
        b0, idlen = CONNECT_PARAMS[i % len(CONNECT_PARAMS)]
        files[CORPUS / "connect" / name] = bytes([b0]) + idlen.to_bytes(2, "big") + pkt
    for name, blob in proxy_seeds().items():
        files[CORPUS / "proxy" / name] = blob
    for name, blob in ws_seeds().items():
        files[CORPUS / "ws" / name] = blob
    return files


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = 0
    for path, blob in all_files().items():
        old = path.read_bytes() if path.exists() else None
        if old == blob:
            continue
        stale += 1
        if check:
            print(f"stale: {path.relative_to(REPO)}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
    if check:
        return 1 if stale else 0
    total = sum(len(b) for b in all_files().values())
    print(f"{len(all_files())} seeds, {total} bytes ({stale} written) under {CORPUS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
