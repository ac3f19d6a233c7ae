/* TLS library differences, in one place: OpenSSL >= 1.1.1 (tested with 3.0) or AWS-LC
 * (OPENSSL_IS_AWSLC, built from its static archives into fastproxy/libfastproxy-awslc.so; see
 * scripts/build-awslc, setup.py and issue 14).
 *
 * The engine calls the fp_* names below through ext/includes/openssl.pxd, which declares them
 * under the OpenSSL names the .pyx files use; with OpenSSL each is the OpenSSL function itself. */
#ifndef FASTPROXY_SSL_COMPAT_H
#define FASTPROXY_SSL_COMPAT_H
#include <ctype.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

/* OpenSSL 3 reports a peer that closes TCP without close_notify as an error; most MQTT
 * clients do exactly that, so treat it as an ordinary EOF (1.1.1 did). */
#ifndef SSL_OP_IGNORE_UNEXPECTED_EOF
#define SSL_OP_IGNORE_UNEXPECTED_EOF 0
#endif

#ifdef OPENSSL_IS_AWSLC
/* ---- AWS-LC (OPENSSL_VERSION_NUMBER reads 1.1.1; it has the OpenSSL 3 names used here) ---- */
#define FP_TLS_LIBRARY "AWS-LC"
#define FP_TLS_LIBRARY_VERSION AWSLC_VERSION_NUMBER_STRING  /* "5.5.0"; built in: compile time = run time */
#define FP_TLS_STATIC 1

/* No SSL_free_buffers: AWS-LC gives a connection's record buffers back as soon as they are
 * empty, by default. Nothing is freed here, so the engine's malloc_trim debt does not grow. */
static inline int fp_SSL_free_buffers(SSL *ssl) { (void)ssl; return 0; }

/* No X509_STORE_load_file: X509_STORE_load_locations with a file reads its certificates and
 * CRLs (PEM) as OpenSSL's does. */
static inline int fp_X509_STORE_load_file(X509_STORE *st, const char *file)
{
    return X509_STORE_load_locations(st, file, NULL);
}

/* SSL_get_verify_result: X509_V_ERR_INVALID_CALL while there is no session (a handshake that
 * failed before one, or no verification made); OpenSSL answers X509_V_OK there, and whether a
 * certificate was presented is SSL_get1_peer_certificate's to say, on both. */
static inline long fp_SSL_get_verify_result(const SSL *ssl)
{
    long r = SSL_get_verify_result(ssl);
    return r == X509_V_ERR_INVALID_CALL ? X509_V_OK : r;
}

/* AWS-LC (like BoringSSL) names reasons as identifiers ("CERTIFICATE_VERIFY_FAILED",
 * "SSLV3_ALERT_BAD_CERTIFICATE") where OpenSSL writes "certificate verify failed": the log, the
 * tls_reason metric label and the error checks read OpenSSL's form from both libraries. */
static inline void fp_reason_text(char *s)
{
    for (; *s; s++)
        *s = (*s == '_') ? ' ' : (char)tolower((unsigned char)*s);
}

static inline const char *fp_ERR_reason_error_string(unsigned long e)
{
    static __thread char buf[128];
    const char *r = ERR_reason_error_string(e);
    if (r == NULL)
        return NULL;
    strncpy(buf, r, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = '\0';
    fp_reason_text(buf);
    return buf;
}

/* "error:0b000074:X.509 certificate routines:OPENSSL_internal:KEY_VALUES_MISMATCH" ->
 * "...:OPENSSL_internal:key values mismatch" (the reason is the text after the last ':'). */
static inline void fp_ERR_error_string_n(unsigned long e, char *buf, size_t len)
{
    char *r;
    ERR_error_string_n(e, buf, len);
    if (len && (r = strrchr(buf, ':')) != NULL)
        fp_reason_text(r + 1);
}

#else
/* ---- OpenSSL ---- */
#define FP_TLS_LIBRARY "OpenSSL"
#define FP_TLS_LIBRARY_VERSION OPENSSL_VERSION_TEXT   /* compile time; the run time's is OpenSSL_version() */
#define FP_TLS_STATIC 0
#define fp_SSL_free_buffers SSL_free_buffers
#define fp_SSL_get_verify_result SSL_get_verify_result
#define fp_X509_STORE_load_file X509_STORE_load_file
#define fp_ERR_reason_error_string ERR_reason_error_string
#define fp_ERR_error_string_n ERR_error_string_n

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#define SSL_get1_peer_certificate SSL_get_peer_certificate
#endif
#endif /* OPENSSL_IS_AWSLC */

#endif
