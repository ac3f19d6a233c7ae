# cython: language_level=3
"""The relay stage: bytes both ways between the client and its server, no Python per chunk.

Edge-triggered epoll; each side remembers its unconsumed readiness, so a direction whose
destination is full simply stops reading (backpressure) until the destination drains. At
most one RELAY_BUF buffer (or one pipe, with splice) per direction is held, and only while
bytes are in flight: an idle connection holds neither."""
from libc.stdint cimport uint32_t, uint64_t
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Side, Dir
from fastproxy._bufpool cimport dir_alloc, dir_release, pipe_get, pipe_put
from fastproxy._transport cimport side_has_input, side_read, side_write, side_shutdown_write, peer_release
from fastproxy._conn cimport conn_end
from fastproxy._wscodec cimport (client_read, client_has_input, ws_place_control, ws_frame_payload,
                                 ws_send_close, ws_drop_101, ws_release_held)
from ws cimport WS_SERVER_HEADER_MAX, WS_CLOSE_NORMAL

cdef void relay_start(Core* e, Conn* c) noexcept nogil:
    if c.upstream >= 0:
        e.upstreams[c.upstream].consec_fails = 0
    c.state = ST_RELAY
    c.deadline_ms = 0
    peer_release(c)         # policy and the PROXY header are done with the certificate's DER
    c.active_ms = e.now
    c.cl_active_ms = c.up_active_ms = e.now
    # Optimistic readiness: bytes may already wait in the kernel (or in OpenSSL, read
    # together with the handshake's last record) and no new edge will announce them.
    c.cl.readable = 1
    c.up.readable = 1
    c.up.writable = 1
    c.use_splice = c.cl.ssl == NULL and c.up.ssl == NULL and c.ws == NULL
    relay_pump(e, c)


cdef void relay_pump(Core* e, Conn* c) noexcept nogil:
    cdef int r
    r = _pump_dir(e, c, &c.cl, &c.up, &c.c2u, 1)
    if r < 0:
        _end_io(e, c, r, 1)
        return
    r = _pump_dir(e, c, &c.up, &c.cl, &c.u2c, 0)
    if r < 0:
        _end_io(e, c, r, 0)
        return
    if c.ws != NULL and c.ws.switched and not c.ws.await_101 and c.ws.held != NULL:
        # passthrough: the broker has answered the upgrade; the client's frames go now
        if ws_release_held(e, c) < 0:
            _end_io(e, c, -3, 1)
            return
        r = _pump_dir(e, c, &c.cl, &c.up, &c.c2u, 1)
        if r < 0:
            _end_io(e, c, r, 1)
            return
    if c.up.shut_wr and c.cl.shut_wr:
        conn_end(e, c, R_OK, 0)


cdef void _end_io(Core* e, Conn* c, int r, bint c2u) noexcept nogil:
    # r == -1: the source side failed; -2: the destination side; -3: out of resources;
    # -5: a passthrough broker did not accept the WebSocket upgrade.
    cdef bint client_side
    cdef int err = fp_errno()
    if r == -3:
        conn_end(e, c, R_INTERNAL, ENOMEM)
        return
    if r == -5:
        conn_end(e, c, R_UPSTREAM_REFUSED, 0)
        return
    client_side = (r == -1) == c2u
    if client_side:
        if c.ws != NULL and c.ws.failed:
            conn_end(e, c, R_WS_PROTOCOL, 0)
            return
        if c.ws != NULL and (c.ws.close_sent or c.ws.close_recv):
            # A browser closing its socket right after the close handshake (or without
            # reading our close frame) ends the session normally.
            conn_end(e, c, R_OK, 0)
            return
        if c.cl.ssl != NULL:
            c.ssl_fatal = 1
            c.ssl_err = ERR_peek_error()
            ERR_clear_error()
        conn_end(e, c, R_CLIENT_RESET, err)
    elif c.ws != NULL and c.ws.await_101:
        c.detail_static = b"the broker reset the connection instead of answering the WebSocket upgrade"
        conn_end(e, c, R_UPSTREAM_REFUSED, err)
    else:
        conn_end(e, c, R_UPSTREAM_RESET, err)


cdef int _pump_dir(Core* e, Conn* c, Side* src, Side* dst, Dir* d, bint c2u) noexcept nogil:
    """Move bytes src -> dst until neither side can progress. Fills the buffer (or pipe)
    from src as far as it goes before flushing, so a burst of small MQTT packets leaves
    in one write. Returns 0, or -1 (src failed), -2 (dst failed), -3 (no buffer).
    Propagates src's EOF to dst once everything read has been flushed."""
    cdef int r
    cdef bint progressed
    cdef bint ws_out = c.ws != NULL and not c2u and not c.ws.switched   # framing the broker's bytes
    cdef bint await_101 = c.ws != NULL and not c2u and c.ws.await_101   # passthrough: its 101 first
    if dst.shut_wr:
        return 0
    while True:
        progressed = False
        if ws_out and d.end == d.start and c.ws.ctrl_out_len:
            if d.buf == NULL and not dir_alloc(e, d):
                return -3
            progressed = ws_place_control(c, d)
        if ws_out and d.end != d.start:
            pass        # one frame per read: read again once this one is out
        elif c2u and c.ws != NULL and c.ws.await_101:
            pass        # passthrough: the client's frames wait for the broker's 101
        elif not src.eof and (client_has_input(c) if c2u else side_has_input(src)):
            if c.use_splice and not d.no_splice and d.end == d.start:
                r = _splice_in(e, c, src, d, c2u)
            elif ws_out:
                r = _read_in_framed(e, c, src, d)
            else:
                r = _read_in(e, c, src, d, c2u)
            if r < 0:
                return r
            progressed = r > 0
        if await_101:
            if d.end > d.start and ws_drop_101(c, d) < 0:
                return -5
            if c.ws.await_101:
                if src.eof:
                    c.detail_static = b"the broker closed before answering the WebSocket upgrade"
                    return -5
                break       # the rest of the broker's answer is still to come: nothing to send
            await_101 = False
        if dst.writable:
            r = _flush(e, c, dst, d, c2u)
            if r < 0:
                return -2
            progressed = progressed or r > 0
        if not progressed:
            break
        c.active_ms = e.now
        c.tls_bufs_freed = 0
    # Idle directions give their buffer / pipe back to the pool.
    if d.buf != NULL and d.end == d.start:
        dir_release(e, d)
    if d.pipe_r >= 0 and d.pipe_bytes == 0:
        pipe_put(e, d)
    if src.eof and d.end == d.start and d.pipe_bytes == 0:
        if ws_out:
            ws_send_close(c, WS_CLOSE_NORMAL, NULL)   # the broker ended the session
        side_shutdown_write(dst)
        # One side is done (MQTT has no use for half-open sessions): like HAProxy's
        # `timeout client-fin`, the other side gets a short grace, not the idle timeout.
        if c.idle_ms == 0 or c.idle_ms > HALF_CLOSED_TIMEOUT_MS:
            c.idle_ms = HALF_CLOSED_TIMEOUT_MS
    return 0


cdef int _read_in(Core* e, Conn* c, Side* src, Dir* d, bint c2u) noexcept nogil:
    """Read from src into d's buffer until it is full or src has nothing more.
    Returns 1 if bytes or EOF arrived, 0 if nothing, -1 on a read error, -3 without memory."""
    cdef ssize_t n
    cdef int got = 0
    if d.buf == NULL and not dir_alloc(e, d):
        return -3
    while d.end < d.cap:
        n = client_read(e, c, d.buf + d.end, d.cap - d.end) if c2u else side_read(src, d.buf + d.end, d.cap - d.end)
        if n > 0:
            d.end += <uint32_t>n
            got = 1
            if c2u:
                c.bytes_in += <uint64_t>n
                e.ctr.bytes_from_clients += <uint64_t>n
                c.cl_active_ms = e.now
            else:
                c.up_active_ms = e.now
            # A TLS read returns one record; the rest of what one recv brought (records in
            # our BIO buffer or OpenSSL's) is read too, so that the burst leaves in one write.
            if not (client_has_input(c) if c2u else side_has_input(src)):
                break
        elif n == IO_EOF:
            src.eof = 1
            return 1
        elif n == IO_ERR:
            return -1
        else:
            break   # IO_AGAIN: side_read consumed the readiness it was waiting on
    return got


cdef int _read_in_framed(Core* e, Conn* c, Side* src, Dir* d) noexcept nogil:
    """Broker -> WebSocket client, d empty: read behind a reserved frame header, then frame
    what came as one binary message. Returns like _read_in."""
    cdef int got
    if d.buf == NULL and not dir_alloc(e, d):
        return -3
    d.start = d.end = WS_SERVER_HEADER_MAX
    got = _read_in(e, c, src, d, 0)
    if d.end > WS_SERVER_HEADER_MAX:
        ws_frame_payload(d)
    else:
        d.start = d.end = 0
    return got


cdef int _splice_in(Core* e, Conn* c, Side* src, Dir* d, bint c2u) noexcept nogil:
    """splice(2) from src's socket into d's pipe (plain on both sides).
    Returns 1 on progress (bytes, EOF, or a switch to buffered copy), 0 if nothing, -1 on error."""
    cdef ssize_t n
    cdef size_t room
    cdef int err
    if d.pipe_r < 0 and not pipe_get(e, d):
        d.no_splice = 1     # out of descriptors: copy through a buffer instead
        return 1
    room = PIPE_CAP - d.pipe_bytes
    if room == 0:
        return 0
    n = splice(src.fd, NULL, d.pipe_w, NULL, room, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    if n > 0:
        d.pipe_bytes += <uint32_t>n
        if c2u:
            c.bytes_in += <uint64_t>n
            e.ctr.bytes_from_clients += <uint64_t>n
            c.cl_active_ms = e.now
        else:
            c.up_active_ms = e.now
        return 1
    if n == 0:
        src.eof = 1
        return 1
    err = fp_errno()
    if err == EAGAIN:
        # EAGAIN with bytes in the pipe may mean the pipe ran out of slots, not that the
        # socket is drained: keep the readiness until the pipe has been flushed.
        if d.pipe_bytes == 0:
            src.readable = 0
        return 0
    if err == EINTR:
        return 1
    return -1


cdef int _flush(Core* e, Conn* c, Side* dst, Dir* d, bint c2u) noexcept nogil:
    """One write of what d holds to dst. Returns 1 if bytes left, 0 if none could, -1 on error."""
    cdef ssize_t n
    cdef int err
    if d.pipe_bytes:
        n = splice(d.pipe_r, NULL, dst.fd, NULL, d.pipe_bytes, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if n > 0:
            d.pipe_bytes -= <uint32_t>n
            if not c2u:
                c.bytes_out += <uint64_t>n
                e.ctr.bytes_to_clients += <uint64_t>n
            return 1
        err = fp_errno()
        if n < 0 and err == EAGAIN:
            dst.writable = 0
            return 0
        if n < 0 and err == EINTR:
            return 1
        return -1
    if d.end > d.start:
        n = side_write(dst, d.buf + d.start, d.end - d.start)
        if n > 0:
            d.start += <uint32_t>n
            if d.start == d.end:
                d.start = d.end = 0
            if not c2u:
                c.bytes_out += <uint64_t>n
                e.ctr.bytes_to_clients += <uint64_t>n
            return 1
        if n == IO_ERR:
            return -1
    return 0


