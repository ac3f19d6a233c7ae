# The upstream stage: choose a server, connect (with retry), PROXY header out.
from libc.stdint cimport int64_t
from fastproxy._types cimport Core, Conn

cdef void upstream_connect(Core* e, Conn* c) noexcept nogil
cdef void upstream_connected(Core* e, Conn* c) noexcept nogil
cdef void upstream_failed(Core* e, Conn* c, int reason, int err) noexcept nogil
cdef void upstream_kill_sessions(Core* e) noexcept nogil
