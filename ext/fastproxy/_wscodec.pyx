# cython: language_level=3
"""The WebSocket frame codec on a client side, after the upgrade (RFC 6455): ws_read turns
the client's frames into MQTT bytes for the CONNECT stage and the relay (a read of the
socket decodes everything it brought, in C, with no Python); on the way out the relay reads
the broker's bytes behind a reserved header and frames each read as one binary message
(coalesced: one frame per read, not per MQTT packet). Pings are answered with pongs at the
next frame boundary; a close is answered and ends the client's input; a protocol violation
(unmasked or text frame, bad opcode, frame above ws_max_frame) is answered with a close frame
and its status code, and ends the session (R_WS_PROTOCOL)."""
from libc.stdlib cimport free
from libc.string cimport memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Dir, WsState
from fastproxy._bufpool cimport pool_get, pool_put
from fastproxy._transport cimport side_read, side_write
from ws cimport *


cdef ssize_t ws_read(Core* e, Conn* c, char* out, size_t n) noexcept nogil:
    """Up to n bytes of the client's binary messages. Returns > 0, or IO_AGAIN, IO_EOF (the
    client closed: TCP, or a close frame), IO_ERR (the socket failed, or a protocol error:
    c.ws.failed, the close frame is sent)."""
    cdef WsState* w = c.ws
    cdef size_t produced = 0, consumed, p
    cdef ssize_t r
    cdef int st
    while produced < n:
        if w.close_recv:
            break
        if w.raw_off == w.raw_len:
            if w.raw == NULL:
                w.raw = pool_get(&e.pool)
                if w.raw == NULL:
                    return produced if produced else IO_ERR
            w.raw_off = w.raw_len = 0
            r = side_read(&c.cl, w.raw, RELAY_BUF)
            if r <= 0:
                pool_put(&e.pool, w.raw)
                w.raw = NULL
                if produced:
                    return <ssize_t>produced
                return r
            w.raw_len = <uint32_t>r
        st = ws_decode(&w.dec, <const uint8_t*>w.raw + w.raw_off, w.raw_len - w.raw_off, &consumed,
                       <uint8_t*>out + produced, n - produced, &p)
        w.raw_off += <uint32_t>consumed
        produced += p
        if w.raw_off == w.raw_len and w.raw != NULL:
            pool_put(&e.pool, w.raw)
            w.raw = NULL
            w.raw_off = w.raw_len = 0
        if st == WS_D_ERROR:
            w.failed = 1
            c.detail_static = w.dec.error
            ws_send_close(c, w.dec.close_code, w.dec.error)
            return IO_ERR
        if st == WS_D_CONTROL:
            _control(c, w)
    if produced:
        return <ssize_t>produced
    return IO_EOF if w.close_recv else IO_AGAIN


cdef void _control(Conn* c, WsState* w) noexcept nogil:
    cdef uint16_t code
    if w.dec.opcode == WS_OP_PING:
        # Only the latest ping needs its pong ([5.5.3]); it waits for a frame boundary.
        w.ctrl_out_len = <uint8_t>ws_control_frame(w.ctrl_out, sizeof(w.ctrl_out), WS_OP_PONG,
                                                   w.dec.ctrl, w.dec.ctrl_len)
        if c.u2c.start == c.u2c.end:
            _write_pending(c, w)
    elif w.dec.opcode == WS_OP_CLOSE:
        # Echo the status code ([5.5.1]); no data is read after a close frame.
        w.close_recv = 1
        code = (<uint16_t>w.dec.ctrl[0] << 8 | w.dec.ctrl[1]) if w.dec.ctrl_len >= 2 else WS_CLOSE_NORMAL
        if c.u2c.start == c.u2c.end:
            ws_send_close(c, code, NULL)


cdef void _write_pending(Conn* c, WsState* w) noexcept nogil:
    # At a frame boundary with nothing queued: straight to the socket; what does not go now
    # stays for ws_place_control.
    cdef ssize_t r
    if w.ctrl_out_len == 0:
        return
    r = side_write(&c.cl, <const char*>w.ctrl_out, w.ctrl_out_len)
    if r == w.ctrl_out_len:
        w.ctrl_out_len = 0


cdef void ws_send_close(Conn* c, uint16_t code, const char* reason) noexcept nogil:
    """Best effort: a close frame straight to the socket (at a frame boundary), once."""
    cdef uint8_t f[WS_CONTROL_MAX + 2]
    cdef size_t n
    if c.ws == NULL or c.ws.close_sent:
        return
    c.ws.close_sent = 1
    n = ws_close_frame(f, sizeof(f), code, reason)
    if n:
        side_write(&c.cl, <const char*>f, n)


cdef bint ws_place_control(Conn* c, Dir* d) noexcept nogil:
    """u2c is empty: put a waiting control frame into it (d.buf must exist). True if placed."""
    cdef WsState* w = c.ws
    if w.ctrl_out_len == 0 or d.buf == NULL:
        return False
    memcpy(d.buf, w.ctrl_out, w.ctrl_out_len)
    d.start = 0
    d.end = w.ctrl_out_len
    w.ctrl_out_len = 0
    return True


cdef void ws_frame_payload(Dir* d) noexcept nogil:
    """d holds a payload at [WS_SERVER_HEADER_MAX, end): put a binary frame header right
    before it and move start there."""
    cdef uint8_t h[WS_SERVER_HEADER_MAX]
    cdef size_t k = ws_frame_header(h, WS_OP_BINARY, d.end - WS_SERVER_HEADER_MAX)
    memcpy(d.buf + WS_SERVER_HEADER_MAX - k, h, k)
    d.start = <uint32_t>(WS_SERVER_HEADER_MAX - k)


cdef void ws_free(Core* e, Conn* c) noexcept nogil:
    if c.ws != NULL:
        if c.ws.raw != NULL:
            pool_put(&e.pool, c.ws.raw)
        free(c.ws)
        c.ws = NULL
