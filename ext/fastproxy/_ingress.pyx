# cython: language_level=3
"""The ingress stage: accept (with the connection cap and descriptor exhaustion), an optional
PROXY header from a trusted load balancer, admission, and the TLS handshake; then the CONNECT
stage. Until a client has sent its first byte it holds a descriptor and its Conn, nothing
more: the TLS object and every buffer wait for input (a flood of silent sockets costs well
under 4 KiB each)."""
from libc.stdlib cimport calloc
from libc.string cimport memset, memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Side, Listener, Cidr
from fastproxy._bufpool cimport pool_get
from fastproxy._transport cimport side_release_input, side_peek, tls_start, tls_handshake
from proxyproto cimport pp_parse_ex, pp_result, PP_NEED_MORE, PP_VALID, PP2_CMD_PROXY, PP2_TCP4, PP2_TCP6
from fastproxy._conn cimport conn_end, conn_tag
from fastproxy._websocket cimport ws_or_connect
from fastproxy._admission cimport admission_address, cidr_match, notice

cdef int ONE = 1


cdef void ingress_accept(Core* e, int li) noexcept nogil:
    cdef Listener* l = &e.listeners[li]
    cdef Conn* c
    cdef int fd, k, err
    cdef sockaddr_storage peer
    cdef socklen_t plen
    cdef epoll_event ev
    for k in range(ACCEPT_BATCH):
        if e.n_conns >= e.max_conns:
            listeners_pause(e, 0)
            notice(e, N_CONN_CAP)
            return
        plen = sizeof(sockaddr_storage)
        fd = accept4(l.fd, <sockaddr*>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            err = fp_errno()
            if err == EAGAIN:
                return
            if err == EINTR or err == ECONNABORTED:
                continue
            e.ctr.accept_errors += 1
            if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                # Out of descriptors or memory: stop accepting for a moment instead of
                # spinning on a level-triggered listener that stays readable.
                listeners_pause(e, ACCEPT_PAUSE_MS)
                notice(e, N_FD_EXHAUSTED)
            return
        c = <Conn*>calloc(1, sizeof(Conn))
        if c == NULL:
            close(fd)
            e.ctr.accept_errors += 1
            return
        c.listener = li
        c.tls_listener = l.ssl_ctx != NULL
        c.cl.fd = fd
        c.up.fd = -1
        c.c2u.pipe_r = c.c2u.pipe_w = -1
        c.u2c.pipe_r = c.u2c.pipe_w = -1
        c.upstream = -1
        c.idle_ms = l.idle_timeout_ms
        c.peer = peer
        c.peer_len = plen
        c.t_wall = fp_wall_time()
        c.t_mono = fp_mono_time()
        c.active_ms = e.now
        if peer.ss_family != AF_UNIX:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &ONE, sizeof(int))
        # link
        c.next = e.conns
        if e.conns != NULL:
            e.conns.prev = c
        e.conns = c
        e.n_conns += 1
        if e.n_conns > e.peak_conns:
            e.peak_conns = e.n_conns
        e.ctr.accepted += 1
        e.ctr.active += 1
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = conn_tag(c, TAG_CLIENT)
        if epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            conn_end(e, c, R_INTERNAL, fp_errno())
            continue
        # Optimistic: the first bytes (ClientHello, CONNECT) often arrived with the ACK.
        c.cl.readable = 1
        c.cl.writable = 1
        c.cl.pool = &e.pool
        if l.accept_pp:
            if not cidr_match(l.trusted, l.n_trusted, &peer):
                conn_end(e, c, R_UNTRUSTED_PROXY, 0)
                continue
            c.state = ST_PROXY_HEADER
            c.deadline_ms = e.now + l.handshake_timeout_ms if l.handshake_timeout_ms > 0 else 0
            ingress_read_proxy_header(e, c)
        else:
            _client_accepted(e, c)


cdef void _client_accepted(Core* e, Conn* c) noexcept nogil:
    """Admission (with the address a trusted PROXY header gave), then the TLS handshake, or
    straight to the CONNECT / upstream."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef int r = admission_address(e, c)
    if r != R_OK:
        conn_end(e, c, r, 0)
        return
    if l.ssl_ctx == NULL:
        ws_or_connect(e, c)
        return
    c.state = ST_HANDSHAKE
    c.deadline_ms = e.now + l.handshake_timeout_ms if l.handshake_timeout_ms > 0 else 0
    ingress_handshake(e, c)


cdef void ingress_handshake(Core* e, Conn* c) noexcept nogil:
    """Advance the handshake (started at the first byte); when done, the CONNECT stage."""
    cdef int r
    cdef ssize_t n
    if c.cl.ssl == NULL:
        n = side_peek(&c.cl)
        if n == IO_AGAIN:
            return
        if n == IO_ERR:
            conn_end(e, c, R_HANDSHAKE_FAILED, fp_errno())
            return
        if n == 0:
            c.detail_static = b"closed before the TLS handshake"
            conn_end(e, c, R_HANDSHAKE_FAILED, 0)
            return
        if tls_start(e, c, e.listeners[c.listener].ssl_ctx) < 0:
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return
    r = tls_handshake(e, c)
    if r > 0:
        ws_or_connect(e, c)
    elif r < 0:
        conn_end(e, c, R_HANDSHAKE_FAILED, c.err)


cdef void ingress_read_proxy_header(Core* e, Conn* c) noexcept nogil:
    """Read raw bytes until a whole PROXY v1/v2 header is there (strict, bounded); the bytes
    after it stay in the client side's input buffer for TLS or the relay."""
    cdef Side* s = &c.cl
    cdef ssize_t n
    cdef int r
    cdef pp_result res
    while True:
        if s.inbuf == NULL:
            s.inbuf = pool_get(s.pool)
            if s.inbuf == NULL:
                conn_end(e, c, R_INTERNAL, ENOMEM)
                return
            s.in_off = s.in_len = 0
        if s.in_len == RELAY_BUF:
            c.detail_static = b"PROXY header too long"
            conn_end(e, c, R_BAD_PROXY_HEADER, 0)
            return
        n = recv(s.fd, s.inbuf + s.in_len, RELAY_BUF - s.in_len, 0)
        if n == 0:
            c.detail_static = b"closed before a whole PROXY header"
            conn_end(e, c, R_BAD_PROXY_HEADER, 0)
            return
        if n < 0:
            if fp_errno() == EAGAIN:
                s.readable = 0
                if s.in_len == 0:
                    side_release_input(s)
                return
            if fp_errno() == EINTR:
                continue
            conn_end(e, c, R_CLIENT_RESET, fp_errno())
            return
        s.in_len += <uint32_t>n
        r = pp_parse_ex(<const uint8_t*>s.inbuf, s.in_len, PP_HEADER_MAX, &res)
        if r == PP_NEED_MORE:
            continue
        if r != PP_VALID:
            c.detail_static = res.reason
            conn_end(e, c, R_BAD_PROXY_HEADER, 0)
            return
        s.in_off = <uint32_t>res.header_len
        if s.in_off == s.in_len:
            side_release_input(s)
        else:
            c.c2u.no_splice = 1     # leftover input is served from inbuf, not the socket
        if res.command == PP2_CMD_PROXY and (res.fam == PP2_TCP4 or res.fam == PP2_TCP6):
            _set_addr(&c.peer, res.fam, res.src_addr, res.src_port)
            _set_addr(&c.pp_dst, res.fam, res.dst_addr, res.dst_port)
            c.peer_len = sizeof(sockaddr_storage)
            c.has_pp_dst = 1
        # LOCAL (the balancer's own health check) or UNSPEC: keep the real peer address.
        _client_accepted(e, c)
        return


cdef void _set_addr(sockaddr_storage* ss, uint8_t fam, const uint8_t* addr, uint16_t port) noexcept nogil:
    memset(ss, 0, sizeof(sockaddr_storage))
    if fam == PP2_TCP4:
        (<sockaddr_in*>ss).sin_family = AF_INET
        (<sockaddr_in*>ss).sin_port = htons(port)
        memcpy(&(<sockaddr_in*>ss).sin_addr, addr, 4)
    else:
        (<sockaddr_in6*>ss).sin6_family = AF_INET6
        (<sockaddr_in6*>ss).sin6_port = htons(port)
        memcpy(&(<sockaddr_in6*>ss).sin6_addr, addr, 16)


cdef void listeners_pause(Core* e, int64_t ms) noexcept nogil:
    cdef int i
    for i in range(e.n_listeners):
        if e.listeners[i].in_epoll:
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, e.listeners[i].fd, NULL)
            e.listeners[i].in_epoll = 0
    e.listeners_paused = True
    e.accept_paused_until = e.now + ms


cdef void listeners_resume(Core* e) noexcept nogil:
    cdef int i
    cdef epoll_event ev
    for i in range(e.n_listeners):
        if not e.listeners[i].in_epoll and e.listeners[i].fd >= 0:
            ev.events = EPOLLIN
            ev.data.u64 = (<uint64_t>i << 3) | TAG_LISTENER
            if epoll_ctl(e.epfd, EPOLL_CTL_ADD, e.listeners[i].fd, &ev) == 0:
                e.listeners[i].in_epoll = 1
    e.listeners_paused = False


cdef void listeners_close(Core* e) noexcept nogil:
    # Closing (not just pausing) lets the kernel hand new connections to the other
    # SO_REUSEPORT workers, or refuse them when this is the last one.
    cdef int i
    for i in range(e.n_listeners):
        if e.listeners[i].fd >= 0:
            close(e.listeners[i].fd)
            e.listeners[i].fd = -1
            e.listeners[i].in_epoll = 0
    e.listeners_paused = False


