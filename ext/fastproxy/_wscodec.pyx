# cython: language_level=3
"""The WebSocket frame codec on a client side, after the upgrade (RFC 6455): ws_read turns
the client's frames into MQTT bytes for the CONNECT stage and the relay (a read of the
socket decodes everything it brought, in C, with no Python); on the way out the relay reads
the broker's bytes behind a reserved header and frames each read as one binary message
(coalesced: one frame per read, not per MQTT packet). Pings are answered with pongs at the
next frame boundary; a close is answered and ends the client's input; a protocol violation
(unmasked or text frame, bad opcode, frame above ws_max_frame) is answered with a close frame
and its status code, and ends the session (R_WS_PROTOCOL)."""
from libc.stdlib cimport free, realloc, malloc
from libc.string cimport memcpy, memcmp
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Dir, WsState
from fastproxy._bufpool cimport pool_get, pool_put, dir_release
from fastproxy._transport cimport side_read, side_write
from ws cimport *

cdef enum:
    HOLD_MAX = 1 << 20      # raw bytes of frames kept before a passthrough CONNECT is approved


cdef ssize_t ws_read(Core* e, Conn* c, char* out, size_t n) noexcept nogil:
    """Up to n bytes of the client's binary messages. Returns > 0, or IO_AGAIN, IO_EOF (the
    client closed: TCP, or a close frame), IO_ERR (the socket failed, or a protocol error:
    c.ws.failed, the close frame is sent)."""
    cdef WsState* w = c.ws
    cdef ssize_t r
    cdef size_t used
    if w.raw_off < w.raw_len:
        r = _drain_held(e, c, w, out, n)
        if r != 0:
            return r
    while not w.close_recv:
        # Straight into the destination, decoded in place: a frame's payload is never longer
        # than the bytes that carried it, so the output never overtakes the input.
        r = side_read(&c.cl, out, n)
        if r <= 0:
            return r
        if w.passthrough and _hold(w, out, <size_t>r) < 0:
            return _too_much(c, w)
        r = _decode(c, w, <uint8_t*>out, <size_t>r, <uint8_t*>out, n, &used)
        if r != 0:
            return r
        # only frame headers or control frames came: read on (edge-triggered readiness)
    return IO_EOF


cdef ssize_t _decode(Conn* c, WsState* w, const uint8_t* inp, size_t len, uint8_t* out,
                     size_t cap, size_t* used) noexcept nogil:
    """Decode inp[0..len) into out (which may be inp itself); *used: input bytes taken.
    Returns the message bytes, or IO_ERR after a protocol error (answered with its close
    frame)."""
    cdef size_t at = 0, produced = 0, consumed, p
    cdef int st
    while at < len and not w.close_recv:
        st = ws_decode(&w.dec, inp + at, len - at, &consumed, out + produced, cap - produced, &p)
        at += consumed
        produced += p
        if st == WS_D_ERROR:
            w.failed = 1
            c.detail_static = w.dec.error
            ws_send_close(c, w.dec.close_code, w.dec.error)
            return IO_ERR
        if st == WS_D_CONTROL:
            _control(c, w)
        elif consumed == 0:
            break       # out is full (only when out is not inp)
    used[0] = at
    return <ssize_t>produced


cdef ssize_t _drain_held(Core* e, Conn* c, WsState* w, char* out, size_t n) noexcept nogil:
    """Decode the bytes that came with the upgrade request (w.raw) into out."""
    cdef size_t used = 0
    cdef ssize_t r
    r = _decode(c, w, <const uint8_t*>w.raw + w.raw_off, w.raw_len - w.raw_off, <uint8_t*>out, n, &used)
    if w.passthrough and used and _hold(w, w.raw + w.raw_off, used) < 0:
        return _too_much(c, w)
    w.raw_off += <uint32_t>used
    if w.raw_off >= w.raw_len:
        pool_put(&e.pool, w.raw)
        w.raw = NULL
        w.raw_off = w.raw_len = 0
    return r


cdef ssize_t _too_much(Conn* c, WsState* w) noexcept nogil:
    w.failed = 1
    c.detail_static = b"the frames before the CONNECT exceed what passthrough holds"
    ws_send_close(c, 1009, c.detail_static)
    return IO_ERR


cdef int _hold(WsState* w, const char* p, size_t n) noexcept nogil:
    """Passthrough: keep the raw frames read before the CONNECT's approval, for the broker.
    Bounded: a CONNECT is at most max_connect_size once decoded; what carries it may add a
    header per frame, not more than HOLD_MAX in all."""
    cdef char* b
    cdef uint32_t cap
    if w.held_len + n > HOLD_MAX:
        return -1
    if w.held_len + n > w.held_cap:
        cap = w.held_cap * 2 if w.held_cap else 4096
        while cap < w.held_len + n:
            cap *= 2
        b = <char*>realloc(w.held, cap)
        if b == NULL:
            return -1
        w.held = b
        w.held_cap = cap
    memcpy(w.held + w.held_len, p, n)
    w.held_len += <uint32_t>n
    return 0


cdef int ws_passthrough_switch(Core* e, Conn* c) noexcept nogil:
    """The CONNECT is approved: the broker gets the client's own upgrade request now, and its
    frames (held, as they came) once it has answered 101, which is dropped: Mosquitto 2.1
    drops a client whose first frame arrives with its request, and a browser never sends one
    before the 101. c2u (the decoded CONNECT) is replaced; the client is not read until then.
    Returns 0, or -1 without memory."""
    cdef WsState* w = c.ws
    cdef Dir* d = &c.c2u
    cdef uint32_t rest = w.raw_len - w.raw_off
    if rest and _hold(w, w.raw + w.raw_off, rest) < 0:
        return -1
    dir_release(e, d)
    d.buf = w.req
    d.cap = w.req_len
    d.own_buf = 1               # freed after use, not pooled
    d.start = 0
    d.end = w.req_len
    w.req = NULL
    w.req_len = 0
    if w.raw != NULL:
        pool_put(&e.pool, w.raw)
        w.raw = NULL
    w.raw_off = w.raw_len = 0
    w.switched = 1
    w.await_101 = 1
    return 0


cdef int ws_release_held(Core* e, Conn* c) noexcept nogil:
    """Passthrough, after the broker's 101: the held frames become what goes to the broker
    next (c2u is empty by then: the client was not read meanwhile). Returns 0 or -1."""
    cdef WsState* w = c.ws
    cdef Dir* d = &c.c2u
    if w.held_len == 0:
        return 0
    if d.end != d.start:
        return -1
    dir_release(e, d)
    d.buf = w.held
    d.cap = w.held_cap
    d.own_buf = 1
    d.start = 0
    d.end = w.held_len
    w.held = NULL
    w.held_len = w.held_cap = 0
    return 0


cdef int ws_drop_101(Conn* c, Dir* d) noexcept nogil:
    """Passthrough: the broker's answer to the upgrade is at the front of u2c. Returns 1 when
    it was a 101 and is dropped, 0 when it is not complete yet, -1 when the broker refused
    (c.detail_static says so)."""
    cdef uint32_t i
    cdef const char* p = d.buf + d.start
    cdef uint32_t n = d.end - d.start
    for i in range(3, n):
        if p[i] == 10 and p[i - 1] == 13 and p[i - 2] == 10 and p[i - 3] == 13:
            if n >= 12 and memcmp(p, b"HTTP/1.1 101", 12) == 0:
                d.start += i + 1
                if d.start == d.end:
                    d.start = d.end = 0
                c.ws.await_101 = 0
                return 1
            c.detail_static = b"the broker refused the WebSocket upgrade"
            return -1
    if n >= WS_REQUEST_MAX:
        c.detail_static = b"the broker's answer to the WebSocket upgrade is too long"
        return -1
    return 0


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
        free(c.ws.req)
        free(c.ws.held)
        free(c.ws)
        c.ws = NULL
