# The balancer's hashes (ext/src/balance.h).
from libc.stdint cimport uint64_t

cdef extern from "balance.h" nogil:
    uint64_t fp_hash64(const void* data, size_t n)
    uint64_t fp_draw(uint64_t item, uint64_t server_key)
    double fp_weighted_score(uint64_t draw, unsigned weight)
