# The CONNECT stage: the first packet, the built-in identity rules, the policy gate.
from libc.stdint cimport uint8_t
from libc.stdint cimport int64_t
from fastproxy._types cimport Core, Conn

cdef void connect_begin(Core* e, Conn* c) noexcept nogil
cdef void connect_read(Core* e, Conn* c) noexcept nogil
cdef void connect_policy_answer(Core* e, Conn* c, int action, int rc5, int upstream,
                                const char* new_id, Py_ssize_t new_id_len) noexcept nogil
cdef void connect_policy_timeout(Core* e, Conn* c) noexcept nogil
