/* The client certificate as the engine keeps it, on both TLS libraries.
 *
 * Captured in the verify callback (the certificate being verified, i.e. the leaf), or after a
 * resumed handshake from the session (OpenSSL) or from our own ticket (AWS-LC), and trusted
 * only once the handshake has succeeded with a verify result of X509_V_OK (fp_peer_verified).
 * With AWS-LC the library keeps nothing but the certificate's SHA-256 after the handshake
 * (retain-only-sha256: about 7 KB and 175 allocations less per connection), so this is the
 * engine's only copy: the CN (access log, ClientId rules, PROXY v2 CN TLV) for the session's
 * life, the DER (policy's PeerCertificate, SAN templates) until the relay starts.
 *
 * The struct lives in the connection (Conn.peer); the SSL points at it with SSL_set_app_data
 * so that the library's callbacks find it. */
#ifndef FASTPROXY_TLS_PEER_H
#define FASTPROXY_TLS_PEER_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include "x509_cn.h"

/* A longer client certificate is refused by the handshake's own limits long before; this
 * bounds what a ticket carries and what is copied. */
#define FP_PEER_DER_MAX 16384

typedef struct fp_peer {
    unsigned char *der;     /* leaf certificate, DER (malloc'd); NULL once dropped */
    unsigned char *cn;      /* CN: raw ASN.1 bytes, NUL, UTF-8, NUL (one malloc); NULL: none */
    int der_len;
    int cn_raw_len;
    int cn_len;             /* UTF-8 length; -1 no CN, FP_CN_MANY several (no identity) */
    uint8_t presented;      /* a client certificate was seen in this handshake or its ticket */
    uint8_t from_ticket;    /* taken from a session ticket: replaced if a full handshake follows */
} fp_peer;

static inline void fp_peer_init(fp_peer *p)
{
    memset(p, 0, sizeof(*p));
    p->cn_len = -1;
}

static inline void fp_peer_drop_der(fp_peer *p)
{
    free(p->der);
    p->der = NULL;
    p->der_len = 0;
}

static inline void fp_peer_clear(fp_peer *p)
{
    free(p->der);
    free(p->cn);
    fp_peer_init(p);
}

/* Takes what the engine needs from cert. Returns 0, or -1 without memory (p then holds no
 * certificate, which no identity rule accepts). */
static inline int fp_peer_capture(fp_peer *p, X509 *cert)
{
    ASN1_STRING *d = NULL;
    unsigned char *der = NULL, *utf8 = NULL;
    int n, k;
    fp_peer_clear(p);
    p->presented = 1;
    n = i2d_X509(cert, NULL);
    if (n > 0 && n <= FP_PEER_DER_MAX && (der = malloc((size_t)n)) != NULL) {
        unsigned char *w = der;
        if (i2d_X509(cert, &w) == n) {
            p->der = der;
            p->der_len = n;
        } else {
            free(der);
        }
    }
    k = fp_subject_cn(cert, &d);
    if (k == FP_CN_MANY) {
        p->cn_len = FP_CN_MANY;
    } else if (k == FP_CN_ONE) {
        int raw = ASN1_STRING_length(d);
        int u = ASN1_STRING_to_UTF8(&utf8, d);
        if (u >= 0 && raw >= 0 && (p->cn = malloc((size_t)raw + (size_t)u + 2)) != NULL) {
            memcpy(p->cn, ASN1_STRING_get0_data(d), (size_t)raw);
            p->cn[raw] = '\0';
            memcpy(p->cn + raw + 1, utf8, (size_t)u);
            p->cn[raw + 1 + u] = '\0';
            p->cn_raw_len = raw;
            p->cn_len = u;
        }
        if (utf8 != NULL)
            OPENSSL_free(utf8);
    }
    ERR_clear_error();
    if (p->der == NULL && n > 0 && n <= FP_PEER_DER_MAX)
        return -1;
    return 0;
}

static inline int fp_peer_capture_der(fp_peer *p, const unsigned char *der, long len)
{
    const unsigned char *r = der;
    X509 *x = (len > 0 && len <= FP_PEER_DER_MAX) ? d2i_X509(NULL, &r, len) : NULL;
    int rc;
    if (x == NULL) {
        ERR_clear_error();
        fp_peer_clear(p);
        return -1;
    }
    rc = fp_peer_capture(p, x);
    X509_free(x);
    return rc;
}

/* The verify callback's capture: once per handshake (the callback runs for every certificate
 * of the chain and again for each error), the target certificate whatever the depth. */
static inline void fp_peer_on_verify(X509_STORE_CTX *x)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(x, SSL_get_ex_data_X509_STORE_CTX_idx());
    fp_peer *p = ssl ? (fp_peer *)SSL_get_app_data(ssl) : NULL;
    X509 *cert = X509_STORE_CTX_get0_cert(x);
    if (p == NULL || cert == NULL || (p->presented && !p->from_ticket))
        return;
    fp_peer_capture(p, cert);
}

/* After a successful handshake: a resumed OpenSSL session ran no verify callback, the
 * certificate is in its session. (With AWS-LC it came from our ticket, or there is none.) */
static inline void fp_peer_after_handshake(fp_peer *p, SSL *ssl)
{
    X509 *cert;
    if (p->presented)
        return;
    cert = SSL_get_peer_certificate(ssl);
    if (cert != NULL) {
        fp_peer_capture(p, cert);
        X509_free(cert);
    }
}

/* Per connection: with AWS-LC the handshake's configuration (certificate chain, key, cipher
 * lists, CA names) is released once the handshake is done; nothing after it asks for them. */
#ifdef OPENSSL_IS_AWSLC
static inline void fp_ssl_setup(SSL *ssl) { SSL_set_shed_handshake_config(ssl, 1); }
#else
static inline void fp_ssl_setup(SSL *ssl) { (void)ssl; }
#endif

#endif
