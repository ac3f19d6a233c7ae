/* Admission state of one listener, per client key: live connections and a token bucket.
 * Keys are client addresses (IPv4, or the /64 of an IPv6 address: one host holds a whole
 * /64, so a per-address limit keyed by full IPv6 addresses limits nothing) or ClientId hashes.
 *
 * Open addressing, linear probing over at most FP_ADM_PROBES slots, no deletion: an entry with
 * no live connection and a full bucket is as good as empty and is reused for the next key
 * that probes past it; an entry holding connections is never reused, so a Conn may keep a
 * pointer to its entry (entries never move). The table is sized to twice the connection cap,
 * so live entries fit; when a probe finds no slot (a flood of distinct keys whose buckets are
 * still refilling) fp_adm_get returns NULL and the caller admits and counts it: failing
 * closed there would let the flood lock everyone out. The hash is keyed with a random seed so
 * that clients cannot choose colliding keys. */
#ifndef FASTPROXY_ADMISSION_H
#define FASTPROXY_ADMISSION_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "balance.h" /* fp_mix64 */

#define FP_ADM_PROBES 32

typedef struct fp_adm_entry {
    uint64_t k0, k1;
    int64_t t_ms;   /* when tokens was last brought up to date */
    double tokens;
    uint32_t conns; /* live connections holding this entry */
    uint32_t used;  /* ever used (probing stops at a never-used slot) */
} fp_adm_entry;

typedef struct fp_adm_table {
    fp_adm_entry *slots;
    uint32_t mask;
    uint64_t seed;
    double rate;        /* tokens per millisecond; 0: no rate limit */
    double burst;       /* bucket size */
    uint32_t max_conns; /* live connections per key; 0: no limit */
} fp_adm_table;

/* slots: at least this many (rounded up to a power of two, at most 1 << 24). Returns 0, or
 * -1 without memory. */
static inline int fp_adm_init(fp_adm_table *t, uint64_t slots, double rate_per_s, double burst,
                              uint32_t max_conns, uint64_t seed)
{
    uint64_t n = 1024;
    while (n < slots && n < (1u << 24))
        n <<= 1;
    t->slots = (fp_adm_entry *)calloc((size_t)n, sizeof(fp_adm_entry));
    if (t->slots == NULL)
        return -1;
    t->mask = (uint32_t)(n - 1);
    t->seed = seed;
    t->rate = rate_per_s > 0 ? rate_per_s / 1000.0 : 0;
    t->burst = burst >= 1 ? burst : 1;
    t->max_conns = max_conns;
    return 0;
}

static inline void fp_adm_free(fp_adm_table *t)
{
    free(t->slots);
    t->slots = NULL;
}

static inline void fp_adm_refill(const fp_adm_table *t, fp_adm_entry *e, int64_t now)
{
    if (t->rate > 0 && now > e->t_ms) {
        e->tokens += (double)(now - e->t_ms) * t->rate;
        if (e->tokens > t->burst)
            e->tokens = t->burst;
    }
    e->t_ms = now;
}

/* The entry of key (k0, k1), made when missing; NULL when no slot is free within the probe. */
static inline fp_adm_entry *fp_adm_get(fp_adm_table *t, uint64_t k0, uint64_t k1, int64_t now)
{
    uint64_t h = fp_mix64(fp_mix64(k0 ^ t->seed) ^ k1);
    fp_adm_entry *spare = NULL;
    unsigned i;
    for (i = 0; i < FP_ADM_PROBES; i++) {
        fp_adm_entry *e = &t->slots[(h + i) & t->mask];
        if (!e->used) {
            if (spare == NULL)
                spare = e;
            break;
        }
        if (e->k0 == k0 && e->k1 == k1)
            return e;
        if (spare == NULL && e->conns == 0) {
            fp_adm_refill(t, e, now);
            if (t->rate <= 0 || e->tokens >= t->burst)
                spare = e;
        }
    }
    if (spare == NULL)
        return NULL;
    spare->k0 = k0;
    spare->k1 = k1;
    spare->t_ms = now;
    spare->tokens = t->burst;
    spare->conns = 0;
    spare->used = 1;
    return spare;
}

/* Take a token from e's bucket: 1 (allowed) or 0 (over the rate). */
static inline int fp_adm_take(const fp_adm_table *t, fp_adm_entry *e, int64_t now)
{
    if (t->rate <= 0)
        return 1;
    fp_adm_refill(t, e, now);
    if (e->tokens < 1.0)
        return 0;
    e->tokens -= 1.0;
    return 1;
}

/* The admission key of an address: IPv4 (also v4-mapped IPv6) whole, IPv6 by its /64. */
static inline void fp_adm_addr_key(int family, const uint8_t *addr, uint64_t *k0, uint64_t *k1)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    uint64_t v = 0;
    if (family == 6 && memcmp(addr, mapped, 12) == 0) {
        family = 4;
        addr += 12;
    }
    if (family == 4) {
        memcpy(&v, addr, 4);
        *k0 = v;
        *k1 = 4;
    } else {
        memcpy(&v, addr, 8);
        *k0 = v;
        *k1 = 6;
    }
}
#endif
