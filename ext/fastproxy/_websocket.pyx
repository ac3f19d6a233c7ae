# cython: language_level=3
"""The WebSocket upgrade stage (RFC 6455 section 4): on a WebSocket listener, once the client
side is usable (TLS done, or plain), read one HTTP/1.1 request (bounded in size, and in time
by the handshake timeout), check it (GET, Upgrade/Connection, key, version 13, an MQTT
subprotocol, one of the listener's paths, an allowed Origin), and answer 101 Switching
Protocols; the CONNECT stage then reads MQTT out of the frames. Anything else is answered
with an HTTP status and a reason, and no upstream connection is made. X-Forwarded-For is
believed only from a trusted proxy (trusted_proxies): its last address becomes the client's.
With ws_passthrough the 101 is still ours (the client must send its CONNECT before any broker
is chosen); the client's own request and frames go to the broker once the CONNECT passed."""
from libc.stdlib cimport calloc, malloc
from libc.string cimport memcpy, memmove, memset
from libc.stdint cimport uint8_t, uint32_t
from system cimport *
from openssl cimport EVP_Digest, EVP_sha1, EVP_EncodeBlock
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Dir, Listener, WsState
from fastproxy._bufpool cimport dir_alloc, dir_release, pool_get
from fastproxy._transport cimport side_read, side_write
from fastproxy._conn cimport conn_end, conn_linger_begin
from fastproxy._identity cimport connect_begin
from fastproxy._admission cimport cidr_match
from ws cimport *

cdef extern from "string.h" nogil:
    void* memmem(const void* haystack, size_t hlen, const void* needle, size_t nlen)
    int snprintf(char* s, size_t n, const char* fmt, ...)
    size_t strlen(const char* s)

cdef const char* GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


cdef void ws_or_connect(Core* e, Conn* c) noexcept nogil:
    """The client side is usable: the upgrade first on a WebSocket listener, else the CONNECT."""
    cdef Listener* l = &e.listeners[c.listener]
    if l.websocket and c.ws == NULL:
        c.state = ST_WS_UPGRADE
        c.deadline_ms = e.now + l.handshake_timeout_ms if l.handshake_timeout_ms > 0 else 0
        ws_upgrade_read(e, c)
    else:
        connect_begin(e, c)


cdef void ws_upgrade_read(Core* e, Conn* c) noexcept nogil:
    cdef Dir* d = &c.c2u
    cdef ssize_t n
    cdef int r
    cdef ws_request req
    while True:
        if d.buf == NULL and not dir_alloc(e, d):
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return
        n = side_read(&c.cl, d.buf + d.end, min(<size_t>WS_REQUEST_MAX, d.cap) - d.end)
        if n > 0:
            d.end += <uint32_t>n
            c.bytes_in += <uint64_t>n
            r = ws_parse_request(d.buf, d.end, &req)
            if r == WS_NEED_MORE:
                continue
            if r == WS_OK:
                r = _check(e, c, &req)
            if r != WS_OK:
                _refuse(e, c, r)
                return
            _accept(e, c, &req)
            return
        if n == IO_AGAIN:
            if d.end == 0:
                dir_release(e, d)
            return
        c.detail_static = b"closed before the WebSocket upgrade"
        conn_end(e, c, R_NO_CONNECT, fp_errno() if n == IO_ERR else 0)
        return


cdef int _check(Core* e, Conn* c, ws_request* req) noexcept nogil:
    """The listener's own rules: path, Origin; X-Forwarded-For from a trusted proxy."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef char key[520]
    cdef size_t i
    if req.path.len == 0 or req.path.len > 510:
        return WS_E_PATH
    key[0] = 10
    memcpy(key + 1, req.path.ptr, req.path.len)
    key[req.path.len + 1] = 10
    if memmem(l.ws_paths, strlen(l.ws_paths), key, req.path.len + 2) == NULL:
        return WS_E_PATH
    if l.ws_origins != NULL:
        if req.origin.ptr == NULL or req.origin.len == 0 or req.origin.len > 510:
            return WS_E_ORIGIN
        key[0] = 10
        for i in range(req.origin.len):     # origins are compared case-insensitively
            key[i + 1] = req.origin.ptr[i] + 32 if 65 <= req.origin.ptr[i] <= 90 else req.origin.ptr[i]
        key[req.origin.len + 1] = 10
        if memmem(l.ws_origins, strlen(l.ws_origins), key, req.origin.len + 2) == NULL:
            return WS_E_ORIGIN
    if req.forwarded_for.ptr != NULL and l.n_trusted and cidr_match(l.trusted, l.n_trusted, &c.peer):
        _forwarded_for(c, req.forwarded_for)
    return WS_OK


cdef void _forwarded_for(Conn* c, ws_span v) noexcept nogil:
    # The last address of the list is the one our trusted proxy saw (nginx's realip without
    # recursion); a value that is not an address leaves the peer as it was.
    cdef char a[64]
    cdef size_t start = v.len, end = v.len
    cdef sockaddr_storage ss
    while start > 0 and v.ptr[start - 1] != 44:     # ','
        start -= 1
    while start < end and v.ptr[start] == 32:
        start += 1
    while end > start and v.ptr[end - 1] == 32:
        end -= 1
    if end - start == 0 or end - start >= sizeof(a):
        return
    memcpy(a, v.ptr + start, end - start)
    a[end - start] = 0
    memset(&ss, 0, sizeof(ss))
    if inet_pton(AF_INET, a, &(<sockaddr_in*>&ss).sin_addr) == 1:
        ss.ss_family = AF_INET
    elif inet_pton(AF_INET6, a, &(<sockaddr_in6*>&ss).sin6_addr) == 1:
        ss.ss_family = AF_INET6
    else:
        return
    c.peer = ss
    c.peer_len = sizeof(sockaddr_storage)


cdef void _accept(Core* e, Conn* c, ws_request* req) noexcept nogil:
    cdef Listener* l = &e.listeners[c.listener]
    cdef Dir* d = &c.c2u
    cdef char resp[512]
    cdef unsigned char src[64]
    cdef unsigned char md[20]
    cdef unsigned char acc[32]
    cdef unsigned int mdlen = 0
    cdef int k
    cdef WsState* w
    cdef uint32_t rest
    memcpy(src, req.key.ptr, 24)
    memcpy(src + 24, GUID, 36)
    if EVP_Digest(src, 60, md, &mdlen, EVP_sha1(), NULL) != 1:
        conn_end(e, c, R_INTERNAL, 0)
        return
    EVP_EncodeBlock(acc, md, 20)
    k = snprintf(resp, sizeof(resp), b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\n\r\n",
                 acc, ws_pick_protocol(req.protocols))
    w = <WsState*>calloc(1, sizeof(WsState))
    if w == NULL:
        conn_end(e, c, R_INTERNAL, ENOMEM)
        return
    w.dec.max_frame = l.ws_max_frame
    c.ws = w
    if l.ws_passthrough:
        # The broker gets the client's own request once the CONNECT is approved.
        w.passthrough = 1
        w.req = <char*>malloc(req.length)
        if w.req == NULL:
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return
        memcpy(w.req, d.buf, req.length)
        w.req_len = <uint32_t>req.length
    if side_write(&c.cl, resp, k) != k:
        # ~200 bytes to a socket that has sent us a request: only a dead peer refuses them
        conn_end(e, c, R_CLIENT_RESET, fp_errno())
        return
    c.bytes_out += <uint64_t>k
    # Bytes the client sent after its request are its first frames.
    rest = d.end - <uint32_t>req.length
    if rest:
        w.raw = pool_get(&e.pool)
        if w.raw == NULL:
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return
        memcpy(w.raw, d.buf + req.length, rest)
        w.raw_len = rest
    d.start = d.end = 0
    dir_release(e, d)
    c.bytes_in = 0                      # the access log counts MQTT bytes, as for mqtts
    c.bytes_out = 0
    connect_begin(e, c)


cdef void _refuse(Core* e, Conn* c, int err) noexcept nogil:
    cdef char resp[512]
    cdef int status = ws_error_status(err)
    cdef const char* text = ws_error_text(err)
    cdef const char* phrase = (b"Not Found" if status == 404 else b"Forbidden" if status == 403
                               else b"Upgrade Required" if status == 426 else b"Bad Request")
    cdef int k = snprintf(resp, sizeof(resp), b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\n"
                          b"Content-Length: %d\r\nConnection: close\r\n%s\r\n%s\n",
                          status, phrase, <int>strlen(text) + 1,
                          b"Sec-WebSocket-Version: 13\r\n" if status == 426 else b"", text)
    if 0 < k < <int>sizeof(resp):
        side_write(&c.cl, resp, k)
    c.detail_static = text
    conn_linger_begin(e, c, R_WS_NOT_FOUND if status == 404 else R_WS_ORIGIN if status == 403
                      else R_WS_VERSION if status == 426 else R_WS_BAD_REQUEST)
