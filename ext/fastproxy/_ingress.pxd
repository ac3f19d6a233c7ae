# The ingress stage: accept, PROXY header in, TLS handshake.
from libc.stdint cimport int64_t
from fastproxy._types cimport Core, Conn

cdef void ingress_accept(Core* e, int li) noexcept nogil
cdef void ingress_handshake(Core* e, Conn* c) noexcept nogil
cdef void ingress_read_proxy_header(Core* e, Conn* c) noexcept nogil
cdef void listeners_pause(Core* e, int64_t ms) noexcept nogil
cdef void listeners_resume(Core* e) noexcept nogil
cdef void listeners_close(Core* e) noexcept nogil
