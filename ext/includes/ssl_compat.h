/* OpenSSL version differences, in one place. */
#ifndef FASTPROXY_SSL_COMPAT_H
#define FASTPROXY_SSL_COMPAT_H
#include <openssl/ssl.h>
#include <openssl/x509.h>

/* OpenSSL 3 reports a peer that closes TCP without close_notify as an error; most MQTT
 * clients do exactly that, so treat it as an ordinary EOF (1.1.1 did). */
#ifndef SSL_OP_IGNORE_UNEXPECTED_EOF
#define SSL_OP_IGNORE_UNEXPECTED_EOF 0
#endif

#if OPENSSL_VERSION_NUMBER < 0x30000000L
#define SSL_get1_peer_certificate SSL_get_peer_certificate
#endif
#endif
