# The WebSocket frame codec of a client side (after the upgrade): client frames decoded on
# read, the broker's bytes framed on the way out, control frames answered. The handshake is
# _websocket's.
from libc.stdint cimport uint16_t
from fastproxy._types cimport Core, Conn, Dir
from fastproxy._transport cimport side_read, side_has_input

cdef ssize_t ws_read(Core* e, Conn* c, char* out, size_t n) noexcept nogil
cdef void ws_free(Core* e, Conn* c) noexcept nogil
cdef bint ws_place_control(Conn* c, Dir* d) noexcept nogil
cdef void ws_frame_payload(Dir* d) noexcept nogil
cdef void ws_send_close(Conn* c, uint16_t code, const char* reason) noexcept nogil
cdef int ws_passthrough_switch(Core* e, Conn* c) noexcept nogil
cdef int ws_drop_101(Conn* c, Dir* d) noexcept nogil
cdef int ws_release_held(Core* e, Conn* c) noexcept nogil


cdef inline ssize_t client_read(Core* e, Conn* c, char* out, size_t n) noexcept nogil:
    """Read the client's application bytes: MQTT, whether it speaks it over TCP/TLS or in
    WebSocket frames."""
    if c.ws != NULL and not c.ws.switched:
        return ws_read(e, c, out, n)
    return side_read(&c.cl, out, n)


cdef inline bint client_has_input(Conn* c) noexcept nogil:
    if c.ws != NULL and not c.ws.switched and c.ws.raw_off < c.ws.raw_len:
        return True
    return side_has_input(&c.cl)
