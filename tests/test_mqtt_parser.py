"""The compiled MQTT CONNECT parser (fastproxy._mqtt over ext/src/mqtt_connect.c).

Valid CONNECTs of MQTT 3.1, 3.1.1 and 5.0 (hand-written bytes and encoder-built ones), the
malformed set, incremental feeding, coalesced packets, CONNACK bytes, ClientId rewriting, and
CONNECTs captured from real clients (mosquitto_pub, paho-mqtt) on a loopback socket. Every
outcome is also checked against the pure-Python reference parser (tests/mqtt_reference.py).
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mqtt_reference as ref  # noqa: E402
from mqtt_reference import Will, encode_connect, encode_properties, lp, varint  # noqa: E402

from fastproxy import mqtt  # noqa: E402
from fastproxy.errors import (  # noqa: E402
    ConnectProtocolError,
    FastproxyError,
    MalformedConnect,
    MQTTProtocolError,
    PacketTooLarge,
    TopicNameInvalid,
    ClientIdNotValid,
    UnsupportedProtocolVersion,
)


outcome = ref.compiled_outcome
reference_outcome = ref.reference_outcome


def agree(data, max_size=65536):
    got = outcome(data, max_size)
    assert got == reference_outcome(data, max_size)
    return got


# ----------------------------------------------------------------------------- valid packets

# Written out by hand (not with the encoder), each with what it must parse to.
HAND_WRITTEN = {
    "3.1.1 minimal": (
        "10 10 0004 4d515454 04 02 003c 0004 61626364",
        dict(version=4, protocol_name="MQTT", client_id="abcd", keepalive=60, clean_start=True),
    ),
    "3.1 MQIsdp": (
        "10 12 0006 4d5149736470 03 02 003c 0004 61626364",
        dict(version=3, protocol_name="MQIsdp", client_id="abcd", keepalive=60),
    ),
    "3.1.1 empty client id, no clean session": (
        "10 0c 0004 4d515454 04 00 0000 0000",
        dict(version=4, client_id="", keepalive=0, clean_start=False),
    ),
    "3.1.1 will qos2 retain, user, password": (
        "10 26 0004 4d515454 04 f6 000a 0002 6964 0003 612f62 0003 627965"
        " 0004 75736572 0006 736563726574",
        dict(version=4, client_id="id", will_topic="a/b", will_qos=2, will_retain=True,
             will_payload_len=3, username="user", password_present=True, keepalive=10),
    ),
    "5.0 no properties": (
        "10 0d 0004 4d515454 05 02 003c 00 0000",
        dict(version=5, client_id="", properties={}),
    ),
    "5.0 session expiry + user property + auth": (
        "10 29 0004 4d515454 05 02 003c"
        " 19 11 00000e10 26 0001 6b 0001 76 15 0005 5343524d31 16 0002 abcd"
        " 0003 636964",
        dict(version=5, client_id="cid", properties={"session_expiry_interval": 3600},
             user_properties=[("k", "v")], auth_method="SCRM1", auth_data=b"\xab\xcd"),
    ),
    "5.0 password without user name": (
        "10 14 0004 4d515454 05 42 003c 00 0001 78 0004 70617373",
        dict(version=5, client_id="x", username=None, password_present=True),
    ),
    "3.1.1 UTF-8 client id": (
        "10 14 0004 4d515454 04 02 003c 0008 e282ac f09f9880 41",
        dict(client_id="\u20ac\U0001f600A"),
    ),
}


@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_valid(name):
    hexstr, expected = HAND_WRITTEN[name]
    data = bytes.fromhex(hexstr.replace(" ", ""))
    info = mqtt.parse_connect(data)
    assert info is not None
    for key, value in expected.items():
        assert getattr(info, key) == value, key
    assert info.packet_length == len(data)
    agree(data)


ALL_CONNECT_PROPS = [
    ("session_expiry_interval", 0xFFFFFFFF),
    ("receive_maximum", 20),
    ("maximum_packet_size", 1 << 20),
    ("topic_alias_maximum", 10),
    ("request_response_information", 1),
    ("request_problem_information", 0),
    ("user_property", ("region", "eu-west")),
    ("user_property", ("region", "eu-central")),  # names may repeat
    ("user_property", ("", "")),
    ("authentication_method", "SCRAM-SHA-256"),
    ("authentication_data", b"\x00\x01client-first"),
]
ALL_WILL_PROPS = [
    ("will_delay_interval", 30),
    ("payload_format_indicator", 1),
    ("message_expiry_interval", 3600),
    ("content_type", "application/json"),
    ("response_topic", "replies/\u00e9"),
    ("correlation_data", b"\x01\x02"),
    ("user_property", ("w", "1")),
]

VALID = {
    "v3.1 plain": encode_connect(3, "client-31"),
    "v3.1 will + user + password": encode_connect(
        3, "c", will=Will("t/1", b"gone", qos=1), username="u", password=b"p"),
    "v3.1.1 plain": encode_connect(4, "client-311"),
    "v3.1.1 empty client id": encode_connect(4, ""),
    "v3.1.1 empty client id, clean session 0": encode_connect(4, "", clean_start=False),
    "v3.1.1 will qos0": encode_connect(4, "c", will=Will("a", b"")),
    "v3.1.1 will qos1 retain": encode_connect(4, "c", will=Will("a/b/c", b"x" * 300, 1, True)),
    "v3.1.1 will qos2": encode_connect(4, "c", will=Will("a", b"\x00\xff", 2)),
    "v3.1.1 user only": encode_connect(4, "c", username="alice"),
    "v3.1.1 user + empty password": encode_connect(4, "c", username="", password=b""),
    "v3.1.1 user + binary password": encode_connect(4, "c", username="alice", password=bytes(range(256))),
    "v3.1.1 keepalive 0": encode_connect(4, "c", keepalive=0),
    "v3.1.1 keepalive 65535": encode_connect(4, "c", keepalive=65535),
    "v3.1.1 long client id (2-byte remaining length)": encode_connect(4, "x" * 200),
    "v3.1.1 3-byte remaining length": encode_connect(4, "c", username="u", password=b"p" * 20000),
    "v3.1.1 non-ASCII strings": encode_connect(4, "\u00fc\u4e2d\U0001f600", username="\u00e9",
                                               will=Will("\u00e9/\u4e2d", b"")),
    "v3.1.1 will topic with 200 levels": encode_connect(4, "c", will=Will("/" * 200, b"")),
    # the neighbours of the refused code points are allowed
    "v3.1.1 edges of the refused ranges": encode_connect(
        4, " ~\u00a0\ufdcf\ufdf0\ufffd", username="\U0001fffd\U0010fffd", will=Will("\uffef/\U00010000", b"")),
    "v5 plain": encode_connect(5, "client-5"),
    "v5 empty client id": encode_connect(5, ""),
    "v5 every CONNECT property": encode_connect(5, "c", properties=ALL_CONNECT_PROPS),
    "v5 every will property": encode_connect(5, "c", will=Will("w", b"bye", 1, True, ALL_WILL_PROPS)),
    "v5 everything": encode_connect(
        5, "c", clean_start=False, keepalive=5, properties=ALL_CONNECT_PROPS,
        will=Will("w/x", b"bye", 2, False, ALL_WILL_PROPS), username="user", password=b"pw"),
    "v5 password without user name": encode_connect(5, "c", password=b"token"),
    "v5 auth method without data": encode_connect(5, "c", properties=[("authentication_method", "K")]),
    "v5 properties in another order": encode_connect(5, "c", properties=list(reversed(ALL_CONNECT_PROPS))),
    "v5 empty will properties, empty user property": encode_connect(
        5, "", will=Will("t", b"", properties=[]), properties=[("user_property", ("", ""))]),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid(name):
    data = VALID[name]
    result = agree(data)
    assert result[0] == "valid", result
    info = mqtt.parse_connect(data)
    assert info.packet_length == len(data)
    assert info.version in mqtt.VERSIONS
    # The same bytes through the other buffer types.
    assert mqtt.parse_connect(bytearray(data)) == info
    assert mqtt.parse_connect(memoryview(data)) == info


def test_every_property_decoded():
    info = mqtt.parse_connect(VALID["v5 everything"])
    assert info.properties == {
        "session_expiry_interval": 0xFFFFFFFF,
        "receive_maximum": 20,
        "maximum_packet_size": 1 << 20,
        "topic_alias_maximum": 10,
        "request_response_information": 1,
        "request_problem_information": 0,
    }
    assert info.user_properties == [("region", "eu-west"), ("region", "eu-central"), ("", "")]
    assert info.auth_method == "SCRAM-SHA-256"
    assert info.auth_data == b"\x00\x01client-first"
    assert info.will_properties == {
        "will_delay_interval": 30,
        "payload_format_indicator": 1,
        "message_expiry_interval": 3600,
        "content_type": "application/json",
        "response_topic": "replies/\u00e9",
        "correlation_data": b"\x01\x02",
    }
    assert info.will_user_properties == [("w", "1")]
    assert (info.will_topic, info.will_qos, info.will_retain, info.will_payload_len) == ("w/x", 2, False, 3)
    assert (info.username, info.password_present, info.clean_start, info.keepalive) == ("user", True, False, 5)
    # The keys are the PropertyId names.
    names = {p.name.lower() for p in mqtt.PropertyId}
    assert set(info.properties) | set(info.will_properties) <= names


def test_password_never_shown():
    info = mqtt.parse_connect(encode_connect(
        5, "c", username="u", password=b"hunter2-secret",
        properties=[("authentication_method", "M"), ("authentication_data", b"tok3n-secret")]))
    for text in (repr(info), str(info)):
        assert "hunter2" not in text
        assert "tok3n" not in text
        assert "password_present=True" in text
        assert "auth_data=<12 bytes>" in text
    assert not hasattr(info, "password")


# ----------------------------------------------------------------------------- invalid packets

def v4(**kw):
    return encode_connect(4, "c", **kw)


def v5(**kw):
    return encode_connect(5, "c", **kw)


M, P, U, T, L = MalformedConnect, ConnectProtocolError, UnsupportedProtocolVersion, TopicNameInvalid, PacketTooLarge
C = ClientIdNotValid
ID_CTL = "client identifier: control character or non-character"
NO = None  # no CONNACK

# name: (bytes, max_size, error class, reason, CONNACK (version, code) or NO)
INVALID = {
    "PUBLISH first": (b"\x30\x05\x00\x01a\x68\x69", 65536, P, "first packet is not CONNECT", NO),
    "PINGREQ first": (b"\xc0\x00", 65536, P, "first packet is not CONNECT", NO),
    "fixed header flags 0001": (b"\x11" + v4()[1:], 65536, M, "reserved fixed header flags set", NO),
    "5-byte remaining length": (b"\x10\xff\xff\xff\xff\x01", 65536, M, "remaining length longer than 4 bytes", NO),
    "non-minimal remaining length": (b"\x10\x90\x00" + v4()[2:], 65536, M, "remaining length not minimally encoded", NO),
    "remaining length past the end (name)": (b"\x10\x03\x00\x04MQTT\x04", 65536, M, "protocol name exceeds remaining length", NO),
    "remaining length 0": (b"\x10\x00", 65536, M, "protocol name exceeds remaining length", NO),
    "remaining length too short (client id)": (
        v4()[:1] + bytes([len(v4()) - 3]) + v4()[2:-1], 65536, M, "client identifier exceeds remaining length", NO),
    "client id length past the end": (
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x09abc", 65536, M, "client identifier exceeds remaining length", NO),
    "trailing bytes inside the packet v4": (v4(extra=b"\x00"), 65536, M, "trailing bytes in packet", NO),
    "trailing bytes inside the packet v5": (v5(extra=b"zz"), 65536, M, "trailing bytes in packet", (5, 0x81)),
    "wrong protocol name": (encode_connect(4, "c", protocol_name=b"MQTX"), 65536, U, "unknown protocol name", NO),
    "lower-case protocol name": (encode_connect(4, "c", protocol_name=b"mqtt"), 65536, U, "unknown protocol name", NO),
    "protocol name length 5": (encode_connect(4, "c", protocol_name=b"MQTTT"), 65536, U, "unknown protocol name", NO),
    "MQTT with level 3": (encode_connect(4, "c", level=3), 65536, U, "unsupported protocol version", (3, 0x01)),
    "MQIsdp with level 4": (encode_connect(3, "c", level=4), 65536, U, "unsupported protocol version", (4, 0x01)),
    "MQIsdp with level 5": (encode_connect(3, "c", level=5), 65536, U, "unsupported protocol version", (5, 0x84)),
    "MQTT with level 6": (encode_connect(4, "c", level=6), 65536, U, "unsupported protocol version", (5, 0x84)),
    "MQTT with bridge bit (0x84)": (encode_connect(4, "c", level=0x84), 65536, U, "unsupported protocol version", (4, 0x01)),
    "MQIsdp with bridge bit (0x83)": (encode_connect(3, "c", level=0x83), 65536, U, "unsupported protocol version", (3, 0x01)),
    "reserved flag set v4": (v4(flags=0x03), 65536, M, "reserved connect flag set", NO),
    "reserved flag set v3": (encode_connect(3, "c", flags=0x01), 65536, M, "reserved connect flag set", NO),
    "reserved flag set v5": (v5(flags=0x03), 65536, M, "reserved connect flag set", (5, 0x81)),
    "will qos without will flag": (v4(flags=0x0A), 65536, M, "will QoS or will retain set without will flag", NO),
    "will retain without will flag": (v5(flags=0x22), 65536, M, "will QoS or will retain set without will flag", (5, 0x81)),
    "will qos 3": (encode_connect(4, "c", will=Will("t", b"", qos=3)), 65536, M, "will QoS 3", NO),
    "password without user name v3.1.1": (v4(flags=0x42, extra=lp(b"pw")), 65536, M, "password flag without user name flag", NO),
    "password without user name v3.1": (
        encode_connect(3, "c", flags=0x42, extra=lp(b"pw")), 65536, M, "password flag without user name flag", NO),
    "user name flag without user name": (v4(flags=0x82), 65536, M, "user name exceeds remaining length", NO),
    "will flag without will": (v4(flags=0x06), 65536, M, "will topic exceeds remaining length", NO),
    "bad UTF-8 in client id (lone continuation)": (encode_connect(4, b"a\x80b"), 65536, M, "client identifier: ill-formed UTF-8", NO),
    "bad UTF-8: overlong '/'": (encode_connect(4, b"\xc0\xaf"), 65536, M, "client identifier: ill-formed UTF-8", NO),
    "bad UTF-8: overlong 3-byte": (encode_connect(4, b"\xe0\x80\xaf"), 65536, M, "client identifier: ill-formed UTF-8", NO),
    "bad UTF-8: surrogate U+D800": (encode_connect(5, b"\xed\xa0\x80"), 65536, M, "client identifier: ill-formed UTF-8", (5, 0x81)),
    "bad UTF-8: above U+10FFFF": (encode_connect(4, b"\xf4\x90\x80\x80"), 65536, M, "client identifier: ill-formed UTF-8", NO),
    "bad UTF-8: truncated sequence": (encode_connect(4, b"ab\xe2\x82"), 65536, M, "client identifier: ill-formed UTF-8", NO),
    "U+0000 in client id": (encode_connect(4, b"a\x00b"), 65536, M, "client identifier: contains U+0000", NO),
    # What Mosquitto refuses as malformed (controls, non-characters): the ClientId is rejected
    # with a CONNACK in every version, other strings are malformed.
    "U+001F in client id v4": (encode_connect(4, "a\x1fb"), 65536, C, ID_CTL, (4, 0x02)),
    "U+0009 in client id v3.1": (encode_connect(3, "a\tb"), 65536, C, ID_CTL, (3, 0x02)),
    "U+007F in client id v5": (encode_connect(5, "a\x7f"), 65536, C, ID_CTL, (5, 0x85)),
    "U+0080 in client id v5": (encode_connect(5, "\x80"), 65536, C, ID_CTL, (5, 0x85)),
    "U+FFFF in client id v4": (encode_connect(4, "id\uffff"), 65536, C, ID_CTL, (4, 0x02)),
    "U+FFFF in client id after 8 ASCII": (encode_connect(5, "abcdefgh\uffff"), 65536, C, ID_CTL, (5, 0x85)),
    "U+0001 after 8 ASCII in client id": (encode_connect(4, "abcdefgh\x01"), 65536, C, ID_CTL, (4, 0x02)),
    "U+009F in will topic v4": (v4(will=Will("a\x9f", b"")), 65536, M, "will topic: control character or non-character", NO),
    "U+FDD0 in user name v5": (v5(username="\ufdd0"), 65536, M, "user name: control character or non-character", (5, 0x81)),
    "U+1FFFE in user name v4": (v4(username="\U0001fffe"), 65536, M, "user name: control character or non-character", NO),
    "U+10FFFF in will topic v5": (v5(will=Will("t\U0010ffff", b"")), 65536, M, "will topic: control character or non-character", (5, 0x81)),
    "U+001B in user property v5": (
        v5(properties=[("user_property", ("k", "\x1b[2J"))]), 65536, M, "user property: control character or non-character", (5, 0x81)),
    "U+FFFE in content type v5": (
        v5(will=Will("t", b"", properties=[("content_type", "\ufffe")])), 65536, M, "content type: control character or non-character", (5, 0x81)),
    "will topic with 201 levels": (v4(will=Will("/" * 201, b"")), 65536, T, "will topic has more than 200 levels", NO),
    "will topic with 201 levels v5": (v5(will=Will("a" + "/" * 201, b"")), 65536, T,
                                      "will topic has more than 200 levels", (5, 0x90)),
    "U+0000 wins over a control character": (encode_connect(4, b"\x01a\x00"), 65536, M, "client identifier: contains U+0000", NO),
    "ill-formed wins over a control character": (encode_connect(4, b"\x01\xff"), 65536, M, "client identifier: ill-formed UTF-8", NO),
    "U+0000 in user name": (v5(username=b"\x00"), 65536, M, "user name: contains U+0000", (5, 0x81)),
    "bad UTF-8 in will topic": (v4(will=Will(b"\xff", b"")), 65536, M, "will topic: ill-formed UTF-8", NO),
    "U+0000 in will topic": (v4(will=Will(b"a\x00", b"")), 65536, M, "will topic: contains U+0000", NO),
    "bad UTF-8 in user property": (
        v5(properties=[("user_property", (b"k", b"\xc3"))]), 65536, M, "user property: ill-formed UTF-8", (5, 0x81)),
    "U+0000 in auth method": (
        v5(properties=[("authentication_method", b"A\x00")]), 65536, M, "authentication method: contains U+0000", (5, 0x81)),
    "bad UTF-8 in content type": (
        v5(will=Will("t", b"", properties=[("content_type", b"\xed\xbf\xbf")])), 65536, M, "content type: ill-formed UTF-8", (5, 0x81)),
    "empty will topic": (v4(will=Will("", b"")), 65536, T, "will topic invalid", NO),
    "wildcard in will topic v5": (v5(will=Will("a/#", b"")), 65536, T, "will topic invalid", (5, 0x90)),
    "wildcard in response topic": (
        v5(will=Will("t", b"", properties=[("response_topic", "r/+")])), 65536, T, "response topic invalid", (5, 0x90)),
    "oversized vs max_size v4": (v4(username="u", password=b"x" * 2000), 1024, L, "packet too large", NO),
    "oversized vs max_size v5": (v5(username="u", password=b"x" * 2000), 1024, L, "packet too large", (5, 0x95)),
    "duplicate session expiry": (
        v5(properties=[("session_expiry_interval", 1), ("session_expiry_interval", 2)]), 65536, P, "duplicate property", (5, 0x82)),
    "duplicate auth method": (
        v5(properties=[("authentication_method", "a"), ("authentication_method", "a")]), 65536, P, "duplicate property", (5, 0x82)),
    "duplicate will delay": (
        v5(will=Will("t", b"", properties=[("will_delay_interval", 1), ("will_delay_interval", 1)])),
        65536, P, "duplicate property", (5, 0x82)),
    "receive maximum 0": (v5(properties=[("receive_maximum", 0)]), 65536, P, "receive maximum is 0", (5, 0x82)),
    "maximum packet size 0": (v5(properties=[("maximum_packet_size", 0)]), 65536, P, "maximum packet size is 0", (5, 0x82)),
    "request problem information 2": (
        v5(properties=[("request_problem_information", 2)]), 65536, P, "request problem information is not 0 or 1", (5, 0x82)),
    "request response information 2": (
        v5(properties=[("request_response_information", 2)]), 65536, P, "request response information is not 0 or 1", (5, 0x82)),
    "payload format indicator 2": (
        v5(will=Will("t", b"", properties=[("payload_format_indicator", 2)])), 65536, P, "payload format indicator is not 0 or 1", (5, 0x82)),
    "auth data without method": (
        v5(properties=[("authentication_data", b"x")]), 65536, P, "authentication data without authentication method", (5, 0x82)),
    "will property in CONNECT properties": (
        v5(properties=[("will_delay_interval", 1)]), 65536, M, "property not allowed in CONNECT", (5, 0x81)),
    "topic alias (0x23) in CONNECT": (
        v5(raw_properties=b"\x03\x23\x00\x01"), 65536, M, "property not allowed in CONNECT", (5, 0x81)),
    "unknown property 0x7f": (v5(raw_properties=b"\x02\x7f\x00"), 65536, M, "property not allowed in CONNECT", (5, 0x81)),
    "two-byte property identifier": (v5(raw_properties=b"\x03\x91\x00\x00"), 65536, M, "property not allowed in CONNECT", (5, 0x81)),
    "session expiry in will properties": (
        v5(will=Will("t", b"", properties=[(0x11, 5)])), 65536, M, "property not allowed in will properties", (5, 0x81)),
    "property length past remaining length": (
        v5(raw_properties=b"\x7f\x11"), 65536, M, "property length exceeds remaining length", (5, 0x81)),
    "property past property length": (
        v5(raw_properties=b"\x03\x11\x00\x00\x00\x05"), 65536, M, "property exceeds property length", (5, 0x81)),
    "property length 5 bytes": (
        v5(raw_properties=b"\x80\x80\x80\x80\x01"), 65536, M, "property length longer than 4 bytes", (5, 0x81)),
    "property length not minimal": (
        v5(raw_properties=b"\x80\x00"), 65536, M, "property length not minimally encoded", (5, 0x81)),
    "user property value past the block": (
        v5(raw_properties=b"\x05\x26\x00\x01k\x00"), 65536, M, "property exceeds property length", (5, 0x81)),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid(name):
    data, max_size, cls, reason, connack = INVALID[name]
    with pytest.raises(cls) as exc:
        mqtt.parse_connect(data, max_size)
    e = exc.value
    assert isinstance(e, MQTTProtocolError) and isinstance(e, FastproxyError)
    assert e.reason == reason
    if connack is None:
        assert e.send_connack is False
        assert e.connack_version is None
        assert e.reason_code == e.v5_reason_code
    else:
        assert e.send_connack is True
        assert (e.connack_version, e.reason_code) == connack
        mqtt.build_connack(e.connack_version, e.reason_code)  # a code the CONNACK can carry
    result = agree(data, max_size)
    assert result[0] == "invalid"
    assert reason in str(e)


def test_3x_malformed_has_no_connack_5_has_one():
    e4 = _error(v4(flags=0x01))
    e5 = _error(v5(flags=0x01))
    assert (e4.send_connack, e4.v5_reason_code, e4.version) == (False, mqtt.ReasonCode.MALFORMED_PACKET, 4)
    assert (e5.send_connack, e5.reason_code, e5.version) == (True, mqtt.ReasonCode.MALFORMED_PACKET, 5)


def _error(data, max_size=65536):
    with pytest.raises(MQTTProtocolError) as exc:
        mqtt.parse_connect(data, max_size)
    return exc.value


def test_errors_pickle():
    e = _error(v5(flags=0x01))
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is type(e)
    assert (e2.reason, e2.reason_code, e2.send_connack, e2.offset) == (e.reason, e.reason_code, e.send_connack, e.offset)


# ----------------------------------------------------------------------------- early detection

def first_decisive_length(data, max_size=65536):
    """The smallest prefix length for which the parser stops asking for more."""
    for n in range(len(data) + 1):
        if outcome(data[:n], max_size) != ("need_more",):
            return n
    return None


@pytest.mark.parametrize("data,max_size,expected", [
    (b"\x30\x05\x00\x01a\x68\x69", 65536, 1),                 # PUBLISH: 1 byte
    (b"\x20\x02\x00\x00", 65536, 1),                         # CONNACK: 1 byte
    (b"\x12\x0a", 65536, 1),                                 # flags: 1 byte
    (b"\x10\xff\xff\xff\xff\x01", 65536, 5),                 # 4th length byte continues
    (b"\x10\x80\x00", 65536, 3),                             # non-minimal
    (b"\x10\x0a\x00\x07MQTT...", 65536, 4),                  # name length 7
    (b"\x10\x0a\x00\x04MQX", 65536, 7),                      # first wrong name byte
    (b"\x10\xff\xff\x03\x00\x04MQTT\x04" + b"\x00" * 100, 65536, 11),  # too large: at the level
    (b"\x10\xff\xff\x03\x00\x04MQTT\x05" + b"\x00" * 100, 65536, 11),
    (b"\x10\x05\x00\x04MQTT\x04", 65536, 4),                 # name cannot fit in 5 bytes
    (v4(extra=b"\x00" * 50), 65536, len(v4())),              # trailing bytes: without them
])
def test_invalid_as_early_as_possible(data, max_size, expected):
    assert first_decisive_length(data, max_size) == expected
    assert outcome(data[:expected], max_size)[0] == "invalid"


def test_too_large_before_the_body():
    header = b"\x10" + varint(1_000_000) + lp(b"MQTT") + b"\x05"
    e = _error(header, max_size=65536)
    assert isinstance(e, PacketTooLarge)
    assert (e.send_connack, e.connack_version, e.reason_code) == (True, 5, 0x95)
    e = _error(b"\x10" + varint(1_000_000) + lp(b"MQTT") + b"\x04")
    assert isinstance(e, PacketTooLarge) and not e.send_connack
    # Exactly max_size is fine.
    data = v4(username="u", password=b"x" * 100)
    assert mqtt.parse_connect(data, max_size=len(data)).packet_length == len(data)
    assert isinstance(_error(data, max_size=len(data) - 1), PacketTooLarge)
    assert mqtt.parse_connect(data, max_size=None) is not None
    with pytest.raises(ValueError):
        mqtt.parse_connect(data, max_size=-1)


# ----------------------------------------------------------------------------- incremental

@pytest.mark.parametrize("name", list(VALID))
def test_incremental_one_byte_at_a_time(name):
    data = VALID[name]
    whole = mqtt.parse_connect(data)
    for n in range(len(data)):
        assert mqtt.parse_connect(data[:n]) is None, n
        assert ref.parse(data[:n]).status == "need_more"
    assert mqtt.parse_connect(data) == whole


@pytest.mark.parametrize("name", list(INVALID))
def test_incremental_invalid_is_stable(name):
    """Every prefix is either 'need more' or exactly the final verdict."""
    data, max_size, *_ = INVALID[name]
    final = outcome(data, max_size)
    for n in range(len(data)):
        got = outcome(data[:n], max_size)
        assert got == ("need_more",) or got == final, n


def test_coalesced_with_following_packets():
    connect = encode_connect(5, "c", properties=ALL_CONNECT_PROPS, username="u", password=b"p")
    publish = b"\x30\x0b\x00\x03a/bhello!!"
    subscribe = b"\x82\x08\x00\x01\x00\x03a/b\x00"
    garbage = b"\xff" * 5
    for tail in (publish, publish + subscribe, garbage, b"\x10" + connect[1:]):
        data = connect + tail
        info = mqtt.parse_connect(data)
        assert info.packet_length == len(connect)
        assert data[info.packet_length:] == tail
        assert dataclasses.asdict(info) == dataclasses.asdict(mqtt.parse_connect(connect))
        agree(data)
    # A partial following packet does not matter either.
    assert mqtt.parse_connect(connect + publish[:3]).packet_length == len(connect)


# ----------------------------------------------------------------------------- CONNACK

def test_build_connack():
    assert mqtt.build_connack(4, mqtt.ConnackReturnCode.UNACCEPTABLE_PROTOCOL_VERSION) == b"\x20\x02\x00\x01"
    assert mqtt.build_connack(4, mqtt.ConnackReturnCode.IDENTIFIER_REJECTED) == b"\x20\x02\x00\x02"
    assert mqtt.build_connack(3, mqtt.ConnackReturnCode.NOT_AUTHORIZED) == b"\x20\x02\x00\x05"
    assert mqtt.build_connack(4, 0) == b"\x20\x02\x00\x00"
    assert mqtt.build_connack(5, mqtt.ReasonCode.MALFORMED_PACKET) == b"\x20\x03\x00\x81\x00"
    assert mqtt.build_connack(5, mqtt.ReasonCode.PROTOCOL_ERROR) == b"\x20\x03\x00\x82\x00"
    assert mqtt.build_connack(5, mqtt.ReasonCode.UNSUPPORTED_PROTOCOL_VERSION) == b"\x20\x03\x00\x84\x00"
    assert mqtt.build_connack(5, mqtt.ReasonCode.CLIENT_IDENTIFIER_NOT_VALID) == b"\x20\x03\x00\x85\x00"
    assert mqtt.build_connack(5, mqtt.ReasonCode.NOT_AUTHORIZED) == b"\x20\x03\x00\x87\x00"
    assert mqtt.build_connack(5, mqtt.ReasonCode.PACKET_TOO_LARGE) == b"\x20\x03\x00\x95\x00"
    for rc in mqtt.ReasonCode:
        assert mqtt.build_connack(5, rc) == bytes([0x20, 3, 0, rc, 0])
    for version, rc in [(4, 6), (4, 0x81), (3, 0x87), (5, 0x01), (5, 0x8B), (5, 0x91), (6, 0), (2, 0),
                        (0, 0), (4, -1), (4, 256), (-1, 0), (300, 0)]:
        with pytest.raises(ValueError):
            mqtt.build_connack(version, rc)
    # The answers the parser asks for can always be built; a CONNACK parses as not-CONNECT.
    assert isinstance(_error(mqtt.build_connack(5, 0x81)), ConnectProtocolError)


def test_connack_code():
    R, C = mqtt.ReasonCode, mqtt.ConnackReturnCode
    assert mqtt.connack_code(5, R.NOT_AUTHORIZED) == 0x87
    assert mqtt.connack_code(4, R.NOT_AUTHORIZED) == C.NOT_AUTHORIZED
    assert mqtt.connack_code(3, R.BANNED) == C.NOT_AUTHORIZED
    assert mqtt.connack_code(4, R.CLIENT_IDENTIFIER_NOT_VALID) == C.IDENTIFIER_REJECTED
    assert mqtt.connack_code(4, R.UNSUPPORTED_PROTOCOL_VERSION) == C.UNACCEPTABLE_PROTOCOL_VERSION
    assert mqtt.connack_code(4, R.BAD_USER_NAME_OR_PASSWORD) == C.BAD_USER_NAME_OR_PASSWORD
    assert mqtt.connack_code(4, R.SERVER_BUSY) == C.SERVER_UNAVAILABLE
    assert mqtt.connack_code(4, R.SUCCESS) == 0
    assert mqtt.connack_code(4, R.MALFORMED_PACKET) is None  # 3.x: close, no CONNACK
    assert mqtt.connack_code(4, R.PACKET_TOO_LARGE) is None
    assert mqtt.connack_code(5, 0x01) is None
    assert mqtt.connack_code(6, 0x87) is None


# ----------------------------------------------------------------------------- rewriting

@pytest.mark.parametrize("name", list(VALID))
@pytest.mark.parametrize("new_id", ["", "CN=device-42", "d" * 127, "\u00e9" * 5000, "x" * 65535])
def test_rewrite_client_id_round_trip(name, new_id):
    data = VALID[name]
    tail = b"\x30\x03\x00\x01t"
    out = mqtt.rewrite_client_id(data + tail, new_id)
    before = mqtt.parse_connect(data, max_size=None)
    after = mqtt.parse_connect(out, max_size=None)
    assert after.client_id == new_id
    assert out[after.packet_length:] == tail
    expect = dataclasses.replace(before, client_id=new_id, packet_length=after.packet_length)
    assert after == expect
    assert agree(out, max_size=mqtt.MAX_PACKET_SIZE)[0] == "valid"
    # The reference sees the same password / will payload bytes.
    r1, r2 = ref.parse(data), ref.parse(out, mqtt.MAX_PACKET_SIZE)
    assert (r1.password, r1.will_payload) == (r2.password, r2.will_payload)
    # And back.
    assert mqtt.rewrite_client_id(out, before.client_id) == data + tail


def test_rewrite_client_id_errors():
    data = VALID["v3.1.1 empty client id"]
    with pytest.raises(ValueError):
        mqtt.rewrite_client_id(data, "a\x00b")
    with pytest.raises(ValueError):
        mqtt.rewrite_client_id(data, "x" * 65536)
    with pytest.raises(ValueError):
        mqtt.rewrite_client_id(data, "\ud800")  # cannot be encoded
    with pytest.raises(ValueError):
        mqtt.rewrite_client_id(data, b"\xff")
    with pytest.raises(ValueError):
        mqtt.rewrite_client_id(data[:-1], "x")  # incomplete
    with pytest.raises(MalformedConnect):
        mqtt.rewrite_client_id(v4(flags=0x01), "x")
    assert mqtt.rewrite_client_id(bytearray(data), b"abc") == encode_connect(4, "abc")


def test_rewrite_changes_remaining_length_size():
    data = encode_connect(4, "")
    assert len(data) == 14 and data[1] == 12
    out = mqtt.rewrite_client_id(data, "x" * 200)
    assert out[1:3] == varint(212) and len(out) == 3 + 212
    out = mqtt.rewrite_client_id(out, "x" * 20000)
    assert out[1:4] == varint(20012)


# ----------------------------------------------------------------------------- real clients

def capture_connect(start_client, timeout=10.0):
    """Listen on 127.0.0.1, let start_client(port) connect, return the bytes of its CONNECT."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(timeout)
    stop = start_client(srv.getsockname()[1])
    try:
        conn, _ = srv.accept()
        conn.settimeout(0.2)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = conn.recv(65536)
            except socket.timeout:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                data += chunk
            if mqtt.parse_connect(data) is not None:
                break
        conn.close()
        return data
    finally:
        srv.close()
        stop()


def mosquitto_pub(*args):
    def start(port):
        proc = subprocess.Popen(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", "t/1", "-m", "m", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            proc.kill()
            proc.wait(timeout=5)
        return stop
    return capture_connect(start)


need_mosquitto_pub = pytest.mark.skipif(shutil.which("mosquitto_pub") is None,
                                        reason="mosquitto_pub (mosquitto-clients) not installed")


@need_mosquitto_pub
def test_mosquitto_pub_v311():
    data = mosquitto_pub("-i", "pub-311", "-u", "alice", "-P", "s3cret", "-k", "30", "-c", "-q", "1",
                         "--will-topic", "status/pub-311", "--will-payload", "offline", "--will-qos", "1",
                         "--will-retain")
    info = mqtt.parse_connect(data)
    assert (info.version, info.protocol_name, info.client_id) == (4, "MQTT", "pub-311")
    assert (info.username, info.password_present, info.keepalive, info.clean_start) == ("alice", True, 30, False)
    assert (info.will_topic, info.will_qos, info.will_retain, info.will_payload_len) == ("status/pub-311", 1, True, 7)
    assert info.packet_length == len(data)
    agree(data)


@need_mosquitto_pub
def test_mosquitto_pub_v5():
    data = mosquitto_pub(
        "-V", "mqttv5", "-i", "pub-5", "-u", "bob", "-P", "pw", "-k", "45",
        "--will-topic", "w/pub-5", "--will-payload", "bye", "--will-qos", "2",
        "-D", "connect", "session-expiry-interval", "3600",
        "-D", "connect", "receive-maximum", "16",
        "-D", "connect", "maximum-packet-size", "100000",
        "-D", "connect", "topic-alias-maximum", "8",
        "-D", "connect", "request-problem-information", "1",
        "-D", "connect", "user-property", "site", "lab",
        "-D", "connect", "user-property", "site", "lab2",
        "-D", "connect", "authentication-method", "TOKEN",
        "-D", "connect", "authentication-data", "abc",
        "-D", "will", "will-delay-interval", "10",
        "-D", "will", "content-type", "text/plain",
        "-D", "will", "user-property", "why", "crash")
    info = mqtt.parse_connect(data)
    assert (info.version, info.client_id, info.username, info.keepalive) == (5, "pub-5", "bob", 45)
    assert info.properties == {"session_expiry_interval": 3600, "receive_maximum": 16,
                               "maximum_packet_size": 100000, "topic_alias_maximum": 8,
                               "request_problem_information": 1}
    assert info.user_properties == [("site", "lab"), ("site", "lab2")]
    assert (info.auth_method, info.auth_data) == ("TOKEN", b"abc")
    assert (info.will_topic, info.will_qos) == ("w/pub-5", 2)
    assert info.will_properties == {"will_delay_interval": 10, "content_type": "text/plain"}
    assert info.will_user_properties == [("why", "crash")]
    agree(data)


@need_mosquitto_pub
def test_mosquitto_pub_v31():
    data = mosquitto_pub("-V", "mqttv31", "-i", "pub-31", "-u", "carol", "-P", "pw")
    info = mqtt.parse_connect(data)
    assert (info.version, info.protocol_name, info.client_id, info.username) == (3, "MQIsdp", "pub-31", "carol")
    assert info.password_present
    agree(data)


def paho_connect(protocol, client_id, **setup):
    paho = pytest.importorskip("paho.mqtt.client")
    from paho.mqtt.enums import CallbackAPIVersion

    def start(port):
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        if "user" in setup:
            client.username_pw_set(*setup["user"])
        if "will" in setup:
            client.will_set(*setup["will"])
        kwargs = {"keepalive": setup.get("keepalive", 60)}
        if "properties" in setup:
            kwargs["properties"] = setup["properties"]
        if "clean_start" in setup:
            kwargs["clean_start"] = setup["clean_start"]
        done = threading.Event()

        def run():
            try:
                client.connect("127.0.0.1", port, **kwargs)
                while not done.is_set():
                    client.loop(timeout=0.05)
            except OSError:
                pass

        t = threading.Thread(target=run, daemon=True)
        t.start()

        def stop():
            done.set()
            t.join(timeout=5)
            try:
                client.socket() and client.socket().close()
            except OSError:
                pass
        return stop
    return capture_connect(start)


def test_paho_v311():
    paho = pytest.importorskip("paho.mqtt.client")
    data = paho_connect(paho.MQTTv311, "paho-311", user=("dave", "pw"), will=("w/paho", b"gone", 1, True),
                        keepalive=17)
    info = mqtt.parse_connect(data)
    assert (info.version, info.client_id, info.username, info.password_present) == (4, "paho-311", "dave", True)
    assert (info.will_topic, info.will_qos, info.will_retain, info.will_payload_len, info.keepalive) == (
        "w/paho", 1, True, 4, 17)
    agree(data)


def test_paho_v31_empty_client_id():
    paho = pytest.importorskip("paho.mqtt.client")
    data = paho_connect(paho.MQTTv31, "paho-31")
    info = mqtt.parse_connect(data)
    assert (info.version, info.protocol_name, info.client_id) == (3, "MQIsdp", "paho-31")
    agree(data)


def test_paho_v5_properties():
    paho = pytest.importorskip("paho.mqtt.client")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 120
    props.ReceiveMaximum = 5
    props.UserProperty = [("a", "1"), ("b", "\u00e9")]
    props.RequestResponseInformation = 1
    data = paho_connect(paho.MQTTv5, "", properties=props, clean_start=True, user=("eve", None))
    info = mqtt.parse_connect(data)
    assert (info.version, info.client_id, info.username, info.password_present) == (5, "", "eve", False)
    assert info.properties == {"session_expiry_interval": 120, "receive_maximum": 5,
                               "request_response_information": 1}
    assert info.user_properties == [("a", "1"), ("b", "\u00e9")]
    agree(data)
    # The empty ClientId can be rewritten (e.g. to the certificate CN) and still parses.
    out = mqtt.rewrite_client_id(data, "device-cn")
    assert mqtt.parse_connect(out).client_id == "device-cn"


# ----------------------------------------------------------------------------- encoder sanity

def test_reference_encoder_matches_hand_written():
    assert encode_connect(4, "abcd") == bytes.fromhex("101000044d5154540402003c000461626364")
    assert encode_connect(3, "abcd") == bytes.fromhex("101200064d51497364700302003c000461626364")
    assert encode_properties([("session_expiry_interval", 3600)]) == bytes.fromhex("05110000 0e10".replace(" ", ""))
    assert varint(0) == b"\x00" and varint(127) == b"\x7f" and varint(128) == b"\x80\x01"
    assert varint(268_435_455) == b"\xff\xff\xff\x7f"
