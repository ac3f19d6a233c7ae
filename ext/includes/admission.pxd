# ext/src/admission.h: per-listener admission tables (client address or ClientId -> live
# connections and a token bucket).
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t

cdef extern from "admission.h" nogil:
    ctypedef struct fp_adm_entry:
        uint32_t conns
    ctypedef struct fp_adm_table:
        uint32_t max_conns
        double rate
    int fp_adm_init(fp_adm_table* t, uint64_t slots, double rate_per_s, double burst,
                    uint32_t max_conns, uint64_t seed)
    void fp_adm_free(fp_adm_table* t)
    fp_adm_entry* fp_adm_get(fp_adm_table* t, uint64_t k0, uint64_t k1, int64_t now)
    int fp_adm_take(const fp_adm_table* t, fp_adm_entry* e, int64_t now)
    void fp_adm_addr_key(int family, const uint8_t* addr, uint64_t* k0, uint64_t* k1)
