# The transport stage: a connection side's byte I/O (plain socket or TLS through our BIO) and
# the TLS handshake. The per-chunk calls are inline here; set-up and certificate readers live
# in _transport.pyx.
from libc.string cimport memcpy
from libc.stdint cimport uint32_t
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Side, Conn, Core
from fastproxy._bufpool cimport pool_put


cdef inline void side_release_input(Side* s) noexcept nogil:
    if s.inbuf != NULL:
        pool_put(s.pool, s.inbuf)
        s.inbuf = NULL
    s.in_off = s.in_len = 0


cdef inline ssize_t side_peek(Side* s) noexcept nogil:
    """Whether a plain socket side has sent anything, without taking it (so that nothing is
    allocated for a client that has not): 1 when a byte waits, 0 at EOF, IO_AGAIN (readiness
    consumed), IO_ERR (errno says why). Bytes left over from a PROXY header count as input."""
    cdef char b
    cdef ssize_t n
    if s.in_off < s.in_len:
        return 1
    n = recv(s.fd, &b, 1, MSG_PEEK)
    if n >= 0:
        return n
    if fp_errno() == EAGAIN or fp_errno() == EINTR:
        s.readable = 0
        return IO_AGAIN
    return IO_ERR


cdef inline bint side_has_input(Side* s) noexcept nogil:
    """Whether a read may return something: unconsumed socket readiness, or bytes already
    pulled into our BIO buffer or into OpenSSL's record buffer."""
    if s.readable or s.in_off < s.in_len:
        return True
    return s.ssl != NULL and SSL_has_pending(s.ssl)


cdef inline ssize_t side_read(Side* s, char* buf, size_t n) noexcept nogil:
    """Read up to n bytes. Returns > 0 bytes, IO_AGAIN (readiness consumed), IO_EOF or IO_ERR.
    After IO_ERR on a TLS side the OpenSSL error queue holds the reason (the caller clears it)."""
    cdef ssize_t r
    cdef int err
    cdef uint32_t k
    if s.ssl == NULL:
        if s.in_off < s.in_len:
            # bytes that followed a received PROXY header
            k = s.in_len - s.in_off
            if k > n:
                k = <uint32_t>n
            memcpy(buf, s.inbuf + s.in_off, k)
            s.in_off += k
            if s.in_off == s.in_len:
                side_release_input(s)
            return k
        while True:
            r = recv(s.fd, buf, n, 0)
            if r > 0:
                # A short read drained the socket: anything later raises a new edge. Not so
                # for a FIN already reported (EPOLLRDHUP), which must still be read as EOF.
                if <size_t>r < n and not s.hup:
                    s.readable = 0
                return r
            if r == 0:
                return IO_EOF
            err = fp_errno()
            if err == EINTR:
                continue
            if err == EAGAIN:
                s.readable = 0
                return IO_AGAIN
            return IO_ERR
    # The error queue is empty here: every path that leaves errors in it clears them.
    r = SSL_read(s.ssl, buf, <int>n)
    if r > 0:
        return r
    err = SSL_get_error(s.ssl, <int>r)
    if err == SSL_ERROR_WANT_READ:
        s.readable = 0
        return IO_AGAIN
    if err == SSL_ERROR_WANT_WRITE:
        s.writable = 0
        return IO_AGAIN
    if err == SSL_ERROR_ZERO_RETURN:
        return IO_EOF
    return IO_ERR


cdef inline ssize_t side_write(Side* s, const char* buf, size_t n) noexcept nogil:
    """Write up to n bytes. Returns > 0 bytes written, IO_AGAIN or IO_ERR."""
    cdef ssize_t r
    cdef int err
    if s.ssl == NULL:
        while True:
            r = send(s.fd, buf, n, MSG_NOSIGNAL)
            if r >= 0:
                return r
            err = fp_errno()
            if err == EINTR:
                continue
            if err == EAGAIN:
                s.writable = 0
                return IO_AGAIN
            return IO_ERR
    r = SSL_write(s.ssl, buf, <int>n)
    if r > 0:
        return r
    err = SSL_get_error(s.ssl, <int>r)
    if err == SSL_ERROR_WANT_WRITE:
        s.writable = 0
        return IO_AGAIN
    if err == SSL_ERROR_WANT_READ:
        s.readable = 0
        return IO_AGAIN
    return IO_ERR


cdef inline void side_shutdown_write(Side* s) noexcept nogil:
    # Half-close: TLS close_notify first (best effort, it may not fit a full socket), then FIN.
    if s.ssl != NULL:
        ERR_clear_error()
        SSL_shutdown(s.ssl)
        ERR_clear_error()
    shutdown(s.fd, SHUT_WR)
    s.shut_wr = 1


cdef inline void discard_input(int fd) noexcept nogil:
    # close() with unread bytes in the receive queue sends RST, and a peer's kernel may then
    # drop what we sent last (a TLS alert, a CONNACK) before its application reads it.
    # Draining what already arrived (bounded) makes the close an orderly FIN.
    cdef char sink[4096]
    cdef int i
    for i in range(16):
        if recv(fd, sink, sizeof(sink), 0) <= 0:
            return



cdef int tls_start(Core* e, Conn* c, SSL_CTX* ctx) noexcept nogil
cdef int tls_handshake(Core* e, Conn* c) noexcept nogil
cdef int verified_cn(Conn* c, const unsigned char** out) noexcept nogil
cdef object peer_cn(Conn* c)
cdef object peer_der(Conn* c)
cdef bint peer_verified(Conn* c) noexcept nogil
cdef void peer_release(Conn* c) noexcept nogil
cdef object tls_version(Conn* c)
