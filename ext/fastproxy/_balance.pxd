# Choosing a server of a listener's pool (ClientId / source hash, least-conn, round-robin).
from fastproxy._types cimport Listener, Upstream, Conn

cdef int pick_server(Listener* l, Upstream* ups, Conn* c, int* why) noexcept nogil
cdef void note_weights(Listener* l, Upstream* ups) noexcept nogil
