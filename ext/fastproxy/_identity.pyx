# cython: language_level=3
"""The CONNECT stage: read the first packet, check it is a valid CONNECT, apply the built-in
identity rules (ClientId / username == certificate CN) in C, and hand the connection to the
policy gate (a Python thread answers later) or straight to the upstream stage."""
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memcmp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Dir, Listener
from fastproxy._bufpool cimport dir_alloc, dir_release, dir_grow
from fastproxy._transport cimport side_peek, verified_cn
from mqtt cimport *
from fastproxy._conn cimport conn_end, conn_refuse, conn_refuse_rc5
from fastproxy._upstream cimport upstream_connect
from fastproxy._admission cimport admission_clientid
from fastproxy._wscodec cimport client_read, ws_passthrough_switch

cdef void connect_begin(Core* e, Conn* c) noexcept nogil:
    """The client side is usable (TLS done, or plain): read its CONNECT, or connect upstream."""
    cdef Listener* l = &e.listeners[c.listener]
    if not l.mqtt:
        _to_upstream(e, c)
        return
    c.state = ST_MQTT_CONNECT
    c.deadline_ms = e.now + l.mqtt_connect_timeout_ms if l.mqtt_connect_timeout_ms > 0 else 0
    connect_read(e, c)


cdef void connect_read(Core* e, Conn* c) noexcept nogil:
    """Read into c2u until it holds a whole CONNECT, then check it. Nothing is sent
    upstream, and no upstream connection exists, before the CONNECT passed."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef Dir* d = &c.c2u
    cdef ssize_t n
    cdef int r
    cdef mqtt_connect mc
    cdef mqtt_connect_error me
    if d.buf == NULL and c.cl.ssl == NULL and c.ws == NULL and side_peek(&c.cl) == IO_AGAIN:
        return      # a plain client that has sent nothing yet costs no buffer (silent-socket floods)
    while True:
        if d.buf == NULL and not dir_alloc(e, d):
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return
        if d.end == d.cap:
            # Bigger than a relay buffer: the parser has already checked the declared
            # length against max_connect_size, so growing to that bound is enough.
            if d.cap >= l.max_connect_size or not dir_grow(e, d, l.max_connect_size):
                conn_end(e, c, R_INTERNAL, ENOMEM)
                return
        n = client_read(e, c, d.buf + d.end, d.cap - d.end)
        if n == IO_ERR:
            if c.ws != NULL and c.ws.failed:
                conn_end(e, c, R_WS_PROTOCOL, 0)
                return
            if c.cl.ssl != NULL:
                c.ssl_fatal = 1
                ERR_clear_error()
            conn_end(e, c, R_NO_CONNECT, fp_errno())
            return
        if n > 0:
            d.end += <uint32_t>n
            c.bytes_in += <uint64_t>n
            e.ctr.bytes_from_clients += <uint64_t>n
            c.active_ms = e.now
        if d.end > 0 and _connect_parse_due(e, c, d):
            r = mqtt_parse_connect(<const uint8_t*>d.buf, d.end, l.max_connect_size, &mc, &me)
            if r == MQTT_VALID:
                _connect_valid(e, c, &mc)
                return
            if r == MQTT_INVALID:
                c.detail_static = me.reason
                conn_refuse(e, c, me.connack_level if me.send_connack else 0, me.reason_code, R_BAD_CONNECT)
                return
        if n == IO_EOF:
            conn_end(e, c, R_NO_CONNECT, 0)
            return
        if n == IO_AGAIN:
            return


cdef bint _connect_parse_due(Core* e, Conn* c, Dir* d) noexcept nogil:
    # Re-parsing from the start on every byte of a large CONNECT sent one byte per segment
    # would be quadratic: parse the first bytes (early refusal of garbage and oversized
    # declarations), then only once the declared length has arrived.
    cdef uint32_t value = 0, i
    cdef uint8_t b
    if d.end <= 64:
        return True
    if c.connect_total == 0:
        for i in range(1, 5):
            if i >= d.end:
                return True
            b = <uint8_t>d.buf[i]
            value |= (b & 0x7F) << (7 * (i - 1))
            if not (b & 0x80):
                c.connect_total = 1 + i + value
                break
        else:
            return True     # a 5-byte length: the parser says why it is invalid
    if c.connect_total > e.listeners[c.listener].max_connect_size:
        return True         # declared too large: refused now, not after buffering it
    return d.end >= c.connect_total


cdef void _connect_valid(Core* e, Conn* c, mqtt_connect* mc) noexcept nogil:
    cdef Listener* l = &e.listeners[c.listener]
    c.mqtt_level = mc.level
    c.keepalive = mc.keepalive
    if mc.client_id.len > 0:
        c.client_id = <char*>malloc(mc.client_id.len)
        if c.client_id != NULL:
            memcpy(c.client_id, mc.client_id.ptr, mc.client_id.len)
            c.client_id_len = <uint16_t>mc.client_id.len
    if mc.username.ptr != NULL and mc.username.len > 0:
        c.username = <char*>malloc(mc.username.len)
        if c.username != NULL:
            memcpy(c.username, mc.username.ptr, mc.username.len)
            c.username_len = <uint16_t>mc.username.len
    if l.idle_keepalive:
        # MQTT: the server may close after 1.5 keepalive periods without a packet; a
        # keepalive of 0 turns the mechanism off, and so the idle timeout.
        c.idle_ms = <int64_t>mc.keepalive * 1500
    c.connect_total = <uint32_t>mc.packet_len
    cdef int rc5
    cdef Dir* d = &c.c2u
    if d.end - d.start > mc.packet_len and mqtt_find_connect(<const uint8_t*>d.buf + d.start + mc.packet_len,
                                                            d.end - d.start - mc.packet_len) >= 0:
        # [MQTT-3.1.0-2]: a second CONNECT is a protocol violation; the broker must not get
        # to decide what it means (it is not checked by any rule here).
        c.detail_static = b"a second CONNECT follows the first"
        conn_refuse_rc5(e, c, 0x82, R_BAD_CONNECT)
        return
    if l.identity:
        rc5 = _identity_check(c, mc, l.identity)
        if rc5:
            c.refuse_code = <uint8_t>rc5
            conn_refuse_rc5(e, c, rc5, R_DENIED)
            return
    # After the identity rules: only the certificate's holder spends its ClientId's tokens.
    if not admission_clientid(e, c, mc.client_id.ptr, mc.client_id.len):
        c.detail_static = b"reconnecting faster than reconnect_rate_per_clientid"
        conn_refuse_rc5(e, c, 0x89, R_RECONNECT_TOO_FAST)
        return
    if l.policy:
        # The gate runs on a Python thread; c waits (not reading the client) for its answer,
        # which the loop applies in connect_policy_answer(), or for the deadline.
        c.state = ST_POLICY
        c.deadline_ms = e.now + l.policy_timeout_ms if l.policy_timeout_ms > 0 else 0
        if e.ask_policy(e, c) < 0:
            c.detail_static = b"policy gate unavailable"
            conn_refuse_rc5(e, c, 0x88, R_DENIED)
        return
    _to_upstream(e, c)


cdef void connect_policy_answer(Core* e, Conn* c, int action, int rc5, int upstream,
                                const char* new_id, Py_ssize_t new_id_len) noexcept nogil:
    """Apply the gate's answer to c (in ST_POLICY): refuse with rc5 (action != 0), or go on
    to the upstream stage, to `upstream` when >= 0 and with the ClientId replaced by new_id
    when it is not NULL. The CONNECT is still at the front of c2u, parsed again here."""
    cdef Dir* d = &c.c2u
    cdef mqtt_connect mc
    cdef mqtt_connect_error me
    cdef size_t rest, cap
    cdef long n
    cdef char* b
    if action != 0:
        conn_refuse_rc5(e, c, rc5, R_DENIED)
        return
    if upstream >= 0:
        if upstream >= e.n_upstreams:
            c.detail_static = b"policy chose an unknown upstream"
            conn_refuse_rc5(e, c, 0x88, R_DENIED)
            return
        c.upstream = upstream
        c.routed = 1
    if new_id != NULL:
        if c.ws != NULL and c.ws.passthrough:
            c.detail_static = b"cannot rewrite the ClientId inside passthrough WebSocket frames"
            conn_refuse_rc5(e, c, 0x88, R_DENIED)
            return
        if new_id_len > 65535 or mqtt_parse_connect(<const uint8_t*>d.buf + d.start, c.connect_total,
                                                    c.connect_total, &mc, &me) != MQTT_VALID:
            c.detail_static = b"cannot rewrite the ClientId"
            conn_refuse_rc5(e, c, 0x88, R_DENIED)
            return
        rest = d.end - d.start - mc.packet_len
        cap = mc.packet_len + <size_t>new_id_len + 8 + rest
        b = <char*>malloc(cap)
        if b == NULL:
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return
        n = mqtt_rewrite_client_id(<const uint8_t*>d.buf + d.start, mc.packet_len, &mc,
                                   <const uint8_t*>new_id, <size_t>new_id_len, <uint8_t*>b, cap - rest)
        if n < 0:
            free(b)
            c.detail_static = b"cannot rewrite the ClientId"
            conn_refuse_rc5(e, c, 0x88, R_DENIED)
            return
        memcpy(b + n, d.buf + d.start + mc.packet_len, rest)
        dir_release(e, d)
        d.buf = b
        d.cap = <uint32_t>cap
        d.own_buf = 1               # freed, not pooled
        d.start = 0
        d.end = <uint32_t>(n + rest)
        if c.client_id != NULL:
            free(c.client_id)
            c.client_id = NULL
            c.client_id_len = 0
        if new_id_len:
            c.client_id = <char*>malloc(<size_t>new_id_len)
            if c.client_id != NULL:
                memcpy(c.client_id, new_id, <size_t>new_id_len)
                c.client_id_len = <uint16_t>new_id_len
    _to_upstream(e, c)


cdef void _to_upstream(Core* e, Conn* c) noexcept nogil:
    """Approved: on to the upstream stage (a passthrough WebSocket client's own request and
    frames first, in place of the decoded CONNECT)."""
    if c.ws != NULL and c.ws.passthrough and not c.ws.switched and ws_passthrough_switch(e, c) < 0:
        conn_end(e, c, R_INTERNAL, ENOMEM)
        return
    upstream_connect(e, c)


cdef void connect_policy_timeout(Core* e, Conn* c) noexcept nogil:
    """The gate did not answer within policy_timeout: Server unavailable (3.x: 0x03)."""
    e.forget(e, c)
    c.policy_token = 0
    c.detail_static = b"the policy hook did not answer within policy_timeout"
    conn_refuse_rc5(e, c, 0x88, R_POLICY_TIMEOUT)


cdef int _identity_check(Conn* c, mqtt_connect* mc, unsigned checks) noexcept nogil:
    """The built-in identity rules, in C so they cost no Python call: ClientId and/or
    username must equal the verified client certificate's CN, byte for byte. Returns 0, or
    the MQTT 5 reason code of the refusal (c.detail_static says why)."""
    cdef const unsigned char* cn = NULL
    cdef int n, rc = 0
    n = verified_cn(c, &cn)
    if n == FP_CN_MANY:
        c.detail_static = b"client certificate has more than one CN"
        return 0x87
    if n < 0:
        c.detail_static = b"no verified client certificate"
        return 0x87
    if (checks & ID_CLIENTID_CN) and (mc.client_id.len != <uint32_t>n
                                       or memcmp(mc.client_id.ptr, cn, n) != 0):
        c.detail_static = b"ClientId does not match certificate CN"
        rc = 0x85
    elif (checks & ID_USERNAME_CN) and (mc.username.ptr == NULL or mc.username.len != <uint32_t>n
                                         or memcmp(mc.username.ptr, cn, n) != 0):
        c.detail_static = b"username does not match certificate CN"
        rc = 0x87
    return rc


