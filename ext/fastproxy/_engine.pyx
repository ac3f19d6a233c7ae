# cython: language_level=3
"""The engine: one epoll loop over the stages, and its Python boundary.

Python hands it listening sockets, TLS contexts and upstream addresses, then calls run()
(which releases the GIL). The stages (_ingress, _identity, _upstream, _relay, _conn) move
each connection along; this module owns the loop, the timers, the configuration API and the
three points where Python is involved, each once per connection and none running user code
on this thread:
  - a CONNECT that needs the policy gate is handed to on_connect(token, request), which must
    only queue it; the answer comes back through policy_answer(token, answer) from any
    thread and is applied when the loop wakes;
  - the end of a connection hands its record to on_close(record), which must only queue it;
  - a dead connection's pending policy token is forgotten;
  - a condition worth a warning (descriptors exhausted, connection cap, admission refusals)
    is handed to on_notice(kind, count) at most once per 10 s per kind.
An exception from any callback is counted (callback_errors) and logged; it never stops
the loop.
"""
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport int8_t, uint8_t, uint16_t, uint32_t, uint64_t, int64_t, uintptr_t
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.exc cimport PyErr_CheckSignals

from system cimport *
from openssl cimport *
from balance cimport fp_hash64
from proxyproto_ssl cimport PP2_WANT_AUTHORITY, PP2_WANT_KEY_ALG, PP2_WANT_SIG_ALG, PP2_WANT_CIPHER
from fastproxy._defs cimport *
from fastproxy._types cimport *
from fastproxy._transport cimport peer_cn, tls_version, verified_cn, peer_der, peer_verified
from fastproxy._conn cimport conn_end, conn_linger, conn_free_dead, conn_close_all
from fastproxy._relay cimport relay_pump
from fastproxy._upstream cimport upstream_connected, upstream_failed, upstream_kill_sessions
from fastproxy._identity cimport connect_read, connect_policy_answer, connect_policy_timeout
from fastproxy._ingress cimport (ingress_accept, ingress_handshake, ingress_read_proxy_header,
                                 listeners_resume, listeners_close)
from fastproxy._balance cimport note_weights
from fastproxy._websocket cimport ws_upgrade_read
from fastproxy._admission cimport notices_flush
from admission cimport fp_adm_table, fp_adm_init, fp_adm_free

import collections as _collections
import ipaddress as _ipaddress
import logging as _logging
import os as _os
import socket as _socket
import threading as _threading

cdef extern from "malloc.h" nogil:
    int malloc_trim(size_t pad)

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
    ("policy-timeout", 504),
    ("address-denied", 403),
    ("too-many-connections", 429),
    ("rate-limited", 429),
    ("reconnect-too-fast", 429),
    ("ws-bad-request", 400),
    ("ws-not-found", 404),
    ("ws-origin-denied", 403),
    ("ws-upgrade-required", 426),
    ("ws-protocol-error", 400),
    ("client-timeout", 200),
    ("server-timeout", 504),
    ("disconnected", 200),
)
assert len(REASONS) == R_COUNT
# Notice kinds, in enum order (on_notice's first argument).
NOTICES = ("fd-exhausted", "connection-cap", "address-denied", "too-many-connections", "rate-limited",
           "reconnect-too-fast", "admission-full")
assert len(NOTICES) == N_COUNT

# The engine's limits, for the Python mirrors in fastproxy.constants (tied by a test).
LIMITS = {"MAX_LISTENERS": MAX_LISTENERS, "MAX_UPSTREAMS": MAX_UPSTREAMS, "MAX_POOL": MAX_POOL,
          "MAX_SOURCES": MAX_SOURCES, "MAX_TRUSTED": MAX_TRUSTED, "PP_HEADER_MAX": PP_HEADER_MAX,
          "BAL_SOURCE": BAL_SOURCE, "PP_V2_SSL_CN": PP_V2_SSL_CN, "MIN_CONNECT_SIZE": MIN_CONNECT_SIZE}
# HAProxy's proxy-v2-options that add TLVs -> the builder's PP2_WANT_* bits
# (fastproxy.constants.PROXY_PROTOCOL_OPTIONS mirrors them; a test ties the two).
PP2_WANT = {"authority": PP2_WANT_AUTHORITY, "cert-key": PP2_WANT_KEY_ALG, "cert-sig": PP2_WANT_SIG_ALG,
            "ssl-cipher": PP2_WANT_CIPHER}
IDENTITY_CLIENTID_CN = ID_CLIENTID_CN
IDENTITY_USERNAME_CN = ID_USERNAME_CN

_log = _logging.getLogger("fastproxy.server")


# ---------------------------------------------------------------------- the Python boundary
# Called by the stages through Core's function pointers, with nothing held; each takes the
# GIL for the few microseconds it runs.

cdef void _report_cb(Core* e, Conn* c) noexcept nogil:
    with gil:
        (<Engine>e.owner)._report(c)


cdef int _ask_policy_cb(Core* e, Conn* c) noexcept nogil:
    with gil:
        return (<Engine>e.owner)._ask_policy(c)


cdef void _notice_cb(Core* e, int kind, uint64_t count) noexcept nogil:
    with gil:
        (<Engine>e.owner)._notice(kind, count)


cdef void _forget_cb(Core* e, Conn* c) noexcept nogil:
    with gil:
        (<Engine>e.owner)._pending.pop(c.policy_token, None)
        c.policy_token = 0


_STATES = {ST_NEW: "new", ST_HANDSHAKE: "tls-handshake", ST_CONNECTING: "connecting", ST_RELAY: "relay",
           ST_MQTT_CONNECT: "connect", ST_PROXY_HEADER: "proxy-header", ST_POLICY: "policy",
           ST_WS_UPGRADE: "ws-upgrade"}


cdef bint _id_matches(Conn* c, bytes want):
    if want is None:
        return True
    return c.client_id != NULL and c.client_id[:c.client_id_len] == want


cdef object _peer_host(Conn* c):
    cdef char host[64]
    host[0] = 0
    if c.peer.ss_family == AF_INET:
        inet_ntop(AF_INET, &(<sockaddr_in*>&c.peer).sin_addr, host, sizeof(host))
    elif c.peer.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &(<sockaddr_in6*>&c.peer).sin6_addr, host, sizeof(host))
    return host.decode()


cdef int _peer_port(Conn* c):
    if c.peer.ss_family == AF_INET:
        return ntohs((<sockaddr_in*>&c.peer).sin_port)
    if c.peer.ss_family == AF_INET6:
        return ntohs((<sockaddr_in6*>&c.peer).sin6_port)
    return 0


cdef char* _joined(items) except NULL:
    cdef bytes b = ("\n" + "\n".join(items) + "\n").encode()
    cdef char* p = <char*>malloc(len(b) + 1)
    if p == NULL:
        raise MemoryError()
    memcpy(p, <char*>b, len(b) + 1)
    return p


cdef void _set_cidr(Cidr* out, net):
    cdef bytes packed = net.network_address.packed
    out.family = AF_INET if net.version == 4 else AF_INET6
    memcpy(out.addr, <char*>packed, len(packed))
    out.prefix = net.prefixlen


cdef fp_adm_table* _new_table(uint64_t slots, rate, uint32_t max_conns) except NULL:
    """rate: None, or (new connections per second, burst)."""
    cdef fp_adm_table* t = <fp_adm_table*>calloc(1, sizeof(fp_adm_table))
    cdef double per_s = rate[0] if rate else 0
    cdef double burst = rate[1] if rate else 1
    if t == NULL:
        raise MemoryError()
    if fp_adm_init(t, slots, per_s, burst, max_conns, int.from_bytes(_os.urandom(8), "little")) < 0:
        free(t)
        raise MemoryError()
    return t


cdef void _free_table(fp_adm_table** t) noexcept:
    if t[0] != NULL:
        fp_adm_free(t[0])
        free(t[0])
        t[0] = NULL


def _ms(double seconds):
    return <int64_t>(seconds * 1000)


cdef class Engine:
    """One event loop over epoll; one per worker process (or thread)."""

    cdef Core core
    cdef int answers_ready            # atomic: policy answers wait in _answers
    cdef int stop_requested           # atomic: stop() calls so far
    cdef int64_t drain_ms
    cdef int64_t last_sweep
    cdef bint running
    cdef bint finished
    cdef bint closed
    cdef bint stopping
    cdef int64_t drain_deadline
    cdef uint64_t next_token
    cdef object on_close
    cdef object on_connect
    cdef object on_notice
    cdef object pending_exc
    cdef dict _pending                # policy token -> Conn* (as an int) awaiting an answer
    cdef object _answers              # deque of (token, answer), appended by any thread
    cdef object _calls                # deque of (function, result holder) run on the loop thread
    cdef list _keep                   # Python objects whose C pointers we hold (TLS contexts)
    cdef double policy_timeout

    def __cinit__(self):
        cdef int fds[2]
        cdef epoll_event ev
        memset(&self.core, 0, sizeof(Core))
        self.core.epfd = -1
        self.core.wake_r = -1
        self.core.wake_w = -1
        self.core.owner = <void*>self
        self._keep = []
        self._pending = {}
        self._answers = _collections.deque()
        self._calls = _collections.deque()
        self.core.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.core.epfd < 0:
            raise OSError(fp_errno(), "epoll_create1: " + _os.strerror(fp_errno()))
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            raise OSError(fp_errno(), "pipe2: " + _os.strerror(fp_errno()))
        self.core.wake_r = fds[0]
        self.core.wake_w = fds[1]
        ev.events = EPOLLIN
        ev.data.u64 = TAG_WAKE
        epoll_ctl(self.core.epfd, EPOLL_CTL_ADD, self.core.wake_r, &ev)

    def __init__(self, *, on_close=None, on_connect=None, on_notice=None, max_connections=100000,
                 double policy_timeout=5.0):
        """on_close(record) is called once per connection, on the loop thread: it must only
        queue the record (see Record in _engine.pyi). on_connect(token, request) is called for
        each CONNECT on a listener added with gate=True, on the loop thread: it must only
        queue the request; the decision is given back with policy_answer(token, answer), or
        the client is refused with reason policy-timeout after policy_timeout seconds.
        on_notice(kind, count) (kind one of NOTICES) is called on the loop thread at most
        once per 10 s per kind, with the occurrences since the last call: it must only queue."""
        self.on_close = on_close
        self.on_connect = on_connect
        self.on_notice = on_notice
        if on_notice is not None:
            self.core.notice = _notice_cb
        self.core.max_conns = max_connections
        if on_close is not None:
            self.core.report = _report_cb
        self.core.ask_policy = _ask_policy_cb
        self.core.forget = _forget_cb
        if policy_timeout <= 0:
            raise ValueError("policy_timeout must be > 0")
        self.policy_timeout = policy_timeout

    def __dealloc__(self):
        self._release()
        if self.core.wake_r >= 0:
            close(self.core.wake_r)
            close(self.core.wake_w)
            self.core.wake_r = self.core.wake_w = -1
        if self.core.epfd >= 0:
            close(self.core.epfd)
            self.core.epfd = -1

    cdef void _release(self) noexcept:
        """Close connections, listeners and pooled resources (not the wake pipe: other
        threads may still write to it)."""
        cdef int i
        self.core.report = NULL
        conn_close_all(&self.core, R_SHUTDOWN, 0)
        conn_free_dead(&self.core)
        for i in range(self.core.n_listeners):
            if self.core.listeners[i].fd >= 0:
                close(self.core.listeners[i].fd)
                self.core.listeners[i].fd = -1
            free(self.core.listeners[i].src)
            self.core.listeners[i].src = NULL
            free(self.core.listeners[i].acl)
            self.core.listeners[i].acl = NULL
            self.core.listeners[i].n_allow = self.core.listeners[i].n_deny = 0
            _free_table(&self.core.listeners[i].by_addr)
            _free_table(&self.core.listeners[i].by_clientid)
            free(self.core.listeners[i].ws_paths)
            free(self.core.listeners[i].ws_origins)
            self.core.listeners[i].ws_paths = self.core.listeners[i].ws_origins = NULL
        for i in range(self.core.pool.n):
            free(self.core.pool.bufs[i])
        self.core.pool.n = 0
        for i in range(self.core.n_pipes):
            close(self.core.pipe_pool[i][0])
            close(self.core.pipe_pool[i][1])
        self.core.n_pipes = 0

    def close(self):
        """Release the listening sockets and everything else now, for an engine that is not
        running (never started, or finished). Idempotent."""
        if self.running:
            raise RuntimeError("the engine is running: stop() it first")
        self._release()
        self.closed = True

    # ------------------------------------------------------------------ configuration (Python)

    @property
    def wakeup_fd(self):
        """Write end of the wake pipe: fit for signal.set_wakeup_fd()."""
        return self.core.wake_w
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
        if self.core.n_upstreams >= MAX_UPSTREAMS:
            raise ValueError("too many upstreams")
        # Bounds the C code relies on (config.py has already told the user about them).
        if not (1 <= weight <= 256) or not (-1 <= proxy_protocol <= PP_V2_SSL_CN):
            raise ValueError("weight 1..256 and proxy_protocol -1..4")
        if key is None:
            key = f"unix:{host_or_path}" if family == AF_UNIX else (
                f"[{host_or_path}]:{port}" if family == AF_INET6 else f"{host_or_path}:{port}")
        kb = key.encode() if isinstance(key, str) else bytes(key)
        u = &self.core.upstreams[self.core.n_upstreams]
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
        self.core.n_upstreams += 1
        return self.core.n_upstreams - 1

    def add_listener(self, int fd, lc, pool, *, tls=None, bint gate=False, unsigned int identity=0):
        """Take ownership of a bound, listening socket fd (closed here if this fails); returns
        the listener index. lc: the fastproxy.config.ListenerConfig, read here and nowhere
        else; pool: the upstream indices it balances over; tls: a fastproxy._tls.TLSContext or
        None; gate: pass each CONNECT to on_connect; identity: ID_CLIENTID_CN | ID_USERNAME_CN,
        the identity rules checked in C right after the CONNECT."""
        try:
            return self._add_listener(fd, lc, list(pool), tls, gate, identity)
        except BaseException:
            close(fd)
            raise

    cdef int _add_listener(self, int fd, lc, list pool, tls, bint gate, unsigned int identity) except -1:
        cdef Listener* l
        cdef epoll_event ev
        cdef sockaddr_in* a4
        cdef sockaddr_in6* a6
        cdef int i, err
        cdef bytes packed
        cdef Core* e = &self.core
        if e.n_listeners >= MAX_LISTENERS:
            raise ValueError(f"at most {MAX_LISTENERS} listen addresses")
        # Bounds the C arrays rely on; config.py reports them to users with file and key.
        if not (1 <= len(pool) <= MAX_POOL) or any(not (0 <= i < e.n_upstreams) for i in pool):
            raise ValueError(f"a pool holds 1..{MAX_POOL} known servers")
        sources = [_ipaddress.ip_address(a) for a in lc.upstream_source]
        trusted = [_ipaddress.ip_network(n, strict=False) for n in lc.trusted_proxies]
        if len(sources) > MAX_SOURCES or len(trusted) > MAX_TRUSTED:
            raise ValueError(f"at most {MAX_SOURCES} source addresses and {MAX_TRUSTED} trusted networks")
        allow = [_ipaddress.ip_network(n, strict=False) for n in lc.allow]
        deny = [_ipaddress.ip_network(n, strict=False) for n in lc.deny]
        if gate and self.on_connect is None:
            raise ValueError("gate listeners need an on_connect callback")
        l = &e.listeners[e.n_listeners]
        memset(l, 0, sizeof(Listener))
        l.fd = fd
        l.n_pool = len(pool)
        for i in range(l.n_pool):
            l.pool[i] = pool[i]
        note_weights(l, e.upstreams)
        l.balance = <uint8_t>lc.balance_mode
        l.retries = <uint8_t>min(max(lc.retries, 0), 255)
        if tls is not None:
            l.ssl_ctx = <SSL_CTX*>PyCapsule_GetPointer(tls.capsule(), b"fastproxy.SSL_CTX")
            self._keep.append(tls)
        l.handshake_timeout_ms = _ms(lc.handshake_timeout)
        l.connect_timeout_ms = _ms(lc.upstream_connect_timeout)
        l.idle_timeout_ms = _ms(lc.idle_timeout)
        l.client_timeout_ms = _ms(lc.client_timeout)
        l.server_timeout_ms = _ms(lc.server_timeout)
        l.mqtt_connect_timeout_ms = _ms(lc.connect_timeout)
        l.policy_timeout_ms = _ms(self.policy_timeout)
        l.policy = gate
        l.identity = identity
        l.idle_keepalive = lc.idle_keepalive
        l.mqtt = lc.mqtt or gate or lc.idle_keepalive or identity != 0
        l.max_connect_size = max(lc.max_connect_size, MIN_CONNECT_SIZE)
        l.pp_mode = <uint8_t>lc.proxy_protocol_mode
        l.pp_crc32c = lc.proxy_protocol_crc32c
        l.pp_want = lc.proxy_protocol_want & (PP2_WANT_AUTHORITY | PP2_WANT_KEY_ALG | PP2_WANT_SIG_ALG | PP2_WANT_CIPHER)
        l.pp_max_len = min(lc.proxy_protocol_max_len, <unsigned int>PP_HEADER_MAX)
        l.accept_pp = lc.accept_proxy_protocol
        for net in trusted:
            _set_cidr(&l.trusted[l.n_trusted], net)
            l.n_trusted += 1
        # Non-blocking here so accept4 in the loop can never block.
        _os.set_blocking(fd, False)
        # Allocated last: every failure above leaves nothing to free (the slot is not counted
        # until the end, and the next add_listener reuses it).
        if sources:
            l.src = <sockaddr_storage*>calloc(len(sources), sizeof(sockaddr_storage))
            if l.src == NULL:
                raise MemoryError()
            for a in sources:
                packed = a.packed
                if a.version == 4:
                    a4 = <sockaddr_in*>&l.src[l.n_src]
                    a4.sin_family = AF_INET
                    memcpy(&a4.sin_addr, <char*>packed, 4)
                else:
                    a6 = <sockaddr_in6*>&l.src[l.n_src]
                    a6.sin6_family = AF_INET6
                    memcpy(&a6.sin6_addr, <char*>packed, 16)
                l.n_src += 1
        try:
            self._admission(l, lc, allow, deny)
            self._websocket(l, lc)
        except BaseException:
            self._unmake_listener(l)
            raise
        # Level-triggered: a listener left with pending connections after ACCEPT_BATCH
        # is reported again on the next wait.
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t>e.n_listeners << 3) | TAG_LISTENER
        if epoll_ctl(e.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            err = fp_errno()
            self._unmake_listener(l)
            raise OSError(err, "epoll_ctl: " + _os.strerror(err))
        l.in_epoll = 1
        e.n_listeners += 1
        return e.n_listeners - 1

    cdef int _admission(self, Listener* l, lc, list allow, list deny) except -1:
        """The listener's allow / deny networks and admission tables (sized to twice the
        connection cap, so that every live client address fits)."""
        cdef int i
        if allow or deny:
            l.acl = <Cidr*>calloc(len(allow) + len(deny), sizeof(Cidr))
            if l.acl == NULL:
                raise MemoryError()
            for i, net in enumerate(allow + deny):
                _set_cidr(&l.acl[i], net)
            l.n_allow, l.n_deny = len(allow), len(deny)
        rate = lc.conn_rate_per_ip
        if lc.max_conns_per_ip or rate:
            l.by_addr = _new_table(2 * self.core.max_conns, rate, lc.max_conns_per_ip)
        if lc.reconnect_rate_per_clientid:
            l.by_clientid = _new_table(2 * self.core.max_conns, lc.reconnect_rate_per_clientid, 0)
        return 0

    cdef int _websocket(self, Listener* l, lc) except -1:
        """A WebSocket listener's paths and origins, as "\\nA\\nB\\n" for a memmem()."""
        if not lc.websocket:
            return 0
        l.websocket = 1
        l.ws_passthrough = lc.ws_passthrough
        l.ws_max_frame = min(lc.ws_max_frame, 0xFFFFFFFF)
        l.ws_paths = _joined(lc.websocket)
        if lc.ws_origins:
            l.ws_origins = _joined([o.lower() for o in lc.ws_origins])
        return 0

    cdef void _unmake_listener(self, Listener* l) noexcept:
        free(l.src)
        l.src = NULL
        free(l.acl)
        l.acl = NULL
        l.n_allow = l.n_deny = 0
        _free_table(&l.by_addr)
        _free_table(&l.by_clientid)
        free(l.ws_paths)
        free(l.ws_origins)
        l.ws_paths = l.ws_origins = NULL

    def _on_loop(self, fn, double timeout):
        """Run fn() on the loop thread (between two epoll batches, with the GIL) and return its
        result; directly when the loop is not running. Raises TimeoutError after timeout."""
        cdef char c = 4
        if not self.running:
            return fn()
        holder = {"done": _threading.Event()}
        self._calls.append((fn, holder))
        fp_store(&self.answers_ready, 1)
        write(self.core.wake_w, &c, 1)
        if not holder["done"].wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if "error" in holder:
            raise holder["error"]
        return holder["result"]

    def sessions(self, int limit=10000, client_id=None, double timeout=2.0):
        """The live sessions, at most limit (ClientId equal to client_id when given): tuples
        (listener, addr, port, state, client_id, cn, upstream, age_s, idle_s, bytes_in,
        bytes_out, websocket). Safe from any thread (read on the loop thread)."""
        cdef bytes want = client_id.encode() if isinstance(client_id, str) else client_id
        return self._on_loop(lambda: self._sessions(limit, want), timeout)

    cdef list _sessions(self, int limit, bytes want):
        cdef Conn* c = self.core.conns
        cdef double now = fp_mono_time()
        cdef int64_t now_ms = fp_now_ms()
        out = []
        while c != NULL and len(out) < limit:
            if c.state != ST_CLOSED and c.state != ST_LINGER and _id_matches(c, want):
                out.append((c.listener, _peer_host(c), _peer_port(c), _STATES.get(c.state, "?"),
                            c.client_id[:c.client_id_len].decode("utf-8", "replace") if c.client_id != NULL else None,
                            peer_cn(c), c.upstream, now - c.t_mono, (now_ms - c.active_ms) / 1000.0,
                            c.bytes_in, c.bytes_out, c.ws != NULL))
            c = c.next
        return out

    def disconnect(self, client_id=None, addr=None, double timeout=2.0):
        """End the sessions with this ClientId (str or bytes) and/or this (host, port) client
        address, logged as `disconnected`; returns how many. Safe from any thread."""
        if client_id is None and addr is None:
            raise ValueError("disconnect needs a ClientId or an address")
        cdef bytes want = client_id.encode() if isinstance(client_id, str) else client_id
        return self._on_loop(lambda: self._disconnect(want, addr), timeout)

    cdef int _disconnect(self, bytes want, addr):
        cdef Conn* c = self.core.conns
        cdef Conn* nxt
        cdef int n = 0
        while c != NULL:
            nxt = c.next
            if (c.state != ST_CLOSED and c.state != ST_LINGER and (want is None or _id_matches(c, want))
                    and (addr is None or (_peer_host(c), _peer_port(c)) == tuple(addr))):
                conn_end(&self.core, c, R_DISCONNECTED, 0)
                n += 1
            c = nxt
        return n

    def stats(self):
        """Counters of this engine (a snapshot; safe to call from another thread)."""
        d = {
            "accepted": self.core.ctr.accepted,
            "active": self.core.ctr.active,
            "closed": self.core.ctr.closed,
            "handshakes": self.core.ctr.handshakes,
            "bytes_from_clients": self.core.ctr.bytes_from_clients,
            "bytes_to_clients": self.core.ctr.bytes_to_clients,
            "accept_errors": self.core.ctr.accept_errors,
            "live_buffers": self.core.pool.live,
            "live_pipes": self.core.ctr.live_pipes,
            "pooled_buffers": self.core.pool.n,
            "pooled_pipes": self.core.n_pipes,
            "callback_errors": self.core.ctr.callback_errors,
            "policy_pending": len(self._pending),
        }
        for i, name in enumerate(NOTICES):
            d["notice_" + name.replace("-", "_")] = self.core.ctr.notices[i]
        for i, (name, _) in enumerate(REASONS):
            d["closed_" + name.replace("-", "_")] = self.core.ctr.reasons[i]
        return d

    def upstream_stats(self):
        """Per upstream, in index order: up, sessions, total, fails, consecutive_fails, weight,
        backup, maxconn (a snapshot; safe from another thread)."""
        cdef int i
        cdef Upstream* u
        out = []
        for i in range(self.core.n_upstreams):
            u = &self.core.upstreams[i]
            out.append({"up": bool(fp_load8(&u.up)), "sessions": u.sessions, "total": u.total, "fails": u.fails,
                        "consecutive_fails": u.consec_fails, "weight": u.weight, "backup": bool(u.backup),
                        "maxconn": u.maxconn})
        return out

    def consecutive_failures(self, int index):
        """Failed connects to upstream `index` since its last good one (passive health)."""
        if not (0 <= index < self.core.n_upstreams):
            raise IndexError(index)
        return self.core.upstreams[index].consec_fails

    def set_upstream_state(self, int index, bint up):
        """Mark a server up or down (from a health checker thread): a down server gets no new
        sessions; its live ones stay unless shutdown_sessions() is called."""
        if not (0 <= index < self.core.n_upstreams):
            raise IndexError(index)
        if up:
            self.core.upstreams[index].consec_fails = 0
        fp_store8(&self.core.upstreams[index].up, up)

    def shutdown_sessions(self, int index):
        """Close every session relayed to (or connecting to) upstream `index`, as HAProxy's
        on-marked-down shutdown-sessions: devices reconnect and land on a healthy server.
        Thread-safe: the loop does it when it wakes."""
        cdef char b = 2
        if not (0 <= index < self.core.n_upstreams):
            raise IndexError(index)
        fp_store8(&self.core.upstreams[index].kill, 1)
        fp_store(&self.core.kill_pending, 1)
        write(self.core.wake_w, &b, 1)

    def stop(self, double drain_timeout=0.0):
        """Stop accepting and let sessions finish for drain_timeout seconds, then close the rest.
        Thread-safe; a second call may shorten the drain (0 = now)."""
        cdef char c = 1
        self.drain_ms = <int64_t>(drain_timeout * 1000)
        fp_add(&self.stop_requested, 1)
        write(self.core.wake_w, &c, 1)

    def policy_answer(self, token, answer):
        """Give the policy gate's answer for a CONNECT (from any thread). answer is
        (action, reason_code_v5, upstream_index | None, new_client_id_bytes | None): action 0
        lets the client through. An answer for a connection that has ended is dropped."""
        cdef char c = 3
        self._answers.append((token, answer))
        fp_store(&self.answers_ready, 1)
        write(self.core.wake_w, &c, 1)

    def run(self):
        """Run the loop in the calling thread until stop() completes. Releases the GIL."""
        if self.running or self.finished or self.closed:
            raise RuntimeError("engine already running or finished")
        self.running = True
        try:
            with nogil:
                self._loop()
        finally:
            self.running = False
            self.finished = True
            conn_close_all(&self.core, R_SHUTDOWN, 1)
            conn_free_dead(&self.core)
            listeners_close(&self.core)
        if self.pending_exc is not None:
            exc, self.pending_exc = self.pending_exc, None
            raise exc

    # ------------------------------------------------------------------ the loop

    cdef void _loop(self) noexcept nogil:
        cdef Core* e = &self.core
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, timeout, tag
        cdef uint64_t data
        cdef Conn* c
        cdef char drain[64]
        e.now = fp_now_ms()
        self.last_sweep = e.now
        while not e.fatal:
            # Sleep without a timer only when no timer has work: no connection, no paused
            # listener, no memory to give back after a flood, no warning held back.
            timeout = -1 if (e.n_conns == 0 and not e.listeners_paused and not self.stopping
                             and e.trim_debt < TRIM_AFTER_FREES and e.peak_conns == 0
                             and not _notices_pending(e)) else SWEEP_MS
            n = epoll_wait(e.epfd, events, MAX_EVENTS, timeout)
            e.now = fp_now_ms()
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
                    ingress_accept(e, <int>(data >> 3))
                elif tag == TAG_WAKE:
                    while read(e.wake_r, drain, sizeof(drain)) > 0:
                        pass
                    if fp_load(&e.kill_pending):
                        upstream_kill_sessions(e)
                    if fp_exchange(&self.answers_ready, 0):
                        self._apply_answers()
                    self._check_signals()
                else:
                    c = <Conn*><uintptr_t>(data & ~(<uint64_t>TAG_MASK))
                    if c.closed:
                        continue
                    _on_event(e, c, tag, events[i].events)
            conn_free_dead(e)
            if fp_load(&self.stop_requested) and not self.stopping:
                self.stopping = True
                listeners_close(e)
                self.drain_deadline = e.now + self.drain_ms
            if self.stopping:
                if e.now + self.drain_ms < self.drain_deadline:
                    self.drain_deadline = e.now + self.drain_ms   # a later stop() shortened it
                if e.n_conns == 0:
                    return
                if e.now >= self.drain_deadline:
                    conn_close_all(e, R_SHUTDOWN, 1)
                    conn_free_dead(e)
                    return
            elif e.listeners_paused and e.n_conns < e.max_conns and e.now >= e.accept_paused_until:
                listeners_resume(e)
            if e.now - self.last_sweep >= SWEEP_MS:
                self.last_sweep = e.now
                _sweep(e)
                conn_free_dead(e)

    # ------------------------------------------------------------------ Python boundary

    cdef int _ask_policy(self, Conn* c) except? -2:
        """Queue c's CONNECT for the gate (on_connect must not block). Returns 0 (waiting), or
        -1 when the request could not be handed over (the caller refuses c)."""
        cdef Dir* d = &c.c2u
        cdef uint64_t token
        try:
            self.next_token += 1
            token = self.next_token
            pkt = d.buf[d.start:d.start + c.connect_total]
            request = (c.listener, _peer_host(c), _peer_port(c), pkt, peer_der(c), peer_verified(c))
            self._pending[token] = <uintptr_t>c
            c.policy_token = token
            self.on_connect(token, request)
            return 0
        except BaseException:
            self._pending.pop(token, None)
            c.policy_token = 0
            self.core.ctr.callback_errors += 1
            _log.exception("policy gate: the request could not be queued; refusing the client")
            return -1

    cdef void _apply_answers(self) noexcept with gil:
        cdef Conn* c
        cdef const char* new_id
        cdef Py_ssize_t new_len
        cdef bytes nb
        cdef int action, rc5, upstream
        while self._calls:
            fn, holder = self._calls.popleft()
            try:
                holder["result"] = fn()
            except BaseException as exc:
                holder["error"] = exc
            holder["done"].set()
        while self._answers:
            token, answer = self._answers.popleft()
            ptr = self._pending.pop(token, None)
            if ptr is None:
                continue        # the connection ended (timeout, reset) before the answer
            c = <Conn*><uintptr_t>ptr
            c.policy_token = 0
            try:
                action, rc5, up, new = answer
                upstream = -1 if up is None else up
                nb = None if new is None else bytes(new)
            except Exception:
                self.core.ctr.callback_errors += 1
                _log.exception("policy gate: malformed answer %r; refusing the client", answer)
                action, rc5, upstream, nb = 1, 0x88, -1, None
            new_id = NULL
            new_len = 0
            if nb is not None:
                new_id = <const char*>nb
                new_len = len(nb)
            self.core.ctr.policy_answers += 1
            # Ends c, or moves it on; a c that ends is freed after this epoll batch (the loop's
            # conn_free_dead), never here: later events of the batch may still name it.
            connect_policy_answer(&self.core, c, action, rc5, upstream, new_id, new_len)

    cdef void _notice(self, int kind, uint64_t count) noexcept:
        try:
            self.on_notice(NOTICES[kind], count)
        except BaseException:
            self.core.ctr.callback_errors += 1
            _log.exception("on_notice callback failed")

    cdef void _report(self, Conn* c) noexcept:
        # Once per connection. The callback only queues; should it raise anyway, the error is
        # counted and logged, and the loop goes on.
        try:
            self.on_close(self._record(c))
        except BaseException:
            self.core.ctr.callback_errors += 1
            _log.exception("on_close callback failed (record dropped)")

    cdef object _record(self, Conn* c):
        cdef char errbuf[160]
        protocol = tls_version(c)
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
        cipher = None
        if c.cl.ssl != NULL and c.handshake_done:
            cipher = SSL_get_cipher_name(c.cl.ssl).decode()
        tls_reason = None
        if c.ssl_err:
            r = ERR_reason_error_string(c.ssl_err)
            tls_reason = r.decode("utf-8", "replace") if r != NULL else "unknown"
        username = c.username[:c.username_len].decode("utf-8", "replace") if c.username != NULL else None
        return (c.listener, _peer_host(c), _peer_port(c), protocol, c.reason, c.bytes_out, c.bytes_in,
                c.t_wall, fp_mono_time() - c.t_mono, detail, peer_cn(c), client_id, c.refuse_code,
                c.upstream, cipher, tls_reason, c.ws != NULL, username)

    cdef void _check_signals(self) noexcept with gil:
        # Runs Python-level signal handlers (they may call stop()); KeyboardInterrupt from the
        # default SIGINT handler ends the loop and is re-raised by run().
        try:
            PyErr_CheckSignals()
        except BaseException as exc:
            self.pending_exc = exc
            self.core.fatal = 1

    cdef void _set_os_error(self, int err) noexcept with gil:
        self.pending_exc = OSError(err, _os.strerror(err))
        self.core.fatal = 1


# ---------------------------------------------------------------------- timers and dispatch

cdef bint _notices_pending(Core* e) noexcept nogil:
    cdef int k
    for k in range(<int>N_COUNT):
        if e.notice_since[k]:
            return True
    return False


cdef void _sweep(Core* e) noexcept nogil:
    """Timeouts of every phase, and the release of idle sessions' TLS buffers."""
    cdef Conn* c = e.conns
    cdef Conn* nxt
    cdef int64_t idle
    cdef Listener* l
    cdef int freed = 0
    while c != NULL:
        nxt = c.next
        if c.state == ST_RELAY:
            idle = c.idle_ms
            l = &e.listeners[c.listener]
            if idle > 0 and e.now - c.active_ms >= idle:
                # A session already half-closed ended normally; its peer just never closed.
                conn_end(e, c, R_OK if (c.cl.shut_wr or c.up.shut_wr) else R_IDLE_TIMEOUT, 0)
            elif l.client_timeout_ms and e.now - c.cl_active_ms >= l.client_timeout_ms:
                conn_end(e, c, R_CLIENT_TIMEOUT, 0)
            elif l.server_timeout_ms and e.now - c.up_active_ms >= l.server_timeout_ms:
                conn_end(e, c, R_SERVER_TIMEOUT, 0)
            elif (c.cl.ssl != NULL and not c.tls_bufs_freed
                  and e.now - c.active_ms >= TLS_IDLE_FREE_MS):
                # Quiet sessions give OpenSSL's ~34 KiB of record buffers back; busy ones
                # keep them instead of a malloc/free per record (SSL_MODE_RELEASE_BUFFERS).
                # AWS-LC has given its buffers back already; either way the session's
                # handshake left freed memory between long-lived allocations: trim debt.
                SSL_free_buffers(c.cl.ssl)
                freed += 1
                c.tls_bufs_freed = 1
        elif c.deadline_ms and e.now >= c.deadline_ms:
            if c.state == ST_HANDSHAKE:
                conn_end(e, c, R_HANDSHAKE_TIMEOUT, 0)
            elif c.state == ST_MQTT_CONNECT:
                conn_end(e, c, R_CONNECT_TIMEOUT, 0)
            elif c.state == ST_WS_UPGRADE:
                c.detail_static = b"no WebSocket upgrade request in time"
                conn_end(e, c, R_WS_BAD_REQUEST, 0)
            elif c.state == ST_PROXY_HEADER:
                c.detail_static = b"no PROXY header in time"
                conn_end(e, c, R_BAD_PROXY_HEADER, 0)
            elif c.state == ST_LINGER:
                conn_end(e, c, c.reason, 0)
            elif c.state == ST_CONNECTING:
                upstream_failed(e, c, R_UPSTREAM_TIMEOUT, ETIMEDOUT)
            elif c.state == ST_POLICY:
                connect_policy_timeout(e, c)
        elif c.state == ST_LINGER:
            conn_linger(e, c)
        c = nxt
    notices_flush(e)
    if e.peak_conns > e.n_conns + TRIM_AFTER_FLOOD:
        # A flood has ended (silent sockets, a reconnect storm): give its memory back.
        e.trim_debt += TRIM_AFTER_FREES
        e.peak_conns = e.n_conns
    elif e.n_conns == 0:
        e.peak_conns = 0
    e.trim_debt += freed
    if e.trim_debt >= TRIM_AFTER_FREES and e.now - e.last_trim >= TRIM_INTERVAL_MS:
        # Record buffers freed by quiet sessions sit between long-lived allocations; glibc
        # keeps those pages resident until asked. Rate-limited: malloc_trim walks the heap.
        malloc_trim(0)
        e.trim_debt = 0
        e.last_trim = e.now



cdef void _on_event(Core* e, Conn* c, int tag, uint32_t ev) noexcept nogil:
    cdef Side* s = &c.cl if tag == TAG_CLIENT else &c.up
    if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        s.readable = 1
        if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
            s.hup = 1
    if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        s.writable = 1
    if c.state == ST_RELAY:
        relay_pump(e, c)
    elif c.state == ST_HANDSHAKE:
        if tag == TAG_CLIENT:
            ingress_handshake(e, c)
    elif c.state == ST_MQTT_CONNECT:
        if tag == TAG_CLIENT:
            connect_read(e, c)
    elif c.state == ST_PROXY_HEADER:
        if tag == TAG_CLIENT:
            ingress_read_proxy_header(e, c)
    elif c.state == ST_LINGER:
        if tag == TAG_CLIENT:
            conn_linger(e, c)
    elif c.state == ST_CONNECTING:
        if tag == TAG_UPSTREAM and c.up.writable:
            upstream_connected(e, c)
        elif tag == TAG_CLIENT and (ev & (EPOLLHUP | EPOLLERR)):
            conn_end(e, c, R_CLIENT_RESET, 0)
    elif c.state == ST_WS_UPGRADE:
        if tag == TAG_CLIENT:
            ws_upgrade_read(e, c)
    elif c.state == ST_POLICY:
        # The client is not read while its CONNECT is being decided; only its loss matters.
        if tag == TAG_CLIENT and (ev & (EPOLLHUP | EPOLLERR)):
            conn_end(e, c, R_CLIENT_RESET, 0)

