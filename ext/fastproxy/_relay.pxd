# The relay stage: bytes both ways, compiled, no Python per chunk.
from libc.stdint cimport int64_t
from fastproxy._types cimport Core, Conn

cdef void relay_start(Core* e, Conn* c) noexcept nogil
cdef void relay_pump(Core* e, Conn* c) noexcept nogil
