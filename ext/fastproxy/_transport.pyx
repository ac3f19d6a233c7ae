# cython: language_level=3
"""The transport stage: our BIO under OpenSSL, TLS set-up and handshake, and the readers of
the client certificate (the one source of the CN for identity rules, the PROXY header's
callers and the access log)."""
from libc.stdint cimport uint32_t
from libc.string cimport memcpy
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Side, Conn, Core
from fastproxy._bufpool cimport pool_get, pool_put


# ---------------------------------------------------------------------- the TLS side's BIO
# OpenSSL's socket BIO costs two recv() per record (header, then body) plus one that ends in
# EAGAIN; read_ahead saves those but memmoves its buffer after every record. This BIO does
# one recv() per burst into a pooled buffer, hands OpenSSL exactly what it asks for, and
# treats a short recv() as "socket drained", so edge-triggered readiness needs no EAGAIN call.

cdef BIO_METHOD* SIDE_BIO = NULL


cdef int _bio_create(BIO* b) noexcept nogil:
    BIO_set_init(b, 1)
    return 1


cdef long _bio_ctrl(BIO* b, int cmd, long num, void* ptr) noexcept nogil:
    if cmd == BIO_CTRL_FLUSH:
        return 1
    if cmd == BIO_CTRL_EOF:
        # OpenSSL asks after a 0-byte read; a TCP close without close_notify is then an
        # ordinary end of stream (SSL_OP_IGNORE_UNEXPECTED_EOF), not an error.
        return (<Side*>BIO_get_data(b)).sock_eof
    return 0


cdef int _bio_write(BIO* b, const char* data, int n) noexcept nogil:
    cdef Side* s = <Side*>BIO_get_data(b)
    cdef ssize_t r
    cdef int err
    BIO_clear_retry_flags(b)
    while True:
        r = send(s.fd, data, <size_t>n, MSG_NOSIGNAL)
        if r >= 0:
            return <int>r
        err = fp_errno()
        if err == EINTR:
            continue
        if err == EAGAIN:
            s.writable = 0
            BIO_set_retry_write(b)
        return -1


cdef int _bio_read(BIO* b, char* out, int outl) noexcept nogil:
    cdef Side* s = <Side*>BIO_get_data(b)
    cdef ssize_t r
    cdef uint32_t n
    cdef int err
    BIO_clear_retry_flags(b)
    if outl <= 0:
        return 0
    if s.in_off == s.in_len:
        if s.sock_eof:
            return 0
        if not s.readable:
            BIO_set_retry_read(b)
            return -1
        if s.inbuf == NULL:
            s.inbuf = pool_get(s.pool)
            if s.inbuf == NULL:
                return -1
        while True:
            r = recv(s.fd, s.inbuf, RELAY_BUF, 0)
            if r >= 0 or fp_errno() != EINTR:
                break
        if r <= 0:
            err = fp_errno()
            side_release_input(s)
            if r == 0:
                s.sock_eof = 1
                return 0
            if err == EAGAIN:
                s.readable = 0
                BIO_set_retry_read(b)
            return -1
        if r < RELAY_BUF and not s.hup:
            s.readable = 0
        s.in_off = 0
        s.in_len = <uint32_t>r
    n = s.in_len - s.in_off
    if n > <uint32_t>outl:
        n = <uint32_t>outl
    memcpy(out, s.inbuf + s.in_off, n)
    s.in_off += n
    if s.in_off == s.in_len:
        side_release_input(s)
    return <int>n


cdef int _init_bio_method() except -1:
    global SIDE_BIO
    SIDE_BIO = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, b"fastproxy side")
    if SIDE_BIO == NULL:
        raise MemoryError("BIO_meth_new")
    BIO_meth_set_write(SIDE_BIO, _bio_write)
    BIO_meth_set_read(SIDE_BIO, _bio_read)
    BIO_meth_set_ctrl(SIDE_BIO, _bio_ctrl)
    BIO_meth_set_create(SIDE_BIO, _bio_create)
    return 0


_init_bio_method()



cdef int tls_start(Core* e, Conn* c, SSL_CTX* ctx) noexcept nogil:
    """Give the client side an SSL object in server mode over our BIO. Returns 0, or -1 without
    memory (nothing to free: the caller ends c)."""
    cdef BIO* bio
    fp_peer_init(&c.cert)
    c.cl.ssl = SSL_new(ctx)
    bio = BIO_new(SIDE_BIO) if c.cl.ssl != NULL else NULL
    if bio == NULL:
        ERR_clear_error()
        return -1
    SSL_set_app_data(c.cl.ssl, &c.cert)    # where the verify callback and ticket opener put the certificate
    fp_ssl_setup(c.cl.ssl)
    BIO_set_data(bio, &c.cl)
    SSL_set_bio(c.cl.ssl, bio, bio)
    SSL_set_accept_state(c.cl.ssl)
    return 0


cdef int tls_handshake(Core* e, Conn* c) noexcept nogil:
    """One handshake step. Returns 1 when done, 0 when it waits for readiness, -1 when it
    failed (c.ssl_err, c.verify_result and c.err say why; the caller ends c)."""
    cdef int r, err
    r = SSL_do_handshake(c.cl.ssl)
    if r == 1:
        c.handshake_done = 1
        e.ctr.handshakes += 1
        fp_peer_after_handshake(&c.cert, c.cl.ssl)
        return 1
    err = SSL_get_error(c.cl.ssl, r)
    if err == SSL_ERROR_WANT_READ:
        c.cl.readable = 0
        return 0
    if err == SSL_ERROR_WANT_WRITE:
        c.cl.writable = 0
        return 0
    c.ssl_fatal = 1
    c.ssl_err = ERR_peek_error()
    c.verify_result = SSL_get_verify_result(c.cl.ssl)
    c.err = fp_errno() if err == SSL_ERROR_SYSCALL else 0
    ERR_clear_error()
    return -1


cdef int verified_cn(Conn* c, const unsigned char** out) noexcept nogil:
    """The subject CN of the verified client certificate as UTF-8 in *out (owned by c, valid
    while c lives); -1 without a verified certificate or a CN; FP_CN_MANY (-2) when the subject
    has several CNs (ambiguous: no identity). Taken by fp_subject_cn, the reader shared with the
    PROXY header and policy's PeerCertificate.cn."""
    if not peer_verified(c):
        return -1
    if c.cert.cn_len < 0:
        return c.cert.cn_len        # -1 (no CN) or FP_CN_MANY
    out[0] = c.cert.cn + c.cert.cn_raw_len + 1
    return c.cert.cn_len


cdef bint peer_verified(Conn* c) noexcept nogil:
    # Only a verified certificate is an identity: with `verify optional` a self-signed
    # "thing001" completes the handshake but must not be logged (or trusted) as thing001.
    return (c.cl.ssl != NULL and c.handshake_done and c.cert.presented
            and SSL_get_verify_result(c.cl.ssl) == X509_V_OK)


cdef object peer_cn(Conn* c):
    """The verified client certificate's CN (str) or None."""
    cdef const unsigned char* cn = NULL
    cdef int n = verified_cn(c, &cn)
    if n < 0:
        return None
    return cn[:n].decode("utf-8", "replace")


cdef object peer_der(Conn* c):
    """The client certificate (DER) or None; decoded in Python only when policy asks. Kept until
    the relay starts (peer_release)."""
    if c.cl.ssl == NULL or not c.cert.presented or c.cert.der == NULL:
        return None
    return c.cert.der[:c.cert.der_len]


cdef void peer_release(Conn* c) noexcept nogil:
    """The relay starts: from here on only the CN is needed (access log)."""
    fp_peer_drop_der(&c.cert)


cdef object tls_version(Conn* c):
    """"TLSv1.3" and the like once the handshake is done, "TLS" before, "TCP" without TLS."""
    if c.cl.ssl == NULL:
        return "TLS" if c.tls_listener else "TCP"
    return SSL_get_version(c.cl.ssl).decode() if c.handshake_done else "TLS"
