# cython: language_level=3
"""Choosing a server: the balance modes over a listener's pool, with health, backups, maxconn
and the servers already tried for this session. Pure computation on the engine's structs, so
_sim.pyx drives the same code outside any loop (tests, bench_balancer)."""
from libc.string cimport memcmp
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from system cimport sockaddr_storage, sockaddr_in, sockaddr_in6, AF_INET, AF_INET6, fp_load8
from balance cimport *
from fastproxy._defs cimport *
from fastproxy._types cimport Listener, Upstream, Conn


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
            if u.backup != backup_pass or not fp_load8(&u.up):
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


cdef void note_weights(Listener* l, Upstream* ups) noexcept nogil:
    # All weights equal: the hash modes compare draws as integers (exact on every platform).
    cdef int i
    l.equal_weights = 1
    for i in range(1, l.n_pool):
        if ups[l.pool[i]].weight != ups[l.pool[0]].weight:
            l.equal_weights = 0


