/*
 * PROXY protocol v1/v2 builder and strict incremental parser. See proxy_v2.h for the API
 * and docs/proxy-protocol.md for the wire facts (HAProxy 2.6 is the reference sender).
 *
 * Plain C99 plus the POSIX socket structs used by pp2_info_set_sockaddrs(); no
 * allocation, no global mutable state.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "proxy_v2.h"

#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>

/* ---- CRC32C ------------------------------------------------------------------------- */
/* Table for the reflected Castagnoli polynomial 0x82F63B78 (RFC 4960 appendix B). */
static const uint32_t crc32c_table[256] = {
    0x00000000u, 0xf26b8303u, 0xe13b70f7u, 0x1350f3f4u, 0xc79a971fu, 0x35f1141cu,
    0x26a1e7e8u, 0xd4ca64ebu, 0x8ad958cfu, 0x78b2dbccu, 0x6be22838u, 0x9989ab3bu,
    0x4d43cfd0u, 0xbf284cd3u, 0xac78bf27u, 0x5e133c24u, 0x105ec76fu, 0xe235446cu,
    0xf165b798u, 0x030e349bu, 0xd7c45070u, 0x25afd373u, 0x36ff2087u, 0xc494a384u,
    0x9a879fa0u, 0x68ec1ca3u, 0x7bbcef57u, 0x89d76c54u, 0x5d1d08bfu, 0xaf768bbcu,
    0xbc267848u, 0x4e4dfb4bu, 0x20bd8edeu, 0xd2d60dddu, 0xc186fe29u, 0x33ed7d2au,
    0xe72719c1u, 0x154c9ac2u, 0x061c6936u, 0xf477ea35u, 0xaa64d611u, 0x580f5512u,
    0x4b5fa6e6u, 0xb93425e5u, 0x6dfe410eu, 0x9f95c20du, 0x8cc531f9u, 0x7eaeb2fau,
    0x30e349b1u, 0xc288cab2u, 0xd1d83946u, 0x23b3ba45u, 0xf779deaeu, 0x05125dadu,
    0x1642ae59u, 0xe4292d5au, 0xba3a117eu, 0x4851927du, 0x5b016189u, 0xa96ae28au,
    0x7da08661u, 0x8fcb0562u, 0x9c9bf696u, 0x6ef07595u, 0x417b1dbcu, 0xb3109ebfu,
    0xa0406d4bu, 0x522bee48u, 0x86e18aa3u, 0x748a09a0u, 0x67dafa54u, 0x95b17957u,
    0xcba24573u, 0x39c9c670u, 0x2a993584u, 0xd8f2b687u, 0x0c38d26cu, 0xfe53516fu,
    0xed03a29bu, 0x1f682198u, 0x5125dad3u, 0xa34e59d0u, 0xb01eaa24u, 0x42752927u,
    0x96bf4dccu, 0x64d4cecfu, 0x77843d3bu, 0x85efbe38u, 0xdbfc821cu, 0x2997011fu,
    0x3ac7f2ebu, 0xc8ac71e8u, 0x1c661503u, 0xee0d9600u, 0xfd5d65f4u, 0x0f36e6f7u,
    0x61c69362u, 0x93ad1061u, 0x80fde395u, 0x72966096u, 0xa65c047du, 0x5437877eu,
    0x4767748au, 0xb50cf789u, 0xeb1fcbadu, 0x197448aeu, 0x0a24bb5au, 0xf84f3859u,
    0x2c855cb2u, 0xdeeedfb1u, 0xcdbe2c45u, 0x3fd5af46u, 0x7198540du, 0x83f3d70eu,
    0x90a324fau, 0x62c8a7f9u, 0xb602c312u, 0x44694011u, 0x5739b3e5u, 0xa55230e6u,
    0xfb410cc2u, 0x092a8fc1u, 0x1a7a7c35u, 0xe811ff36u, 0x3cdb9bddu, 0xceb018deu,
    0xdde0eb2au, 0x2f8b6829u, 0x82f63b78u, 0x709db87bu, 0x63cd4b8fu, 0x91a6c88cu,
    0x456cac67u, 0xb7072f64u, 0xa457dc90u, 0x563c5f93u, 0x082f63b7u, 0xfa44e0b4u,
    0xe9141340u, 0x1b7f9043u, 0xcfb5f4a8u, 0x3dde77abu, 0x2e8e845fu, 0xdce5075cu,
    0x92a8fc17u, 0x60c37f14u, 0x73938ce0u, 0x81f80fe3u, 0x55326b08u, 0xa759e80bu,
    0xb4091bffu, 0x466298fcu, 0x1871a4d8u, 0xea1a27dbu, 0xf94ad42fu, 0x0b21572cu,
    0xdfeb33c7u, 0x2d80b0c4u, 0x3ed04330u, 0xccbbc033u, 0xa24bb5a6u, 0x502036a5u,
    0x4370c551u, 0xb11b4652u, 0x65d122b9u, 0x97baa1bau, 0x84ea524eu, 0x7681d14du,
    0x2892ed69u, 0xdaf96e6au, 0xc9a99d9eu, 0x3bc21e9du, 0xef087a76u, 0x1d63f975u,
    0x0e330a81u, 0xfc588982u, 0xb21572c9u, 0x407ef1cau, 0x532e023eu, 0xa145813du,
    0x758fe5d6u, 0x87e466d5u, 0x94b49521u, 0x66df1622u, 0x38cc2a06u, 0xcaa7a905u,
    0xd9f75af1u, 0x2b9cd9f2u, 0xff56bd19u, 0x0d3d3e1au, 0x1e6dcdeeu, 0xec064eedu,
    0xc38d26c4u, 0x31e6a5c7u, 0x22b65633u, 0xd0ddd530u, 0x0417b1dbu, 0xf67c32d8u,
    0xe52cc12cu, 0x1747422fu, 0x49547e0bu, 0xbb3ffd08u, 0xa86f0efcu, 0x5a048dffu,
    0x8ecee914u, 0x7ca56a17u, 0x6ff599e3u, 0x9d9e1ae0u, 0xd3d3e1abu, 0x21b862a8u,
    0x32e8915cu, 0xc083125fu, 0x144976b4u, 0xe622f5b7u, 0xf5720643u, 0x07198540u,
    0x590ab964u, 0xab613a67u, 0xb831c993u, 0x4a5a4a90u, 0x9e902e7bu, 0x6cfbad78u,
    0x7fab5e8cu, 0x8dc0dd8fu, 0xe330a81au, 0x115b2b19u, 0x020bd8edu, 0xf0605beeu,
    0x24aa3f05u, 0xd6c1bc06u, 0xc5914ff2u, 0x37faccf1u, 0x69e9f0d5u, 0x9b8273d6u,
    0x88d28022u, 0x7ab90321u, 0xae7367cau, 0x5c18e4c9u, 0x4f48173du, 0xbd23943eu,
    0xf36e6f75u, 0x0105ec76u, 0x12551f82u, 0xe03e9c81u, 0x34f4f86au, 0xc69f7b69u,
    0xd5cf889du, 0x27a40b9eu, 0x79b737bau, 0x8bdcb4b9u, 0x988c474du, 0x6ae7c44eu,
    0xbe2da0a5u, 0x4c4623a6u, 0x5f16d052u, 0xad7d5351u,
};


uint32_t pp_crc32c_update(uint32_t reg, const uint8_t *buf, size_t len)
{
    while (len--)
        reg = (reg >> 8) ^ crc32c_table[(reg ^ *buf++) & 0xffu];
    return reg;
}

uint32_t pp_crc32c(const uint8_t *buf, size_t len)
{
    return pp_crc32c_update(0xFFFFFFFFu, buf, len) ^ 0xFFFFFFFFu;
}

/* ---- small helpers ------------------------------------------------------------------ */
static const uint8_t pp2_sig[PP2_SIGNATURE_LEN] = {
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A
};

/* Address block length for a family/transport byte; -1 for values the spec does not define. */
static long fam_addr_len(uint8_t fam)
{
    switch (fam) {
    case PP2_AF_UNSPEC:   return 0;
    case PP2_TCP4:
    case PP2_UDP4:        return PP2_ADDR_LEN_INET;
    case PP2_TCP6:
    case PP2_UDP6:        return PP2_ADDR_LEN_INET6;
    case PP2_UNIX_STREAM:
    case PP2_UNIX_DGRAM:  return PP2_ADDR_LEN_UNIX;
    default:              return -1;
    }
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static uint32_t get32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

long pp_find_ctl(const uint8_t *s, size_t len)
{
    size_t i;
    if (!s)
        return -1;
    for (i = 0; i < len; i++)
        if (s[i] < 0x20 || s[i] == 0x7f)
            return (long)i;
    return -1;
}

/* ---- builder ------------------------------------------------------------------------ */
void pp2_info_init(pp2_info *info)
{
    memset(info, 0, sizeof(*info));
    info->command = PP2_CMD_PROXY;
    info->fam = PP2_AF_UNSPEC;
    info->noop_len = -1;
}

int pp2_info_set_sockaddrs(pp2_info *info, const void *src, const void *dst)
{
    struct sockaddr sa_s, sa_d;

    if (!info)
        return PP_ERR_ARG;
    memset(info->src_addr, 0, sizeof(info->src_addr));
    memset(info->dst_addr, 0, sizeof(info->dst_addr));
    info->src_port = info->dst_port = 0;
    if (!src || !dst) {
        info->command = PP2_CMD_LOCAL;
        info->fam = PP2_AF_UNSPEC;
        return 0;
    }
    memcpy(&sa_s, src, sizeof(sa_s));       /* only to read sa_family without aliasing */
    memcpy(&sa_d, dst, sizeof(sa_d));
    info->command = PP2_CMD_PROXY;
    if (sa_s.sa_family == AF_INET && sa_d.sa_family == AF_INET) {
        struct sockaddr_in s4, d4;
        memcpy(&s4, src, sizeof(s4));
        memcpy(&d4, dst, sizeof(d4));
        info->fam = PP2_TCP4;
        memcpy(info->src_addr, &s4.sin_addr, 4);
        memcpy(info->dst_addr, &d4.sin_addr, 4);
        info->src_port = ntohs(s4.sin_port);
        info->dst_port = ntohs(d4.sin_port);
    } else if ((sa_s.sa_family == AF_INET || sa_s.sa_family == AF_INET6) &&
               (sa_d.sa_family == AF_INET || sa_d.sa_family == AF_INET6)) {
        /* at least one IPv6: both as IPv6, IPv4 as ::ffff:a.b.c.d (HAProxy's v4tov6) */
        const void *sides[2] = { src, dst };
        uint8_t *addrs[2] = { info->src_addr, info->dst_addr };
        uint16_t *ports[2] = { &info->src_port, &info->dst_port };
        int i;
        info->fam = PP2_TCP6;
        for (i = 0; i < 2; i++) {
            struct sockaddr sa;
            memcpy(&sa, sides[i], sizeof(sa));
            if (sa.sa_family == AF_INET) {
                struct sockaddr_in a4;
                memcpy(&a4, sides[i], sizeof(a4));
                addrs[i][10] = 0xff;
                addrs[i][11] = 0xff;
                memcpy(addrs[i] + 12, &a4.sin_addr, 4);
                *ports[i] = ntohs(a4.sin_port);
            } else {
                struct sockaddr_in6 a6;
                memcpy(&a6, sides[i], sizeof(a6));
                memcpy(addrs[i], &a6.sin6_addr, 16);
                *ports[i] = ntohs(a6.sin6_port);
            }
        }
    } else if (sa_s.sa_family == AF_UNIX && sa_d.sa_family == AF_UNIX) {
        struct sockaddr_un su, du;
        size_t n = sizeof(su.sun_path) < PP2_UNIX_PATH_LEN ? sizeof(su.sun_path) : PP2_UNIX_PATH_LEN;
        memcpy(&su, src, sizeof(su));
        memcpy(&du, dst, sizeof(du));
        info->fam = PP2_UNIX_STREAM;
        memcpy(info->src_addr, su.sun_path, n);
        memcpy(info->dst_addr, du.sun_path, n);
    } else {
        info->command = PP2_CMD_LOCAL;
        info->fam = PP2_AF_UNSPEC;
    }
    return 0;
}

/* Size of one TLV carrying `s`, 0 when absent; -1 when the value is too long. */
static long tlv_size(const pp_str *s, size_t limit)
{
    if (!s->ptr)
        return 0;
    if (s->len > limit)
        return -1;
    return (long)(PP2_TLV_HEADER_LEN + s->len);
}

static uint8_t *write_tlv(uint8_t *p, uint8_t type, const uint8_t *v, size_t n)
{
    p[0] = type;
    put16(p + 1, (uint16_t)n);
    if (n)
        memcpy(p + PP2_TLV_HEADER_LEN, v, n);
    return p + PP2_TLV_HEADER_LEN + n;
}

static uint8_t *write_opt_tlv(uint8_t *p, uint8_t type, const pp_str *s)
{
    return s->ptr ? write_tlv(p, type, s->ptr, s->len) : p;
}

/* Checks that `area` is a well-formed TLV sequence. */
static int tlvs_well_formed(const uint8_t *area, size_t len)
{
    pp_tlv_iter it;
    pp_tlv t;
    int r;
    pp_tlv_iter_init(&it, area, len);
    while ((r = pp_tlv_next(&it, &t)) == 1)
        ;
    return r == 0;
}

/* Pass 1 of the builder: total header length (ignoring max_len) or a PP_ERR_* code. */
static long measure(const pp2_info *info, long *ssl_len_out)
{
    long addr_len, sz, ssl_len = 0;
    size_t total;
    int i;
    const pp_str *subs[5];

    if (!info)
        return PP_ERR_ARG;
    if (info->command != PP2_CMD_PROXY && info->command != PP2_CMD_LOCAL)
        return PP_ERR_ARG;
    addr_len = fam_addr_len(info->fam);
    if (addr_len < 0)
        return PP_ERR_ARG;
    /* each part is <= 65535 + 3 bytes, so none of these sums can overflow */
    total = PP2_HEADER_LEN + (size_t)addr_len;
    if (info->flags & PP2_F_CRC32C)
        total += PP2_TLV_HEADER_LEN + 4;
    if ((sz = tlv_size(&info->alpn, 65535)) < 0) return PP_ERR_TOO_LONG;
    total += (size_t)sz;
    if ((sz = tlv_size(&info->authority, PP2_AUTHORITY_MAX)) < 0) return PP_ERR_ARG;
    total += (size_t)sz;
    if ((sz = tlv_size(&info->unique_id, PP2_UNIQUE_ID_MAX)) < 0) return PP_ERR_ARG;
    total += (size_t)sz;
    if (info->flags & PP2_F_SSL) {
        subs[0] = &info->ssl_version;
        subs[1] = &info->ssl_cn;
        subs[2] = &info->ssl_key_alg;
        subs[3] = &info->ssl_sig_alg;
        subs[4] = &info->ssl_cipher;
        ssl_len = PP2_SSL_FIXED_LEN;
        for (i = 0; i < 5; i++) {
            if ((sz = tlv_size(subs[i], 65535)) < 0) return PP_ERR_TOO_LONG;
            ssl_len += sz;
        }
        if (ssl_len > 65535)
            return PP_ERR_TOO_LONG;
        total += PP2_TLV_HEADER_LEN + (size_t)ssl_len;
    }
    if ((sz = tlv_size(&info->netns, 65535)) < 0) return PP_ERR_TOO_LONG;
    total += (size_t)sz;
    if (info->extra_tlvs.ptr) {
        if (info->extra_tlvs.len > 65535)
            return PP_ERR_TOO_LONG;
        if (!tlvs_well_formed(info->extra_tlvs.ptr, info->extra_tlvs.len))
            return PP_ERR_ARG;
        total += info->extra_tlvs.len;
    }
    if (info->noop_len >= 0) {
        if (info->noop_len > 65535)
            return PP_ERR_TOO_LONG;
        total += PP2_TLV_HEADER_LEN + (size_t)info->noop_len;
    }
    if (total - PP2_HEADER_LEN > 65535)
        return PP_ERR_TOO_LONG;
    if (ssl_len_out)
        *ssl_len_out = ssl_len;
    return (long)total;
}

long pp2_build_size(const pp2_info *info)
{
    return measure(info, NULL);
}

int pp2_build(const pp2_info *info, uint8_t *out, size_t cap)
{
    long addr_len, ssl_len = 0, m;
    size_t total, limit;
    uint8_t *p;
    uint8_t *crc_p = NULL;
    const pp_str *subs[5];
    static const uint8_t sub_types[5] = {
        PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_KEY_ALG,
        PP2_SUBTYPE_SSL_SIG_ALG, PP2_SUBTYPE_SSL_CIPHER,
    };
    int i;

    if (!info || (!out && cap))
        return PP_ERR_ARG;
    m = measure(info, &ssl_len);
    if (m < 0)
        return (int)m;
    total = (size_t)m;
    limit = info->max_len ? info->max_len : PP2_DEFAULT_MAX_LEN;
    if (total > limit)
        return PP_ERR_MAX_LEN;
    if (total > cap)
        return PP_ERR_CAP;
    addr_len = fam_addr_len(info->fam);
    subs[0] = &info->ssl_version;
    subs[1] = &info->ssl_cn;
    subs[2] = &info->ssl_key_alg;
    subs[3] = &info->ssl_sig_alg;
    subs[4] = &info->ssl_cipher;

    /* pass 2: write, in HAProxy 2.6's order */
    p = out;
    memcpy(p, pp2_sig, PP2_SIGNATURE_LEN);
    p[12] = (uint8_t)(PP2_VERSION | info->command);
    p[13] = info->fam;
    put16(p + 14, (uint16_t)(total - PP2_HEADER_LEN));
    p += PP2_HEADER_LEN;
    switch (addr_len) {
    case PP2_ADDR_LEN_INET:
        memcpy(p, info->src_addr, 4);
        memcpy(p + 4, info->dst_addr, 4);
        put16(p + 8, info->src_port);
        put16(p + 10, info->dst_port);
        break;
    case PP2_ADDR_LEN_INET6:
        memcpy(p, info->src_addr, 16);
        memcpy(p + 16, info->dst_addr, 16);
        put16(p + 32, info->src_port);
        put16(p + 34, info->dst_port);
        break;
    case PP2_ADDR_LEN_UNIX:
        memcpy(p, info->src_addr, PP2_UNIX_PATH_LEN);
        memcpy(p + PP2_UNIX_PATH_LEN, info->dst_addr, PP2_UNIX_PATH_LEN);
        break;
    default:
        break;
    }
    p += addr_len;
    if (info->flags & PP2_F_CRC32C) {
        static const uint8_t zero4[4] = { 0, 0, 0, 0 };
        crc_p = p + PP2_TLV_HEADER_LEN;
        p = write_tlv(p, PP2_TYPE_CRC32C, zero4, 4);
    }
    p = write_opt_tlv(p, PP2_TYPE_ALPN, &info->alpn);
    p = write_opt_tlv(p, PP2_TYPE_AUTHORITY, &info->authority);
    p = write_opt_tlv(p, PP2_TYPE_UNIQUE_ID, &info->unique_id);
    if (info->flags & PP2_F_SSL) {
        p[0] = PP2_TYPE_SSL;
        put16(p + 1, (uint16_t)ssl_len);
        p[3] = info->ssl_client;
        put32(p + 4, info->ssl_verify);
        p += PP2_TLV_HEADER_LEN + PP2_SSL_FIXED_LEN;
        for (i = 0; i < 5; i++)
            p = write_opt_tlv(p, sub_types[i], subs[i]);
    }
    p = write_opt_tlv(p, PP2_TYPE_NETNS, &info->netns);
    if (info->extra_tlvs.ptr && info->extra_tlvs.len) {
        memcpy(p, info->extra_tlvs.ptr, info->extra_tlvs.len);
        p += info->extra_tlvs.len;
    }
    if (info->noop_len >= 0) {
        p[0] = PP2_TYPE_NOOP;
        put16(p + 1, (uint16_t)info->noop_len);
        memset(p + PP2_TLV_HEADER_LEN, 0, (size_t)info->noop_len);
        p += PP2_TLV_HEADER_LEN + (size_t)info->noop_len;
    }
    if (crc_p)
        put32(crc_p, pp_crc32c(out, total));
    return (int)total;
}

/* ---- text addresses ------------------------------------------------------------------ */
static char *fmt_u(char *p, unsigned v)
{
    char tmp[10];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

int pp_format_ipv4(const uint8_t a[4], char *out, size_t cap)
{
    char buf[16], *p = buf;
    int i;
    size_t n;
    for (i = 0; i < 4; i++) {
        if (i)
            *p++ = '.';
        p = fmt_u(p, a[i]);
    }
    n = (size_t)(p - buf);
    if (n + 1 > cap)
        return PP_ERR_CAP;
    memcpy(out, buf, n);
    out[n] = '\0';
    return (int)n;
}

/* Same output as glibc's inet_ntop(AF_INET6): lowercase, no leading zeros, the longest
 * (leftmost on ties) run of >= 2 zero groups as "::", and the last 32 bits dotted when the
 * address is IPv4-compatible (::a.b.c.d, first six groups zero) or v4-mapped (::ffff:a.b.c.d). */
int pp_format_ipv6(const uint8_t a[16], char *out, size_t cap)
{
    static const char hex[] = "0123456789abcdef";
    char buf[48], *p = buf;
    unsigned w[8];
    int i, best = -1, best_len = 0, cur = -1, cur_len = 0;
    size_t n;

    for (i = 0; i < 8; i++)
        w[i] = ((unsigned)a[2 * i] << 8) | a[2 * i + 1];
    for (i = 0; i < 8; i++) {
        if (w[i] == 0) {
            if (cur < 0) { cur = i; cur_len = 1; } else cur_len++;
        } else if (cur >= 0) {
            if (cur_len > best_len) { best = cur; best_len = cur_len; }
            cur = -1;
        }
    }
    if (cur >= 0 && cur_len > best_len) { best = cur; best_len = cur_len; }
    if (best_len < 2)
        best = -1;

    for (i = 0; i < 8; i++) {
        if (best >= 0 && i >= best && i < best + best_len) {
            if (i == best)
                *p++ = ':';
            continue;
        }
        if (i)
            *p++ = ':';
        if (i == 6 && best == 0 && (best_len == 6 || (best_len == 5 && w[5] == 0xffff))) {
            int j;
            for (j = 12; j < 16; j++) {
                if (j > 12)
                    *p++ = '.';
                p = fmt_u(p, a[j]);
            }
            break;
        }
        {
            unsigned v = w[i];
            int started = 0, sh;
            for (sh = 12; sh >= 0; sh -= 4) {
                unsigned d = (v >> sh) & 0xf;
                if (d || started || sh == 0) { *p++ = hex[d]; started = 1; }
            }
        }
    }
    if (best >= 0 && best + best_len == 8)
        *p++ = ':';
    n = (size_t)(p - buf);
    if (n + 1 > cap)
        return PP_ERR_CAP;
    memcpy(out, buf, n);
    out[n] = '\0';
    return (int)n;
}

int pp1_build(const pp2_info *info, char *out, size_t cap)
{
    char line[PP1_MAX_LEN + 1], *p = line;
    size_t n;
    int r;

    if (!info || (!out && cap))
        return PP_ERR_ARG;
    memcpy(p, "PROXY ", 6);
    p += 6;
    if (info->command == PP2_CMD_PROXY && (info->fam == PP2_TCP4 || info->fam == PP2_TCP6)) {
        int v4 = info->fam == PP2_TCP4;
        memcpy(p, v4 ? "TCP4 " : "TCP6 ", 5);
        p += 5;
        r = v4 ? pp_format_ipv4(info->src_addr, p, 46) : pp_format_ipv6(info->src_addr, p, 46);
        p += r;
        *p++ = ' ';
        r = v4 ? pp_format_ipv4(info->dst_addr, p, 46) : pp_format_ipv6(info->dst_addr, p, 46);
        p += r;
        *p++ = ' ';
        p = fmt_u(p, info->src_port);
        *p++ = ' ';
        p = fmt_u(p, info->dst_port);
    } else {
        memcpy(p, "UNKNOWN", 7);
        p += 7;
    }
    *p++ = '\r';
    *p++ = '\n';
    n = (size_t)(p - line);
    if (n > PP1_MAX_LEN)          /* cannot happen: the text of an IPv6 address is at */
        return PP_ERR_TOO_LONG;   /* most 39 characters here, so n <= 104 */
    if (info->max_len && n > info->max_len)
        return PP_ERR_MAX_LEN;
    if (n > cap)
        return PP_ERR_CAP;
    memcpy(out, line, n);
    return (int)n;
}

/* ---- TLV iteration ------------------------------------------------------------------ */
void pp_tlv_iter_init(pp_tlv_iter *it, const uint8_t *area, size_t len)
{
    it->p = area;
    it->end = area ? area + len : area;
}

int pp_tlv_next(pp_tlv_iter *it, pp_tlv *out)
{
    size_t left;
    uint16_t n;
    if (!it->p || it->p >= it->end)
        return 0;
    left = (size_t)(it->end - it->p);
    if (left < PP2_TLV_HEADER_LEN)
        return -1;
    n = get16(it->p + 1);
    if ((size_t)n > left - PP2_TLV_HEADER_LEN)
        return -1;
    out->type = it->p[0];
    out->len = n;
    out->value = it->p + PP2_TLV_HEADER_LEN;
    it->p += PP2_TLV_HEADER_LEN + n;
    return 1;
}

int pp_tlv_ssl_open(const pp_tlv *ssl, uint8_t *client, uint32_t *verify, pp_tlv_iter *sub)
{
    if (!ssl || ssl->type != PP2_TYPE_SSL || ssl->len < PP2_SSL_FIXED_LEN)
        return -1;
    if (client)
        *client = ssl->value[0];
    if (verify)
        *verify = get32(ssl->value + 1);
    if (sub)
        pp_tlv_iter_init(sub, ssl->value + PP2_SSL_FIXED_LEN, ssl->len - PP2_SSL_FIXED_LEN);
    return 0;
}

int pp_tlv_find(const uint8_t *area, size_t len, uint8_t type, pp_tlv *out)
{
    pp_tlv_iter it;
    pp_tlv t;
    int r;
    pp_tlv_iter_init(&it, area, len);
    while ((r = pp_tlv_next(&it, &t)) == 1) {
        if (t.type == type) {
            if (out)
                *out = t;
            return 1;
        }
    }
    return r;   /* 0 end, -1 malformed */
}

/* ---- parser ------------------------------------------------------------------------- */
static int invalid(pp_result *res, const char *reason, size_t off)
{
    res->reason = reason;
    res->error_offset = off;
    return PP_INVALID;
}

static int parse_v2(const uint8_t *buf, size_t len, size_t max_len, pp_result *res)
{
    size_t i, n = len < PP2_SIGNATURE_LEN ? len : PP2_SIGNATURE_LEN;
    size_t total, pos, tlv_start, crc_off = 0;
    long alen;
    uint16_t dlen;
    uint8_t vc, fam;

    for (i = 0; i < n; i++)
        if (buf[i] != pp2_sig[i])
            return invalid(res, "bad PROXY v2 signature", i);
    if (len < 13)
        return PP_NEED_MORE;
    vc = buf[12];
    if ((vc & 0xF0) != PP2_VERSION)
        return invalid(res, "unsupported PROXY protocol version (want 2)", 12);
    if ((vc & 0x0F) > PP2_CMD_PROXY)
        return invalid(res, "unknown PROXY v2 command", 12);
    if (len < 14)
        return PP_NEED_MORE;
    fam = buf[13];
    alen = fam_addr_len(fam);
    if (alen < 0)
        return invalid(res, "unknown PROXY v2 address family or transport", 13);
    if (len < PP2_HEADER_LEN)
        return PP_NEED_MORE;
    dlen = get16(buf + 14);
    total = PP2_HEADER_LEN + (size_t)dlen;
    if (total > max_len)
        return invalid(res, "PROXY v2 header longer than the configured limit", 14);
    if ((size_t)dlen < (size_t)alen)
        return invalid(res, "PROXY v2 length shorter than the address block", 14);
    if (len < total)
        return PP_NEED_MORE;

    res->version = 2;
    res->command = vc & 0x0F;
    res->fam = fam;
    switch (alen) {
    case PP2_ADDR_LEN_INET:
        memcpy(res->src_addr, buf + 16, 4);
        memcpy(res->dst_addr, buf + 20, 4);
        res->src_port = get16(buf + 24);
        res->dst_port = get16(buf + 26);
        break;
    case PP2_ADDR_LEN_INET6:
        memcpy(res->src_addr, buf + 16, 16);
        memcpy(res->dst_addr, buf + 32, 16);
        res->src_port = get16(buf + 48);
        res->dst_port = get16(buf + 50);
        break;
    case PP2_ADDR_LEN_UNIX:
        memcpy(res->src_addr, buf + 16, PP2_UNIX_PATH_LEN);
        memcpy(res->dst_addr, buf + 16 + PP2_UNIX_PATH_LEN, PP2_UNIX_PATH_LEN);
        break;
    default:
        break;
    }

    tlv_start = PP2_HEADER_LEN + (size_t)alen;
    pos = tlv_start;
    while (pos < total) {
        uint8_t type;
        size_t tl;
        if (total - pos < PP2_TLV_HEADER_LEN)
            return invalid(res, "truncated TLV header at the end of the PROXY v2 header", pos);
        type = buf[pos];
        tl = get16(buf + pos + 1);
        if (tl > total - pos - PP2_TLV_HEADER_LEN)
            return invalid(res, "TLV runs past the end of the PROXY v2 header", pos);
        switch (type) {
        case PP2_TYPE_CRC32C:
            if (tl != 4)
                return invalid(res, "CRC32C TLV is not 4 bytes long", pos);
            if (res->has_crc32c)
                return invalid(res, "more than one CRC32C TLV", pos);
            res->has_crc32c = 1;
            res->crc32c = get32(buf + pos + PP2_TLV_HEADER_LEN);
            crc_off = pos + PP2_TLV_HEADER_LEN;
            break;
        case PP2_TYPE_AUTHORITY:
            if (tl > PP2_AUTHORITY_MAX)
                return invalid(res, "AUTHORITY TLV longer than 255 bytes", pos);
            break;
        case PP2_TYPE_UNIQUE_ID:
            if (tl > PP2_UNIQUE_ID_MAX)
                return invalid(res, "UNIQUE_ID TLV longer than 128 bytes", pos);
            break;
        case PP2_TYPE_SSL: {
            size_t sp, send;
            if (tl < PP2_SSL_FIXED_LEN)
                return invalid(res, "SSL TLV shorter than its 5-byte client/verify fields", pos);
            sp = pos + PP2_TLV_HEADER_LEN + PP2_SSL_FIXED_LEN;
            send = pos + PP2_TLV_HEADER_LEN + tl;
            while (sp < send) {
                size_t sl;
                if (send - sp < PP2_TLV_HEADER_LEN)
                    return invalid(res, "truncated sub-TLV header inside the SSL TLV", sp);
                sl = get16(buf + sp + 1);
                if (sl > send - sp - PP2_TLV_HEADER_LEN)
                    return invalid(res, "sub-TLV runs past the end of the SSL TLV", sp);
                sp += PP2_TLV_HEADER_LEN + sl;
            }
            break;
        }
        default:
            break;
        }
        pos += PP2_TLV_HEADER_LEN + tl;
    }
    if (res->has_crc32c) {
        static const uint8_t zero4[4] = { 0, 0, 0, 0 };
        uint32_t reg = pp_crc32c_update(0xFFFFFFFFu, buf, crc_off);
        reg = pp_crc32c_update(reg, zero4, 4);
        reg = pp_crc32c_update(reg, buf + crc_off + 4, total - crc_off - 4);
        if ((reg ^ 0xFFFFFFFFu) != res->crc32c)
            return invalid(res, "CRC32C mismatch", crc_off);
    }
    res->header_len = total;
    if (total > tlv_start) {
        res->tlv = buf + tlv_start;
        res->tlv_len = total - tlv_start;
    }
    return PP_VALID;
}

static int is_digit(uint8_t c) { return c >= '0' && c <= '9'; }
static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decimal without leading zeros ("0" itself is fine), at most `maxv`. */
static int parse_dec(const uint8_t *s, size_t n, unsigned maxv, unsigned *out)
{
    unsigned v = 0;
    size_t i;
    if (n == 0 || n > 5 || (n > 1 && s[0] == '0'))
        return -1;
    for (i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return -1;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v > maxv)
        return -1;
    *out = v;
    return 0;
}

static int parse_ipv4(const uint8_t *s, size_t n, uint8_t out[4])
{
    size_t i = 0, start;
    int part;
    for (part = 0; part < 4; part++) {
        unsigned v;
        start = i;
        while (i < n && s[i] != '.')
            i++;
        if (i - start > 3 || parse_dec(s + start, i - start, 255, &v) < 0)
            return -1;
        out[part] = (uint8_t)v;
        if (part < 3) {
            if (i >= n)            /* need a dot */
                return -1;
            i++;
        }
    }
    return i == n ? 0 : -1;
}

/* RFC 4291 text form as inet_pton(AF_INET6) accepts it: 1-4 hex digits per group, at most
 * one "::", optional dotted IPv4 in the last 32 bits. */
static int parse_ipv6(const uint8_t *s, size_t n, uint8_t out[16])
{
    uint8_t b[16];
    int nb = 0, gap = -1;
    size_t i = 0;

    if (n < 2)
        return -1;
    if (s[0] == ':') {
        if (s[1] != ':')
            return -1;
        gap = 0;
        i = 2;
    }
    while (i < n) {
        size_t j = i;
        int dot = 0;
        while (j < n && s[j] != ':') {
            if (s[j] == '.')
                dot = 1;
            j++;
        }
        if (dot) {
            if (j != n || nb > 12 || parse_ipv4(s + i, j - i, b + nb) < 0)
                return -1;
            nb += 4;
            i = j;
            break;
        }
        {
            unsigned v = 0;
            size_t k;
            if (j == i || j - i > 4 || nb > 14)
                return -1;
            for (k = i; k < j; k++) {
                int h = hexval(s[k]);
                if (h < 0)
                    return -1;
                v = (v << 4) | (unsigned)h;
            }
            b[nb++] = (uint8_t)(v >> 8);
            b[nb++] = (uint8_t)v;
        }
        if (j == n) {
            i = j;
            break;
        }
        /* s[j] == ':' */
        if (j + 1 < n && s[j + 1] == ':') {
            if (gap >= 0)
                return -1;
            gap = nb;
            i = j + 2;
        } else {
            i = j + 1;
            if (i == n)
                return -1;     /* trailing single ':' */
        }
    }
    if (gap >= 0) {
        int tail = nb - gap;
        if (nb > 14)
            return -1;         /* "::" must stand for at least one group */
        memset(out, 0, 16);
        memcpy(out, b, (size_t)gap);
        memcpy(out + 16 - tail, b + gap, (size_t)tail);
    } else {
        if (nb != 16)
            return -1;
        memcpy(out, b, 16);
    }
    return 0;
}

/* Could the bytes seen so far (no CRLF yet) still begin a valid v1 line? */
static int v1_prefix_ok(const uint8_t *buf, size_t len, size_t *bad)
{
    static const char *const protos[3] = { "TCP4 ", "TCP6 ", "UNKNOWN" };
    size_t i, plen = len > 6 ? len - 6 : 0;
    int k, match = -1;

    if (plen == 0)
        return 1;
    for (k = 0; k < 3; k++) {
        size_t m = strlen(protos[k]), c = plen < m ? plen : m;
        if (memcmp(buf + 6, protos[k], c) == 0) {
            match = k;
            break;
        }
    }
    if (match < 0) {
        *bad = 6;
        return 0;
    }
    if (match == 2)             /* UNKNOWN, then CRLF or a space and anything until CRLF */
        return !(len > 13 && buf[13] != ' ' && buf[13] != '\r') || ((*bad = 13), 0);
    for (i = 11; i < len; i++) {
        uint8_t c = buf[i];
        int ok = c == ' ' || c == '\r' || is_digit(c) || c == '.' ||
                 (match == 1 && (c == ':' || hexval(c) >= 0));
        if (!ok) {
            *bad = i;
            return 0;
        }
    }
    return 1;
}

static int parse_v1(const uint8_t *buf, size_t len, pp_result *res)
{
    static const char prefix[] = "PROXY ";
    size_t i, n = len < 6 ? len : 6, scan, eol = 0, bad = 0;
    const uint8_t *f[4];
    size_t fl[4];
    int nf;

    for (i = 0; i < n; i++)
        if (buf[i] != (uint8_t)prefix[i])
            return invalid(res, "bad PROXY v1 prefix", i);
    /* The first CR must be followed by LF (when that byte is there) and the first LF must
     * follow a CR, so looking at the first of each is enough (memchr is vectorised). */
    scan = len < PP1_MAX_LEN ? len : PP1_MAX_LEN;
    {
        const uint8_t *lf = memchr(buf, '\n', scan);
        size_t lim = lf ? (size_t)(lf - buf) : scan;
        const uint8_t *cr = memchr(buf, '\r', lim);
        if (cr) {
            i = (size_t)(cr - buf);
            if (i + 1 < len && buf[i + 1] != '\n')
                return invalid(res, "CR not followed by LF in PROXY v1 line", i);
        }
        if (lf) {
            i = (size_t)(lf - buf);
            if (i == 0 || buf[i - 1] != '\r')
                return invalid(res, "LF without CR in PROXY v1 line", i);
            eol = i + 1;
        }
    }
    if (!eol) {
        if (len >= PP1_MAX_LEN)
            return invalid(res, "no CRLF within the first 107 bytes of a PROXY v1 line", PP1_MAX_LEN);
        if (!v1_prefix_ok(buf, len, &bad))
            return invalid(res, "invalid character in PROXY v1 line", bad);
        return PP_NEED_MORE;
    }
    if (eol < 6 + 7 + 2)
        return invalid(res, "PROXY v1 line too short", 0);

    res->version = 1;
    res->command = PP2_CMD_PROXY;
    res->header_len = eol;
    if (memcmp(buf + 6, "UNKNOWN", 7) == 0 && (buf[13] == '\r' || buf[13] == ' ')) {
        res->fam = PP2_AF_UNSPEC;   /* the rest of the line is ignored (spec 2.1) */
        return PP_VALID;
    }
    if (memcmp(buf + 6, "TCP4 ", 5) == 0)
        res->fam = PP2_TCP4;
    else if (memcmp(buf + 6, "TCP6 ", 5) == 0)
        res->fam = PP2_TCP6;
    else
        return invalid(res, "unknown PROXY v1 protocol (want TCP4, TCP6 or UNKNOWN)", 6);

    /* exactly four fields separated by single spaces between offset 11 and the CR */
    {
        size_t end = eol - 2, start = 11;
        nf = 0;
        for (i = 11; i <= end; i++) {
            if (i == end || buf[i] == ' ') {
                if (i == start)
                    return invalid(res, "empty field in PROXY v1 line", i);
                if (nf == 4)
                    return invalid(res, "too many fields in PROXY v1 line", start);
                f[nf] = buf + start;
                fl[nf] = i - start;
                nf++;
                start = i + 1;
            }
        }
        if (nf != 4)
            return invalid(res, "too few fields in PROXY v1 line", end);
    }
    if (res->fam == PP2_TCP4) {
        if (parse_ipv4(f[0], fl[0], res->src_addr) < 0)
            return invalid(res, "bad IPv4 source address in PROXY v1 line", (size_t)(f[0] - buf));
        if (parse_ipv4(f[1], fl[1], res->dst_addr) < 0)
            return invalid(res, "bad IPv4 destination address in PROXY v1 line", (size_t)(f[1] - buf));
    } else {
        if (parse_ipv6(f[0], fl[0], res->src_addr) < 0)
            return invalid(res, "bad IPv6 source address in PROXY v1 line", (size_t)(f[0] - buf));
        if (parse_ipv6(f[1], fl[1], res->dst_addr) < 0)
            return invalid(res, "bad IPv6 destination address in PROXY v1 line", (size_t)(f[1] - buf));
    }
    {
        unsigned sp, dp;
        if (parse_dec(f[2], fl[2], 65535, &sp) < 0)
            return invalid(res, "bad source port in PROXY v1 line", (size_t)(f[2] - buf));
        if (parse_dec(f[3], fl[3], 65535, &dp) < 0)
            return invalid(res, "bad destination port in PROXY v1 line", (size_t)(f[3] - buf));
        res->src_port = (uint16_t)sp;
        res->dst_port = (uint16_t)dp;
    }
    return PP_VALID;
}

int pp_parse_ex(const uint8_t *buf, size_t len, size_t max_len, pp_result *res)
{
    int r;
    if (!res)
        return PP_INVALID;
    memset(res, 0, sizeof(*res));
    if (!buf && len)
        return invalid(res, "NULL buffer", 0);
    if (max_len < PP2_HEADER_LEN)
        max_len = PP2_HEADER_LEN;
    if (max_len > PP2_MAX_HEADER_LEN)
        max_len = PP2_MAX_HEADER_LEN;
    if (len == 0)
        return PP_NEED_MORE;
    if (buf[0] == 'P')
        r = parse_v1(buf, len, res);
    else if (buf[0] == 0x0D)
        r = parse_v2(buf, len, max_len, res);
    else
        return invalid(res, "not a PROXY protocol header", 0);
    if (r != PP_VALID) {
        /* leave nothing half-filled behind for callers that ignore the return code */
        const char *reason = res->reason;
        size_t off = res->error_offset;
        memset(res, 0, sizeof(*res));
        res->reason = reason;
        res->error_offset = off;
    }
    return r;
}

int pp_parse(const uint8_t *buf, size_t len, pp_result *res)
{
    return pp_parse_ex(buf, len, PP_PARSE_DEFAULT_MAX, res);
}
