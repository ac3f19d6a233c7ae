# cython: language_level=3
"""Ending connections: close both sides, account, report to Python, linger after a refusal."""
from libc.stdlib cimport free
from libc.stdint cimport uint8_t, uint64_t
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn
from fastproxy._bufpool cimport dir_release, pipe_put
from fastproxy._transport cimport side_release_input, side_write, discard_input
from mqtt cimport mqtt_build_connack, mqtt_connack_code
from fastproxy._admission cimport admission_release
from fastproxy._wscodec cimport ws_free



cdef void conn_end(Core* e, Conn* c, int reason, int err) noexcept nogil:
    """Close both sides, report the record to Python, and queue c for freeing."""
    if c.closed:
        return
    c.closed = 1
    if c.policy_token:
        e.forget(e, c)          # a late policy answer for c is dropped, not applied to freed memory
    # Counted out before the record leaves: whoever has the record sees the counters after it.
    conn_release_server(e, c)
    admission_release(c)
    e.n_conns -= 1
    e.ctr.active -= 1
    e.ctr.closed += 1
    if not c.reported:
        conn_account(e, c, reason, err)
    ws_free(e, c)
    if c.cl.ssl != NULL:
        if c.handshake_done and not c.ssl_fatal and not c.cl.shut_wr:
            ERR_clear_error()
            SSL_shutdown(c.cl.ssl)     # best-effort close_notify
        ERR_clear_error()
        SSL_free(c.cl.ssl)          # frees our BIO too
        c.cl.ssl = NULL
    fp_peer_clear(&c.cert)
    side_release_input(&c.cl)
    if c.cl.fd >= 0:
        discard_input(c.cl.fd)
        close(c.cl.fd)
        c.cl.fd = -1
    if c.up.fd >= 0:
        close(c.up.fd)
        c.up.fd = -1
    dir_release(e, &c.c2u)
    dir_release(e, &c.u2c)
    if c.client_id != NULL:
        free(c.client_id)
        c.client_id = NULL
    if c.username != NULL:
        free(c.username)
        c.username = NULL
    if c.c2u.pipe_r >= 0:
        pipe_put(e, &c.c2u)
    if c.u2c.pipe_r >= 0:
        pipe_put(e, &c.u2c)
    # unlink from the live list, onto the dead list
    if c.prev != NULL:
        c.prev.next = c.next
    else:
        e.conns = c.next
    if c.next != NULL:
        c.next.prev = c.prev
    c.state = ST_CLOSED
    c.next = e.dead
    c.prev = NULL
    e.dead = c


cdef void conn_account(Core* e, Conn* c, int reason, int err) noexcept nogil:
    c.reported = 1
    c.reason = reason
    c.err = err
    e.ctr.reasons[reason] += 1
    if e.report != NULL:
        e.report(e, c)


cdef void conn_refuse(Core* e, Conn* c, int level, int code, int reason) noexcept nogil:
    """Answer with CONNACK(code) in the client's protocol level (none when level is 0),
    then close."""
    cdef uint8_t frame[10]
    cdef uint8_t* pkt = frame + 2
    cdef int n
    if level and code >= 0:
        n = mqtt_build_connack(<uint8_t>level, <uint8_t>code, pkt, 8)
        if n > 0 and c.ws != NULL:
            # a WebSocket client: the CONNACK is one binary frame (FIN, opcode 2)
            frame[0] = 0x82
            frame[1] = <uint8_t>n
            pkt = frame
            n += 2
        if n > 0 and side_write(&c.cl, <const char*>pkt, <size_t>n) > 0:
            c.bytes_out += <uint64_t>n
            e.ctr.bytes_to_clients += <uint64_t>n
        elif c.cl.ssl != NULL:
            ERR_clear_error()
    conn_linger_begin(e, c, reason)


cdef void conn_refuse_rc5(Core* e, Conn* c, int rc5, int reason) noexcept nogil:
    """Refuse with the MQTT 5 reason code rc5, as the client's protocol level can say it
    (3.x clients get the return code of the same meaning; none where 3.x has no such code)."""
    cdef int code = mqtt_connack_code(c.mqtt_level, <uint8_t>rc5) if c.mqtt_level else -1
    conn_refuse(e, c, c.mqtt_level if code >= 0 else 0, code, reason)


cdef void conn_linger_begin(Core* e, Conn* c, int reason) noexcept nogil:
    """Refused client: log it now, send FIN after what we wrote (the CONNACK), and keep
    reading and discarding until its EOF. Closing with unread input would send RST, and the
    client's kernel may then drop the CONNACK before the application reads it."""
    conn_account(e, c, reason, c.err)
    if c.cl.ssl != NULL and c.handshake_done and not c.ssl_fatal:
        SSL_shutdown(c.cl.ssl)
        ERR_clear_error()
    shutdown(c.cl.fd, SHUT_WR)
    c.cl.shut_wr = 1
    dir_release(e, &c.c2u)
    side_release_input(&c.cl)
    c.state = ST_LINGER
    c.deadline_ms = e.now + LINGER_MS
    conn_linger(e, c)


cdef void conn_linger(Core* e, Conn* c) noexcept nogil:
    cdef char sink[16384]
    cdef ssize_t n
    cdef int i
    for i in range(64):
        n = recv(c.cl.fd, sink, sizeof(sink), MSG_TRUNC)
        if n > 0:
            continue
        if n < 0 and fp_errno() == EAGAIN:
            c.cl.readable = 0
            return
        if n < 0 and fp_errno() == EINTR:
            continue
        break
    else:
        return      # still sending: the sweep comes back to it
    conn_end(e, c, c.reason, 0)


cdef void conn_free_dead(Core* e) noexcept nogil:
    cdef Conn* c = e.dead
    cdef Conn* nxt
    while c != NULL:
        nxt = c.next
        free(c)
        c = nxt
    e.dead = NULL


cdef void conn_close_all(Core* e, int reason, bint report) noexcept nogil:
    cdef Conn* c
    if not report:
        e.report = NULL
    while e.conns != NULL:
        c = e.conns
        conn_end(e, c, reason, 0)


cdef void conn_release_server(Core* e, Conn* c) noexcept nogil:
    if c.counted:
        e.upstreams[c.upstream].sessions -= 1
        c.counted = 0


