/*
 * libFuzzer harness for proxy_v2.c: the PROXY protocol v1/v2 parser, TLV iterator, builders
 * and address formatters (not part of any extension module; scripts/fuzz builds and runs it,
 * docs/fuzzing.md has the details):
 *
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -Iext/src ext/src/fuzz_proxy_v2.c ext/src/proxy_v2.c -o .build/fuzz/fuzz_proxy_v2
 *   .build/fuzz/fuzz_proxy_v2 -max_len=4200 WORK_CORPUS tests/fuzz/corpus/proxy
 *
 * Input: byte 0 picks a mode (low 2 bits) and a parameter (high 6 bits); the rest is the data.
 *   0  the data is a header: pp_parse (default cap 4096) and pp_parse_ex with the same cap
 *   1  the data is a header, parsed with a cap from the parameter (0 .. 70000, which
 *      pp_parse_ex clamps to 16 .. 65551)
 *   2  the data describes a pp2_info (or two sockaddrs; sometimes one field ~64 KiB long):
 *      build v2 and v1, parse back
 *   3  a v2 header: 16-byte preamble (family from the parameter) + the data as addresses and
 *      TLVs, with the CRC32C TLV (if any) fixed up when the parameter's high bit is set, so
 *      the fuzzer gets past the signature, the length and the checksum at once
 * Every parsed buffer is a heap block of exactly its size, so AddressSanitizer reports a read
 * even one byte past the end. Besides "no crash" it checks, and traps when one is broken:
 *   - any outcome: every prefix gives NEED_MORE until the final outcome, then that outcome
 *     (v2: same reason and offset); INVALID stays INVALID when bytes are appended
 *   - INVALID: a non-empty reason, offset <= len, nothing else left in the result
 *   - NEED_MORE: v1 shorter than 107 bytes; v2 shorter than its declared length; a v2 prefix
 *     that ends inside the address block can be completed into a VALID header
 *   - VALID: the header lies inside the input and the same result comes from exactly
 *     header_len bytes (one byte less needs more); version/command/family/addresses/ports are
 *     the bytes of the header (v2) or the text (v1: the fields agree with glibc inet_pton, and a
 *     TCP4 line rebuilt by pp1_build is byte-identical); the TLV area ends exactly at the header
 *     end, the TLV and SSL sub-TLV walks stay inside and end cleanly, pp_tlv_find agrees with
 *     the walk, AUTHORITY <= 255, UNIQUE_ID <= 128, at most one CRC32C of 4 bytes, matching a
 *     bitwise CRC32C computed here; rebuilding with pp2_build from the parsed result (TLVs as
 *     extra_tlvs) gives the same bytes (or, with a CRC32C that was not first, a VALID header
 *     with the same addresses and TLVs)
 *   - parsing with a larger cap never turns VALID into anything else
 *   - builders: pp2_build == pp2_build_size, refuses cap - 1 and max_len - 1, its output parses
 *     to the same facts; pp1_build output is <= 107 bytes and parses back; pp_format_ipv6 ==
 *     glibc inet_ntop, pp_format_ipv4 == inet_ntop
 *   - TLV iteration over arbitrary bytes stays inside and terminates; pp_parse_ex with a NULL
 *     result or buffer; pp_find_ctl against a plain loop
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "proxy_v2.h"

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "fuzz_proxy_v2: invariant failed: %s (line %d)\n", #cond,      \
                    __LINE__);                                                             \
            __builtin_trap();                                                              \
        }                                                                                  \
    } while (0)

/* 0 and 70000 are clamped by pp_parse_ex to 16 and 65551 */
static const size_t caps[8] = {0, 28, 52, 100, 232, 500, PP_PARSE_DEFAULT_MAX, 70000};

static uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint8_t *dup_exact(const uint8_t *d, size_t n)
{
    uint8_t *b = malloc(n ? n : 1);
    if (b && n)
        memcpy(b, d, n);
    return b;
}

/* Bitwise CRC32C, independent of the table in proxy_v2.c. */
static uint32_t crc32c_bitwise(const uint8_t *p, size_t n, size_t zero_at)
{
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        c ^= (i >= zero_at && i < zero_at + 4) ? 0 : p[i];
        for (k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

static long fam_alen(uint8_t fam)
{
    switch (fam) {
    case PP2_AF_UNSPEC: return 0;
    case PP2_TCP4: case PP2_UDP4: return PP2_ADDR_LEN_INET;
    case PP2_TCP6: case PP2_UDP6: return PP2_ADDR_LEN_INET6;
    case PP2_UNIX_STREAM: case PP2_UNIX_DGRAM: return PP2_ADDR_LEN_UNIX;
    default: return -1;
    }
}

static int same_result(const pp_result *a, const pp_result *b)
{
    return a->version == b->version && a->header_len == b->header_len &&
           a->command == b->command && a->fam == b->fam && a->src_port == b->src_port &&
           a->dst_port == b->dst_port && memcmp(a->src_addr, b->src_addr, sizeof a->src_addr) == 0 &&
           memcmp(a->dst_addr, b->dst_addr, sizeof a->dst_addr) == 0 && a->tlv_len == b->tlv_len &&
           a->has_crc32c == b->has_crc32c && a->crc32c == b->crc32c;
}

/* TLV iteration over arbitrary bytes: every TLV inside, terminates, pp_tlv_find agrees. */
static void walk_tlvs(const uint8_t *area, size_t len)
{
    pp_tlv_iter it;
    pp_tlv t, f;
    int r, count = 0, seen[256] = {0};
    pp_tlv first[256];
    pp_tlv_iter_init(&it, area, len);
    while ((r = pp_tlv_next(&it, &t)) == 1) {
        CHECK(t.value >= area + PP2_TLV_HEADER_LEN && t.value + t.len <= area + len);
        CHECK(++count <= (int)(len / PP2_TLV_HEADER_LEN));
        if (!seen[t.type]) {
            seen[t.type] = 1;
            first[t.type] = t;
        }
        if (t.type == PP2_TYPE_SSL) {
            pp_tlv_iter sub;
            pp_tlv s;
            uint8_t client;
            uint32_t verify;
            int k;
            if (pp_tlv_ssl_open(&t, &client, &verify, &sub) == 0) {
                CHECK(t.len >= PP2_SSL_FIXED_LEN && client == t.value[0]);
                while ((k = pp_tlv_next(&sub, &s)) == 1)
                    CHECK(s.value + s.len <= t.value + t.len && s.value > t.value);
                CHECK(k == 0 || k == -1);
            } else {
                CHECK(t.len < PP2_SSL_FIXED_LEN);
            }
        }
    }
    CHECK(r == 0 || r == -1);
    /* pp_tlv_find: the first TLV of a type before any malformation */
    {
        static const uint8_t types[14] = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0x21,
                                          0x22, 0x23, 0x24, 0x25, 0x30, 0xE0};
        int ti;
        for (ti = 0; ti < 14; ti++) {
            uint8_t ty = types[ti];
            int fr = pp_tlv_find(area, len, ty, &f);
            if (seen[ty]) {
                CHECK(fr == 1 && f.value == first[ty].value && f.len == first[ty].len);
            } else {
                CHECK(fr == r);
            }
        }
    }
}

static void check_v1_fields(const uint8_t *d, const pp_result *r)
{
    /* fields: "PROXY TCPx " then src dst sport dport "\r\n" */
    char f[4][108];
    size_t i = 11, k, nf = 0;
    for (nf = 0; nf < 4; nf++) {
        k = 0;
        while (i < r->header_len - 2 && d[i] != ' ')
            f[nf][k++] = (char)d[i++];
        f[nf][k] = '\0';
        i++;
    }
    {
        uint8_t a[16];
        int af = r->fam == PP2_TCP4 ? AF_INET : AF_INET6;
        size_t al = r->fam == PP2_TCP4 ? 4 : 16;
        CHECK(inet_pton(af, f[0], a) == 1 && memcmp(a, r->src_addr, al) == 0);
        CHECK(inet_pton(af, f[1], a) == 1 && memcmp(a, r->dst_addr, al) == 0);
        CHECK((unsigned)atoi(f[2]) == r->src_port && (unsigned)atoi(f[3]) == r->dst_port);
    }
    /* rebuild the line: TCP4 text is canonical, so the same bytes; TCP6 the same facts */
    {
        pp2_info info;
        char line[PP1_MAX_LEN];
        pp_result r2;
        int n;
        uint8_t *exact;
        pp2_info_init(&info);
        info.fam = r->fam;
        info.src_port = r->src_port;
        info.dst_port = r->dst_port;
        memcpy(info.src_addr, r->src_addr, 16);
        memcpy(info.dst_addr, r->dst_addr, 16);
        n = pp1_build(&info, line, sizeof line);
        CHECK(n > 0 && n <= PP1_MAX_LEN);
        if (r->fam == PP2_TCP4)
            CHECK((size_t)n == r->header_len && memcmp(line, d, (size_t)n) == 0);
        exact = dup_exact((const uint8_t *)line, (size_t)n);
        CHECK(exact);
        CHECK(pp_parse(exact, (size_t)n, &r2) == PP_VALID && (size_t)n == r2.header_len);
        r2.header_len = r->header_len;
        CHECK(same_result(r, &r2));
        free(exact);
    }
}

/* Parsed v2 header -> pp2_build with the TLV area as extra_tlvs -> the same bytes. */
static void rebuild_v2(const uint8_t *d, const pp_result *r)
{
    pp2_info info;
    uint8_t *out, *tlvs = NULL;
    size_t tl = 0, crc_pos = (size_t)-1;
    long sz;
    int n;
    pp_result r2;

    pp2_info_init(&info);
    info.command = r->command;
    info.fam = r->fam;
    info.src_port = r->src_port;
    info.dst_port = r->dst_port;
    memcpy(info.src_addr, r->src_addr, sizeof info.src_addr);
    memcpy(info.dst_addr, r->dst_addr, sizeof info.dst_addr);
    info.max_len = PP2_MAX_HEADER_LEN;
    if (r->tlv) {
        /* copy the TLVs without the CRC32C one; the builder writes that one first */
        pp_tlv_iter it;
        pp_tlv t;
        tlvs = malloc(r->tlv_len);
        CHECK(tlvs);
        pp_tlv_iter_init(&it, r->tlv, r->tlv_len);
        while (pp_tlv_next(&it, &t) == 1) {
            if (t.type == PP2_TYPE_CRC32C) {
                crc_pos = (size_t)(t.value - PP2_TLV_HEADER_LEN - r->tlv);
                continue;
            }
            memcpy(tlvs + tl, t.value - PP2_TLV_HEADER_LEN, PP2_TLV_HEADER_LEN + t.len);
            tl += PP2_TLV_HEADER_LEN + t.len;
        }
        info.extra_tlvs.ptr = tlvs;
        info.extra_tlvs.len = tl;
    }
    if (r->has_crc32c)
        info.flags |= PP2_F_CRC32C;
    sz = pp2_build_size(&info);
    CHECK(sz == (long)r->header_len);
    out = malloc((size_t)sz);
    CHECK(out);
    n = pp2_build(&info, out, (size_t)sz);
    CHECK(n == sz);
    if (!r->has_crc32c || crc_pos == 0)
        CHECK(memcmp(out, d, (size_t)n) == 0);
    CHECK(pp_parse_ex(out, (size_t)n, PP2_MAX_HEADER_LEN, &r2) == PP_VALID);
    CHECK(r2.header_len == r->header_len && r2.fam == r->fam && r2.command == r->command &&
          r2.src_port == r->src_port && r2.dst_port == r->dst_port && r2.has_crc32c == r->has_crc32c &&
          memcmp(r2.src_addr, r->src_addr, sizeof r2.src_addr) == 0 &&
          memcmp(r2.dst_addr, r->dst_addr, sizeof r2.dst_addr) == 0);
    /* refusals: one byte of room or of max_len short */
    CHECK(pp2_build(&info, out, (size_t)sz - 1) == PP_ERR_CAP);
    info.max_len = (size_t)sz - 1;
    CHECK(pp2_build(&info, out, (size_t)sz) == PP_ERR_MAX_LEN);
    /* v1 from the same facts */
    {
        char line[PP1_MAX_LEN];
        uint8_t *exact;
        info.max_len = 0;
        n = pp1_build(&info, line, sizeof line);
        CHECK(n >= 15 && n <= PP1_MAX_LEN);
        exact = dup_exact((const uint8_t *)line, (size_t)n);
        CHECK(exact);
        CHECK(pp_parse(exact, (size_t)n, &r2) == PP_VALID && r2.header_len == (size_t)n);
        if (r->command == PP2_CMD_PROXY && (r->fam == PP2_TCP4 || r->fam == PP2_TCP6)) {
            size_t al = r->fam == PP2_TCP4 ? 4 : 16;
            CHECK(r2.fam == r->fam && r2.src_port == r->src_port && r2.dst_port == r->dst_port &&
                  memcmp(r2.src_addr, r->src_addr, al) == 0 && memcmp(r2.dst_addr, r->dst_addr, al) == 0);
        } else {
            CHECK(r2.fam == PP2_AF_UNSPEC && n == 15);
        }
        free(exact);
    }
    free(out);
    free(tlvs);
}

static void check_valid(const uint8_t *d, size_t n, size_t cap, const pp_result *r)
{
    CHECK(r->reason == NULL);
    CHECK(r->header_len >= 15 && r->header_len <= n);
    CHECK(r->version == 1 || r->version == 2);
    if (r->version == 1) {
        const uint8_t *lf = memchr(d, '\n', r->header_len);
        CHECK(r->header_len <= PP1_MAX_LEN && d[0] == 'P');
        CHECK(lf == d + r->header_len - 1 && d[r->header_len - 2] == '\r');
        CHECK(memchr(d, '\r', r->header_len) == (const void *)(d + r->header_len - 2));
        CHECK(r->command == PP2_CMD_PROXY && r->tlv == NULL && r->tlv_len == 0 && !r->has_crc32c);
        if (r->fam == PP2_AF_UNSPEC) {
            CHECK(memcmp(d, "PROXY UNKNOWN", 13) == 0);
        } else {
            CHECK(r->fam == PP2_TCP4 || r->fam == PP2_TCP6);
            check_v1_fields(d, r);
        }
        return;
    }
    /* v2 */
    {
        long alen = fam_alen(d[13]);
        size_t total = PP2_HEADER_LEN + get16(d + 14), pos, crcs = 0;
        CHECK(memcmp(d, PP2_SIGNATURE, PP2_SIGNATURE_LEN) == 0);
        CHECK(r->header_len == total && total <= (cap < PP2_HEADER_LEN ? PP2_HEADER_LEN : cap));
        CHECK((d[12] & 0xF0) == 0x20 && r->command == (d[12] & 0x0F) && r->command <= 1);
        CHECK(r->fam == d[13] && alen >= 0 && total >= PP2_HEADER_LEN + (size_t)alen);
        if (alen == PP2_ADDR_LEN_INET) {
            CHECK(memcmp(r->src_addr, d + 16, 4) == 0 && memcmp(r->dst_addr, d + 20, 4) == 0);
            CHECK(r->src_port == get16(d + 24) && r->dst_port == get16(d + 26));
        } else if (alen == PP2_ADDR_LEN_INET6) {
            CHECK(memcmp(r->src_addr, d + 16, 16) == 0 && memcmp(r->dst_addr, d + 32, 16) == 0);
            CHECK(r->src_port == get16(d + 48) && r->dst_port == get16(d + 50));
        } else if (alen == PP2_ADDR_LEN_UNIX) {
            CHECK(memcmp(r->src_addr, d + 16, 108) == 0 && memcmp(r->dst_addr, d + 124, 108) == 0);
            CHECK(r->src_port == 0 && r->dst_port == 0);
        }
        if (total == PP2_HEADER_LEN + (size_t)alen) {
            CHECK(r->tlv == NULL && r->tlv_len == 0 && !r->has_crc32c);
        } else {
            CHECK(r->tlv == d + PP2_HEADER_LEN + alen && r->tlv + r->tlv_len == d + total);
            walk_tlvs(r->tlv, r->tlv_len);
            /* the parser's walk, redone here: exact fill, limits, sub-TLVs */
            for (pos = 0; pos < r->tlv_len;) {
                const uint8_t *t = r->tlv + pos;
                size_t tl;
                CHECK(r->tlv_len - pos >= PP2_TLV_HEADER_LEN);
                tl = get16(t + 1);
                CHECK(tl <= r->tlv_len - pos - PP2_TLV_HEADER_LEN);
                if (t[0] == PP2_TYPE_CRC32C) {
                    CHECK(tl == 4 && ++crcs == 1);
                    CHECK(r->crc32c == ((uint32_t)t[3] << 24 | (uint32_t)t[4] << 16 |
                                        (uint32_t)t[5] << 8 | t[6]));
                    CHECK(crc32c_bitwise(d, total, (size_t)(t + 3 - d)) == r->crc32c);
                } else if (t[0] == PP2_TYPE_AUTHORITY) {
                    CHECK(tl <= PP2_AUTHORITY_MAX);
                } else if (t[0] == PP2_TYPE_UNIQUE_ID) {
                    CHECK(tl <= PP2_UNIQUE_ID_MAX);
                } else if (t[0] == PP2_TYPE_SSL) {
                    pp_tlv one;
                    pp_tlv_iter it, sub;
                    pp_tlv s;
                    int k;
                    CHECK(tl >= PP2_SSL_FIXED_LEN);
                    pp_tlv_iter_init(&it, t, PP2_TLV_HEADER_LEN + tl);
                    CHECK(pp_tlv_next(&it, &one) == 1);
                    CHECK(pp_tlv_ssl_open(&one, NULL, NULL, &sub) == 0);
                    while ((k = pp_tlv_next(&sub, &s)) == 1)
                        ;
                    CHECK(k == 0);
                }
                pos += PP2_TLV_HEADER_LEN + tl;
            }
            CHECK(pos == r->tlv_len);
            CHECK(!!r->has_crc32c == (crcs == 1));
        }
        rebuild_v2(d, r);
    }
}

/* Parse d[0..n) (copied into an exact-size block) and check everything about the outcome. */
static void check_parse(const uint8_t *data, size_t n, size_t cap)
{
    pp_result r, r2;
    int rc, rc2;
    uint8_t *d = dup_exact(data, n);
    size_t k;
    if (!d)
        return;

    rc = pp_parse_ex(d, n, cap, &r);
    CHECK(rc == PP_VALID || rc == PP_NEED_MORE || rc == PP_INVALID);
    if (cap == PP_PARSE_DEFAULT_MAX) {
        rc2 = pp_parse(d, n, &r2);
        CHECK(rc2 == rc && r2.reason == r.reason && r2.error_offset == r.error_offset);
    }
    if (rc == PP_INVALID) {
        CHECK(r.reason != NULL && r.reason[0] != '\0');
        CHECK(r.error_offset <= n);
        CHECK(r.header_len == 0 && r.version == 0 && r.tlv == NULL && !r.has_crc32c);
        /* refusal is final: appending bytes never makes it valid or incomplete */
        {
            static const uint8_t tails[3][4] = {{'\r', '\n', '\r', '\n'}, {0, 0, 0, 0}, {' ', '1', '\r', '\n'}};
            int t;
            for (t = 0; t < 3; t++) {
                uint8_t *ext = malloc(n + 4);
                CHECK(ext);
                memcpy(ext, d, n);
                memcpy(ext + n, tails[t], 4);
                rc2 = pp_parse_ex(ext, n + 4, cap, &r2);
                CHECK(rc2 == PP_INVALID);
                if (d[0] != 'P')   /* v2 refusals are decided by bytes already there */
                    CHECK(r2.reason == r.reason && r2.error_offset == r.error_offset);
                free(ext);
            }
        }
        /* v1: an address refused by us is refused by glibc inet_pton too */
        if (d[0] == 'P' && strstr(r.reason, "address in PROXY v1") != NULL) {
            char field[PP1_MAX_LEN + 1];
            size_t i = r.error_offset, k = 0;
            while (i < n && d[i] != ' ' && d[i] != '\r' && k < PP1_MAX_LEN)
                field[k++] = (char)d[i++];
            field[k] = '\0';
            if (memchr(field, '\0', k) == NULL) {
                uint8_t a[16];
                CHECK(inet_pton(strstr(r.reason, "IPv4") ? AF_INET : AF_INET6, field, a) == 0);
            }
        }
    } else if (rc == PP_NEED_MORE) {
        CHECK(r.reason == NULL && r.header_len == 0);
        if (n > 0 && d[0] == 'P') {
            CHECK(n < PP1_MAX_LEN);
        } else if (n >= PP2_HEADER_LEN) {
            size_t total = PP2_HEADER_LEN + get16(d + 14);
            long alen = fam_alen(d[13]);
            CHECK(n < total && total <= (cap < PP2_HEADER_LEN ? PP2_HEADER_LEN : cap));
            CHECK(alen >= 0 && total >= PP2_HEADER_LEN + (size_t)alen);
            /* A prefix ending inside the address block: complete it with zeros and NOOP TLV
             * filler; it must become VALID (unless a 1- or 2-byte TLV area cannot be filled). */
            if (n <= PP2_HEADER_LEN + (size_t)alen && total - PP2_HEADER_LEN - (size_t)alen != 1 &&
                total - PP2_HEADER_LEN - (size_t)alen != 2) {
                uint8_t *full = calloc(1, total);
                size_t p = PP2_HEADER_LEN + (size_t)alen;
                CHECK(full);
                memcpy(full, d, n);
                if (p < total) {    /* one NOOP TLV fills the rest (total <= 65551) */
                    size_t vl = total - p - PP2_TLV_HEADER_LEN;
                    full[p] = PP2_TYPE_NOOP;
                    full[p + 1] = (uint8_t)(vl >> 8);
                    full[p + 2] = (uint8_t)vl;
                }
                CHECK(pp_parse_ex(full, total, cap, &r2) == PP_VALID && r2.header_len == total);
                free(full);
            }
        }
    } else {
        check_valid(d, n, cap, &r);
        /* exactly the header is enough, one byte less is not */
        {
            uint8_t *h = dup_exact(d, r.header_len);
            CHECK(h);
            CHECK(pp_parse_ex(h, r.header_len, cap, &r2) == PP_VALID && same_result(&r, &r2));
            CHECK(pp_parse_ex(h, r.header_len - 1, cap, &r2) == PP_NEED_MORE);
            free(h);
        }
    }

    /* Prefixes, longest first: the final outcome, until NEED_MORE; then only NEED_MORE. All
     * of them for short inputs; else the ones around the decision points and a spread. */
    {
        size_t cut[64];
        int nc = 0, i, j, seen_more = 0;
        if (n <= 40) {
            for (k = 0; k < n; k++)
                cut[nc++] = k;
        } else {
            size_t marks[12] = {n - 1, n - 2, r.header_len, r.header_len - 1, r.header_len + 1,
                                r.error_offset, r.error_offset + 1, 16, 15, 13, 12, 6};
            for (i = 0; i < 12; i++)
                if (marks[i] < n)
                    cut[nc++] = marks[i];
            for (i = 1; i <= 32; i++)
                cut[nc++] = n * (size_t)i / 33;
        }
        for (i = 1; i < nc; i++)    /* longest first */
            for (j = i; j > 0 && cut[j] > cut[j - 1]; j--) {
                size_t t = cut[j];
                cut[j] = cut[j - 1];
                cut[j - 1] = t;
            }
        for (i = 0; i < nc; i++) {
            if (i > 0 && cut[i] == cut[i - 1])
                continue;
            k = cut[i];
            rc2 = pp_parse_ex(d, k, cap, &r2);
            if (seen_more) {
                CHECK(rc2 == PP_NEED_MORE);
            } else if (rc2 == PP_NEED_MORE) {
                seen_more = 1;
            } else if (rc == PP_VALID) {
                CHECK(rc2 == PP_VALID && k >= r.header_len && same_result(&r, &r2));
            } else {
                CHECK(rc == PP_INVALID && rc2 == PP_INVALID);
                if (d[0] != 'P')
                    CHECK(r2.reason == r.reason && r2.error_offset == r.error_offset);
            }
        }
        CHECK(pp_parse_ex(d, 0, cap, &r2) == PP_NEED_MORE);
    }

    /* The cap: a larger one never turns VALID into anything else, and a header VALID under
     * the largest cap whose length fits this cap is VALID here too, with the same result. */
    if (cap < PP2_MAX_HEADER_LEN && n > 0) {
        rc2 = pp_parse_ex(d, n, PP2_MAX_HEADER_LEN, &r2);
        if (rc == PP_VALID)
            CHECK(rc2 == PP_VALID && same_result(&r, &r2));
        if (rc2 == PP_VALID && r2.header_len <= cap)
            CHECK(rc == PP_VALID && same_result(&r, &r2));
    }
    free(d);
}

static void check_format(const uint8_t *d, size_t n)
{
    uint8_t a[16] = {0};
    char ours[64], theirs[64];
    int w;
    memcpy(a, d, n < 16 ? n : 16);
    w = pp_format_ipv6(a, ours, sizeof ours);
    CHECK(w > 0 && inet_ntop(AF_INET6, a, theirs, sizeof theirs) != NULL);
    CHECK(strcmp(ours, theirs) == 0 && (size_t)w == strlen(ours));
    CHECK(pp_format_ipv6(a, ours, (size_t)w) == PP_ERR_CAP);
    w = pp_format_ipv4(a, ours, sizeof ours);
    CHECK(w > 0 && inet_ntop(AF_INET, a, theirs, sizeof theirs) != NULL);
    CHECK(strcmp(ours, theirs) == 0 && (size_t)w == strlen(ours));
    CHECK(pp_format_ipv4(a, ours, (size_t)w) == PP_ERR_CAP);
}

/* Would the parser take these TLVs? (pp2_build appends extra_tlvs verbatim once they are
 * well-formed: the Python build_v2(tlvs=...) uses that to write deliberately bad headers.) */
static int extras_strict_ok(const pp_str *x)
{
    pp_tlv_iter it, sub;
    pp_tlv t, s;
    int k;
    if (!x->ptr)
        return 1;
    pp_tlv_iter_init(&it, x->ptr, x->len);
    while ((k = pp_tlv_next(&it, &t)) == 1) {
        if (t.type == PP2_TYPE_CRC32C || (t.type == PP2_TYPE_AUTHORITY && t.len > PP2_AUTHORITY_MAX) ||
            (t.type == PP2_TYPE_UNIQUE_ID && t.len > PP2_UNIQUE_ID_MAX))
            return 0;
        if (t.type == PP2_TYPE_SSL) {
            if (pp_tlv_ssl_open(&t, NULL, NULL, &sub) != 0)
                return 0;
            while ((k = pp_tlv_next(&sub, &s)) == 1)
                ;
            if (k != 0)
                return 0;
        }
    }
    return k == 0;
}

static void check_build(const uint8_t *d, size_t n, unsigned param)
{
    static const uint8_t fams[8] = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x44};
    pp2_info info;
    pp_result r;
    size_t pos, i;
    long sz;
    int len;
    uint8_t *out;
    char line[PP1_MAX_LEN];

    if (n < 8)
        return;
    check_format(d, n);
    pp2_info_init(&info);
    if (param & 0x20) {
        /* from socket addresses: family from the first bytes of each side */
        struct sockaddr_storage ss[2];
        static const sa_family_t afs[4] = {AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC};
        int s;
        memset(ss, 0, sizeof ss);
        for (s = 0; s < 2; s++) {
            size_t off = 2 + (size_t)s * 40, m;
            ss[s].ss_family = afs[(d[s] >> 2) & 3];
            if (off < n) {
                m = n - off < 40 ? n - off : 40;
                if (ss[s].ss_family == AF_UNIX) {
                    memcpy(((struct sockaddr_un *)&ss[s])->sun_path, d + off, m);
                } else if (ss[s].ss_family == AF_INET) {
                    memcpy(&((struct sockaddr_in *)&ss[s])->sin_port, d + off, m < 6 ? m : 6);
                } else if (ss[s].ss_family == AF_INET6) {
                    memcpy(&((struct sockaddr_in6 *)&ss[s])->sin6_port, d + off, m < 2 ? m : 2);
                    if (m > 6)
                        memcpy(&((struct sockaddr_in6 *)&ss[s])->sin6_addr, d + off + 6, m - 6 < 16 ? m - 6 : 16);
                }
            }
        }
        CHECK(pp2_info_set_sockaddrs(&info, (d[0] & 1) ? NULL : &ss[0], &ss[1]) == 0);
        CHECK(info.command <= 1 && fam_alen(info.fam) >= 0);
        info.flags = param & 3;
        info.ssl_client = d[1];
    } else {
        info.command = (d[0] & 0x10) ? (d[0] & 3) : (d[0] & 1);  /* sometimes an invalid one */
        info.fam = fams[((d[0] >> 2) & 3) | ((d[1] & 1) << 2)];
        info.flags = d[1] >> 1;
        info.ssl_client = d[2];
        info.ssl_verify = (uint32_t)d[3] << 24 | (uint32_t)d[4] << 8 | d[5];
        info.src_port = get16(d + 6);
        info.dst_port = (uint16_t)(info.src_port ^ 0xA5A5);
        pos = 8;
        for (i = 0; i < PP2_UNIX_PATH_LEN && pos + i < n; i++) {
            info.src_addr[i] = d[pos + i];
            info.dst_addr[PP2_UNIX_PATH_LEN - 1 - i] = d[pos + i];
        }
        pos += (d[1] & 0x40) ? 0 : (n - pos < 32 ? n - pos : 32);
        /* the rest: string fields, each a length byte (255: absent) and that many bytes; a
         * length byte with bit 7 and bits 0-6 set to 0x7E takes the rest as the value */
        {
            pp_str *fields[10] = {&info.alpn, &info.authority, &info.unique_id, &info.ssl_version,
                                  &info.ssl_cn, &info.ssl_key_alg, &info.ssl_sig_alg,
                                  &info.ssl_cipher, &info.netns, &info.extra_tlvs};
            for (i = 0; i < 10 && pos < n; i++) {
                size_t l = d[pos++];
                if (l == 255)
                    continue;
                if (l == 254 || l > n - pos)
                    l = n - pos;
                fields[i]->ptr = d + pos;
                fields[i]->len = l;
                pos += l;
            }
            if (pos < n)
                info.noop_len = (d[pos] & 0x80) ? -1 : (long)(d[pos] & 0x7F) * ((d[pos] & 0x40) ? 1031 : 1);
        }
        info.max_len = (param & 0x10) ? 0 : (param & 0x08) ? 16 + (size_t)param * 7 : PP2_MAX_HEADER_LEN;
        if ((param & 0x07) == 0x07 && n > 8) {
            /* one field made huge (around the 16-bit length limits), from a static buffer */
            static uint8_t big[70000];
            pp_str *bigs[6] = {&info.alpn, &info.ssl_cn, &info.ssl_cipher, &info.netns,
                               &info.extra_tlvs, &info.unique_id};
            pp_str *f = bigs[d[n - 1] % 6];
            f->ptr = big;
            f->len = 65520 + (size_t)(d[n - 1] >> 3) % 24 * 3;      /* 65520 .. 65589 */
            if (d[n - 1] & 1)
                info.noop_len = 65535 + (d[n - 2] & 1);
        }
    }

    sz = pp2_build_size(&info);
    out = malloc(sz > 0 ? (size_t)sz : 1);
    CHECK(out);
    len = pp2_build(&info, out, sz > 0 ? (size_t)sz : 0);
    if (sz < 0) {
        CHECK(len == sz && (sz == PP_ERR_ARG || sz == PP_ERR_TOO_LONG));
        /* documented reasons */
        if (sz == PP_ERR_ARG)
            CHECK(info.command > 1 || fam_alen(info.fam) < 0 ||
                  (info.authority.ptr && info.authority.len > PP2_AUTHORITY_MAX) ||
                  (info.unique_id.ptr && info.unique_id.len > PP2_UNIQUE_ID_MAX) ||
                  info.extra_tlvs.ptr);
    } else if (len == PP_ERR_MAX_LEN) {
        CHECK((size_t)sz > (info.max_len ? info.max_len : PP2_DEFAULT_MAX_LEN));
    } else {
        CHECK(len == sz && len >= PP2_HEADER_LEN);
        CHECK(pp2_build(&info, out, (size_t)len - 1) == PP_ERR_CAP);
        if (!extras_strict_ok(&info.extra_tlvs)) {
            check_parse(out, (size_t)len, PP2_MAX_HEADER_LEN);
            free(out);
            goto v1;
        }
        CHECK(pp_parse_ex(out, (size_t)len, PP2_MAX_HEADER_LEN, &r) == PP_VALID);
        CHECK(r.header_len == (size_t)len && r.command == info.command && r.fam == info.fam);
        CHECK(!!r.has_crc32c == !!(info.flags & PP2_F_CRC32C));
        {
            long alen = fam_alen(info.fam);
            size_t al = alen == PP2_ADDR_LEN_INET ? 4 : alen == PP2_ADDR_LEN_INET6 ? 16 :
                        alen == PP2_ADDR_LEN_UNIX ? 108 : 0;
            CHECK(memcmp(r.src_addr, info.src_addr, al) == 0 && memcmp(r.dst_addr, info.dst_addr, al) == 0);
            if (al == 4 || al == 16)
                CHECK(r.src_port == info.src_port && r.dst_port == info.dst_port);
        }
        /* every field comes back as a TLV (first of its type, in HAProxy's order) */
        {
            pp_tlv t;
            if (info.alpn.ptr) {
                CHECK(pp_tlv_find(r.tlv, r.tlv_len, PP2_TYPE_ALPN, &t) == 1);
                CHECK(t.len == info.alpn.len && (!t.len || memcmp(t.value, info.alpn.ptr, t.len) == 0));
            }
            if (info.flags & PP2_F_SSL) {
                uint8_t client;
                uint32_t verify;
                pp_tlv_iter sub;
                pp_tlv s;
                CHECK(pp_tlv_find(r.tlv, r.tlv_len, PP2_TYPE_SSL, &t) == 1);
                CHECK(pp_tlv_ssl_open(&t, &client, &verify, &sub) == 0);
                CHECK(client == info.ssl_client && verify == info.ssl_verify);
                if (info.ssl_cn.ptr) {
                    int found = 0;
                    while (pp_tlv_next(&sub, &s) == 1)
                        if (s.type == PP2_SUBTYPE_SSL_CN && !found) {
                            found = 1;
                            CHECK(s.len == info.ssl_cn.len &&
                                  (!s.len || memcmp(s.value, info.ssl_cn.ptr, s.len) == 0));
                        }
                    CHECK(found);
                }
            }
        }
        check_parse(out, (size_t)len, PP2_MAX_HEADER_LEN);
    }
    free(out);

v1:
    /* v1 from the same info */
    len = pp1_build(&info, line, sizeof line);
    if (len == PP_ERR_MAX_LEN) {
        CHECK(info.max_len && info.max_len < PP1_MAX_LEN);
    } else {
        CHECK(len >= 15 && len <= PP1_MAX_LEN);
        check_parse((const uint8_t *)line, (size_t)len, PP_PARSE_DEFAULT_MAX);
        CHECK(pp_parse((const uint8_t *)line, (size_t)len, &r) == PP_VALID && r.header_len == (size_t)len);
        if (info.command == PP2_CMD_PROXY && (info.fam == PP2_TCP4 || info.fam == PP2_TCP6)) {
            size_t al = info.fam == PP2_TCP4 ? 4 : 16;
            CHECK(r.fam == info.fam && r.src_port == info.src_port && r.dst_port == info.dst_port);
            CHECK(memcmp(r.src_addr, info.src_addr, al) == 0 && memcmp(r.dst_addr, info.dst_addr, al) == 0);
        } else {
            CHECK(r.fam == PP2_AF_UNSPEC);
        }
        CHECK(pp1_build(&info, line, (size_t)len - 1) == PP_ERR_CAP);
    }
}

/* Mode 3: a v2 preamble + the data, with an optional CRC32C fix-up. */
static void check_templated(const uint8_t *d, size_t n, unsigned param)
{
    static const uint8_t fams[8] = {0x11, 0x21, 0x31, 0x00, 0x12, 0x22, 0x32, 0x11};
    size_t m = n > 4096 ? 4096 : n, total = PP2_HEADER_LEN + m;
    uint8_t *b = malloc(total);
    CHECK(b);
    memcpy(b, PP2_SIGNATURE, PP2_SIGNATURE_LEN);
    b[12] = (param & 0x10) ? 0x20 : 0x21;
    b[13] = fams[param & 7];
    b[14] = (uint8_t)(m >> 8);
    b[15] = (uint8_t)m;
    memcpy(b + PP2_HEADER_LEN, d, m);
    if (param & 0x20) {
        /* fix up the first CRC32C TLV of a well-formed TLV area */
        long alen = fam_alen(b[13]);
        if (alen >= 0 && (size_t)alen <= m) {
            pp_tlv t;
            if (pp_tlv_find(b + PP2_HEADER_LEN + alen, m - (size_t)alen, PP2_TYPE_CRC32C, &t) == 1 &&
                t.len == 4) {
                size_t at = (size_t)(t.value - b);
                uint32_t c = crc32c_bitwise(b, total, at);
                b[at] = (uint8_t)(c >> 24);
                b[at + 1] = (uint8_t)(c >> 16);
                b[at + 2] = (uint8_t)(c >> 8);
                b[at + 3] = (uint8_t)c;
            }
        }
    }
    CHECK(pp_crc32c(b, total) == crc32c_bitwise(b, total, total));
    check_parse(b, total, PP_PARSE_DEFAULT_MAX + 32);
    walk_tlvs(d, n);
    free(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    unsigned mode, param;
    if (size == 0)
        return 0;
    /* API edges: NULL result / NULL buffer; pp_find_ctl against a plain loop */
    {
        pp_result r;
        long want = -1;
        size_t i;
        CHECK(pp_parse_ex(data, size, 4096, NULL) == PP_INVALID);
        CHECK(pp_parse_ex(NULL, 0, 4096, &r) == PP_NEED_MORE);
        CHECK(pp_parse_ex(NULL, size, 4096, &r) == PP_INVALID && r.reason != NULL);
        for (i = 0; i < size && want < 0; i++)
            if (data[i] < 0x20 || data[i] == 0x7F)
                want = (long)i;
        CHECK(pp_find_ctl(data, size) == want && pp_find_ctl(NULL, size) == -1);
    }
    mode = data[0] & 3;
    param = data[0] >> 2;
    data++;
    size--;
    switch (mode) {
    case 0:
        check_parse(data, size, PP_PARSE_DEFAULT_MAX);
        break;
    case 1:
        check_parse(data, size, caps[param & 7] + (param >> 3) * 3);
        break;
    case 2:
        check_build(data, size, param);
        break;
    default:
        check_templated(data, size, param);
        break;
    }
    return 0;
}
