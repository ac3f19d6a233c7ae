# cython: language_level=3
"""Admission: the listener's allow / deny networks and the per-address limits (live
connections, new connections per second) are checked right after accept, before any TLS
object or buffer exists, so a refused client costs a descriptor for a moment and nothing
else; the per-ClientId reconnect rate is checked after the CONNECT and its identity rules.
Conditions worth a warning are counted here and reported to Python at most once per
NOTICE_MS per kind (Core.notice), never once per event."""
from libc.stdint cimport uint8_t, uint64_t, int64_t
from system cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Core, Conn, Cidr, Listener
from admission cimport fp_adm_entry, fp_adm_get, fp_adm_take, fp_adm_addr_key
from balance cimport fp_hash64

cdef bint _v4_mapped(const uint8_t* a) noexcept nogil:
    cdef int i
    for i in range(10):
        if a[i]:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


cdef const uint8_t* _address(const sockaddr_storage* peer, int* family) noexcept nogil:
    """The address bytes of peer and its family (AF_INET for a v4-mapped IPv6 address, so
    that IPv4 networks match clients of a dual-stack listener); NULL for other families."""
    cdef const uint8_t* a
    if peer.ss_family == AF_INET:
        family[0] = AF_INET
        return <const uint8_t*>&(<sockaddr_in*>peer).sin_addr
    if peer.ss_family == AF_INET6:
        a = <const uint8_t*>&(<sockaddr_in6*>peer).sin6_addr
        if _v4_mapped(a):
            family[0] = AF_INET
            return a + 12
        family[0] = AF_INET6
        return a
    return NULL


cdef bint cidr_match(const Cidr* nets, int n, const sockaddr_storage* peer) noexcept nogil:
    """Whether peer's address is inside one of nets[0..n)."""
    cdef int family = 0, i, bits, j
    cdef const uint8_t* a = _address(peer, &family)
    cdef const Cidr* net
    if a == NULL:
        return False
    for i in range(n):
        net = &nets[i]
        if net.family != family:
            continue
        bits = net.prefix
        j = 0
        while bits >= 8 and a[j] == net.addr[j]:
            bits -= 8
            j += 1
        if bits >= 8:
            continue
        if bits == 0 or ((a[j] ^ net.addr[j]) & (0xFF << (8 - bits)) & 0xFF) == 0:
            return True
    return False


cdef int admission_address(Core* e, Conn* c) noexcept nogil:
    """R_OK, with c counted in its address's entry, or the reason to refuse c (noticed)."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef int family = 0
    cdef const uint8_t* a
    cdef uint64_t k0, k1
    cdef fp_adm_entry* ent
    if l.n_allow or l.n_deny:
        if (l.n_allow and not cidr_match(l.acl, l.n_allow, &c.peer)) or \
                (l.n_deny and cidr_match(l.acl + l.n_allow, l.n_deny, &c.peer)):
            notice(e, N_ADDRESS_DENIED)
            return R_ADDRESS_DENIED
    if l.by_addr == NULL:
        return R_OK
    a = _address(&c.peer, &family)
    if a == NULL:
        return R_OK                 # a unix-socket client: no address to count
    fp_adm_addr_key(4 if family == AF_INET else 6, a, &k0, &k1)
    ent = fp_adm_get(l.by_addr, k0, k1, e.now)
    if ent == NULL:
        notice(e, N_ADMISSION_FULL)
        return R_OK
    if l.by_addr.max_conns and ent.conns >= l.by_addr.max_conns:
        notice(e, N_TOO_MANY_CONNS)
        return R_TOO_MANY_CONNS
    if not fp_adm_take(l.by_addr, ent, e.now):
        notice(e, N_RATE_LIMITED)
        return R_RATE_LIMITED
    ent.conns += 1
    c.adm = ent
    return R_OK


cdef void admission_release(Conn* c) noexcept nogil:
    if c.adm != NULL:
        c.adm.conns -= 1
        c.adm = NULL


cdef bint admission_clientid(Core* e, Conn* c, const uint8_t* client_id, size_t n) noexcept nogil:
    """Whether this CONNECT is within its ClientId's reconnect rate (an empty ClientId, which
    the broker replaces by a fresh one, always is)."""
    cdef Listener* l = &e.listeners[c.listener]
    cdef fp_adm_entry* ent
    if l.by_clientid == NULL or n == 0:
        return True
    ent = fp_adm_get(l.by_clientid, fp_hash64(client_id, n), 0x1d, e.now)
    if ent == NULL:
        notice(e, N_ADMISSION_FULL)
        return True
    if fp_adm_take(l.by_clientid, ent, e.now):
        return True
    notice(e, N_RECONNECT_TOO_FAST)
    return False


cdef void notice(Core* e, int kind) noexcept nogil:
    e.ctr.notices[kind] += 1
    e.notice_since[kind] += 1
    if e.now >= e.notice_at[kind]:
        _report(e, kind)


cdef void notices_flush(Core* e) noexcept nogil:
    """From the sweep: report what was held back once its period is over."""
    cdef int k
    for k in range(<int>N_COUNT):
        if e.notice_since[k] and e.now >= e.notice_at[k]:
            _report(e, k)


cdef void _report(Core* e, int kind) noexcept nogil:
    cdef uint64_t n = e.notice_since[kind]
    e.notice_since[kind] = 0
    e.notice_at[kind] = e.now + NOTICE_MS
    if e.notice != NULL:
        e.notice(e, kind, n)
