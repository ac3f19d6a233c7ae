# Ending connections (shared by every stage): close, account, report, refuse and linger.
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from fastproxy._types cimport Core, Conn

cdef void conn_end(Core* e, Conn* c, int reason, int err) noexcept nogil
cdef void conn_account(Core* e, Conn* c, int reason, int err) noexcept nogil
cdef void conn_refuse(Core* e, Conn* c, int level, int code, int reason) noexcept nogil
cdef void conn_refuse_rc5(Core* e, Conn* c, int rc5, int reason) noexcept nogil
cdef void conn_linger_begin(Core* e, Conn* c, int reason) noexcept nogil
cdef void conn_linger(Core* e, Conn* c) noexcept nogil
cdef void conn_free_dead(Core* e) noexcept nogil
cdef void conn_close_all(Core* e, int reason, bint report) noexcept nogil
cdef void conn_release_server(Core* e, Conn* c) noexcept nogil


cdef inline uint64_t conn_tag(void* p, int tag) noexcept nogil:
    """epoll data for one side of a connection: the Conn* with the side in its low bits."""
    return <uint64_t><uintptr_t>p | <uint64_t>tag
