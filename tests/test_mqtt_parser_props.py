"""Property tests: the compiled CONNECT parser against the pure-Python reference.

1. Random valid CONNECTs (all three versions, every field and property) built with the reference
   encoder: the compiled parser returns exactly what was encoded, field by field, and agrees
   with the reference parser.
2. Random mutations of valid CONNECTs (byte flips, insertions, deletions, truncation, appended
   bytes, random max_size): both parsers reach the same verdict (need more / valid with the
   same fields / invalid with the same reason, offset and CONNACK), and nothing crashes.
3. Every prefix of any input is either "need more" or the verdict of the whole input.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mqtt_reference as ref  # noqa: E402
from mqtt_reference import Will, encode_connect, refused_code_point  # noqa: E402

from fastproxy import mqtt  # noqa: E402
from fastproxy.errors import MQTTProtocolError  # noqa: E402

SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


outcome = ref.compiled_outcome
reference_outcome = ref.reference_outcome


# ----------------------------------------------------------------------------- strategies

# Code points a valid CONNECT may hold: not U+0000, not the controls and non-characters the
# parser refuses as Mosquitto does (mqtt_reference.refused_code_point).
_chars = st.characters(codec="utf-8", exclude_characters="\x00").filter(lambda ch: not refused_code_point(ch))
text = st.text(_chars, max_size=24)
topic = st.text(_chars.filter(lambda ch: ch not in "+#"), min_size=1, max_size=24)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
blob = st.binary(max_size=40)
pairs = st.lists(st.tuples(text, text), max_size=4)


@st.composite
def connect_spec(draw):
    version = draw(st.sampled_from([3, 4, 5]))
    spec = {
        "version": version,
        "client_id": draw(text),
        "clean_start": draw(st.booleans()),
        "keepalive": draw(u16),
        "username": draw(st.none() | text),
        "password": draw(st.none() | blob),
        "will": None,
        "props": {},
        "user_props": [],
        "will_props": {},
        "will_user_props": [],
        "auth": {},
    }
    if version != 5 and spec["username"] is None:
        spec["password"] = None  # 3.x: password needs a user name
    if version == 5:
        options = {
            "session_expiry_interval": u32,
            "receive_maximum": st.integers(1, 0xFFFF),
            "maximum_packet_size": st.integers(1, 0xFFFFFFFF),
            "topic_alias_maximum": u16,
            "request_response_information": st.integers(0, 1),
            "request_problem_information": st.integers(0, 1),
        }
        for name, strategy in options.items():
            if draw(st.booleans()):
                spec["props"][name] = draw(strategy)
        spec["user_props"] = draw(pairs)
        if draw(st.booleans()):
            spec["auth"]["authentication_method"] = draw(text)
            if draw(st.booleans()):
                spec["auth"]["authentication_data"] = draw(blob)
    if draw(st.booleans()):
        spec["will"] = {"topic": draw(topic), "payload": draw(st.binary(max_size=200)),
                        "qos": draw(st.integers(0, 2)), "retain": draw(st.booleans())}
        if version == 5:
            options = {
                "will_delay_interval": u32,
                "payload_format_indicator": st.integers(0, 1),
                "message_expiry_interval": u32,
                "content_type": text,
                "response_topic": topic,
                "correlation_data": blob,
            }
            for name, strategy in options.items():
                if draw(st.booleans()):
                    spec["will_props"][name] = draw(strategy)
            spec["will_user_props"] = draw(pairs)
    return spec


def encode(spec, draw_order=None):
    """The spec as bytes; properties (and user properties among them) in a shuffled order."""
    props = [*spec["props"].items(), *spec["auth"].items(),
             *(("user_property", p) for p in spec["user_props"])]
    will_props = [*spec["will_props"].items(), *(("user_property", p) for p in spec["will_user_props"])]
    if draw_order is not None:
        props = draw_order(props)
        will_props = draw_order(will_props)
    # User properties keep their relative order (it is part of what is compared).
    props = _keep_user_order(props, spec["user_props"])
    will_props = _keep_user_order(will_props, spec["will_user_props"])
    will = None
    if spec["will"] is not None:
        w = spec["will"]
        will = Will(w["topic"], w["payload"], w["qos"], w["retain"], will_props)
    return encode_connect(spec["version"], spec["client_id"], clean_start=spec["clean_start"],
                          keepalive=spec["keepalive"], will=will, username=spec["username"],
                          password=spec["password"], properties=props)


def _keep_user_order(props, user_props):
    it = iter(user_props)
    return [(k, next(it)) if k == "user_property" else (k, v) for k, v in props]


def expected_fields(spec, data):
    w = spec["will"]
    return {
        "version": spec["version"],
        "protocol_name": "MQIsdp" if spec["version"] == 3 else "MQTT",
        "client_id": spec["client_id"],
        "username": spec["username"],
        "password_present": spec["password"] is not None,
        "keepalive": spec["keepalive"],
        "clean_start": spec["clean_start"],
        "will_topic": w["topic"] if w else None,
        "will_qos": w["qos"] if w else 0,
        "will_retain": w["retain"] if w else False,
        "will_payload_len": len(w["payload"]) if w else None,
        "properties": spec["props"],
        "user_properties": spec["user_props"],
        "will_properties": spec["will_props"],
        "will_user_properties": spec["will_user_props"],
        "auth_method": spec["auth"].get("authentication_method"),
        "auth_data": spec["auth"].get("authentication_data"),
        "packet_length": len(data),
    }


# ----------------------------------------------------------------------------- valid packets

@SETTINGS
@given(spec=connect_spec(), data=st.data())
def test_random_valid_connect_parses_field_by_field(spec, data):
    packet = encode(spec, lambda items: data.draw(st.permutations(items)))
    got = outcome(packet)
    assert got[0] == "valid", got
    assert got[1] == expected_fields(spec, packet)
    assert got == reference_outcome(packet)
    r = ref.parse(packet)
    assert r.password == spec["password"]
    # Any prefix needs more; any suffix is left alone.
    cut = data.draw(st.integers(0, len(packet) - 1))
    assert mqtt.parse_connect(packet[:cut]) is None
    tail = data.draw(st.binary(max_size=20))
    assert mqtt.parse_connect(packet + tail).packet_length == len(packet)


@SETTINGS
@given(spec=connect_spec(), new_id=text, tail=st.binary(max_size=10))
def test_random_rewrite_client_id(spec, new_id, tail):
    packet = encode(spec)
    out = mqtt.rewrite_client_id(packet + tail, new_id)
    before = mqtt.parse_connect(packet)
    after = mqtt.parse_connect(out, max_size=None)
    assert after == dataclasses.replace(before, client_id=new_id, packet_length=after.packet_length)
    assert out[after.packet_length:] == tail
    assert reference_outcome(out[:after.packet_length], mqtt.MAX_PACKET_SIZE) == outcome(
        out[:after.packet_length], None)


# ----------------------------------------------------------------------------- mutations

@st.composite
def mutated(draw):
    packet = bytearray(encode(draw(connect_spec())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append", "length"]))
        i = draw(st.integers(0, max(0, len(packet) - 1)))
        if kind == "flip" and packet:
            packet[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and packet:
            packet[i] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x7F, 0x80, 0xC0, 0xED, 0xFF, 0x23, 0x2B]))
        elif kind == "insert":
            packet[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and packet:
            del packet[i:i + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del packet[i:]
        elif kind == "append":
            packet += draw(st.binary(min_size=1, max_size=8))
        elif kind == "length" and len(packet) > 1:
            packet[1] = draw(st.integers(0, 255))  # remaining length (first byte of it)
    return bytes(packet)


@settings(max_examples=3000, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(packet=mutated(), max_size=st.sampled_from([65536, 64, 16, 1 << 28]))
def test_mutations_both_parsers_agree(packet, max_size):
    assert outcome(packet, max_size) == reference_outcome(packet, max_size)


@settings(max_examples=1000, deadline=None)
@given(body=st.binary(max_size=80), first=st.sampled_from([0x10, 0x10, 0x10, 0x11, 0x20, 0x30]))
def test_random_bytes_both_parsers_agree(body, first):
    packet = bytes([first]) + body
    assert outcome(packet) == reference_outcome(packet)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(packet=mutated(), max_size=st.sampled_from([65536, 32]))
def test_prefixes_need_more_or_the_final_verdict(packet, max_size):
    final = outcome(packet, max_size)
    for n in range(len(packet)):
        got = outcome(packet[:n], max_size)
        if got != ("need_more",):
            assert got == final, n
            # Once decided, every longer prefix gives the same verdict.
            for m in range(n, len(packet) + 1):
                assert outcome(packet[:m], max_size) == final
            break


@settings(max_examples=500, deadline=None)
@given(packet=mutated())
def test_buffer_types_agree(packet):
    a = outcome(packet)
    assume(a[0] != "need_more" or len(packet) > 0)
    assert outcome(bytearray(packet)) == a
    assert outcome(memoryview(packet)) == a
