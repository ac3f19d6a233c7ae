# cython: language_level=3
"""fastproxy._mqtt - Python face of the C MQTT CONNECT parser (ext/src/mqtt_connect.c).

Use it through fastproxy.mqtt, which re-exports these functions next to the ConnectInfo
dataclass and the reason-code constants. The engine calls the C functions directly.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
# No PyBytes_AS_STRING/PyBytes_GET_SIZE (macros outside the limited API, FASTPROXY_ABI3): a `bytes`
# variable coerced to a char pointer and len() of it are what Cython compiles to those macros with
# the full API and to PyBytes_AsString/PyBytes_Size with the limited one.
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from fastproxy.errors import (
    ConnectProtocolError,
    MalformedConnect,
    MQTTProtocolError,
    PacketTooLarge,
    TopicNameInvalid,
    ClientIdNotValid,
    UnsupportedProtocolVersion,
)


from mqtt cimport *


MAX_PACKET_SIZE = MQTT_MAX_PACKET_SIZE

cdef object _ConnectInfo = None  # fastproxy.mqtt.ConnectInfo, imported on first use (no cycle)

cdef dict _ERROR_CLASSES = {
    0x81: MalformedConnect,
    0x82: ConnectProtocolError,
    0x84: UnsupportedProtocolVersion,
    0x85: ClientIdNotValid,
    0x90: TopicNameInvalid,
    0x95: PacketTooLarge,
}


cdef inline object _text(mqtt_bytes b):
    """A validated UTF-8 span as str, None when absent."""
    if b.ptr == NULL:
        return None
    return PyUnicode_DecodeUTF8(<const char *>b.ptr, b.len, NULL)


cdef inline object _blob(mqtt_bytes b):
    if b.ptr == NULL:
        return None
    return PyBytes_FromStringAndSize(<const char *>b.ptr, b.len)


cdef inline bint _has(uint64_t mask, int prop_id):
    return (mask >> prop_id) & 1


cdef list _user_properties(mqtt_bytes block):
    cdef mqtt_property_iter it
    cdef mqtt_property p
    cdef list out = []
    mqtt_property_iter_init(&it, block)
    while mqtt_property_next(&it, &p) == 1:
        if p.id == MQTT_PROP_USER_PROPERTY:
            out.append((_text(p.str), _text(p.str2)))
    return out


cdef object _info(const mqtt_connect *c):
    global _ConnectInfo
    cdef dict props
    cdef dict will_props
    cdef list user_props
    cdef list will_user_props
    cdef uint64_t m
    if _ConnectInfo is None:
        from fastproxy.mqtt import ConnectInfo
        _ConnectInfo = ConnectInfo
    props = {}
    will_props = {}
    user_props = []
    will_user_props = []
    if c.level == MQTT_LEVEL_5_0:
        m = c.props_present
        if m:
            if _has(m, MQTT_PROP_SESSION_EXPIRY_INTERVAL):
                props["session_expiry_interval"] = c.session_expiry_interval
            if _has(m, MQTT_PROP_RECEIVE_MAXIMUM):
                props["receive_maximum"] = c.receive_maximum
            if _has(m, MQTT_PROP_MAXIMUM_PACKET_SIZE):
                props["maximum_packet_size"] = c.maximum_packet_size
            if _has(m, MQTT_PROP_TOPIC_ALIAS_MAXIMUM):
                props["topic_alias_maximum"] = c.topic_alias_maximum
            if _has(m, MQTT_PROP_REQUEST_RESPONSE_INFORMATION):
                props["request_response_information"] = c.request_response_information
            if _has(m, MQTT_PROP_REQUEST_PROBLEM_INFORMATION):
                props["request_problem_information"] = c.request_problem_information
            if c.user_property_count:
                user_props = _user_properties(c.properties)
        m = c.will_props_present
        if m:
            if _has(m, MQTT_PROP_WILL_DELAY_INTERVAL):
                will_props["will_delay_interval"] = c.will_delay_interval
            if _has(m, MQTT_PROP_PAYLOAD_FORMAT_INDICATOR):
                will_props["payload_format_indicator"] = c.payload_format_indicator
            if _has(m, MQTT_PROP_MESSAGE_EXPIRY_INTERVAL):
                will_props["message_expiry_interval"] = c.message_expiry_interval
            if _has(m, MQTT_PROP_CONTENT_TYPE):
                will_props["content_type"] = _text(c.content_type)
            if _has(m, MQTT_PROP_RESPONSE_TOPIC):
                will_props["response_topic"] = _text(c.response_topic)
            if _has(m, MQTT_PROP_CORRELATION_DATA):
                will_props["correlation_data"] = _blob(c.correlation_data)
            if c.will_user_property_count:
                will_user_props = _user_properties(c.will_properties)
    # Positional, in the field order of fastproxy.mqtt.ConnectInfo.
    return _ConnectInfo(
        c.level,
        _text(c.protocol_name),
        _text(c.client_id),
        _text(c.username),
        c.password.ptr != NULL,
        c.keepalive,
        (c.flags & MQTT_CONNECT_FLAG_CLEAN_START) != 0,
        _text(c.will_topic),
        c.will_qos,
        (c.flags & MQTT_CONNECT_FLAG_WILL_RETAIN) != 0,
        c.will_payload.len if c.will_payload.ptr != NULL else None,
        props,
        user_props,
        will_props,
        will_user_props,
        _text(c.authentication_method),
        _blob(c.authentication_data),
        c.packet_len,
    )


cdef object _error(const mqtt_connect_error *e):
    cls = _ERROR_CLASSES.get(e.rc5, MQTTProtocolError)
    send = e.send_connack != 0
    return cls(
        (<bytes>e.reason).decode("ascii"),
        reason_code=e.reason_code if send else e.rc5,
        send_connack=send,
        connack_version=e.connack_level if send else None,
        v5_reason_code=e.rc5,
        version=e.level if e.have_level else None,
        offset=e.offset,
    )


cdef size_t _max_size(object max_size) except? 0:
    if max_size is None:
        return MQTT_MAX_PACKET_SIZE
    if max_size < 0:
        raise ValueError(f"max_size must be >= 0, not {max_size}")
    return <size_t>min(max_size, MQTT_MAX_PACKET_SIZE)


def parse_connect(data, max_size=65536):
    """Parse the MQTT CONNECT at the start of data (the bytes received so far).

    Returns None when more bytes are needed (call again with the longer buffer), or a
    fastproxy.mqtt.ConnectInfo whose packet_length says where the next packet starts.
    Raises an MQTTProtocolError subclass (MalformedConnect, ConnectProtocolError,
    UnsupportedProtocolVersion, TopicNameInvalid, PacketTooLarge) when the bytes can never
    become a valid CONNECT. max_size bounds the whole packet (None: only the MQTT limit).
    """
    cdef mqtt_connect c
    cdef mqtt_connect_error e
    cdef size_t limit = _max_size(max_size)
    cdef Py_buffer view
    cdef bytes b
    cdef int r
    if type(data) is bytes:
        b = <bytes>data
        r = mqtt_parse_connect(<const uint8_t *><const char *>b, <size_t>len(b), limit, &c, &e)
        if r == MQTT_VALID:
            return _info(&c)
    else:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            r = mqtt_parse_connect(<const uint8_t *>view.buf, <size_t>view.len, limit, &c, &e)
            if r == MQTT_VALID:
                return _info(&c)  # converted while the buffer is held
        finally:
            PyBuffer_Release(&view)
    if r == MQTT_NEED_MORE:
        return None
    raise _error(&e)


def build_connack(int version, int reason_code):
    """The CONNACK refusing a connection (Session Present 0) with reason_code.

    version 3 or 4: b"\\x20\\x02\\x00" + RC (RC a 3.1.1 return code 0x00..0x05);
    version 5:      b"\\x20\\x03\\x00" + RC + b"\\x00" (RC a reason code CONNACK may carry).
    """
    cdef uint8_t out[8]
    cdef int n
    if not 0 <= version <= 255 or not 0 <= reason_code <= 255:
        raise ValueError(f"no CONNACK for version {version} with reason code {reason_code}")
    n = mqtt_build_connack(<uint8_t>version, <uint8_t>reason_code, out, sizeof(out))
    if n < 0:
        raise ValueError(
            f"no CONNACK for version {version} with reason code 0x{reason_code:02x}")
    return PyBytes_FromStringAndSize(<const char *>out, n)


def connack_code(int version, int reason_code):
    """The CONNACK code meaning MQTT 5.0 reason code reason_code in protocol version `version`
    (5: the code itself; 3/4: the 3.x return code, e.g. 0x87 -> 0x05), or None when that
    version has none (then close without a CONNACK)."""
    cdef int r
    if not 0 <= version <= 255 or not 0 <= reason_code <= 255:
        return None
    r = mqtt_connack_code(<uint8_t>version, <uint8_t>reason_code)
    return None if r < 0 else r


def rewrite_client_id(data, new_id):
    """data with the ClientId of the CONNECT at its start replaced by new_id (str).

    The CONNECT is re-encoded (new Remaining Length, new ClientId); every other field and any
    bytes after the CONNECT are copied unchanged. Raises ValueError when data does not start
    with a complete CONNECT or new_id is not a valid ClientId (U+0000, > 65535 bytes), and the
    MQTTProtocolError subclass when the CONNECT is invalid.
    """
    cdef mqtt_connect c
    cdef mqtt_connect_error e
    cdef bytes src
    cdef bytes nid
    cdef bytes result
    cdef char *out
    cdef long n
    cdef size_t new_rl, total, rest
    cdef int r
    src = data if type(data) is bytes else bytes(data)
    nid = new_id.encode("utf-8") if isinstance(new_id, str) else bytes(new_id)
    r = mqtt_parse_connect(<const uint8_t *><const char *>src, <size_t>len(src),
                           MQTT_MAX_PACKET_SIZE, &c, &e)
    if r == MQTT_NEED_MORE:
        raise ValueError("data does not hold a complete CONNECT")
    if r == MQTT_INVALID:
        raise _error(&e)
    if len(nid) > 65535:
        raise ValueError("new client identifier is longer than 65535 bytes")
    new_rl = c.remaining_len - c.client_id.len + <size_t>len(nid)
    if new_rl > MQTT_MAX_REMAINING_LENGTH:
        raise ValueError("rewritten CONNECT would exceed the MQTT maximum packet size")
    total = 2 + (new_rl >= 128) + (new_rl >= 16384) + (new_rl >= 2097152) + new_rl
    rest = <size_t>len(src) - c.packet_len
    result = PyBytes_FromStringAndSize(NULL, total + rest)
    out = <char *>result  # a new object, not yet shared: filling it in place is allowed
    n = mqtt_rewrite_client_id(<const uint8_t *><const char *>src, <size_t>len(src), &c,
                               <const uint8_t *><const char *>nid, <size_t>len(nid),
                               <uint8_t *>out, total)
    if n == MQTT_BUILD_E_ARG:
        raise ValueError("new client identifier is not well-formed UTF-8 without U+0000")
    if n < 0 or <size_t>n != total:
        raise RuntimeError(f"mqtt_rewrite_client_id failed ({n})")
    if rest:
        memcpy(out + total, <const char *>src + c.packet_len, rest)
    return result


def _parse_repeat(bytes data, Py_ssize_t iterations, max_size=65536):
    """Benchmark helper: run the C parser `iterations` times on data, return its last outcome
    (0 need more, 1 valid, 2 invalid). Measures the parser without building Python objects."""
    cdef mqtt_connect c
    cdef mqtt_connect_error e
    cdef size_t limit = _max_size(max_size)
    cdef const uint8_t *p = <const uint8_t *><const char *>data
    cdef size_t n = <size_t>len(data)
    cdef Py_ssize_t i
    cdef int r = 0
    with nogil:
        for i in range(iterations):
            r = mqtt_parse_connect(p, n, limit, &c, &e)
    return r
