# cython: language_level=3
"""The compiled engine: an epoll loop that accepts, terminates TLS, connects upstream and
relays bytes both ways, with no Python code per chunk.

Python hands it listening sockets, TLS contexts and upstream addresses, then calls run()
(which releases the GIL). Python is called back once per connection, when it ends (the
access-log record); counters live here and are read with stats().

Relay: edge-triggered epoll; each side remembers its unconsumed readiness, so a direction
whose destination is full simply stops reading (backpressure) until the destination drains.
At most one RELAY_BUF buffer (or one pipe, with splice) per direction is held, and only
while bytes are in flight: an idle connection holds neither.
"""
from libc.stdlib cimport malloc, calloc, free

cdef extern from "malloc.h" nogil:
    int malloc_trim(size_t pad)
from libc.string cimport memset, memcpy, memmove, memcmp, strlen
from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.exc cimport PyErr_CheckSignals

from system cimport *
from openssl cimport *
from conn cimport *
from mqtt cimport *
from proxyproto cimport *
from balance cimport *

import os as _os

# (name, access-log status) per EndReason, in enum order.
REASONS = (
    ("ok", 200),
    ("idle-timeout", 200),
    ("client-reset", 200),
    ("upstream-reset", 200),
    ("tls-handshake-failed", 400),
    ("tls-handshake-timeout", 400),
    ("denied", 403),
    ("internal-error", 500),
    ("upstream-refused", 502),
    ("upstream-unreachable", 502),
    ("shutdown", 503),
    ("upstream-timeout", 504),
    ("bad-connect", 400),
    ("connect-timeout", 400),
    ("no-connect", 400),
    ("bad-proxy-header", 400),
    ("untrusted-proxy", 403),
    ("no-server", 503),
    ("upstream-down", 502),
    ("no-source-port", 503),
)
# Names of the pool balance modes, in BAL_* order.
BALANCE_MODES = ("clientid", "round-robin", "least-conn", "source")
assert len(REASONS) == R_COUNT

cdef int ONE = 1


cdef inline uint64_t _tag(void* p, int tag) noexcept nogil:
    return <uint64_t><uintptr_t>p | <uint64_t>tag


cdef inline char* pool_get(BufPool* p) noexcept nogil:
    cdef char* b
    if p.n > 0:
        p.n -= 1
        b = p.bufs[p.n]
    else:
        b = <char*>malloc(RELAY_BUF)
        if b == NULL:
            return NULL
    p.live += 1
    return b


cdef inline void pool_put(BufPool* p, char* b) noexcept nogil:
    p.live -= 1
    if p.n < BUF_POOL_MAX:
        p.bufs[p.n] = b
        p.n += 1
    else:
        free(b)


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


cdef inline void _side_release_input(Side* s) noexcept nogil:
    if s.inbuf != NULL:
        pool_put(s.pool, s.inbuf)
        s.inbuf = NULL
    s.in_off = s.in_len = 0


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
            _side_release_input(s)
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
        _side_release_input(s)
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
                _side_release_input(s)
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


cdef inline void _discard_input(int fd) noexcept nogil:
    # close() with unread bytes in the receive queue sends RST, and a peer's kernel may then
    # drop what we sent last (a TLS alert, a CONNACK) before its application reads it.
    # Draining what already arrived (bounded) makes the close an orderly FIN.
    cdef char sink[4096]
    cdef int i
    for i in range(16):
        if recv(fd, sink, sizeof(sink), 0) <= 0:
            return


# ---------------------------------------------------------------------- choosing a server

cdef inline uint64_t _addr_hash(sockaddr_storage* ss) noexcept nogil:
    # The client's address without its port; an IPv4-mapped IPv6 address hashes as IPv4 so a
    # dual-stack listener and a v4 one send the same client to the same server.
    cdef const uint8_t* a
    if ss.ss_family == AF_INET:
        return fp_hash64(&(<sockaddr_in*>ss).sin_addr, 4)
    if ss.ss_family == AF_INET6:
        a = (<sockaddr_in6*>ss).sin6_addr.s6_addr
        if memcmp(a, b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
            return fp_hash64(a + 12, 4)
        return fp_hash64(a, 16)
    return 0


cdef int pick_server(Listener* l, Upstream* ups, Conn* c, int* why) noexcept nogil:
    """The pool position of the server for c: not tried yet for this session, up, under its
    maxconn; primaries first, backups only when no primary qualifies. -1 when none does, with
    *why = 1 (none up) or 2 (those up are full). The hash modes rank servers per item, so a
    retry (tried bit set) goes to the item's next-ranked server, and the item comes back to
    its first choice once that is up again."""
    cdef int k, i, best, backup_pass, mode = l.balance, n_up = 0
    cdef Upstream* u
    cdef Upstream* b
    cdef uint64_t item = 0, draw, best_draw = 0
    cdef double score, best_score = 0.0
    cdef int64_t total
    cdef uint32_t start = 0
    if mode == BAL_CLIENTID:
        if c.client_id_len == 0 or c.client_id == NULL:
            mode = BAL_LEAST_CONN
        else:
            item = fp_hash64(c.client_id, c.client_id_len)
    elif mode == BAL_SOURCE:
        item = _addr_hash(&c.peer)
    if mode == BAL_LEAST_CONN:
        start = l.rr            # ties rotate instead of piling onto the first server
        l.rr += 1
    for backup_pass in range(2):
        best = -1
        total = 0
        for k in range(l.n_pool):
            i = <int>((start + <uint32_t>k) % <uint32_t>l.n_pool)
            if c.tried & ((<uint64_t>1) << i):
                continue
            u = &ups[l.pool[i]]
            if u.backup != backup_pass or not u.up:
                continue
            n_up += 1
            if u.maxconn and u.sessions >= u.maxconn:
                continue
            if mode == BAL_CLIENTID or mode == BAL_SOURCE:
                draw = fp_draw(item, u.key)
                if l.equal_weights:
                    if best < 0 or draw > best_draw:
                        best = i
                        best_draw = draw
                else:
                    score = fp_weighted_score(draw, u.weight)
                    if best < 0 or score > best_score:
                        best = i
                        best_score = score
            elif mode == BAL_LEAST_CONN:
                if best < 0:
                    best = i
                else:
                    b = &ups[l.pool[best]]
                    if <uint64_t>u.sessions * b.weight < <uint64_t>b.sessions * u.weight:
                        best = i
            else:
                # nginx's smooth weighted round-robin: weights 5,1,1 give a,a,b,a,c,a,a
                l.wrr[i] += u.weight
                total += u.weight
                if best < 0 or l.wrr[i] > l.wrr[best]:
                    best = i
        if best >= 0:
            if mode == BAL_ROUND_ROBIN:
                l.wrr[best] -= total
            return best
    why[0] = 2 if n_up else 1
    return -1


cdef inline void _note_weights(Listener* l, Upstream* ups) noexcept nogil:
    # All weights equal: the hash modes compare draws as integers (exact on every platform).
    cdef int i
    l.equal_weights = 1
    for i in range(1, l.n_pool):
        if ups[l.pool[i]].weight != ups[l.pool[0]].weight:
            l.equal_weights = 0


cdef class _SimPool:
    """A listener, its pool and one connection outside any engine: pick_server() as the loop
    runs it, for tests, simulations and the balancer benchmark."""
    cdef Listener* l
    cdef Upstream* ups
    cdef Conn* c

    def __cinit__(self, server_keys, weights=None, up=None, backup=None, int balance=BAL_CLIENTID):
        cdef int i, n = len(server_keys)
        cdef bytes k
        if not (0 < n <= MAX_POOL):
            raise ValueError(f"a pool holds 1..{MAX_POOL} servers")
        if not (0 <= balance <= BAL_SOURCE):
            raise ValueError("unknown balance mode")
        self.l = <Listener*>calloc(1, sizeof(Listener))
        self.ups = <Upstream*>calloc(n, sizeof(Upstream))
        self.c = <Conn*>calloc(1, sizeof(Conn))
        if self.l == NULL or self.ups == NULL or self.c == NULL:
            raise MemoryError()
        self.l.balance = <uint8_t>balance
        self.l.n_pool = n
        for i in range(n):
            k = server_keys[i]
            self.l.pool[i] = i
            self.ups[i].key = fp_hash64(<const char*>k, len(k))
            self.ups[i].weight = weights[i] if weights is not None else 1
            if not (1 <= self.ups[i].weight <= 256):
                raise ValueError("weight must be 1..256")
            self.ups[i].up = up[i] if up is not None else 1
            self.ups[i].backup = backup[i] if backup is not None else 0
        _note_weights(self.l, self.ups)

    def __dealloc__(self):
        free(self.l)
        free(self.ups)
        free(self.c)


def pick_many(items, server_keys, *, weights=None, up=None, backup=None, int balance=BAL_CLIENTID):
    """Run the engine's server choice for each item (a ClientId) over a pool described by
    server_keys (the address texts), as a fresh listener would; returns the chosen positions
    (-1: none). For tests, simulations and docs: the same C code the loop runs."""
    cdef _SimPool sim = _SimPool(server_keys, weights, up, backup, balance)
    cdef int why = 0
    cdef bytes b
    out = []
    for item in items:
        b = item
        if len(b) > 65535:
            raise ValueError("a ClientId has at most 65535 bytes")
        memset(sim.c, 0, sizeof(Conn))
        sim.c.client_id = <char*>b
        sim.c.client_id_len = <uint16_t>len(b)
        out.append(pick_server(sim.l, sim.ups, sim.c, &why))
    return out


def bench_balancer(int balance, int n_servers, long n_iter, bint weighted=False):
    """Nanoseconds per server choice, measured in C over n_iter distinct ClientIds."""
    cdef char idbuf[32]
    cdef long i
    cdef int why = 0, j
    cdef double t0, t1
    cdef int sink = 0
    keys = [f"10.0.0.{i + 1}:1883".encode() for i in range(n_servers)]
    weights = [1 + (i % 3) for i in range(n_servers)] if weighted else None
    cdef _SimPool sim = _SimPool(keys, weights, None, None, balance)
    cdef Listener* l = sim.l
    cdef Upstream* ups = sim.ups
    cdef Conn* c = sim.c
    memcpy(idbuf, b"device-000000000000", 19)
    c.client_id = idbuf
    c.client_id_len = 19
    c.peer.ss_family = AF_INET
    with nogil:
        t0 = fp_mono_time()
        for i in range(n_iter):
            # a different 19-byte ClientId (and client address) each time
            for j in range(12):
                idbuf[7 + j] = <char>(48 + (i >> (j * 2)) % 4)
            (<sockaddr_in*>&c.peer).sin_addr.s_addr = <uint32_t>i
            sink += pick_server(l, ups, c, &why)
        t1 = fp_mono_time()
    return (t1 - t0) * 1e9 / n_iter if n_iter else 0.0


cdef class Engine:
    """One event loop over epoll; one per worker process (or thread)."""

    cdef int epfd
    cdef int wake_r, wake_w
    cdef Listener listeners[MAX_LISTENERS]
    cdef int n_listeners
    cdef Upstream upstreams[MAX_UPSTREAMS]
    cdef int n_upstreams
    cdef Conn* conns                  # doubly linked list of live connections
    cdef Conn* dead                   # closed during the current batch, freed after it
    cdef uint64_t n_conns
    cdef uint64_t max_conns
    cdef Counters ctr
    cdef BufPool pool
    cdef int pipe_pool[PIPE_POOL_MAX][2]
    cdef int n_pipes
    cdef int64_t now
    cdef int64_t last_sweep
    cdef int64_t accept_paused_until
    cdef int64_t last_trim
    cdef int trim_debt
    cdef bint listeners_paused
    cdef bint running
    cdef bint finished
    cdef int stop_requested
    cdef int64_t drain_ms
    cdef bint stopping
    cdef int64_t drain_deadline
    cdef bint fatal
    cdef int kill_pending             # shutdown_sessions() asked; the loop reads Upstream.kill
    cdef object on_close
    cdef bint has_on_close
    cdef object on_connect
    cdef object pending_exc
    cdef list _keep                   # Python objects whose C pointers we hold (TLS contexts)

    def __cinit__(self):
        cdef int fds[2]
        cdef epoll_event ev
        self.epfd = -1
        self.wake_r = -1
        self.wake_w = -1
        self.n_listeners = 0
        self.n_upstreams = 0
        self.conns = NULL
        self.dead = NULL
        memset(&self.pool, 0, sizeof(BufPool))
        self.n_pipes = 0
        memset(&self.ctr, 0, sizeof(Counters))
        self._keep = []
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(fp_errno(), "epoll_create1: " + _os.strerror(fp_errno()))
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            raise OSError(fp_errno(), "pipe2: " + _os.strerror(fp_errno()))
        self.wake_r = fds[0]
        self.wake_w = fds[1]
        ev.events = EPOLLIN
        ev.data.u64 = TAG_WAKE
        epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.wake_r, &ev)

    def __init__(self, *, on_close=None, on_connect=None, max_connections=100000):
        """on_close(record) is called once per connection; record is the tuple
        (listener, addr, port, protocol, reason, bytes_sent, bytes_received, start_wall,
        duration, detail, client_cn)."""
        self.on_close = on_close
        self.has_on_close = on_close is not None
        self.on_connect = on_connect
        self.max_conns = max_connections

    def __dealloc__(self):
        cdef int i
        self._close_all_conns(R_SHUTDOWN, 0)
        self._free_dead()
        for i in range(self.n_listeners):
            if self.listeners[i].fd >= 0:
                close(self.listeners[i].fd)
            free(self.listeners[i].src)
        for i in range(self.pool.n):
            free(self.pool.bufs[i])
        for i in range(self.n_pipes):
            close(self.pipe_pool[i][0])
            close(self.pipe_pool[i][1])
        if self.wake_r >= 0:
            close(self.wake_r)
            close(self.wake_w)
        if self.epfd >= 0:
            close(self.epfd)

    # ------------------------------------------------------------------ configuration (Python)

    @property
    def wakeup_fd(self):
        """Write end of the wake pipe: fit for signal.set_wakeup_fd()."""
        return self.wake_w

    def add_upstream(self, int family, str host_or_path, int port=0, *, int weight=1, bint backup=False,
                     unsigned int maxconn=0, int proxy_protocol=-1, key=None):
        """Register a broker address; returns its index. family: AF_INET, AF_INET6 or AF_UNIX.
        weight (1-256), backup, maxconn (0: no limit) and proxy_protocol (-1: the listener's,
        else 0..4 as add_listener's) matter when it is in a listener's pool. key: the text the
        balancer hashes to rank this server (default: the address text), so proxies that list
        the same servers send a ClientId to the same one."""
        cdef Upstream* u
        cdef bytes kb
        cdef sockaddr_in* a4
        cdef sockaddr_in6* a6
        cdef sockaddr_un* au
        cdef bytes b = host_or_path.encode()
        if self.n_upstreams >= MAX_UPSTREAMS:
            raise ValueError("too many upstreams")
        if not (1 <= weight <= 256):
            raise ValueError("weight must be 1..256")
        if not (-1 <= proxy_protocol <= PP_V2_SSL_CN):
            raise ValueError("proxy_protocol must be -1..4")
        if key is None:
            key = f"unix:{host_or_path}" if family == AF_UNIX else (
                f"[{host_or_path}]:{port}" if family == AF_INET6 else f"{host_or_path}:{port}")
        kb = key.encode() if isinstance(key, str) else bytes(key)
        u = &self.upstreams[self.n_upstreams]
        memset(u, 0, sizeof(Upstream))
        u.family = family
        u.key = fp_hash64(<const char*>kb, len(kb))
        u.weight = <uint16_t>weight
        u.backup = backup
        u.maxconn = maxconn
        u.pp_mode = <int8_t>proxy_protocol
        u.up = 1
        if family == AF_INET:
            a4 = <sockaddr_in*>&u.addr
            a4.sin_family = AF_INET
            a4.sin_port = htons(port)
            if inet_pton(AF_INET, b, &a4.sin_addr) != 1:
                raise ValueError(f"bad IPv4 address {host_or_path!r}")
            u.addr_len = sizeof(sockaddr_in)
        elif family == AF_INET6:
            a6 = <sockaddr_in6*>&u.addr
            a6.sin6_family = AF_INET6
            a6.sin6_port = htons(port)
            if inet_pton(AF_INET6, b, &a6.sin6_addr) != 1:
                raise ValueError(f"bad IPv6 address {host_or_path!r}")
            u.addr_len = sizeof(sockaddr_in6)
        elif family == AF_UNIX:
            au = <sockaddr_un*>&u.addr
            au.sun_family = AF_UNIX
            if len(b) >= <Py_ssize_t>sizeof(au.sun_path):
                raise ValueError(f"unix socket path too long: {host_or_path!r}")
            memcpy(au.sun_path, <char*>b, len(b))
            u.addr_len = <socklen_t>(sizeof(sa_family_t) + len(b) + 1)
        else:
            raise ValueError(f"unsupported address family {family}")
        self.n_upstreams += 1
        return self.n_upstreams - 1

    def add_listener(self, int fd, upstream, *, tls=None, double handshake_timeout=10.0,
                     double connect_timeout=5.0, double idle_timeout=60.0, bint mqtt=False,
                     bint idle_keepalive=False, bint policy=False, double mqtt_connect_timeout=5.0,
                     unsigned int max_connect_size=65536, int proxy_protocol=0,
                     bint proxy_protocol_crc32c=False, unsigned int proxy_protocol_max_len=500,
                     unsigned int proxy_protocol_want=0, bint accept_proxy_protocol=False,
                     trusted_proxies=(), unsigned int identity=0, int balance=BAL_CLIENTID,
                     int retries=3, source_addresses=()):
        """Take ownership of a bound, listening socket fd; returns the listener index.
        tls: a fastproxy._tls.TLSContext or None for plain TCP. Timeouts in seconds (0 = none).
        mqtt: read and check the CONNECT first (within mqtt_connect_timeout, at most
        max_connect_size bytes); policy: pass each CONNECT to on_connect; idle_keepalive: idle
        timeout 1.5 x the CONNECT's keepalive instead of idle_timeout. proxy_protocol: 0 none,
        1 v1, 2 v2, 3 v2 + SSL TLV, 4 v2 + SSL TLV with CN (HAProxy's send-proxy[-v2[-ssl[-cn]]]);
        proxy_protocol_want adds TLVs as HAProxy's proxy-v2-options do (PP2_WANT_AUTHORITY,
        _KEY_ALG, _SIG_ALG, _CIPHER bits). The header goes first, in the same write as the
        CONNECT, and never longer than proxy_protocol_max_len. accept_proxy_protocol: clients
        must start with a PROXY v1/v2 header (within handshake_timeout) and come from one of
        trusted_proxies, a sequence of (family, packed network address, prefix length).
        identity: ID_CLIENTID_CN | ID_USERNAME_CN, checked in C right after the CONNECT.
        upstream: an upstream index or a sequence of them (the pool); balance: BAL_* (see
        BALANCE_MODES); retries: further servers tried when a connect fails before any byte was
        relayed; source_addresses: (family, packed address) pairs bound round-robin before
        each upstream connect (IP_BIND_ADDRESS_NO_PORT: the port is picked per destination)."""
        cdef Listener* l
        cdef epoll_event ev
        cdef sockaddr_in* a4
        cdef sockaddr_in6* a6
        cdef int i, err
        cdef bytes packed_b
        if self.n_listeners >= MAX_LISTENERS:
            raise ValueError("too many listeners")
        pool = [upstream] if isinstance(upstream, int) else list(upstream)
        if not (1 <= len(pool) <= MAX_POOL):
            raise ValueError(f"a pool holds 1..{MAX_POOL} servers")
        for idx in pool:
            if not (0 <= idx < self.n_upstreams):
                raise ValueError("unknown upstream index")
        if not (0 <= balance <= BAL_SOURCE):
            raise ValueError("unknown balance mode")
        if len(source_addresses) > MAX_SOURCES:
            raise ValueError(f"at most {MAX_SOURCES} source addresses")
        sources = [(fam, bytes(packed)) for fam, packed in source_addresses]
        for fam, packed_b in sources:
            if not ((fam == AF_INET and len(packed_b) == 4) or (fam == AF_INET6 and len(packed_b) == 16)):
                raise ValueError("bad source address")
        l = &self.listeners[self.n_listeners]
        memset(l, 0, sizeof(Listener))
        l.fd = fd
        l.n_pool = len(pool)
        for i in range(l.n_pool):
            l.pool[i] = pool[i]
        _note_weights(l, self.upstreams)
        l.balance = <uint8_t>balance
        l.retries = <uint8_t>min(max(retries, 0), 255)
        l.ssl_ctx = NULL
        if tls is not None:
            l.ssl_ctx = <SSL_CTX*>PyCapsule_GetPointer(tls.capsule(), b"fastproxy.SSL_CTX")
            self._keep.append(tls)
        l.handshake_timeout_ms = <int64_t>(handshake_timeout * 1000)
        l.connect_timeout_ms = <int64_t>(connect_timeout * 1000)
        l.idle_timeout_ms = <int64_t>(idle_timeout * 1000)
        l.mqtt = mqtt or policy or idle_keepalive
        l.policy = policy
        l.identity = identity
        if identity:
            l.mqtt = 1
        l.idle_keepalive = idle_keepalive
        l.mqtt_connect_timeout_ms = <int64_t>(mqtt_connect_timeout * 1000)
        l.max_connect_size = max_connect_size if max_connect_size >= 16 else 16
        if not (0 <= proxy_protocol <= PP_V2_SSL_CN):
            raise ValueError("proxy_protocol must be 0..4")
        l.pp_mode = <uint8_t>proxy_protocol
        l.pp_crc32c = proxy_protocol_crc32c
        l.pp_want = proxy_protocol_want & (PP2_WANT_AUTHORITY | PP2_WANT_KEY_ALG | PP2_WANT_SIG_ALG | PP2_WANT_CIPHER)
        l.pp_max_len = min(proxy_protocol_max_len, <unsigned int>PP_HEADER_MAX)
        l.accept_pp = accept_proxy_protocol
        if len(trusted_proxies) > MAX_TRUSTED:
            raise ValueError(f"at most {MAX_TRUSTED} trusted proxy networks per listener")
        l.n_trusted = 0
        for fam, packed, prefix in trusted_proxies:
            if len(packed) not in (4, 16) or not (0 <= prefix <= 8 * len(packed)):
                raise ValueError("bad trusted network")
            l.trusted[l.n_trusted].family = fam
            memcpy(l.trusted[l.n_trusted].addr, <char*>packed, len(packed))
            l.trusted[l.n_trusted].prefix = prefix
            l.n_trusted += 1
        if policy and self.on_connect is None:
            raise ValueError("policy listeners need an on_connect callback")
        # Fix non-blocking here so accept4 in the loop can never block.
        import fcntl
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _os.O_NONBLOCK)
        # Allocated last: every failure above leaves nothing to free (the slot is not counted
        # until the end, and the next add_listener reuses it).
        if sources:
            l.src = <sockaddr_storage*>calloc(len(sources), sizeof(sockaddr_storage))
            if l.src == NULL:
                raise MemoryError()
            for fam, packed_b in sources:
                if fam == AF_INET:
                    a4 = <sockaddr_in*>&l.src[l.n_src]
                    a4.sin_family = AF_INET
                    memcpy(&a4.sin_addr, <char*>packed_b, 4)
                else:
                    a6 = <sockaddr_in6*>&l.src[l.n_src]
                    a6.sin6_family = AF_INET6
                    memcpy(&a6.sin6_addr, <char*>packed_b, 16)
                l.n_src += 1
        # Level-triggered: a listener left with pending connections after ACCEPT_BATCH
        # is reported again on the next wait.
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t>self.n_listeners << 3) | TAG_LISTENER
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err = fp_errno()
            free(l.src)
            l.src = NULL
            raise OSError(err, "epoll_ctl: " + _os.strerror(err))
        l.in_epoll = 1
        self.n_listeners += 1
        return self.n_listeners - 1

    def stats(self):
        """Counters of this engine (a snapshot; safe to call from another thread)."""
        d = {
            "accepted": self.ctr.accepted,
            "active": self.ctr.active,
            "closed": self.ctr.closed,
            "handshakes": self.ctr.handshakes,
            "bytes_from_clients": self.ctr.bytes_from_clients,
            "bytes_to_clients": self.ctr.bytes_to_clients,
            "accept_errors": self.ctr.accept_errors,
            "live_buffers": self.pool.live,
            "live_pipes": self.ctr.live_pipes,
            "pooled_buffers": self.pool.n,
            "pooled_pipes": self.n_pipes,
        }
        for i, (name, _) in enumerate(REASONS):
            d["closed_" + name.replace("-", "_")] = self.ctr.reasons[i]
        return d

    def upstream_stats(self):
        """Per upstream, in index order: up, sessions, total, fails, consecutive_fails, weight,
        backup, maxconn (a snapshot; safe from another thread)."""
        cdef int i
        cdef Upstream* u
        out = []
        for i in range(self.n_upstreams):
            u = &self.upstreams[i]
            out.append({"up": bool(u.up), "sessions": u.sessions, "total": u.total, "fails": u.fails,
                        "consecutive_fails": u.consec_fails, "weight": u.weight, "backup": bool(u.backup),
                        "maxconn": u.maxconn})
        return out

    def consecutive_failures(self, int index):
        """Failed connects to upstream `index` since its last good one (passive health)."""
        if not (0 <= index < self.n_upstreams):
            raise IndexError(index)
        return self.upstreams[index].consec_fails

    def set_upstream_state(self, int index, bint up):
        """Mark a server up or down (from a health checker thread): a down server gets no new
        sessions; its live ones stay unless shutdown_sessions() is called."""
        if not (0 <= index < self.n_upstreams):
            raise IndexError(index)
        self.upstreams[index].up = up
        if up:
            self.upstreams[index].consec_fails = 0

    def shutdown_sessions(self, int index):
        """Close every session relayed to (or connecting to) upstream `index`, as HAProxy's
        on-marked-down shutdown-sessions: devices reconnect and land on a healthy server.
        Thread-safe: the loop does it when it wakes."""
        cdef char b = 2
        if not (0 <= index < self.n_upstreams):
            raise IndexError(index)
        self.upstreams[index].kill = 1
        self.kill_pending = 1
        write(self.wake_w, &b, 1)

    def stop(self, double drain_timeout=0.0):
        """Stop accepting and let sessions finish for drain_timeout seconds, then close the rest.
        Thread-safe; a second call may shorten the drain (0 = now)."""
        cdef char c = 1
        self.drain_ms = <int64_t>(drain_timeout * 1000)
        self.stop_requested += 1
        write(self.wake_w, &c, 1)

    def run(self):
        """Run the loop in the calling thread until stop() completes. Releases the GIL."""
        if self.running or self.finished:
            raise RuntimeError("engine already running or finished")
        self.running = True
        try:
            with nogil:
                self._loop()
        finally:
            self.running = False
            self.finished = True
            self._close_all_conns(R_SHUTDOWN, 1)
            self._free_dead()
            self._close_listeners()
        if self.pending_exc is not None:
            exc, self.pending_exc = self.pending_exc, None
            raise exc

    # ------------------------------------------------------------------ the loop

    cdef void _loop(self) noexcept nogil:
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, timeout, tag
        cdef uint64_t data
        cdef Conn* c
        cdef char drain[64]
        self.now = fp_now_ms()
        self.last_sweep = self.now
        while not self.fatal:
            timeout = -1 if (self.n_conns == 0 and not self.listeners_paused and not self.stopping) else SWEEP_MS
            n = epoll_wait(self.epfd, events, MAX_EVENTS, timeout)
            self.now = fp_now_ms()
            if n < 0:
                if fp_errno() == EINTR:
                    self._check_signals()
                    n = 0
                else:
                    self._set_os_error(fp_errno())
                    return
            for i in range(n):
                data = events[i].data.u64
                tag = <int>(data & TAG_MASK)
                if tag == TAG_LISTENER:
                    self._accept(<int>(data >> 3))
                elif tag == TAG_WAKE:
                    while read(self.wake_r, drain, sizeof(drain)) > 0:
                        pass
                    if self.kill_pending:
                        self._kill_sessions()
                    self._check_signals()
                else:
                    c = <Conn*><uintptr_t>(data & ~(<uint64_t>TAG_MASK))
                    if c.closed:
                        continue
                    self._on_event(c, tag, events[i].events)
            self._free_dead()
            if self.stop_requested and not self.stopping:
                self.stopping = True
                self._close_listeners()
                self.drain_deadline = self.now + self.drain_ms
            if self.stopping:
                if self.now + self.drain_ms < self.drain_deadline:
                    self.drain_deadline = self.now + self.drain_ms   # a later stop() shortened it
                if self.n_conns == 0:
                    return
                if self.now >= self.drain_deadline:
                    self._close_all_conns(R_SHUTDOWN, 1)
                    self._free_dead()
                    return
            elif self.listeners_paused and self.n_conns < self.max_conns and self.now >= self.accept_paused_until:
                self._resume_listeners()
            if self.now - self.last_sweep >= SWEEP_MS:
                self.last_sweep = self.now
                self._sweep()
                self._free_dead()

    cdef void _on_event(self, Conn* c, int tag, uint32_t ev) noexcept nogil:
        cdef Side* s = &c.cl if tag == TAG_CLIENT else &c.up
        if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            s.readable = 1
            if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                s.hup = 1
        if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            s.writable = 1
        if c.state == ST_RELAY:
            self._pump(c)
        elif c.state == ST_HANDSHAKE:
            if tag == TAG_CLIENT:
                self._handshake(c)
        elif c.state == ST_MQTT_CONNECT:
            if tag == TAG_CLIENT:
                self._read_connect(c)
        elif c.state == ST_PROXY_HEADER:
            if tag == TAG_CLIENT:
                self._read_proxy_header(c)
        elif c.state == ST_LINGER:
            if tag == TAG_CLIENT:
                self._linger(c)
        elif c.state == ST_CONNECTING:
            if tag == TAG_UPSTREAM and c.up.writable:
                self._connected(c)
            elif tag == TAG_CLIENT and (ev & (EPOLLHUP | EPOLLERR)):
                self._end(c, R_CLIENT_RESET, 0)

    # ------------------------------------------------------------------ accept

    cdef void _accept(self, int li) noexcept nogil:
        cdef Listener* l = &self.listeners[li]
        cdef Conn* c
        cdef int fd, k, err
        cdef sockaddr_storage peer
        cdef socklen_t plen
        cdef epoll_event ev
        for k in range(ACCEPT_BATCH):
            if self.n_conns >= self.max_conns:
                self._pause_listeners(0)
                return
            plen = sizeof(sockaddr_storage)
            fd = accept4(l.fd, <sockaddr*>&peer, &plen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd < 0:
                err = fp_errno()
                if err == EAGAIN:
                    return
                if err == EINTR or err == ECONNABORTED:
                    continue
                self.ctr.accept_errors += 1
                if err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
                    # Out of descriptors or memory: stop accepting for a moment instead of
                    # spinning on a level-triggered listener that stays readable.
                    self._pause_listeners(ACCEPT_PAUSE_MS)
                return
            c = <Conn*>calloc(1, sizeof(Conn))
            if c == NULL:
                close(fd)
                self.ctr.accept_errors += 1
                return
            c.listener = li
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
            c.active_ms = self.now
            if peer.ss_family != AF_UNIX:
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &ONE, sizeof(int))
            # link
            c.next = self.conns
            if self.conns != NULL:
                self.conns.prev = c
            self.conns = c
            self.n_conns += 1
            self.ctr.accepted += 1
            self.ctr.active += 1
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
            ev.data.u64 = _tag(c, TAG_CLIENT)
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
                self._end(c, R_INTERNAL, fp_errno())
                continue
            # Optimistic: the first bytes (ClientHello, CONNECT) often arrived with the ACK.
            c.cl.readable = 1
            c.cl.writable = 1
            c.cl.pool = &self.pool
            if l.accept_pp:
                if not self._trusted(l, &peer):
                    self._end(c, R_UNTRUSTED_PROXY, 0)
                    continue
                c.state = ST_PROXY_HEADER
                c.deadline_ms = self.now + l.handshake_timeout_ms if l.handshake_timeout_ms > 0 else 0
                self._read_proxy_header(c)
            else:
                self._client_accepted(c)

    cdef void _client_accepted(self, Conn* c) noexcept nogil:
        """Start the client side: TLS handshake, or straight to the CONNECT / upstream."""
        cdef Listener* l = &self.listeners[c.listener]
        cdef BIO* bio
        if l.ssl_ctx == NULL:
            self._client_ready(c)
            return
        c.cl.ssl = SSL_new(l.ssl_ctx)
        bio = BIO_new(SIDE_BIO) if c.cl.ssl != NULL else NULL
        if bio == NULL:
            ERR_clear_error()
            self._end(c, R_INTERNAL, ENOMEM)
            return
        BIO_set_data(bio, &c.cl)
        SSL_set_bio(c.cl.ssl, bio, bio)
        SSL_set_accept_state(c.cl.ssl)
        c.state = ST_HANDSHAKE
        c.deadline_ms = self.now + l.handshake_timeout_ms if l.handshake_timeout_ms > 0 else 0
        self._handshake(c)

    cdef void _pause_listeners(self, int64_t ms) noexcept nogil:
        cdef int i
        for i in range(self.n_listeners):
            if self.listeners[i].in_epoll:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.listeners[i].fd, NULL)
                self.listeners[i].in_epoll = 0
        self.listeners_paused = True
        self.accept_paused_until = self.now + ms

    cdef void _resume_listeners(self) noexcept nogil:
        cdef int i
        cdef epoll_event ev
        for i in range(self.n_listeners):
            if not self.listeners[i].in_epoll and self.listeners[i].fd >= 0:
                ev.events = EPOLLIN
                ev.data.u64 = (<uint64_t>i << 3) | TAG_LISTENER
                if epoll_ctl(self.epfd, EPOLL_CTL_ADD, self.listeners[i].fd, &ev) == 0:
                    self.listeners[i].in_epoll = 1
        self.listeners_paused = False

    cdef void _close_listeners(self) noexcept nogil:
        # Closing (not just pausing) lets the kernel hand new connections to the other
        # SO_REUSEPORT workers, or refuse them when this is the last one.
        cdef int i
        for i in range(self.n_listeners):
            if self.listeners[i].fd >= 0:
                close(self.listeners[i].fd)
                self.listeners[i].fd = -1
                self.listeners[i].in_epoll = 0
        self.listeners_paused = False

    # ------------------------------------------------------------------ TLS handshake

    cdef void _handshake(self, Conn* c) noexcept nogil:
        cdef int r, err
        r = SSL_do_handshake(c.cl.ssl)
        if r == 1:
            c.handshake_done = 1
            self.ctr.handshakes += 1
            self._client_ready(c)
            return
        err = SSL_get_error(c.cl.ssl, r)
        if err == SSL_ERROR_WANT_READ:
            c.cl.readable = 0
        elif err == SSL_ERROR_WANT_WRITE:
            c.cl.writable = 0
        else:
            c.ssl_fatal = 1
            c.ssl_err = ERR_peek_error()
            c.verify_result = SSL_get_verify_result(c.cl.ssl)
            ERR_clear_error()
            self._end(c, R_HANDSHAKE_FAILED, fp_errno() if err == SSL_ERROR_SYSCALL else 0)

    # ------------------------------------------------------------------ PROXY header in

    cdef bint _trusted(self, Listener* l, sockaddr_storage* peer) noexcept nogil:
        cdef const uint8_t* a
        cdef int i, bits, j, alen
        cdef Cidr* n
        if peer.ss_family == AF_INET:
            a = <const uint8_t*>&(<sockaddr_in*>peer).sin_addr
        elif peer.ss_family == AF_INET6:
            a = <const uint8_t*>&(<sockaddr_in6*>peer).sin6_addr
        else:
            return False
        for i in range(l.n_trusted):
            n = &l.trusted[i]
            if n.family != peer.ss_family:
                continue
            bits = n.prefix
            j = 0
            while bits >= 8 and a[j] == n.addr[j]:
                bits -= 8
                j += 1
            if bits >= 8:
                continue
            if bits == 0 or ((a[j] ^ n.addr[j]) & (0xFF << (8 - bits)) & 0xFF) == 0:
                return True
        return False

    cdef void _read_proxy_header(self, Conn* c) noexcept nogil:
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
                    self._end(c, R_INTERNAL, ENOMEM)
                    return
                s.in_off = s.in_len = 0
            if s.in_len == RELAY_BUF:
                c.detail_static = b"PROXY header too long"
                self._end(c, R_BAD_PROXY_HEADER, 0)
                return
            n = recv(s.fd, s.inbuf + s.in_len, RELAY_BUF - s.in_len, 0)
            if n == 0:
                c.detail_static = b"closed before a whole PROXY header"
                self._end(c, R_BAD_PROXY_HEADER, 0)
                return
            if n < 0:
                if fp_errno() == EAGAIN:
                    s.readable = 0
                    if s.in_len == 0:
                        _side_release_input(s)
                    return
                if fp_errno() == EINTR:
                    continue
                self._end(c, R_CLIENT_RESET, fp_errno())
                return
            s.in_len += <uint32_t>n
            r = pp_parse_ex(<const uint8_t*>s.inbuf, s.in_len, PP_HEADER_MAX, &res)
            if r == PP_NEED_MORE:
                continue
            if r != PP_VALID:
                c.detail_static = res.reason
                self._end(c, R_BAD_PROXY_HEADER, 0)
                return
            s.in_off = <uint32_t>res.header_len
            if s.in_off == s.in_len:
                _side_release_input(s)
            else:
                c.c2u.no_splice = 1     # leftover input is served from inbuf, not the socket
            if res.command == PP2_CMD_PROXY and (res.fam == PP2_TCP4 or res.fam == PP2_TCP6):
                self._set_addr(&c.peer, res.fam, res.src_addr, res.src_port)
                self._set_addr(&c.pp_dst, res.fam, res.dst_addr, res.dst_port)
                c.peer_len = sizeof(sockaddr_storage)
                c.has_pp_dst = 1
            # LOCAL (the balancer's own health check) or UNSPEC: keep the real peer address.
            self._client_accepted(c)
            return

    cdef void _set_addr(self, sockaddr_storage* ss, uint8_t fam, const uint8_t* addr, uint16_t port) noexcept nogil:
        memset(ss, 0, sizeof(sockaddr_storage))
        if fam == PP2_TCP4:
            (<sockaddr_in*>ss).sin_family = AF_INET
            (<sockaddr_in*>ss).sin_port = htons(port)
            memcpy(&(<sockaddr_in*>ss).sin_addr, addr, 4)
        else:
            (<sockaddr_in6*>ss).sin6_family = AF_INET6
            (<sockaddr_in6*>ss).sin6_port = htons(port)
            memcpy(&(<sockaddr_in6*>ss).sin6_addr, addr, 16)

    # ------------------------------------------------------------------ MQTT CONNECT

    cdef void _client_ready(self, Conn* c) noexcept nogil:
        """The client side is usable (TLS done, or plain): read its CONNECT, or connect upstream."""
        cdef Listener* l = &self.listeners[c.listener]
        if not l.mqtt:
            self._connect_upstream(c)
            return
        c.state = ST_MQTT_CONNECT
        c.deadline_ms = self.now + l.mqtt_connect_timeout_ms if l.mqtt_connect_timeout_ms > 0 else 0
        self._read_connect(c)

    cdef void _read_connect(self, Conn* c) noexcept nogil:
        """Read into c2u until it holds a whole CONNECT, then check it. Nothing is sent
        upstream, and no upstream connection exists, before the CONNECT passed."""
        cdef Listener* l = &self.listeners[c.listener]
        cdef Dir* d = &c.c2u
        cdef ssize_t n
        cdef int r
        cdef mqtt_connect mc
        cdef mqtt_connect_error me
        while True:
            if d.buf == NULL and not self._dir_alloc(d):
                self._end(c, R_INTERNAL, ENOMEM)
                return
            if d.end == d.cap:
                # Bigger than a relay buffer: the parser has already checked the declared
                # length against max_connect_size, so growing to that bound is enough.
                if d.cap >= l.max_connect_size or not self._dir_grow(d, l.max_connect_size):
                    self._end(c, R_INTERNAL, ENOMEM)
                    return
            n = side_read(&c.cl, d.buf + d.end, d.cap - d.end)
            if n == IO_ERR:
                if c.cl.ssl != NULL:
                    c.ssl_fatal = 1
                    ERR_clear_error()
                self._end(c, R_NO_CONNECT, fp_errno())
                return
            if n > 0:
                d.end += <uint32_t>n
                c.bytes_in += <uint64_t>n
                self.ctr.bytes_from_clients += <uint64_t>n
                c.active_ms = self.now
            if d.end > 0 and self._connect_parse_due(c, d):
                r = mqtt_parse_connect(<const uint8_t*>d.buf, d.end, l.max_connect_size, &mc, &me)
                if r == MQTT_VALID:
                    self._connect_valid(c, &mc)
                    return
                if r == MQTT_INVALID:
                    c.detail_static = me.reason
                    self._refuse(c, me.connack_level if me.send_connack else 0, me.reason_code, R_BAD_CONNECT)
                    return
            if n == IO_EOF:
                self._end(c, R_NO_CONNECT, 0)
                return
            if n == IO_AGAIN:
                return

    cdef bint _connect_parse_due(self, Conn* c, Dir* d) noexcept nogil:
        # Re-parsing from the start on every byte of a large CONNECT sent one byte per segment
        # would be quadratic: parse the first bytes (early refusal of garbage and oversized
        # declarations), then only once the declared length has arrived.
        cdef uint32_t value = 0, i
        cdef uint8_t b
        if d.end <= 64:
            return True
        if c.connect_total == 0:
            for i in range(1, 5):
                if i >= d.end:
                    return True
                b = <uint8_t>d.buf[i]
                value |= (b & 0x7F) << (7 * (i - 1))
                if not (b & 0x80):
                    c.connect_total = 1 + i + value
                    break
            else:
                return True     # a 5-byte length: the parser says why it is invalid
        if c.connect_total > self.listeners[c.listener].max_connect_size:
            return True         # declared too large: refused now, not after buffering it
        return d.end >= c.connect_total

    cdef void _connect_valid(self, Conn* c, mqtt_connect* mc) noexcept nogil:
        cdef Listener* l = &self.listeners[c.listener]
        c.mqtt_level = mc.level
        c.keepalive = mc.keepalive
        if mc.client_id.len > 0:
            c.client_id = <char*>malloc(mc.client_id.len)
            if c.client_id != NULL:
                memcpy(c.client_id, mc.client_id.ptr, mc.client_id.len)
                c.client_id_len = <uint16_t>mc.client_id.len
        if l.idle_keepalive:
            # MQTT: the server may close after 1.5 keepalive periods without a packet; a
            # keepalive of 0 turns the mechanism off, and so the idle timeout.
            c.idle_ms = <int64_t>mc.keepalive * 1500
        cdef int rc5, code
        if l.identity:
            rc5 = self._identity_check(c, mc, l.identity)
            if rc5:
                code = mqtt_connack_code(c.mqtt_level, <uint8_t>rc5)
                c.refuse_code = <uint8_t>rc5
                self._refuse(c, c.mqtt_level if code >= 0 else 0, code, R_DENIED)
                return
        if l.policy:
            if self._ask_policy(c, mc) < 0:
                return
        self._connect_upstream(c)

    cdef int _identity_check(self, Conn* c, mqtt_connect* mc, unsigned checks) noexcept nogil:
        """The built-in identity rules, in C so they cost no Python call: ClientId and/or
        username must equal the verified client certificate's CN, byte for byte. Returns 0, or
        the MQTT 5 reason code of the refusal (c.detail_static says why)."""
        cdef unsigned char* cn = NULL
        cdef int n, rc = 0
        n = self._verified_cn(c, &cn)
        if n < 0:
            c.detail_static = b"no verified client certificate"
            return 0x87
        if (checks & ID_CLIENTID_CN) and (mc.client_id.len != <uint32_t>n
                                           or memcmp(mc.client_id.ptr, cn, n) != 0):
            c.detail_static = b"ClientId does not match certificate CN"
            rc = 0x85
        elif (checks & ID_USERNAME_CN) and (mc.username.ptr == NULL or mc.username.len != <uint32_t>n
                                             or memcmp(mc.username.ptr, cn, n) != 0):
            c.detail_static = b"username does not match certificate CN"
            rc = 0x87
        OPENSSL_free(cn)
        return rc

    cdef int _verified_cn(self, Conn* c, unsigned char** out) noexcept nogil:
        """The last subject CN of the client certificate as UTF-8 in *out (OPENSSL_free it), or
        -1 without a verified certificate or a CN. The one source of the CN for the identity
        rules and the access log (policy's PeerCertificate.cn picks the same entry)."""
        cdef X509* cert
        cdef X509_NAME* name
        cdef int i = -1, last = -1, n = -1
        # Only a verified certificate is an identity: with `verify optional` a self-signed
        # "thing001" completes the handshake but must not be logged (or trusted) as thing001.
        if c.cl.ssl == NULL or not c.handshake_done or SSL_get_verify_result(c.cl.ssl) != X509_V_OK:
            return -1
        cert = SSL_get1_peer_certificate(c.cl.ssl)
        if cert == NULL:
            return -1
        name = X509_get_subject_name(cert)
        while True:
            i = X509_NAME_get_index_by_NID(name, NID_commonName, i)
            if i < 0:
                break
            last = i
        if last >= 0:
            n = ASN1_STRING_to_UTF8(out, X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, last)))
        X509_free(cert)
        if n < 0:
            ERR_clear_error()
        return n

    cdef void _refuse(self, Conn* c, int level, int code, int reason) noexcept nogil:
        """Answer with CONNACK(code) in the client's protocol level (none when level is 0),
        then close."""
        cdef uint8_t pkt[8]
        cdef int n
        if level and code >= 0:
            n = mqtt_build_connack(<uint8_t>level, <uint8_t>code, pkt, sizeof(pkt))
            if n > 0 and side_write(&c.cl, <const char*>pkt, <size_t>n) > 0:
                c.bytes_out += <uint64_t>n
                self.ctr.bytes_to_clients += <uint64_t>n
            elif c.cl.ssl != NULL:
                ERR_clear_error()
        self._begin_linger(c, reason)

    cdef int _ask_policy(self, Conn* c, mqtt_connect* mc) noexcept with gil:
        """Python decides about this CONNECT (once per connection). Returns 0 to go on, -1 when
        the connection was refused or the callback failed (then run() re-raises)."""
        cdef Dir* d = &c.c2u
        cdef bytes pkt
        cdef bytes new_id
        cdef long n
        cdef int code
        cdef size_t rest, cap
        cdef char* b
        try:
            pkt = d.buf[d.start:d.start + mc.packet_len]
            action, rc5, upstream, new_id_obj = self.on_connect(
                (c.listener, self._peer_host(c), self._peer_port(c), pkt, self._peer_der(c),
                 self._peer_verified(c)))
            if action != 0:
                code = mqtt_connack_code(c.mqtt_level, <uint8_t>rc5)
                self._refuse(c, c.mqtt_level if code >= 0 else 0, code, R_DENIED)
                return -1
            if upstream is not None:
                if not (0 <= upstream < self.n_upstreams):
                    raise ValueError(f"policy chose unknown upstream {upstream}")
                c.upstream = upstream
                c.routed = 1
            if new_id_obj is not None:
                new_id = new_id_obj
                rest = d.end - d.start - mc.packet_len
                cap = mc.packet_len + len(new_id) + 8 + rest
                b = <char*>malloc(cap)
                if b == NULL:
                    raise MemoryError()
                n = mqtt_rewrite_client_id(<const uint8_t*>d.buf + d.start, mc.packet_len, mc,
                                           <const uint8_t*><char*>new_id, len(new_id),
                                           <uint8_t*>b, cap - rest)
                if n < 0:
                    free(b)
                    raise ValueError(f"cannot rewrite the ClientId (error {n})")
                memcpy(b + n, d.buf + d.start + mc.packet_len, rest)
                self._dir_release(d)
                d.buf = b
                d.cap = <uint32_t>cap
                d.own_buf = 1               # freed, not pooled
                d.start = 0
                d.end = <uint32_t>(n + rest)
                if c.client_id != NULL:
                    free(c.client_id)
                    c.client_id = NULL
                    c.client_id_len = 0
                if len(new_id):
                    c.client_id = <char*>malloc(len(new_id))
                    if c.client_id != NULL:
                        memcpy(c.client_id, <char*>new_id, len(new_id))
                        c.client_id_len = <uint16_t>len(new_id)
            return 0
        except Exception:
            # A decision the engine cannot apply (or a bug in the gate) refuses this client
            # only: Server unavailable, which 3.x clients get as 0x03.
            import logging
            logging.getLogger("fastproxy.policy").exception("policy decision could not be applied; refusing")
            code = mqtt_connack_code(c.mqtt_level, 0x88)
            c.detail_static = b"policy decision could not be applied"
            self._refuse(c, c.mqtt_level if code >= 0 else 0, code, R_DENIED)
            return -1
        except BaseException as e:     # KeyboardInterrupt, SystemExit: stop the loop
            self.pending_exc = e
            self.fatal = True
            self._end(c, R_INTERNAL, 0)
            return -1

    cdef object _peer_host(self, Conn* c):
        cdef char host[64]
        host[0] = 0
        if c.peer.ss_family == AF_INET:
            inet_ntop(AF_INET, &(<sockaddr_in*>&c.peer).sin_addr, host, sizeof(host))
        elif c.peer.ss_family == AF_INET6:
            inet_ntop(AF_INET6, &(<sockaddr_in6*>&c.peer).sin6_addr, host, sizeof(host))
        return host.decode()

    cdef int _peer_port(self, Conn* c):
        if c.peer.ss_family == AF_INET:
            return ntohs((<sockaddr_in*>&c.peer).sin_port)
        if c.peer.ss_family == AF_INET6:
            return ntohs((<sockaddr_in6*>&c.peer).sin6_port)
        return 0

    cdef object _peer_der(self, Conn* c):
        """The client certificate (DER) or None; decoded in Python only when policy asks."""
        cdef X509* cert
        cdef unsigned char* der = NULL
        cdef int n
        if c.cl.ssl == NULL:
            return None
        cert = SSL_get1_peer_certificate(c.cl.ssl)
        if cert == NULL:
            return None
        n = i2d_X509(cert, &der)
        X509_free(cert)
        if n <= 0:
            ERR_clear_error()
            return None
        out = der[:n]
        OPENSSL_free(der)
        return out

    cdef bint _peer_verified(self, Conn* c):
        cdef X509* cert
        if c.cl.ssl == NULL:
            return False
        cert = SSL_get1_peer_certificate(c.cl.ssl)
        if cert == NULL:
            return False
        X509_free(cert)
        return SSL_get_verify_result(c.cl.ssl) == X509_V_OK

    # ------------------------------------------------------------------ upstream connect

    cdef void _connect_upstream(self, Conn* c) noexcept nogil:
        """Choose c's server (unless a policy routed it) and connect; c2u holds what goes first
        (the CONNECT). Nothing has been written upstream until the connect completes, so a
        failure before that may go to the next server (_upstream_failed)."""
        cdef Listener* l = &self.listeners[c.listener]
        cdef Upstream* u
        cdef int pos, why = 0, err, mode
        if not c.routed:
            pos = pick_server(l, self.upstreams, c, &why)
            if pos < 0:
                self._no_server(c, why)
                return
            c.upstream = l.pool[pos]
            c.tried |= (<uint64_t>1) << pos
        u = &self.upstreams[c.upstream]
        # The header is built before the upstream is contacted: a client it cannot be built
        # for (too long, CN with control characters) never opens a broker connection.
        mode = u.pp_mode if u.pp_mode >= 0 else l.pp_mode
        if mode != PP_NONE and self._proxy_header(c, mode) < 0:
            return
        c.tries += 1
        u.sessions += 1
        u.total += 1
        c.counted = 1
        err = self._open_upstream(c, u)
        if err == 0:
            self._start_relay(c)
        elif err == EINPROGRESS:
            c.state = ST_CONNECTING
            c.deadline_ms = self.now + l.connect_timeout_ms if l.connect_timeout_ms > 0 else 0
        else:
            self._upstream_failed(c, self._connect_reason(err), err)

    cdef int _open_upstream(self, Conn* c, Upstream* u) noexcept nogil:
        """Socket, source address, connect. Returns 0 (connected), EINPROGRESS, or the errno of
        the failure (c.up.fd may be open: the caller closes it)."""
        cdef Listener* l = &self.listeners[c.listener]
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
            ev.data.u64 = _tag(c, TAG_UPSTREAM)
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
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

    cdef int _connect_reason(self, int err) noexcept nogil:
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

    cdef void _connected(self, Conn* c) noexcept nogil:
        cdef int err = 0
        cdef socklen_t len = sizeof(int)
        if getsockopt(c.up.fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0:
            err = fp_errno()
        if err != 0:
            self._upstream_failed(c, self._connect_reason(err), err)
            return
        self._start_relay(c)

    cdef void _upstream_failed(self, Conn* c, int reason, int err) noexcept nogil:
        """The connect to c's server failed before any byte went to it: count it against the
        server and try the next one of the pool (at most l.retries more), so a device does not
        see a dead broker while a healthy one exists."""
        cdef Listener* l = &self.listeners[c.listener]
        cdef Upstream* u = &self.upstreams[c.upstream]
        cdef bint local = reason == R_INTERNAL or reason == R_NO_SOURCE_PORT
        if not local:
            u.fails += 1
            u.consec_fails += 1
        if c.up.fd >= 0:
            close(c.up.fd)          # also leaves the epoll set; no event of it is pending
        memset(&c.up, 0, sizeof(Side))
        c.up.fd = -1
        self._release_server(c)
        if c.pp_len:
            c.c2u.start += c.pp_len     # the next server may want another header, or none
            c.pp_len = 0
        c.reason = reason
        c.err = err
        if local or c.routed or c.tries > l.retries:
            self._give_up(c, 0x88)
            return
        self._connect_upstream(c)

    cdef void _no_server(self, Conn* c, int why) noexcept nogil:
        """No server to try: every one is down or full (why 1 / 2), or each one tried failed."""
        if c.tries:
            self._give_up(c, 0x88)      # keeps the last connect failure as the reason
            return
        c.reason = R_NO_SERVER
        c.err = 0
        c.detail_static = b"every server is at its maxconn" if why == 2 else b"no server is up"
        self._give_up(c, 0x89 if why == 2 else 0x88)

    cdef void _give_up(self, Conn* c, int rc5) noexcept nogil:
        # MQTT clients hear why (Server unavailable 0x88 / Server busy 0x89; 3.x: 0x03) rather
        # than a bare close; nothing of theirs reached a broker. c.reason, c.err say why.
        cdef int code
        if c.mqtt_level:
            code = mqtt_connack_code(c.mqtt_level, <uint8_t>rc5)
            self._refuse(c, c.mqtt_level if code >= 0 else 0, code, c.reason)
        else:
            self._end(c, c.reason, c.err)

    cdef inline void _release_server(self, Conn* c) noexcept nogil:
        if c.counted:
            self.upstreams[c.upstream].sessions -= 1
            c.counted = 0

    cdef void _kill_sessions(self) noexcept nogil:
        """shutdown-sessions: end the sessions of every server flagged by shutdown_sessions()."""
        cdef uint8_t flagged[MAX_UPSTREAMS]
        cdef Conn* c = self.conns
        cdef Conn* nxt
        cdef int i
        self.kill_pending = 0
        for i in range(self.n_upstreams):
            flagged[i] = self.upstreams[i].kill
            self.upstreams[i].kill = 0
        while c != NULL:
            nxt = c.next
            if (c.upstream >= 0 and flagged[c.upstream]
                    and (c.state == ST_RELAY or c.state == ST_CONNECTING)):
                self._end(c, R_UPSTREAM_DOWN, 0)
            c = nxt

    cdef void _start_relay(self, Conn* c) noexcept nogil:
        if c.upstream >= 0:
            self.upstreams[c.upstream].consec_fails = 0
        c.state = ST_RELAY
        c.deadline_ms = 0
        c.active_ms = self.now
        # Optimistic readiness: bytes may already wait in the kernel (or in OpenSSL, read
        # together with the handshake's last record) and no new edge will announce them.
        c.cl.readable = 1
        c.up.readable = 1
        c.up.writable = 1
        c.use_splice = c.cl.ssl == NULL and c.up.ssl == NULL
        self._pump(c)

    cdef int _proxy_header(self, Conn* c, int mode) noexcept nogil:
        """Put the PROXY header in front of what c2u holds (the CONNECT), so both leave in one
        write: Mosquitto 2.1 drops a header split across reads. Returns 0, or -1 after ending c."""
        cdef Listener* l = &self.listeners[c.listener]
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
            pp2_info_set_ssl(&info, c.cl.ssl, want, &scratch)
            ERR_clear_error()
            if info.ssl_cn.ptr != NULL and pp_find_ctl(info.ssl_cn.ptr, info.ssl_cn.len) >= 0:
                # Receivers take the CN as a user name (Mosquitto strndup()s it: a NUL would
                # cut "admin\0x" to "admin"); such a certificate is refused, not forwarded.
                c.detail_static = b"client certificate CN contains control characters"
                self._end(c, R_DENIED, 0)
                return -1
        if mode == PP_V1:
            n = pp1_build(&info, <char*>hdr, sizeof(hdr))
        else:
            n = pp2_build(&info, hdr, sizeof(hdr))
        if n <= 0:
            c.detail_static = b"PROXY header longer than proxy_protocol_max_len"
            self._end(c, R_INTERNAL, 0)
            return -1
        have = d.end - d.start
        if d.buf == NULL:
            if not self._dir_alloc(d):
                self._end(c, R_INTERNAL, ENOMEM)
                return -1
        elif have + <uint32_t>n > d.cap:
            b = <char*>malloc(have + n)
            if b == NULL:
                self._end(c, R_INTERNAL, ENOMEM)
                return -1
            memcpy(b + n, d.buf + d.start, have)
            self._dir_release(d)
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

    # ------------------------------------------------------------------ relay

    cdef void _pump(self, Conn* c) noexcept nogil:
        cdef int r
        r = self._pump_dir(c, &c.cl, &c.up, &c.c2u, 1)
        if r < 0:
            self._end_io(c, r, 1)
            return
        r = self._pump_dir(c, &c.up, &c.cl, &c.u2c, 0)
        if r < 0:
            self._end_io(c, r, 0)
            return
        if c.up.shut_wr and c.cl.shut_wr:
            self._end(c, R_OK, 0)

    cdef void _end_io(self, Conn* c, int r, bint c2u) noexcept nogil:
        # r == -1: the source side failed; -2: the destination side; -3: out of resources.
        cdef bint client_side
        cdef int err = fp_errno()
        if r == -3:
            self._end(c, R_INTERNAL, ENOMEM)
            return
        client_side = (r == -1) == c2u
        if client_side:
            if c.cl.ssl != NULL:
                c.ssl_fatal = 1
                c.ssl_err = ERR_peek_error()
                ERR_clear_error()
            self._end(c, R_CLIENT_RESET, err)
        else:
            self._end(c, R_UPSTREAM_RESET, err)

    cdef int _pump_dir(self, Conn* c, Side* src, Side* dst, Dir* d, bint c2u) noexcept nogil:
        """Move bytes src -> dst until neither side can progress. Fills the buffer (or pipe)
        from src as far as it goes before flushing, so a burst of small MQTT packets leaves
        in one write. Returns 0, or -1 (src failed), -2 (dst failed), -3 (no buffer).
        Propagates src's EOF to dst once everything read has been flushed."""
        cdef int r
        cdef bint progressed
        if dst.shut_wr:
            return 0
        while True:
            progressed = False
            if not src.eof and side_has_input(src):
                if c.use_splice and not d.no_splice and d.end == d.start:
                    r = self._splice_in(c, src, d, c2u)
                else:
                    r = self._read_in(c, src, d, c2u)
                if r < 0:
                    return r
                progressed = r > 0
            if dst.writable:
                r = self._flush(c, dst, d, c2u)
                if r < 0:
                    return -2
                progressed = progressed or r > 0
            if not progressed:
                break
            c.active_ms = self.now
            c.tls_bufs_freed = 0
        # Idle directions give their buffer / pipe back to the pool.
        if d.buf != NULL and d.end == d.start:
            self._dir_release(d)
        if d.pipe_r >= 0 and d.pipe_bytes == 0:
            self._pipe_put(d)
        if src.eof and d.end == d.start and d.pipe_bytes == 0:
            side_shutdown_write(dst)
            # One side is done (MQTT has no use for half-open sessions): like HAProxy's
            # `timeout client-fin`, the other side gets a short grace, not the idle timeout.
            if c.idle_ms == 0 or c.idle_ms > HALF_CLOSED_TIMEOUT_MS:
                c.idle_ms = HALF_CLOSED_TIMEOUT_MS
        return 0

    cdef int _read_in(self, Conn* c, Side* src, Dir* d, bint c2u) noexcept nogil:
        """Read from src into d's buffer until it is full or src has nothing more.
        Returns 1 if bytes or EOF arrived, 0 if nothing, -1 on a read error, -3 without memory."""
        cdef ssize_t n
        cdef int got = 0
        if d.buf == NULL and not self._dir_alloc(d):
            return -3
        while d.end < d.cap:
            n = side_read(src, d.buf + d.end, d.cap - d.end)
            if n > 0:
                d.end += <uint32_t>n
                got = 1
                if c2u:
                    c.bytes_in += <uint64_t>n
                    self.ctr.bytes_from_clients += <uint64_t>n
                if not src.readable:
                    break
            elif n == IO_EOF:
                src.eof = 1
                return 1
            elif n == IO_ERR:
                return -1
            else:
                break   # IO_AGAIN: side_read consumed the readiness it was waiting on
        return got

    cdef int _splice_in(self, Conn* c, Side* src, Dir* d, bint c2u) noexcept nogil:
        """splice(2) from src's socket into d's pipe (plain on both sides).
        Returns 1 on progress (bytes, EOF, or a switch to buffered copy), 0 if nothing, -1 on error."""
        cdef ssize_t n
        cdef size_t room
        cdef int err
        if d.pipe_r < 0 and not self._pipe_get(d):
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
                self.ctr.bytes_from_clients += <uint64_t>n
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

    cdef int _flush(self, Conn* c, Side* dst, Dir* d, bint c2u) noexcept nogil:
        """One write of what d holds to dst. Returns 1 if bytes left, 0 if none could, -1 on error."""
        cdef ssize_t n
        cdef int err
        if d.pipe_bytes:
            n = splice(d.pipe_r, NULL, dst.fd, NULL, d.pipe_bytes, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                d.pipe_bytes -= <uint32_t>n
                if not c2u:
                    c.bytes_out += <uint64_t>n
                    self.ctr.bytes_to_clients += <uint64_t>n
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
                    self.ctr.bytes_to_clients += <uint64_t>n
                return 1
            if n == IO_ERR:
                return -1
        return 0

    # ------------------------------------------------------------------ pools

    cdef bint _dir_alloc(self, Dir* d) noexcept nogil:
        d.buf = pool_get(&self.pool)
        if d.buf == NULL:
            return False
        d.cap = RELAY_BUF
        d.own_buf = 0
        d.start = d.end = 0
        return True

    cdef void _dir_release(self, Dir* d) noexcept nogil:
        if d.buf != NULL:
            if d.own_buf:
                free(d.buf)     # a large CONNECT's (or a rewritten one's) own buffer
            else:
                pool_put(&self.pool, d.buf)
            d.buf = NULL
        d.cap = 0
        d.own_buf = 0
        d.start = d.end = 0

    cdef bint _dir_grow(self, Dir* d, uint32_t cap) noexcept nogil:
        cdef char* b = <char*>malloc(cap)
        if b == NULL:
            return False
        memcpy(b, d.buf + d.start, d.end - d.start)
        d.end -= d.start
        d.start = 0
        if d.own_buf:
            free(d.buf)
        else:
            pool_put(&self.pool, d.buf)
        d.buf = b
        d.cap = cap
        d.own_buf = 1
        return True

    cdef bint _pipe_get(self, Dir* d) noexcept nogil:
        cdef int fds[2]
        if self.n_pipes > 0:
            self.n_pipes -= 1
            d.pipe_r = self.pipe_pool[self.n_pipes][0]
            d.pipe_w = self.pipe_pool[self.n_pipes][1]
        else:
            if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
                return False
            d.pipe_r = fds[0]
            d.pipe_w = fds[1]
        d.pipe_bytes = 0
        self.ctr.live_pipes += 1
        return True

    cdef void _pipe_put(self, Dir* d) noexcept nogil:
        self.ctr.live_pipes -= 1
        # A pipe still holding bytes (connection cut mid-transfer) is never reused.
        if d.pipe_bytes == 0 and self.n_pipes < PIPE_POOL_MAX:
            self.pipe_pool[self.n_pipes][0] = d.pipe_r
            self.pipe_pool[self.n_pipes][1] = d.pipe_w
            self.n_pipes += 1
        else:
            close(d.pipe_r)
            close(d.pipe_w)
        d.pipe_r = d.pipe_w = -1
        d.pipe_bytes = 0

    # ------------------------------------------------------------------ timeouts, ending

    cdef void _sweep(self) noexcept nogil:
        cdef Conn* c = self.conns
        cdef Conn* nxt
        cdef int64_t idle
        cdef int freed = 0
        while c != NULL:
            nxt = c.next
            if c.state == ST_RELAY:
                idle = c.idle_ms
                if idle > 0 and self.now - c.active_ms >= idle:
                    # A session already half-closed ended normally; its peer just never closed.
                    self._end(c, R_OK if (c.cl.shut_wr or c.up.shut_wr) else R_IDLE_TIMEOUT, 0)
                elif (c.cl.ssl != NULL and not c.tls_bufs_freed
                      and self.now - c.active_ms >= TLS_IDLE_FREE_MS):
                    # Quiet sessions give OpenSSL's ~34 KiB of record buffers back; busy ones
                    # keep them instead of a malloc/free per record (SSL_MODE_RELEASE_BUFFERS).
                    if SSL_free_buffers(c.cl.ssl):
                        freed += 1
                    c.tls_bufs_freed = 1
            elif c.deadline_ms and self.now >= c.deadline_ms:
                if c.state == ST_HANDSHAKE:
                    self._end(c, R_HANDSHAKE_TIMEOUT, 0)
                elif c.state == ST_MQTT_CONNECT:
                    self._end(c, R_CONNECT_TIMEOUT, 0)
                elif c.state == ST_PROXY_HEADER:
                    c.detail_static = b"no PROXY header in time"
                    self._end(c, R_BAD_PROXY_HEADER, 0)
                elif c.state == ST_LINGER:
                    self._end(c, c.reason, 0)
                elif c.state == ST_CONNECTING:
                    self._upstream_failed(c, R_UPSTREAM_TIMEOUT, ETIMEDOUT)
            elif c.state == ST_LINGER:
                self._linger(c)
            c = nxt
        self.trim_debt += freed
        if self.trim_debt >= TRIM_AFTER_FREES and self.now - self.last_trim >= TRIM_INTERVAL_MS:
            # Record buffers freed by quiet sessions sit between long-lived allocations; glibc
            # keeps those pages resident until asked. Rate-limited: malloc_trim walks the heap.
            malloc_trim(0)
            self.trim_debt = 0
            self.last_trim = self.now

    cdef void _end(self, Conn* c, int reason, int err) noexcept nogil:
        """Close both sides, report the record to Python, and queue c for freeing."""
        if c.closed:
            return
        c.closed = 1
        if not c.reported:
            self._account(c, reason, err)
        self._release_server(c)
        if c.cl.ssl != NULL:
            if c.handshake_done and not c.ssl_fatal and not c.cl.shut_wr:
                ERR_clear_error()
                SSL_shutdown(c.cl.ssl)     # best-effort close_notify
            ERR_clear_error()
            SSL_free(c.cl.ssl)          # frees our BIO too
            c.cl.ssl = NULL
        _side_release_input(&c.cl)
        if c.cl.fd >= 0:
            _discard_input(c.cl.fd)
            close(c.cl.fd)
            c.cl.fd = -1
        if c.up.fd >= 0:
            close(c.up.fd)
            c.up.fd = -1
        self._dir_release(&c.c2u)
        self._dir_release(&c.u2c)
        if c.client_id != NULL:
            free(c.client_id)
            c.client_id = NULL
        if c.c2u.pipe_r >= 0:
            self._pipe_put(&c.c2u)
        if c.u2c.pipe_r >= 0:
            self._pipe_put(&c.u2c)
        # unlink from the live list, onto the dead list
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.conns = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        c.state = ST_CLOSED
        c.next = self.dead
        c.prev = NULL
        self.dead = c
        self.n_conns -= 1
        self.ctr.active -= 1
        self.ctr.closed += 1

    cdef void _account(self, Conn* c, int reason, int err) noexcept nogil:
        c.reported = 1
        c.reason = reason
        c.err = err
        self.ctr.reasons[reason] += 1
        if self.has_on_close:
            self._report(c)

    cdef void _begin_linger(self, Conn* c, int reason) noexcept nogil:
        """Refused client: log it now, send FIN after what we wrote (the CONNACK), and keep
        reading and discarding until its EOF. Closing with unread input would send RST, and the
        client's kernel may then drop the CONNACK before the application reads it."""
        self._account(c, reason, c.err)
        if c.closed:
            return      # the record hook failed; the loop is stopping
        if c.cl.ssl != NULL and c.handshake_done and not c.ssl_fatal:
            SSL_shutdown(c.cl.ssl)
            ERR_clear_error()
        shutdown(c.cl.fd, SHUT_WR)
        c.cl.shut_wr = 1
        self._dir_release(&c.c2u)
        _side_release_input(&c.cl)
        c.state = ST_LINGER
        c.deadline_ms = self.now + LINGER_MS
        self._linger(c)

    cdef void _linger(self, Conn* c) noexcept nogil:
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
        self._end(c, c.reason, 0)

    cdef void _free_dead(self) noexcept nogil:
        cdef Conn* c = self.dead
        cdef Conn* nxt
        while c != NULL:
            nxt = c.next
            free(c)
            c = nxt
        self.dead = NULL

    cdef void _close_all_conns(self, int reason, bint report) noexcept nogil:
        cdef Conn* c
        if not report:
            self.has_on_close = False
        while self.conns != NULL:
            c = self.conns
            self._end(c, reason, 0)

    # ------------------------------------------------------------------ Python boundary

    cdef void _report(self, Conn* c) noexcept with gil:
        # Called once per connection. An exception from the callback stops the loop and is
        # re-raised by run(): no Python exception unwinds through the C loop.
        if self.fatal:
            return
        try:
            self.on_close(self._record(c))
        except BaseException as e:
            self.pending_exc = e
            self.fatal = True

    cdef object _record(self, Conn* c):
        cdef char errbuf[160]
        if c.cl.ssl != NULL:
            protocol = SSL_get_version(c.cl.ssl).decode() if c.handshake_done else "TLS"
        else:
            protocol = "TCP"
        detail = None
        if c.ssl_err:
            ERR_error_string_n(c.ssl_err, errbuf, sizeof(errbuf))
            detail = errbuf.decode("utf-8", "replace")
            if c.verify_result != X509_V_OK:
                detail += " (certificate: " + X509_verify_cert_error_string(c.verify_result).decode() + ")"
        elif c.detail_static != NULL:
            detail = c.detail_static.decode("utf-8", "replace")
        elif c.err:
            detail = _os.strerror(c.err)
        client_id = c.client_id[:c.client_id_len].decode("utf-8", "replace") if c.client_id != NULL else None
        return (c.listener, self._peer_host(c), self._peer_port(c), protocol, c.reason, c.bytes_out, c.bytes_in,
                c.t_wall, fp_mono_time() - c.t_mono, detail, self._peer_cn(c), client_id, c.refuse_code,
                c.upstream)

    cdef object _peer_cn(self, Conn* c):
        # Read at the end of the session from the SSL object, so a connection stores nothing.
        cdef unsigned char* cn = NULL
        cdef int n = self._verified_cn(c, &cn)
        if n < 0:
            return None
        try:
            return cn[:n].decode("utf-8", "replace")
        finally:
            OPENSSL_free(cn)

    cdef void _check_signals(self) noexcept with gil:
        # Runs Python-level signal handlers (they may call stop()); KeyboardInterrupt from the
        # default SIGINT handler ends the loop and is re-raised by run().
        try:
            PyErr_CheckSignals()
        except BaseException as e:
            self.pending_exc = e
            self.fatal = True

    cdef void _set_os_error(self, int err) noexcept with gil:
        self.pending_exc = OSError(err, _os.strerror(err))
        self.fatal = True


IDENTITY_CLIENTID_CN = ID_CLIENTID_CN
IDENTITY_USERNAME_CN = ID_USERNAME_CN
