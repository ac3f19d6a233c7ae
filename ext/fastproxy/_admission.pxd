# The admission stage: who may open a session, checked before any TLS work (networks, per
# client address) and after the CONNECT (per ClientId); and the rate-limited warnings.
from libc.stdint cimport uint8_t, int64_t
from system cimport sockaddr_storage
from fastproxy._types cimport Core, Conn, Cidr

cdef bint cidr_match(const Cidr* nets, int n, const sockaddr_storage* peer) noexcept nogil
cdef int admission_address(Core* e, Conn* c) noexcept nogil
cdef void admission_release(Conn* c) noexcept nogil
cdef bint admission_clientid(Core* e, Conn* c, const uint8_t* client_id, size_t n) noexcept nogil
cdef void notice(Core* e, int kind) noexcept nogil
cdef void notices_flush(Core* e) noexcept nogil
