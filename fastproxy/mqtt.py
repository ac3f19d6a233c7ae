"""MQTT CONNECT inspection: the typed result, the spec's constants, and the compiled parser.

The parser itself is C (ext/src/mqtt_connect.c, wrapped by fastproxy._mqtt); see
docs/mqtt-parser.md. Typical use on the bytes a client sent so far::

    from fastproxy import mqtt
    try:
        info = mqtt.parse_connect(buf, max_size=65536)
    except mqtt.MQTTProtocolError as e:
        if e.send_connack:
            sock.send(mqtt.build_connack(e.connack_version, e.reason_code))
        close()
    else:
        if info is None:
            ...  # read more, call again with the longer buffer
        else:
            forward(buf)  # buf[info.packet_length:] is the client's next packets, untouched

Versions are protocol levels: 3 = MQTT 3.1 ("MQIsdp"), 4 = MQTT 3.1.1, 5 = MQTT 5.0.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import IntEnum

from fastproxy.errors import (
    ConnectProtocolError,
    EngineNotBuiltError,
    MalformedConnect,
    MQTTProtocolError,
    PacketTooLarge,
    TopicNameInvalid,
    ClientIdNotValid,
    UnsupportedProtocolVersion,
)

__all__ = [
    "MQTT_3_1",
    "MQTT_3_1_1",
    "MQTT_5_0",
    "VERSIONS",
    "MAX_PACKET_SIZE",
    "ConnackReturnCode",
    "ReasonCode",
    "PropertyId",
    "ConnectInfo",
    "parse_connect",
    "build_connack",
    "connack_code",
    "rewrite_client_id",
    "MQTTProtocolError",
    "MalformedConnect",
    "ConnectProtocolError",
    "UnsupportedProtocolVersion",
    "TopicNameInvalid",
    "ClientIdNotValid",
    "PacketTooLarge",
]

# Protocol levels (MQTT 3.1.1 §3.1.2.2, MQTT 5.0 §3.1.2.2).
MQTT_3_1 = 3  # protocol name "MQIsdp"
MQTT_3_1_1 = 4  # protocol name "MQTT"
MQTT_5_0 = 5  # protocol name "MQTT"
VERSIONS = (MQTT_3_1, MQTT_3_1_1, MQTT_5_0)

# Largest packet MQTT can express: a 4-byte Remaining Length of 268,435,455 + 5 header bytes.
MAX_PACKET_SIZE = 268_435_460


class ConnackReturnCode(IntEnum):
    """CONNACK Connect Return Codes of MQTT 3.1 and 3.1.1 (3.1.1 §3.2.2.3, table 3.1)."""

    CONNECTION_ACCEPTED = 0x00
    UNACCEPTABLE_PROTOCOL_VERSION = 0x01
    IDENTIFIER_REJECTED = 0x02
    SERVER_UNAVAILABLE = 0x03
    BAD_USER_NAME_OR_PASSWORD = 0x04
    NOT_AUTHORIZED = 0x05


class ReasonCode(IntEnum):
    """MQTT 5.0 Reason Codes that a CONNACK may carry (5.0 §3.2.2.2)."""

    SUCCESS = 0x00
    UNSPECIFIED_ERROR = 0x80
    MALFORMED_PACKET = 0x81
    PROTOCOL_ERROR = 0x82
    IMPLEMENTATION_SPECIFIC_ERROR = 0x83
    UNSUPPORTED_PROTOCOL_VERSION = 0x84
    CLIENT_IDENTIFIER_NOT_VALID = 0x85
    BAD_USER_NAME_OR_PASSWORD = 0x86
    NOT_AUTHORIZED = 0x87
    SERVER_UNAVAILABLE = 0x88
    SERVER_BUSY = 0x89
    BANNED = 0x8A
    BAD_AUTHENTICATION_METHOD = 0x8C
    TOPIC_NAME_INVALID = 0x90
    PACKET_TOO_LARGE = 0x95
    QUOTA_EXCEEDED = 0x97
    PAYLOAD_FORMAT_INVALID = 0x99
    RETAIN_NOT_SUPPORTED = 0x9A
    QOS_NOT_SUPPORTED = 0x9B
    USE_ANOTHER_SERVER = 0x9C
    SERVER_MOVED = 0x9D
    CONNECTION_RATE_EXCEEDED = 0x9F


class PropertyId(IntEnum):
    """MQTT 5.0 property identifiers allowed in CONNECT (§3.1.2.11) and Will Properties
    (§3.1.3.2). The lower-case member name is the key used in ConnectInfo.properties and
    ConnectInfo.will_properties."""

    PAYLOAD_FORMAT_INDICATOR = 0x01
    MESSAGE_EXPIRY_INTERVAL = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SESSION_EXPIRY_INTERVAL = 0x11
    AUTHENTICATION_METHOD = 0x15
    AUTHENTICATION_DATA = 0x16
    REQUEST_PROBLEM_INFORMATION = 0x17
    WILL_DELAY_INTERVAL = 0x18
    REQUEST_RESPONSE_INFORMATION = 0x19
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27


@dataclass(slots=True, repr=False)
class ConnectInfo:
    """A valid CONNECT, as returned by parse_connect.

    The password is never kept (only whether there was one), and repr/str show the size of
    the authentication data, never its bytes. The field order is the order the compiled
    module passes them in: append new fields at the end only.
    """

    version: int
    """Protocol level: 3 (MQTT 3.1), 4 (MQTT 3.1.1) or 5 (MQTT 5.0)."""
    protocol_name: str
    """"MQTT" or "MQIsdp"."""
    client_id: str
    """May be empty (the caller decides whether to accept, rewrite or refuse that)."""
    username: str | None
    password_present: bool
    keepalive: int
    """Keep Alive in seconds (0: off)."""
    clean_start: bool
    """Clean Start (5.0) / Clean Session (3.x)."""
    will_topic: str | None
    """None when the Will Flag is 0."""
    will_qos: int
    will_retain: bool
    will_payload_len: int | None
    properties: dict[str, int] = field(default_factory=dict)
    """5.0 CONNECT properties by name: session_expiry_interval, receive_maximum,
    maximum_packet_size, topic_alias_maximum, request_response_information,
    request_problem_information (only those present)."""
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    """5.0 User Properties of the CONNECT, in order (names may repeat)."""
    will_properties: dict[str, int | str | bytes] = field(default_factory=dict)
    """5.0 Will Properties by name: will_delay_interval, payload_format_indicator,
    message_expiry_interval, content_type, response_topic, correlation_data."""
    will_user_properties: list[tuple[str, str]] = field(default_factory=list)
    auth_method: str | None = None
    """5.0 Authentication Method."""
    auth_data: bytes | None = None
    """5.0 Authentication Data (never shown by repr)."""
    packet_length: int = 0
    """Length of the CONNECT, fixed header included: bytes from here on are later packets."""

    @property
    def has_will(self) -> bool:
        return self.will_topic is not None

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "auth_data" and value is not None:
                parts.append(f"auth_data=<{len(value)} bytes>")
            else:
                parts.append(f"{f.name}={value!r}")
        return f"ConnectInfo({', '.join(parts)})"

    __str__ = __repr__


try:
    from fastproxy._mqtt import build_connack, connack_code, parse_connect, rewrite_client_id
except ImportError as _exc:  # pragma: no cover - depends on the build
    raise EngineNotBuiltError(
        "fastproxy._mqtt is not built: run `pip install .` or "
        "`FASTPROXY_ONLY=_mqtt python setup.py build_ext --inplace`"
    ) from _exc
