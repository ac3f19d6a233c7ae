"""A small pure-Python MQTT CONNECT parser and encoder, to check the compiled one against.

Written from the specifications, not from ext/src/mqtt_connect.c:
  MQTT 3.1   (IBM, protocol name "MQIsdp", level 3)
  MQTT 3.1.1 (OASIS, section 3.1 CONNECT, level 4)
  MQTT 5.0   (OASIS, section 3.1 CONNECT, level 5)

It follows the same documented rules as the C parser (docs/mqtt-parser.md): fields are checked
in packet order, the first failing check wins, a read past the declared length is malformed
even before those bytes arrive, and a read past the bytes received means "need more". UTF-8 is
checked with Python's strict codec (which rejects surrogates, overlong forms and values above
U+10FFFF), not with a hand-written validator.

parse(data, max_size) returns a Result; encode_connect(...) builds a CONNECT (valid by default,
with knobs to break it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------- constants

MALFORMED_PACKET = 0x81
PROTOCOL_ERROR = 0x82
CLIENT_IDENTIFIER_NOT_VALID = 0x85
UNSUPPORTED_PROTOCOL_VERSION = 0x84
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95

SUPPORTED = {(b"MQIsdp", 3), (b"MQTT", 4), (b"MQTT", 5)}

# MQTT 5.0 section 2.2.2.2: identifier -> (key, type). Types: byte, u16, u32, str, bin, pair.
CONNECT_PROPERTIES = {  # section 3.1.2.11
    0x11: ("session_expiry_interval", "u32"),
    0x21: ("receive_maximum", "u16"),
    0x27: ("maximum_packet_size", "u32"),
    0x22: ("topic_alias_maximum", "u16"),
    0x19: ("request_response_information", "byte"),
    0x17: ("request_problem_information", "byte"),
    0x26: ("user_property", "pair"),
    0x15: ("authentication_method", "str"),
    0x16: ("authentication_data", "bin"),
}
WILL_PROPERTIES = {  # section 3.1.3.2
    0x18: ("will_delay_interval", "u32"),
    0x01: ("payload_format_indicator", "byte"),
    0x02: ("message_expiry_interval", "u32"),
    0x03: ("content_type", "str"),
    0x08: ("response_topic", "str"),
    0x09: ("correlation_data", "bin"),
    0x26: ("user_property", "pair"),
}
PROPERTY_IDS = {name: pid for table in (CONNECT_PROPERTIES, WILL_PROPERTIES)
                for pid, (name, _) in table.items()}
PROPERTY_TYPES = {pid: kind for table in (CONNECT_PROPERTIES, WILL_PROPERTIES)
                  for pid, (_, kind) in table.items()}
# Properties whose value must be 0 or 1, and those that must not be 0 (Protocol Errors).
ZERO_OR_ONE = {"request_response_information", "request_problem_information",
               "payload_format_indicator"}
NOT_ZERO = {"receive_maximum", "maximum_packet_size"}
UTF8_FIELD_NAMES = {"authentication_method": "authentication method",
                    "content_type": "content type", "response_topic": "response topic",
                    "user_property": "user property"}


# ---------------------------------------------------------------------------- results

@dataclass
class Result:
    status: str  # "need_more" | "valid" | "invalid"
    fields: dict[str, Any] = field(default_factory=dict)  # valid: same keys as ConnectInfo
    password: bytes | None = None
    will_payload: bytes | None = None
    # invalid:
    rc5: int = 0
    reason: str = ""
    offset: int = 0
    level: int | None = None
    send_connack: bool = False
    connack_version: int | None = None
    reason_code: int | None = None


class NeedMore(Exception):
    pass


class Bad(Exception):
    def __init__(self, rc5: int, reason: str, offset: int, rc3: int = 0) -> None:
        super().__init__(reason)
        self.rc5, self.reason, self.offset = rc5, reason, offset
        self.rc3 = rc3  # the 3.x CONNACK return code, when 3.x has one for this refusal


class Reader:
    """Reads forward through data[pos:end]; end is the declared end of the current structure."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, past: str) -> bytes:
        if self.pos + n > self.end:
            raise Bad(MALFORMED_PACKET, past, self.pos)
        if self.pos + n > len(self.data):
            raise NeedMore
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self, past: str) -> int:
        return self.take(1, past)[0]

    def u16(self, past: str) -> int:
        return int.from_bytes(self.take(2, past), "big")

    def u32(self, past: str) -> int:
        return int.from_bytes(self.take(4, past), "big")

    def binary(self, past: str) -> bytes:
        start = self.pos
        n = self.u16(past)
        if start + 2 + n > self.end:
            raise Bad(MALFORMED_PACKET, past, start)
        self.pos = start
        return self.take(2 + n, past)[2:]

    def varint(self, what: str) -> int:
        """Variable Byte Integer (5.0 section 1.5.5): 1 to 4 bytes, shortest form."""
        start, value = self.pos, 0
        for i in range(4):
            if start + i + 1 > self.end:
                raise Bad(MALFORMED_PACKET, f"{what} exceeds remaining length", start)
            if start + i + 1 > len(self.data):
                raise NeedMore
            b = self.data[start + i]
            value += (b & 0x7F) << (7 * i)
            if b < 0x80:
                if b == 0 and i > 0:
                    raise Bad(MALFORMED_PACKET, f"{what} not minimally encoded", start)
                self.pos = start + i + 1
                return value
        raise Bad(MALFORMED_PACKET, f"{what} longer than 4 bytes", start)


def refused_code_point(ch: str) -> bool:
    """3.1.1 section 1.5.3 / 5.0 section 1.5.4 "SHOULD NOT include": the control characters and
    the non-characters, which Mosquitto (lib/utf8_mosq.c) refuses as malformed."""
    o = ord(ch)
    return 0x01 <= o <= 0x1F or 0x7F <= o <= 0x9F or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE


def utf8(raw: bytes, name: str, offset: int) -> str:
    """3.1.1 section 1.5.3 / 5.0 section 1.5.4: well-formed UTF-8, no U+0000, none of the code
    points a receiver may treat as malformed (the proxy does, as Mosquitto does)."""
    try:
        text = raw.decode("utf-8")  # strict: no surrogates, no overlongs
    except UnicodeDecodeError:
        raise Bad(MALFORMED_PACKET, f"{name}: ill-formed UTF-8", offset) from None
    if "\x00" in text:
        raise Bad(MALFORMED_PACKET, f"{name}: contains U+0000", offset)
    if any(refused_code_point(ch) for ch in text):
        if name == "client identifier":  # the identifier is rejected: 5.0 0x85, 3.x 0x02
            raise Bad(CLIENT_IDENTIFIER_NOT_VALID, f"{name}: control character or non-character", offset, rc3=0x02)
        raise Bad(MALFORMED_PACKET, f"{name}: control character or non-character", offset)
    return text


def valid_topic_name(topic: str) -> bool:
    return topic != "" and "+" not in topic and "#" not in topic


# ---------------------------------------------------------------------------- parser

def parse(data: bytes, max_size: int = 65536) -> Result:
    data = bytes(data)
    state: dict[str, Any] = {"level": None, "version": None, "unsupported": False}
    try:
        out = _parse(data, max_size, state)
    except NeedMore:
        return Result("need_more")
    except Bad as e:
        r = Result("invalid", rc5=e.rc5, reason=e.reason, offset=e.offset, level=state["level"])
        level = state["level"]
        if state["unsupported"]:
            asked = level & 0x7F
            r.send_connack = True
            if asked >= 5:
                r.connack_version, r.reason_code = 5, UNSUPPORTED_PROTOCOL_VERSION
            else:
                r.connack_version, r.reason_code = (3 if asked == 3 else 4), 0x01
        elif state["version"] == 5:
            r.send_connack, r.connack_version, r.reason_code = True, 5, e.rc5
        elif e.rc3 and state["version"] in (3, 4):
            r.send_connack, r.connack_version, r.reason_code = True, state["version"], e.rc3
        return r
    return out


def _parse(data: bytes, max_size: int, state: dict[str, Any]) -> Result:
    if not data:
        raise NeedMore
    # Fixed header: type 1 (CONNECT), flags 0000, then the Remaining Length.
    if data[0] >> 4 != 1:
        raise Bad(PROTOCOL_ERROR, "first packet is not CONNECT", 0)
    if data[0] & 0x0F:
        raise Bad(MALFORMED_PACKET, "reserved fixed header flags set", 0)
    header = Reader(data, 1, 1 << 62)
    remaining = header.varint("remaining length")
    packet_length = header.pos + remaining
    r = Reader(data, header.pos, packet_length)

    # Protocol Name, compared as its bytes come in.
    start = r.pos
    name_len = r.u16("protocol name exceeds remaining length")
    if name_len not in (4, 6):
        raise Bad(UNSUPPORTED_PROTOCOL_VERSION, "unknown protocol name", start)
    if start + 2 + name_len > packet_length:
        raise Bad(MALFORMED_PACKET, "protocol name exceeds remaining length", start)
    expected = b"MQTT" if name_len == 4 else b"MQIsdp"
    received = data[start + 2:start + 2 + name_len]
    if not expected.startswith(received):
        raise Bad(UNSUPPORTED_PROTOCOL_VERSION, "unknown protocol name", start)
    r.pos = start
    name = r.binary("protocol name exceeds remaining length")

    # Protocol Level.
    start = r.pos
    level = r.byte("protocol level exceeds remaining length")
    state["level"] = level
    if (name, level) not in SUPPORTED:
        state["unsupported"] = True
        raise Bad(UNSUPPORTED_PROTOCOL_VERSION, "unsupported protocol version", start)
    state["version"] = level

    if packet_length > max_size:
        raise Bad(PACKET_TOO_LARGE, "packet too large", 1)

    # Connect Flags.
    start = r.pos
    flags = r.byte("connect flags exceed remaining length")
    username_flag, password_flag = bool(flags & 0x80), bool(flags & 0x40)
    will_retain, will_qos, will_flag = bool(flags & 0x20), (flags >> 3) & 3, bool(flags & 0x04)
    clean_start = bool(flags & 0x02)
    if flags & 0x01:
        raise Bad(MALFORMED_PACKET, "reserved connect flag set", start)
    if not will_flag and (will_qos or will_retain):
        raise Bad(MALFORMED_PACKET, "will QoS or will retain set without will flag", start)
    if will_qos == 3:
        raise Bad(MALFORMED_PACKET, "will QoS 3", start)
    if level != 5 and password_flag and not username_flag:
        raise Bad(MALFORMED_PACKET, "password flag without user name flag", start)

    keepalive = r.u16("keep alive exceeds remaining length")

    props: dict[str, Any] = {}
    user_props: list[tuple[str, str]] = []
    if level == 5:
        props, user_props = _properties(r, CONNECT_PROPERTIES, "CONNECT")

    client_id = _string(r, "client identifier")
    will_topic = will_payload = None
    will_props: dict[str, Any] = {}
    will_user_props: list[tuple[str, str]] = []
    if will_flag:
        if level == 5:
            will_props, will_user_props = _properties(r, WILL_PROPERTIES, "will properties")
        start = r.pos
        will_topic = _string(r, "will topic")
        if not valid_topic_name(will_topic):
            raise Bad(TOPIC_NAME_INVALID, "will topic invalid", start)
        if will_topic.count("/") > 200:   # Mosquitto's TOPIC_HIERARCHY_LIMIT
            raise Bad(TOPIC_NAME_INVALID, "will topic has more than 200 levels", start)
        will_payload = r.binary("will payload exceeds remaining length")
    username = _string(r, "user name") if username_flag else None
    password = r.binary("password exceeds remaining length") if password_flag else None
    if r.pos != packet_length:
        raise Bad(MALFORMED_PACKET, "trailing bytes in packet", r.pos)

    auth_method = props.pop("authentication_method", None)
    auth_data = props.pop("authentication_data", None)
    fields = {
        "version": level,
        "protocol_name": name.decode(),
        "client_id": client_id,
        "username": username,
        "password_present": password is not None,
        "keepalive": keepalive,
        "clean_start": clean_start,
        "will_topic": will_topic,
        "will_qos": will_qos,
        "will_retain": will_retain,
        "will_payload_len": None if will_payload is None else len(will_payload),
        "properties": props,
        "user_properties": user_props,
        "will_properties": will_props,
        "will_user_properties": will_user_props,
        "auth_method": auth_method,
        "auth_data": auth_data,
        "packet_length": packet_length,
    }
    return Result("valid", fields=fields, password=password, will_payload=will_payload)


def _string(r: Reader, name: str) -> str:
    start = r.pos
    return utf8(r.binary(f"{name} exceeds remaining length"), name, start)


def _properties(r: Reader, allowed: dict[int, tuple[str, str]], where: str):
    """MQTT 5.0 section 2.2.2: Property Length, then exactly that many bytes of properties."""
    start = r.pos
    length = r.varint("property length")
    if r.pos + length > r.end:
        raise Bad(MALFORMED_PACKET, "property length exceeds remaining length", start)
    block = Reader(r.data, r.pos, r.pos + length)
    past = "property exceeds property length"
    values: dict[str, Any] = {}
    user: list[tuple[str, str]] = []
    while block.pos < block.end:
        at = block.pos
        pid = block.byte(past)
        if pid not in allowed:
            raise Bad(MALFORMED_PACKET, f"property not allowed in {where}", at)
        name, kind = allowed[pid]
        if name in values:
            raise Bad(PROTOCOL_ERROR, "duplicate property", at)
        if kind == "byte":
            value: Any = block.byte(past)
        elif kind == "u16":
            value = block.u16(past)
        elif kind == "u32":
            value = block.u32(past)
        elif kind == "bin":
            value = block.binary(past)
        elif kind == "str":
            value = utf8(block.binary(past), UTF8_FIELD_NAMES[name], at)
        else:  # pair
            k = block.binary(past)
            v = block.binary(past)
            user.append((utf8(k, "user property", at), utf8(v, "user property", at)))
            continue
        if name in ZERO_OR_ONE and value > 1:
            raise Bad(PROTOCOL_ERROR, f"{name.replace('_', ' ')} is not 0 or 1", at)
        if name in NOT_ZERO and value == 0:
            raise Bad(PROTOCOL_ERROR, f"{name.replace('_', ' ')} is 0", at)
        if name == "response_topic" and not valid_topic_name(value):
            raise Bad(TOPIC_NAME_INVALID, "response topic invalid", at)
        values[name] = value
    r.pos = block.end
    if "authentication_data" in values and "authentication_method" not in values:
        raise Bad(PROTOCOL_ERROR, "authentication data without authentication method", start)
    return values, user


# ---------------------------------------------------------------------------- encoder

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _raw(s: str | bytes) -> bytes:
    return s.encode("utf-8") if isinstance(s, str) else bytes(s)


def lp(s: str | bytes) -> bytes:
    """Length-prefixed UTF-8 string / binary data (str is encoded, bytes taken as is)."""
    raw = _raw(s)
    return len(raw).to_bytes(2, "big") + raw


def encode_properties(props) -> bytes:
    """props: iterable of (name or id, value); user_property values are (key, value) pairs.
    Encoded in the given order (duplicates allowed, to build invalid packets)."""
    body = bytearray()
    for key, value in props:
        pid = PROPERTY_IDS[key] if isinstance(key, str) else key
        kind = PROPERTY_TYPES.get(pid, "byte")
        body += varint(pid)
        if kind == "byte":
            body.append(value)
        elif kind == "u16":
            body += value.to_bytes(2, "big")
        elif kind == "u32":
            body += value.to_bytes(4, "big")
        elif kind in ("str", "bin"):
            body += lp(value)
        else:
            body += lp(value[0]) + lp(value[1])
    return varint(len(body)) + bytes(body)


@dataclass
class Will:
    topic: str | bytes
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    properties: list = field(default_factory=list)


def encode_connect(
    version: int = 4,
    client_id: str | bytes = "",
    *,
    clean_start: bool = True,
    keepalive: int = 60,
    will: Will | None = None,
    username: str | bytes | None = None,
    password: bytes | None = None,
    properties: list | tuple = (),
    protocol_name: bytes | None = None,
    level: int | None = None,
    flags: int | None = None,
    raw_properties: bytes | None = None,
    extra: bytes = b"",
    remaining_length: int | None = None,
    first_byte: int = 0x10,
) -> bytes:
    """A CONNECT. version: 3, 4 or 5. The keyword-only knobs after `properties` break it:
    protocol_name/level/flags replace those fields, raw_properties replaces the encoded
    CONNECT properties, extra is appended inside the packet, remaining_length overrides the
    declared length, first_byte replaces 0x10."""
    name = protocol_name if protocol_name is not None else (b"MQIsdp" if version == 3 else b"MQTT")
    computed = 0
    if clean_start:
        computed |= 0x02
    if will is not None:
        computed |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        computed |= 0x40
    if username is not None:
        computed |= 0x80
    body = bytearray(lp(name))
    body.append(version if level is None else level)
    body.append(computed if flags is None else flags)
    body += keepalive.to_bytes(2, "big")
    if version == 5:
        body += raw_properties if raw_properties is not None else encode_properties(properties)
    body += lp(client_id)
    if will is not None:
        if version == 5:
            body += encode_properties(will.properties)
        body += lp(will.topic) + lp(will.payload)
    if username is not None:
        body += lp(username)
    if password is not None:
        body += lp(password)
    body += extra
    rl = len(body) if remaining_length is None else remaining_length
    return bytes([first_byte]) + varint(rl) + bytes(body)


# ---------------------------------------------------------------------------- outcomes to compare
# One shape for both parsers' results, so tests and fuzzers compare them with ==.


def reference_outcome(data: bytes, max_size: int = 65536) -> tuple:
    """This reference parser's result as ("need_more",) / ("invalid", ...) / ("valid", fields)."""
    r = parse(data, max_size)
    if r.status == "invalid":
        return ("invalid", r.rc5, r.reason, r.offset, r.send_connack, r.connack_version,
                r.reason_code, r.level)
    if r.status == "need_more":
        return ("need_more",)
    return ("valid", r.fields)


def compiled_outcome(data: bytes, max_size: int = 65536, parse_connect=None) -> tuple:
    """The compiled parser's result in the shape of reference_outcome() (parse_connect: an
    alternative entry point to fastproxy.mqtt.parse_connect, e.g. the fuzzers' exact-size one)."""
    import dataclasses

    from fastproxy import mqtt
    from fastproxy.errors import MQTTProtocolError

    try:
        info = (parse_connect or mqtt.parse_connect)(data, max_size)
    except MQTTProtocolError as e:
        return ("invalid", e.v5_reason_code, e.reason, e.offset, e.send_connack,
                e.connack_version if e.send_connack else None,
                e.reason_code if e.send_connack else None, e.version)
    if info is None:
        return ("need_more",)
    return ("valid", dataclasses.asdict(info))
