/* A server context's identity settings, on both TLS libraries (included by _tls only: the
 * ticket functions below are real functions, not inline ones, and need the TLS library).
 * The per-connection side is tls_peer.h. */
#ifndef FASTPROXY_TLS_CONTEXT_H
#define FASTPROXY_TLS_CONTEXT_H
#include "tls_peer.h"

#ifdef OPENSSL_IS_AWSLC
#include <openssl/aead.h>
#include <openssl/rand.h>

/* Session tickets under retain-only-sha256 would come back without the certificate, and a
 * resumed session would have no identity. So tickets are sealed by us (AES-256-GCM, a random
 * key per context, made before workers fork so that every worker opens every ticket) with the
 * client's certificate inside, as an OpenSSL ticket carries it: a resumed session has the
 * same CN, SANs and DER as the full handshake it resumes. */
typedef struct fp_ticket_key { EVP_AEAD_CTX aead; } fp_ticket_key;
#define FP_TICKET_NONCE 12
static const uint8_t FP_TICKET_AD[] = "fastproxy ticket 1";
static int fp_ticket_idx = -1;

static void fp_ticket_key_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int index, long argl, void *argp)
{
    fp_ticket_key *k = ptr;
    (void)parent; (void)ad; (void)index; (void)argl; (void)argp;
    if (k != NULL) {
        EVP_AEAD_CTX_cleanup(&k->aead);
        free(k);
    }
}

static inline const fp_ticket_key *fp_ticket_key_of(const SSL *ssl)
{
    return fp_ticket_idx < 0 ? NULL : SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), fp_ticket_idx);
}

static inline size_t fp_peer_ticket_der_len(const SSL *ssl)
{
    const fp_peer *p = SSL_get_app_data(ssl);
    return (p != NULL && p->presented && p->der != NULL) ? (size_t)p->der_len : 0;
}

static size_t fp_ticket_max_overhead(SSL *ssl)
{
    return FP_TICKET_NONCE + EVP_AEAD_max_overhead(EVP_aead_aes_256_gcm()) + 2 + fp_peer_ticket_der_len(ssl);
}

/* ticket = nonce || AEAD(u16 der_len || der || session) */
static int fp_ticket_seal(SSL *ssl, uint8_t *out, size_t *out_len, size_t max_out_len,
                          const uint8_t *in, size_t in_len)
{
    const fp_ticket_key *k = fp_ticket_key_of(ssl);
    const fp_peer *p = SSL_get_app_data(ssl);
    size_t dl = fp_peer_ticket_der_len(ssl), pl = 2 + dl + in_len, n = 0;
    uint8_t *plain;
    int ok;
    if (k == NULL || max_out_len < FP_TICKET_NONCE)
        return 0;
    if ((plain = malloc(pl)) == NULL)
        return 0;
    plain[0] = (uint8_t)(dl >> 8);
    plain[1] = (uint8_t)dl;
    if (dl)
        memcpy(plain + 2, p->der, dl);
    memcpy(plain + 2 + dl, in, in_len);
    RAND_bytes(out, FP_TICKET_NONCE);
    ok = EVP_AEAD_CTX_seal(&k->aead, out + FP_TICKET_NONCE, &n, max_out_len - FP_TICKET_NONCE,
                           out, FP_TICKET_NONCE, plain, pl, FP_TICKET_AD, sizeof(FP_TICKET_AD));
    OPENSSL_cleanse(plain, pl);
    free(plain);
    if (!ok)
        return 0;
    *out_len = FP_TICKET_NONCE + n;
    return 1;
}

static enum ssl_ticket_aead_result_t fp_ticket_open(SSL *ssl, uint8_t *out, size_t *out_len,
                                                    size_t max_out_len, const uint8_t *in, size_t in_len)
{
    const fp_ticket_key *k = fp_ticket_key_of(ssl);
    fp_peer *p = SSL_get_app_data(ssl);
    enum ssl_ticket_aead_result_t r = ssl_ticket_aead_ignore_ticket;
    uint8_t *plain;
    size_t n = 0, dl;
    if (k == NULL || in_len <= FP_TICKET_NONCE)
        return ssl_ticket_aead_ignore_ticket;        /* a full handshake instead */
    if ((plain = malloc(in_len)) == NULL)
        return ssl_ticket_aead_ignore_ticket;
    if (!EVP_AEAD_CTX_open(&k->aead, plain, &n, in_len, in, FP_TICKET_NONCE,
                           in + FP_TICKET_NONCE, in_len - FP_TICKET_NONCE, FP_TICKET_AD, sizeof(FP_TICKET_AD))
        || n < 2 || (dl = ((size_t)plain[0] << 8) | plain[1]) > n - 2 || n - 2 - dl > max_out_len)
        goto done;
    if (p != NULL) {
        fp_peer_clear(p);
        if (dl && fp_peer_capture_der(p, plain + 2, (long)dl) != 0)
            goto done;                                  /* no identity: no resumption */
        p->from_ticket = 1;
    }
    memcpy(out, plain + 2 + dl, n - 2 - dl);
    *out_len = n - 2 - dl;
    r = ssl_ticket_aead_success;
done:
    ERR_clear_error();
    OPENSSL_cleanse(plain, in_len);
    free(plain);
    return r;
}

static const SSL_TICKET_AEAD_METHOD FP_TICKET_METHOD = {
    fp_ticket_max_overhead, fp_ticket_seal, fp_ticket_open,
};

/* The identity settings of a context that asks for client certificates.
 * Returns 0, or -1 (an OpenSSL-style error is queued). */
static inline int fp_ctx_setup_identity(SSL_CTX *ctx)
{
    uint8_t key[32];
    fp_ticket_key *k;
    SSL_CTX_set_retain_only_sha256_of_client_certs(ctx, 1);
    if (fp_ticket_idx < 0 && (fp_ticket_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, fp_ticket_key_free)) < 0)
        return -1;
    if ((k = malloc(sizeof(*k))) == NULL)
        return -1;
    RAND_bytes(key, sizeof(key));
    if (!EVP_AEAD_CTX_init(&k->aead, EVP_aead_aes_256_gcm(), key, sizeof(key), EVP_AEAD_DEFAULT_TAG_LENGTH, NULL)) {
        OPENSSL_cleanse(key, sizeof(key));
        free(k);
        return -1;
    }
    OPENSSL_cleanse(key, sizeof(key));
    if (!SSL_CTX_set_ex_data(ctx, fp_ticket_idx, k)) {
        fp_ticket_key_free(NULL, k, NULL, 0, 0, NULL);
        return -1;
    }
    SSL_CTX_set_ticket_aead_method(ctx, &FP_TICKET_METHOD);
    return 0;
}

#else
/* OpenSSL keeps the certificate in the session whatever is asked (no API drops it); its own
 * tickets carry it across resumption. */
static inline int fp_ctx_setup_identity(SSL_CTX *ctx) { (void)ctx; return 0; }
#endif

#endif
