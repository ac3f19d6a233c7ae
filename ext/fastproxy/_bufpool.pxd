# Buffers and pipes lent to connections while bytes are in flight: an idle connection holds
# neither. Inline (compiled into each stage that cimports it): these run per chunk.
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.stdint cimport uint32_t
from system cimport pipe2, close, O_NONBLOCK, O_CLOEXEC
from fastproxy._defs cimport *
from fastproxy._types cimport BufPool, Dir, Core


cdef inline char* pool_get(BufPool* p) noexcept nogil:
    """A RELAY_BUF buffer (pooled or new), or NULL without memory."""
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


cdef inline bint dir_alloc(Core* e, Dir* d) noexcept nogil:
    """Give d an empty pooled buffer; False without memory."""
    d.buf = pool_get(&e.pool)
    if d.buf == NULL:
        return False
    d.cap = RELAY_BUF
    d.own_buf = 0
    d.start = d.end = 0
    return True


cdef inline void dir_release(Core* e, Dir* d) noexcept nogil:
    if d.buf != NULL:
        if d.own_buf:
            free(d.buf)     # a large CONNECT's (or a rewritten one's) own buffer
        else:
            pool_put(&e.pool, d.buf)
        d.buf = NULL
    d.cap = 0
    d.own_buf = 0
    d.start = d.end = 0


cdef inline bint dir_grow(Core* e, Dir* d, uint32_t cap) noexcept nogil:
    """Move d's bytes into an own buffer of cap bytes (cap >= what d holds); False without memory."""
    cdef char* b = <char*>malloc(cap)
    if b == NULL:
        return False
    memcpy(b, d.buf + d.start, d.end - d.start)
    d.end -= d.start
    d.start = 0
    if d.own_buf:
        free(d.buf)
    else:
        pool_put(&e.pool, d.buf)
    d.buf = b
    d.cap = cap
    d.own_buf = 1
    return True


cdef inline bint pipe_get(Core* e, Dir* d) noexcept nogil:
    """Give d a splice pipe (pooled or new); False when out of descriptors."""
    cdef int fds[2]
    if e.n_pipes > 0:
        e.n_pipes -= 1
        d.pipe_r = e.pipe_pool[e.n_pipes][0]
        d.pipe_w = e.pipe_pool[e.n_pipes][1]
    else:
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
            return False
        d.pipe_r = fds[0]
        d.pipe_w = fds[1]
    d.pipe_bytes = 0
    e.ctr.live_pipes += 1
    return True


cdef inline void pipe_put(Core* e, Dir* d) noexcept nogil:
    e.ctr.live_pipes -= 1
    # A pipe still holding bytes (connection cut mid-transfer) is never reused.
    if d.pipe_bytes == 0 and e.n_pipes < PIPE_POOL_MAX:
        e.pipe_pool[e.n_pipes][0] = d.pipe_r
        e.pipe_pool[e.n_pipes][1] = d.pipe_w
        e.n_pipes += 1
    else:
        close(d.pipe_r)
        close(d.pipe_w)
    d.pipe_r = d.pipe_w = -1
    d.pipe_bytes = 0
