/* Platform glue for the compiled engine: Linux only (epoll, splice, accept4). */
#ifndef FASTPROXY_COMPAT_H
#define FASTPROXY_COMPAT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef SPLICE_F_MOVE
#define SPLICE_F_MOVE 1
#define SPLICE_F_NONBLOCK 2
#endif
/* Linux 4.2; older libc headers lack the name. */
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#ifndef F_GETPIPE_SZ
#define F_GETPIPE_SZ 1032
#endif

/* errno is a macro (a thread-local lvalue); Cython reads it through this. */
static inline int fp_errno(void) { return errno; }

/* Monotonic milliseconds; the coarse clock is a vDSO read and precise enough for timeouts. */
static inline int64_t fp_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline double fp_wall_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline double fp_mono_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Flags one thread writes and the loop reads (stop requests, health state, policy answers):
 * atomics, so a weakly ordered CPU (aarch64) sees them, and in order with what they announce. */
static inline int fp_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void fp_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int fp_exchange(int *p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }
static inline int fp_add(int *p, int v) { return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL); }
static inline uint8_t fp_load8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void fp_store8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint8_t fp_exchange8(uint8_t *p, uint8_t v) { return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL); }

#ifdef FASTPROXY_DEBUG
#define FP_DEBUG 1
#else
#define FP_DEBUG 0
#endif

#endif
