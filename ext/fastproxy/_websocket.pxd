# The WebSocket upgrade stage: the HTTP request of a WebSocket listener's client, answered
# with 101 (then the CONNECT stage, over frames) or with an HTTP error.
from fastproxy._types cimport Core, Conn

cdef void ws_or_connect(Core* e, Conn* c) noexcept nogil
cdef void ws_upgrade_read(Core* e, Conn* c) noexcept nogil
