/* The one reader of a client certificate's subject CN, for every use of it: the identity
 * rules (ClientId / username == CN), the access log, policy's PeerCertificate.cn, templates
 * and the PROXY v2 CN sub-TLV.
 *
 * A subject may hold several CN attributes ("CN=admin, CN=thing001", one CA signing it is
 * enough). Readers disagree on which one counts (OpenSSL-based code often takes the last,
 * HAProxy and Mosquitto the first), so any choice lets a certificate be one identity to the
 * check and another to the broker. Such a certificate has no CN here: the callers refuse it
 * wherever a CN-based rule or the CN TLV applies. */
#ifndef FASTPROXY_X509_CN_H
#define FASTPROXY_X509_CN_H
#include <openssl/asn1.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#define FP_CN_ONE   1   /* *out is the CN's ASN.1 string (owned by the certificate) */
#define FP_CN_NONE  0   /* no CN attribute */
#define FP_CN_MANY (-2) /* more than one CN attribute: ambiguous, not an identity */

static inline int fp_subject_cn(X509 *cert, ASN1_STRING **out)
{
    X509_NAME *name = cert ? X509_get_subject_name(cert) : NULL;
    int i = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
    if (i < 0)
        return FP_CN_NONE;
    if (X509_NAME_get_index_by_NID(name, NID_commonName, i) >= 0)
        return FP_CN_MANY;
    *out = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, i));
    return FP_CN_ONE;
}
#endif
