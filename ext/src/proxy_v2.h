/*
 * PROXY protocol v1 (text) and v2 (binary) builder and strict parser.
 *
 * Plain C99, no allocation, no global state, no I/O: safe to call from any thread and
 * from the engine's event loop. Wire format after HAProxy 2.6 (doc/proxy-protocol.txt and
 * src/connection.c make_proxy_line_v2 / conn_recv_proxy); see docs/proxy-protocol.md.
 *
 * Building (sender side):
 *     pp2_info info;
 *     pp2_info_init(&info);                       // zeroes, command PROXY, max_len 500
 *     pp2_info_set_sockaddrs(&info, peer, local);  // or fill fam/addresses/ports by hand
 *     info.flags |= PP2_F_SSL;                     // emit PP2_TYPE_SSL (send-proxy-v2-ssl)
 *     info.ssl_client = PP2_CLIENT_SSL | ...; info.ssl_verify = ...;
 *     PP2_SET_STR(info.ssl_version, "TLSv1.3");
 *     int n = pp2_build(&info, out, sizeof out);   // > 0: bytes written; < 0: PP_ERR_*
 *
 * Parsing (receiver side, incremental):
 *     pp_result r;
 *     switch (pp_parse(buf, len, &r)) {
 *     case PP_NEED_MORE: read more, call again with the longer buffer;
 *     case PP_INVALID:   r.reason is a static string; drop the connection;
 *     case PP_VALID:     r.header_len bytes are the header; addresses, r.tlv / r.tlv_len;
 *     }
 */
#ifndef FASTPROXY_PROXY_V2_H
#define FASTPROXY_PROXY_V2_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- wire constants (names and values as in the specification) ---------------------- */
#define PP2_SIGNATURE       "\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
#define PP2_SIGNATURE_LEN   12
#define PP2_HEADER_LEN      16          /* signature + ver/cmd + fam + 16-bit length */

#define PP2_VERSION         0x20
#define PP2_CMD_LOCAL       0x00
#define PP2_CMD_PROXY       0x01

#define PP2_FAM_UNSPEC      0x00
#define PP2_FAM_INET        0x10
#define PP2_FAM_INET6       0x20
#define PP2_FAM_UNIX        0x30
#define PP2_TRANS_UNSPEC    0x00
#define PP2_TRANS_STREAM    0x01
#define PP2_TRANS_DGRAM     0x02

/* the family/transport byte values the spec defines */
#define PP2_AF_UNSPEC       0x00
#define PP2_TCP4            0x11
#define PP2_UDP4            0x12
#define PP2_TCP6            0x21
#define PP2_UDP6            0x22
#define PP2_UNIX_STREAM     0x31
#define PP2_UNIX_DGRAM      0x32

#define PP2_ADDR_LEN_INET   12          /* 4 + 4 + 2 + 2 */
#define PP2_ADDR_LEN_INET6  36          /* 16 + 16 + 2 + 2 */
#define PP2_ADDR_LEN_UNIX   216         /* 108 + 108 */
#define PP2_UNIX_PATH_LEN   108

#define PP2_TYPE_ALPN           0x01
#define PP2_TYPE_AUTHORITY      0x02
#define PP2_TYPE_CRC32C         0x03
#define PP2_TYPE_NOOP           0x04
#define PP2_TYPE_UNIQUE_ID      0x05
#define PP2_TYPE_SSL            0x20
#define PP2_SUBTYPE_SSL_VERSION 0x21
#define PP2_SUBTYPE_SSL_CN      0x22
#define PP2_SUBTYPE_SSL_CIPHER  0x23
#define PP2_SUBTYPE_SSL_SIG_ALG 0x24
#define PP2_SUBTYPE_SSL_KEY_ALG 0x25
#define PP2_TYPE_NETNS          0x30

#define PP2_CLIENT_SSL          0x01
#define PP2_CLIENT_CERT_CONN    0x02
#define PP2_CLIENT_CERT_SESS    0x04

#define PP2_TLV_HEADER_LEN      3
#define PP2_SSL_FIXED_LEN       5       /* client (u8) + verify (u32 BE) */
#define PP2_AUTHORITY_MAX       255     /* HAProxy rejects longer (PP2_AUTHORITY_MAX) */
#define PP2_UNIQUE_ID_MAX       128     /* spec 2.2.5: "up to 128 bytes" */

/* `verify` we send when no client certificate was presented (spec-literal: zero only when
 * a certificate was presented and verified). X509_V_ERR_APPLICATION_VERIFICATION, the value
 * HAProxy uses when it has no TLS context. */
#define PP2_VERIFY_NO_CERT      50u

#define PP1_MAX_LEN             107     /* longest v1 line including CRLF (spec 2.1) */
#define PP2_DEFAULT_MAX_LEN     500     /* default cap on a built v2 header (Mosquitto 2.1) */
#define PP_PARSE_DEFAULT_MAX    4096    /* default cap on a parsed v2 header (nginx's too) */
#define PP2_MAX_HEADER_LEN      (PP2_HEADER_LEN + 65535)

/* ---- return codes ------------------------------------------------------------------- */
#define PP_VALID        1
#define PP_NEED_MORE    0
#define PP_INVALID      (-1)

#define PP_ERR_CAP      (-1)    /* output buffer too small */
#define PP_ERR_MAX_LEN  (-2)    /* header would exceed info->max_len */
#define PP_ERR_ARG      (-3)    /* bad command / family / port / value length */
#define PP_ERR_TOO_LONG (-4)    /* header or one TLV would exceed 65535 bytes of length field */

/* ---- builder ------------------------------------------------------------------------ */
typedef struct pp_str { const uint8_t *ptr; size_t len; } pp_str;   /* ptr NULL = absent */
#define PP2_SET_STR(field, cstr) \
    do { (field).ptr = (const uint8_t *)(cstr); (field).len = strlen(cstr); } while (0)

#define PP2_F_CRC32C    0x0001u     /* emit PP2_TYPE_CRC32C (first TLV, like HAProxy) */
#define PP2_F_SSL       0x0002u     /* emit PP2_TYPE_SSL (client, verify, sub-TLVs) */

typedef struct pp2_info {
    uint8_t  command;           /* PP2_CMD_PROXY or PP2_CMD_LOCAL */
    uint8_t  fam;               /* PP2_TCP4, PP2_TCP6, PP2_UNIX_STREAM, ..., PP2_AF_UNSPEC */
    uint16_t src_port;          /* host byte order (INET/INET6 only) */
    uint16_t dst_port;
    /* INET: 4 bytes used, INET6: 16, UNIX: 108 (NUL-padded path); network byte order */
    uint8_t  src_addr[PP2_UNIX_PATH_LEN];
    uint8_t  dst_addr[PP2_UNIX_PATH_LEN];
    uint32_t flags;             /* PP2_F_* */

    pp_str   alpn;              /* PP2_TYPE_ALPN when ptr != NULL (negotiated protocol) */
    pp_str   authority;         /* PP2_TYPE_AUTHORITY (SNI), <= 255 bytes */
    pp_str   unique_id;         /* PP2_TYPE_UNIQUE_ID, <= 128 bytes */

    uint8_t  ssl_client;        /* PP2_CLIENT_* bit field */
    uint32_t ssl_verify;        /* 0 only when a client certificate was presented and verified */
    pp_str   ssl_version;       /* PP2_SUBTYPE_SSL_VERSION, e.g. "TLSv1.3" */
    pp_str   ssl_cn;            /* PP2_SUBTYPE_SSL_CN, raw bytes, taken as given */
    pp_str   ssl_key_alg;       /* PP2_SUBTYPE_SSL_KEY_ALG, e.g. "RSA2048" / "EC256" */
    pp_str   ssl_sig_alg;       /* PP2_SUBTYPE_SSL_SIG_ALG, e.g. "RSA-SHA256" */
    pp_str   ssl_cipher;        /* PP2_SUBTYPE_SSL_CIPHER, e.g. "TLS_AES_256_GCM_SHA384" */

    pp_str   netns;             /* PP2_TYPE_NETNS */
    pp_str   extra_tlvs;        /* already-encoded TLVs appended verbatim after NETNS */
    long     noop_len;          /* >= 0: append a PP2_TYPE_NOOP TLV with that many zero bytes */

    size_t   max_len;           /* refuse headers longer than this; 0 = PP2_DEFAULT_MAX_LEN */
} pp2_info;

/* Zero the struct; command = PROXY, fam = UNSPEC, noop_len = -1, max_len = 0 (=> 500). */
void pp2_info_init(pp2_info *info);

/* Fill command/fam/addresses/ports from the client's address (`src`, getpeername) and
 * the address it connected to (`dst`, getsockname), given as pointers to zero-initialised
 * struct sockaddr_storage (void* keeps this header free of socket headers; the whole struct
 * of the family is read). Two AF_INET give PP2_TCP4; an AF_INET/AF_INET6 mix gives PP2_TCP6
 * with the IPv4 side v4-mapped (HAProxy's v4tov6); AF_INET6 v4-mapped addresses (dual-stack
 * listeners) are sent as they are, like HAProxy; two AF_UNIX give PP2_UNIX_STREAM (HAProxy
 * would send LOCAL; Mosquitto 2.1 mis-parses UNIX headers, see docs); NULL or anything else
 * gives LOCAL/UNSPEC like HAProxy. Returns 0, or PP_ERR_ARG when info is NULL. */
int pp2_info_set_sockaddrs(pp2_info *info, const void *src, const void *dst);

/* Write a v2 header; returns its length (> 0) or a PP_ERR_* code (< 0; `out` is then
 * unspecified). TLV order is HAProxy 2.6's: CRC32C, ALPN, AUTHORITY, UNIQUE_ID,
 * SSL{VERSION, CN, KEY_ALG, SIG_ALG, CIPHER}, NETNS, then ours: extra_tlvs, NOOP. */
int pp2_build(const pp2_info *info, uint8_t *out, size_t cap);
/* Length pp2_build would write, ignoring max_len and cap (or a PP_ERR_* code). */
long pp2_build_size(const pp2_info *info);

/* Write a v1 line from the same info: "PROXY TCP4|TCP6 src dst sport dport\r\n" for
 * PROXY + TCP4/TCP6, "PROXY UNKNOWN\r\n" for everything else. Returns length or PP_ERR_*. */
int pp1_build(const pp2_info *info, char *out, size_t cap);

/* ---- parser ------------------------------------------------------------------------- */
typedef struct pp_result {
    int         version;        /* 1 or 2 */
    size_t      header_len;     /* bytes to consume */
    uint8_t     command;        /* PP2_CMD_PROXY / PP2_CMD_LOCAL (v1: always PROXY) */
    uint8_t     fam;            /* v2 family/transport byte; v1: PP2_TCP4/PP2_TCP6/PP2_AF_UNSPEC */
    uint16_t    src_port;       /* host order */
    uint16_t    dst_port;
    uint8_t     src_addr[PP2_UNIX_PATH_LEN];    /* 4 / 16 / 108 bytes used by family */
    uint8_t     dst_addr[PP2_UNIX_PATH_LEN];
    const uint8_t *tlv;         /* TLV area inside the input (v2), NULL when empty */
    size_t      tlv_len;
    int         has_crc32c;     /* a CRC32C TLV was present (and matched) */
    uint32_t    crc32c;
    const char *reason;         /* static string when PP_INVALID, else NULL */
    size_t      error_offset;   /* offset of the offending byte/field when PP_INVALID */
} pp_result;

/* Strict incremental parse of a v1 or v2 header at the start of buf. Returns PP_VALID,
 * PP_NEED_MORE (buf is a proper prefix of a header that could still be valid) or
 * PP_INVALID. v2 headers longer than PP_PARSE_DEFAULT_MAX are refused. */
int pp_parse(const uint8_t *buf, size_t len, pp_result *res);
/* Same with an explicit cap on the total v2 header length (16..65551). */
int pp_parse_ex(const uint8_t *buf, size_t len, size_t max_len, pp_result *res);

/* ---- TLV iteration ------------------------------------------------------------------ */
typedef struct pp_tlv { uint8_t type; uint16_t len; const uint8_t *value; } pp_tlv;
typedef struct pp_tlv_iter { const uint8_t *p; const uint8_t *end; } pp_tlv_iter;

void pp_tlv_iter_init(pp_tlv_iter *it, const uint8_t *area, size_t len);
/* 1: *out filled; 0: end of area; -1: malformed (header or value past the end). */
int  pp_tlv_next(pp_tlv_iter *it, pp_tlv *out);
/* Opens a PP2_TYPE_SSL value: reads client/verify and sets *sub to iterate its sub-TLVs.
 * Returns 0, or -1 when the TLV is not PP2_TYPE_SSL or shorter than 5 bytes. */
int  pp_tlv_ssl_open(const pp_tlv *ssl, uint8_t *client, uint32_t *verify, pp_tlv_iter *sub);
/* First TLV of `type` in the area: 1 found, 0 not found, -1 malformed. */
int  pp_tlv_find(const uint8_t *area, size_t len, uint8_t type, pp_tlv *out);

/* ---- helpers ------------------------------------------------------------------------ */
/* CRC32C (Castagnoli, reflected 0x82F63B78, init/xorout 0xFFFFFFFF): pp_crc32c("123456789")
 * == 0xE3069283. _update takes and returns the raw register (start with 0xFFFFFFFF). */
uint32_t pp_crc32c(const uint8_t *buf, size_t len);
uint32_t pp_crc32c_update(uint32_t reg, const uint8_t *buf, size_t len);

/* Index of the first control character (0x00-0x1F, 0x7F) in s, or -1 when there is none.
 * Receivers treat the CN as a C string or a user name (Mosquitto strndup()s it, so a NUL
 * truncates it): the engine should refuse or log such CNs before building. */
long pp_find_ctl(const uint8_t *s, size_t len);

/* Text of an address as written in a v1 line (inet_ntop style, RFC 5952 for IPv6 with the
 * dotted tail for v4-mapped/compatible addresses, as glibc prints them). Returns length
 * (no NUL counted; a NUL is written) or PP_ERR_CAP. */
int pp_format_ipv4(const uint8_t a[4], char *out, size_t cap);
int pp_format_ipv6(const uint8_t a[16], char *out, size_t cap);

/* ---- optional: fill the TLS facts from an OpenSSL connection ------------------------
 * Compiled only where the includer defines PP2_WITH_OPENSSL before including this header
 * (the engine links OpenSSL; the _proxyproto module does not). Mirrors what HAProxy 2.6
 * derives for send-proxy-v2-ssl[-cn] + proxy-v2-options (src/connection.c, ssl_sock.c):
 *   - the client certificate: `peer`, as the engine keeps it (tls_peer.h; with AWS-LC the
 *     library keeps only its hash), and `verify_result`, SSL_get_verify_result()'s answer
 *   - client: PP2_CLIENT_SSL; + CERT_SESS when the session has a peer certificate;
 *             + CERT_CONN when that certificate was sent on this connection (not resumed)
 *   - verify: SSL_get_verify_result() when a peer certificate exists, else
 *             PP2_VERIFY_NO_CERT (HAProxy would send 0 here: our deliberate difference)
 *   - version SSL_get_version(); cipher SSL_get_cipher_name()
 *   - CN: the PEER certificate's one subject commonName (fp_subject_cn), raw ASN.1 bytes;
 *     CERT_CONN, CERT_SESS and the CN only when that certificate was verified (HAProxy sets
 *     them for any certificate presented: our second deliberate difference)
 *   - key_alg / sig_alg: of the certificate WE presented (the context's), as HAProxy
 *     does and as the spec says ("certificate presented by the frontend"):
 *     "RSA<bits>" / "EC<bits>" / "DSA<bits>", and OBJ_nid2sn() of the signature algorithm
 *     ("RSA-SHA256", "ecdsa-with-SHA256")
 *   - alpn: SSL_get0_alpn_selected(); authority: SSL_get_servername() (SNI)
 * `want` selects what is filled (PP2_WANT_*); strings point into OpenSSL objects owned by
 * `ssl`, into `peer` or into *scratch, and stay valid until those are freed. Returns 0, or -1 when the CN
 * was wanted and the verified certificate has several (ambiguous: the caller refuses it). */

#ifdef __cplusplus
}
#endif
#endif /* FASTPROXY_PROXY_V2_H */

/* Outside the main guard, so an includer that saw the header without PP2_WITH_OPENSSL (a
 * Cython module cimporting both declaration files) still gets these when it asks. */
#if defined(PP2_WITH_OPENSSL) && !defined(FASTPROXY_PROXY_V2_SSL_H)
#define FASTPROXY_PROXY_V2_SSL_H
#include <stdio.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/objects.h>
#include "tls_peer.h"

#define PP2_WANT_ALPN       0x01u
#define PP2_WANT_AUTHORITY  0x02u
#define PP2_WANT_SSL        0x04u   /* send-proxy-v2-ssl: client, verify, VERSION */
#define PP2_WANT_CN         0x08u   /* send-proxy-v2-ssl-cn / proxy-v2-options cert-cn */
#define PP2_WANT_KEY_ALG    0x10u   /* proxy-v2-options cert-key */
#define PP2_WANT_SIG_ALG    0x20u   /* proxy-v2-options cert-sig */
#define PP2_WANT_CIPHER     0x40u   /* proxy-v2-options ssl-cipher */

typedef struct pp2_ssl_scratch { char key_alg[24]; } pp2_ssl_scratch;

static inline int pp2_info_set_ssl(pp2_info *info, const SSL *ssl, const fp_peer *peer,
                                   long verify_result, unsigned want, pp2_ssl_scratch *scratch)
{
    const char *s;
    int ambiguous = 0;
    if (want & PP2_WANT_ALPN) {
        const unsigned char *a = NULL;
        unsigned int alen = 0;
        SSL_get0_alpn_selected(ssl, &a, &alen);
        if (a && alen) { info->alpn.ptr = a; info->alpn.len = alen; }
    }
    if ((want & PP2_WANT_AUTHORITY) &&
        (s = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name)) != NULL) {
        info->authority.ptr = (const uint8_t *)s;
        info->authority.len = strlen(s);
    }
    if (!(want & (PP2_WANT_SSL | PP2_WANT_CN | PP2_WANT_KEY_ALG | PP2_WANT_SIG_ALG | PP2_WANT_CIPHER)))
        return 0;
    {
        /* Our certificate from the context: with AWS-LC the SSL sheds its own copy of the
         * configuration after the handshake. */
        X509 *own = SSL_CTX_get0_certificate(SSL_get_SSL_CTX(ssl));
        info->flags |= PP2_F_SSL;
        info->ssl_client = PP2_CLIENT_SSL;
        info->ssl_verify = PP2_VERIFY_NO_CERT;
        if ((s = SSL_get_version(ssl)) != NULL) {
            info->ssl_version.ptr = (const uint8_t *)s;
            info->ssl_version.len = strlen(s);
        }
        if (peer != NULL && peer->presented) {
            info->ssl_verify = (uint32_t)verify_result;
            /* Receivers take CERT_SESS (+ CN) as "this client holds that identity": only for
             * a verified certificate (verify optional lets a self-signed one through). */
            if (verify_result == X509_V_OK) {
                info->ssl_client |= PP2_CLIENT_CERT_SESS;
                if (!SSL_session_reused((SSL *)ssl))
                    info->ssl_client |= PP2_CLIENT_CERT_CONN;
                if (want & PP2_WANT_CN) {
                    if (peer->cn_len == FP_CN_MANY) {
                        ambiguous = 1;
                    } else if (peer->cn != NULL) {
                        info->ssl_cn.ptr = peer->cn;      /* the raw ASN.1 bytes, as HAProxy */
                        info->ssl_cn.len = (size_t)peer->cn_raw_len;
                    }
                }
            }
        }
        if (own && (want & PP2_WANT_KEY_ALG) && scratch) {
            EVP_PKEY *pk = X509_get0_pubkey(own);
            const char *kind = NULL;
            if (pk) {
                switch (EVP_PKEY_base_id(pk)) {
                case EVP_PKEY_RSA: kind = "RSA"; break;
                case EVP_PKEY_EC:  kind = "EC";  break;
                case EVP_PKEY_DSA: kind = "DSA"; break;
                default: break;  /* HAProxy 2.6 omits the TLV for other key types */
                }
            }
            if (kind) {
                int n = snprintf(scratch->key_alg, sizeof(scratch->key_alg), "%s%d", kind,
                                 EVP_PKEY_bits(pk));
                if (n > 0 && (size_t)n < sizeof(scratch->key_alg)) {
                    info->ssl_key_alg.ptr = (const uint8_t *)scratch->key_alg;
                    info->ssl_key_alg.len = (size_t)n;
                }
            }
        }
        if (own && (want & PP2_WANT_SIG_ALG)) {
            const ASN1_OBJECT *obj = NULL;
            X509_ALGOR_get0(&obj, NULL, NULL, X509_get0_tbs_sigalg(own));
            if (obj && (s = OBJ_nid2sn(OBJ_obj2nid(obj))) != NULL) {
                info->ssl_sig_alg.ptr = (const uint8_t *)s;
                info->ssl_sig_alg.len = strlen(s);
            }
        }
        if ((want & PP2_WANT_CIPHER) && (s = SSL_get_cipher_name(ssl)) != NULL) {
            info->ssl_cipher.ptr = (const uint8_t *)s;
            info->ssl_cipher.len = strlen(s);
        }
    }
    return ambiguous ? -1 : 0;
}
#endif /* PP2_WITH_OPENSSL */
