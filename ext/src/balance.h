/* Server choice for upstream pools: hashes and the weighted rendezvous score.
 *
 * Everything here is a pure function of bytes, so every fastproxy instance (any host,
 * any architecture, any restart) ranks the servers of a pool the same way for the same
 * ClientId: devices behind several proxies land on one broker with no shared state.
 */
#ifndef FASTPROXY_BALANCE_H
#define FASTPROXY_BALANCE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* SplitMix64's finalizer: full avalanche, so h ^ key for nearby keys still scatters. */
static inline uint64_t fp_mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* FNV-1a over the bytes, then mixed: stable, endian-independent, no seed. */
static inline uint64_t fp_hash64(const void *data, size_t n) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t i;
    for (i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return fp_mix64(h ^ (uint64_t)n);
}

/* The rendezvous draw of one (item, server) pair. */
static inline uint64_t fp_draw(uint64_t item, uint64_t server_key) {
    return fp_mix64(item ^ server_key);
}

/* Weighted rendezvous (Schindelhauer & Schomaker's logarithmic method): the server with the
 * highest weight / -ln(u) wins, u the draw mapped into (0, 1). A server of weight 2 wins
 * twice as many items, and adding or removing a server moves only the items it wins or
 * held. With equal weights callers compare draws as integers instead (same order, exact). */
static inline double fp_weighted_score(uint64_t draw, unsigned weight) {
    double u = ((double)(draw >> 11) + 0.5) * (1.0 / 9007199254740992.0);  /* 2^-53 */
    return (double)weight / -log(u);
}

#endif
