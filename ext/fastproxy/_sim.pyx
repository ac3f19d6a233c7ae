# cython: language_level=3
"""Simulation and benchmark entry points of the balancer, kept out of the production modules:
a listener, its pool and one connection outside any engine, driven by tests and benchmarks."""
from libc.stdlib cimport calloc, free
from libc.string cimport memset, memcpy
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from system cimport fp_mono_time, sockaddr_in, AF_INET
from balance cimport fp_hash64
from fastproxy._defs cimport *
from fastproxy._types cimport Listener, Upstream, Conn
from fastproxy._balance cimport pick_server, note_weights


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
        note_weights(self.l, self.ups)

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


