# cython: language_level=3
"""The upstream stage: choose the server (balance, health, maxconn), connect (source addresses,
retry on the next server), and put the PROXY header in front of the first bytes."""
from libc.stdlib cimport malloc
from libc.string cimport memset, memcpy, memmove, memcmp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from system cimport *
from openssl cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Side, Dir, Listener, Upstream
from fastproxy._bufpool cimport dir_alloc, dir_release
from proxyproto cimport *
from proxyproto_ssl cimport *
from fastproxy._conn cimport conn_end, conn_refuse_rc5, conn_release_server, conn_tag
from fastproxy._relay cimport relay_start
from fastproxy._balance cimport pick_server

cdef int ONE = 1

cdef void upstream_connect(Core* e, Conn* c) noexcept nogil:
    """Choose c's server (unless a policy routed it) and connect; c2u holds what goes first
    (the CONNECT). Nothing has been written upstream until the connect completes, so a
    failure before that may go to the next server (_upstream_failed)."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef Upstream* u
    cdef int pos, why = 0, err, mode
    if not c.routed:
        pos = pick_server(l, e.upstreams, c, &why)
        if pos < 0:
            _no_server(e, c, why)
            return
        c.upstream = l.pool[pos]
        c.tried |= (<uint64_t>1) << pos
    u = &e.upstreams[c.upstream]
    # The header is built before the upstream is contacted: a client it cannot be built
    # for (too long, CN with control characters) never opens a broker connection.
    mode = u.pp_mode if u.pp_mode >= 0 else l.pp_mode
    if mode != PP_NONE and _proxy_header(e, c, mode) < 0:
        return
    c.tries += 1
    u.sessions += 1
    u.total += 1
    c.counted = 1
    err = _open_upstream(e, c, u)
    if err == 0:
        upstream_connected(e, c)
    elif err == EINPROGRESS:
        c.state = ST_CONNECTING
        c.deadline_ms = e.now + l.connect_timeout_ms if l.connect_timeout_ms > 0 else 0
    else:
        upstream_failed(e, c, _connect_reason(err), err)


cdef int _open_upstream(Core* e, Conn* c, Upstream* u) noexcept nogil:
    """Socket, source address, connect. Returns 0 (connected), EINPROGRESS, or the errno of
    the failure (c.up.fd may be open: the caller closes it)."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef int fd, err, k
    cdef bint use_src = l.n_src > 0 and u.family != AF_UNIX
    cdef int n_try = l.n_src if use_src else 1
    cdef sockaddr_storage* src = NULL
    cdef epoll_event ev
    for k in range(n_try):
        fd = socket(u.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            return fp_errno()
        c.up.fd = fd
        if u.family != AF_UNIX:
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &ONE, sizeof(int))
        if use_src:
            src = &l.src[l.src_next % <uint32_t>l.n_src]
            l.src_next += 1
            if src.ss_family == u.family:
                # Port chosen at connect() per (source, destination), not at bind() per
                # source: each source address gives the whole port range to each server.
                setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &ONE, sizeof(int))
                if bind(fd, <sockaddr*>src, sizeof(sockaddr_in) if u.family == AF_INET
                        else sizeof(sockaddr_in6)) < 0:
                    err = fp_errno()
                    close(fd)
                    c.up.fd = -1
                    if err == EADDRINUSE or err == EADDRNOTAVAIL:
                        continue
                    return err
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        ev.data.u64 = conn_tag(c, TAG_UPSTREAM)
        if epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            return fp_errno()
        if connect(fd, <sockaddr*>&u.addr, u.addr_len) == 0:
            return 0
        err = fp_errno()
        if err == EADDRNOTAVAIL and k + 1 < n_try:
            close(fd)           # this source's ports toward the server are used up: next one
            c.up.fd = -1
            continue
        return err
    return EADDRNOTAVAIL


cdef int _connect_reason(int err) noexcept nogil:
    if err == ENETUNREACH or err == EHOSTUNREACH:
        return R_UPSTREAM_UNREACHABLE
    if err == ETIMEDOUT:
        return R_UPSTREAM_TIMEOUT
    if err == EADDRNOTAVAIL or err == EADDRINUSE:
        return R_NO_SOURCE_PORT
    if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
        return R_INTERNAL
    # ECONNREFUSED, and for unix sockets ENOENT / EAGAIN (backlog full)
    return R_UPSTREAM_REFUSED


cdef void upstream_connected(Core* e, Conn* c) noexcept nogil:
    cdef int err = 0
    cdef socklen_t len = sizeof(int)
    if getsockopt(c.up.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0:
        err = fp_errno()
    if err != 0:
        upstream_failed(e, c, _connect_reason(err), err)
        return
    if _self_connected(e, c):
        upstream_failed(e, c, R_UPSTREAM_REFUSED, ECONNREFUSED)
        return
    relay_start(e, c)


cdef bint _self_connected(Core* e, Conn* c) noexcept nogil:
    """A TCP connect to a loopback port with no listener can succeed against itself (the
    kernel gave the same port as the source: simultaneous open). Then the client's CONNECT
    would come back as the broker's answer; it is a refused connect."""
    cdef Upstream* u = &e.upstreams[c.upstream]
    cdef sockaddr_storage local
    cdef socklen_t llen = sizeof(sockaddr_storage)
    if u.family != AF_INET and u.family != AF_INET6:
        return False
    if getsockname(c.up.fd, <sockaddr*>&local, &llen) < 0 or llen != u.addr_len:
        return False
    return memcmp(&local, &u.addr, llen) == 0


cdef void upstream_failed(Core* e, Conn* c, int reason, int err) noexcept nogil:
    """The connect to c's server failed before any byte went to it: count it against the
    server and try the next one of the pool (at most l.retries more), so a device does not
    see a dead broker while a healthy one exists."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef Upstream* u = &e.upstreams[c.upstream]
    cdef bint local = reason == R_INTERNAL or reason == R_NO_SOURCE_PORT
    if not local:
        u.fails += 1
        u.consec_fails += 1
    if c.up.fd >= 0:
        close(c.up.fd)          # also leaves the epoll set; no event of it is pending
    memset(&c.up, 0, sizeof(Side))
    c.up.fd = -1
    conn_release_server(e, c)
    if c.pp_len:
        c.c2u.start += c.pp_len     # the next server may want another header, or none
        c.pp_len = 0
    c.reason = reason
    c.err = err
    if local or c.routed or c.tries > l.retries:
        _give_up(e, c, 0x88)
        return
    upstream_connect(e, c)


cdef void _no_server(Core* e, Conn* c, int why) noexcept nogil:
    """No server to try: every one is down or full (why 1 / 2), or each one tried failed."""
    if c.tries:
        _give_up(e, c, 0x88)      # keeps the last connect failure as the reason
        return
    c.reason = R_NO_SERVER
    c.err = 0
    c.detail_static = b"every server is at its maxconn" if why == 2 else b"no server is up"
    _give_up(e, c, 0x89 if why == 2 else 0x88)


cdef void _give_up(Core* e, Conn* c, int rc5) noexcept nogil:
    # MQTT clients hear why (Server unavailable 0x88 / Server busy 0x89; 3.x: 0x03) rather
    # than a bare close; nothing of theirs reached a broker. c.reason, c.err say why.
    if c.mqtt_level:
        conn_refuse_rc5(e, c, rc5, c.reason)
    else:
        conn_end(e, c, c.reason, c.err)


cdef void upstream_kill_sessions(Core* e) noexcept nogil:
    """shutdown-sessions: end the sessions of every server flagged by shutdown_sessions()."""
    cdef uint8_t flagged[MAX_UPSTREAMS]
    cdef Conn* c = e.conns
    cdef Conn* nxt
    cdef int i
    fp_store(&e.kill_pending, 0)
    for i in range(e.n_upstreams):
        flagged[i] = fp_exchange8(&e.upstreams[i].kill, 0)
    while c != NULL:
        nxt = c.next
        if (c.upstream >= 0 and flagged[c.upstream]
                and (c.state == ST_RELAY or c.state == ST_CONNECTING)):
            conn_end(e, c, R_UPSTREAM_DOWN, 0)
        c = nxt


cdef int _proxy_header(Core* e, Conn* c, int mode) noexcept nogil:
    """Put the PROXY header in front of what c2u holds (the CONNECT), so both leave in one
    write: Mosquitto 2.1 drops a header split across reads. Returns 0, or -1 after ending c."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef pp2_info info
    cdef pp2_ssl_scratch scratch
    cdef sockaddr_storage local
    cdef socklen_t llen = sizeof(sockaddr_storage)
    cdef uint8_t hdr[PP_HEADER_MAX]
    cdef unsigned want
    cdef int n
    cdef Dir* d = &c.c2u
    cdef uint32_t have
    cdef char* b
    memset(&local, 0, sizeof(sockaddr_storage))
    if c.has_pp_dst:
        local = c.pp_dst        # the address the client reached, as the balancer told us
    else:
        getsockname(c.cl.fd, <sockaddr*>&local, &llen)
    pp2_info_init(&info)
    pp2_info_set_sockaddrs(&info, &c.peer, &local)
    info.max_len = l.pp_max_len
    if l.pp_crc32c:
        info.flags |= PP2_F_CRC32C
    if c.cl.ssl != NULL and mode >= PP_V2:
        # As HAProxy 2.6: ALPN whenever negotiated; the SSL TLV carries VERSION (+ CN);
        # AUTHORITY, KEY_ALG, SIG_ALG, CIPHER only when asked for.
        want = PP2_WANT_ALPN | l.pp_want
        if mode >= PP_V2_SSL:
            want |= PP2_WANT_SSL
        if mode == PP_V2_SSL_CN:
            want |= PP2_WANT_CN
        if pp2_info_set_ssl(&info, c.cl.ssl, &c.cert, SSL_get_verify_result(c.cl.ssl), want, &scratch) < 0:
            # "CN=admin, CN=thing001": which one a receiver takes is its choice, not ours.
            ERR_clear_error()
            c.detail_static = b"client certificate has more than one CN"
            c.refuse_code = 0x87
            conn_refuse_rc5(e, c, 0x87, R_DENIED)
            return -1
        ERR_clear_error()
        if info.ssl_cn.ptr != NULL and pp_find_ctl(info.ssl_cn.ptr, info.ssl_cn.len) >= 0:
            # Receivers take the CN as a user name (Mosquitto strndup()s it: a NUL would
            # cut "admin\0x" to "admin"); such a certificate is refused, not forwarded.
            c.detail_static = b"client certificate CN contains control characters"
            c.refuse_code = 0x87
            conn_refuse_rc5(e, c, 0x87, R_DENIED)
            return -1
    if mode == PP_V1:
        n = pp1_build(&info, <char*>hdr, sizeof(hdr))
    else:
        n = pp2_build(&info, hdr, sizeof(hdr))
    if n <= 0:
        c.detail_static = b"PROXY header longer than proxy_protocol_max_len"
        conn_end(e, c, R_INTERNAL, 0)
        return -1
    have = d.end - d.start
    if d.buf == NULL:
        if not dir_alloc(e, d):
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return -1
    elif have + <uint32_t>n > d.cap:
        b = <char*>malloc(have + n)
        if b == NULL:
            conn_end(e, c, R_INTERNAL, ENOMEM)
            return -1
        memcpy(b + n, d.buf + d.start, have)
        dir_release(e, d)
        d.buf = b
        d.cap = have + <uint32_t>n
        d.own_buf = 1                  # freed after use, not pooled
        d.start = 0
        d.end = have + <uint32_t>n
        memcpy(d.buf, hdr, n)
        c.pp_len = <uint16_t>n
        return 0
    memmove(d.buf + n, d.buf + d.start, have)
    memcpy(d.buf, hdr, n)
    d.start = 0
    d.end = have + <uint32_t>n
    c.pp_len = <uint16_t>n
    return 0


