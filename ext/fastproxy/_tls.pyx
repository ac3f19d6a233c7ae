# cython: language_level=3
"""TLS server contexts (SSL_CTX) built from validated settings.

Owns the OpenSSL configuration side only; record I/O happens in _engine, which receives the
SSL_CTX* through a PyCapsule (capsule()) and keeps this object alive while it uses it.
"""
from libc.string cimport strlen
from cpython.pycapsule cimport PyCapsule_New

from openssl cimport *

from fastproxy.errors import TLSConfigError

# The context's identity settings (ext/src/tls_context.h): AWS-LC keeps only the client
# certificate's hash and its tickets are sealed here with the certificate inside.
cdef extern from "tls_context.h" nogil:
    int fp_ctx_setup_identity(SSL_CTX* ctx)

cdef const char* CAPSULE_NAME = b"fastproxy.SSL_CTX"
# ALPN protocol list in wire format (length-prefixed): MQTT's registered id.
cdef const unsigned char* ALPN_MQTT = b"\x04mqtt"


cdef int _no_password(char* buf, int size, int rwflag, void* userdata) noexcept nogil:
    # Encrypted keys are refused: a proxy restarted unattended cannot ask for a passphrase.
    (<int*>userdata)[0] = 1
    return 0


cdef int _verify_required(int ok, X509_STORE_CTX* ctx) noexcept nogil:
    # The chain's verdict stands; the certificate is taken here (tls_peer.h), because with
    # AWS-LC the library keeps only its SHA-256 after the handshake.
    fp_peer_on_verify(ctx)
    return ok


cdef int _verify_optional(int ok, X509_STORE_CTX* ctx) noexcept nogil:
    # `verify optional`: finish the handshake whatever the chain says; the result is kept in
    # SSL_get_verify_result for policy to decide.
    fp_peer_on_verify(ctx)
    return 1


cdef int _alpn_select(SSL* ssl, const unsigned char** out, unsigned char* outlen,
                      const unsigned char* inp, unsigned int inlen, void* arg) noexcept nogil:
    cdef unsigned char* sel = NULL
    cdef unsigned char sel_len = 0
    if SSL_select_next_proto(&sel, &sel_len, ALPN_MQTT, 5, inp, inlen) == OPENSSL_NPN_NEGOTIATED:
        out[0] = sel
        outlen[0] = sel_len
        return SSL_TLSEXT_ERR_OK
    # Clients offering only other protocols still get through (as nginx does), without ALPN.
    return SSL_TLSEXT_ERR_NOACK


cdef str _last_error():
    cdef char buf[256]
    cdef unsigned long e = ERR_peek_last_error()
    if e == 0:
        return "unknown OpenSSL error"
    ERR_error_string_n(e, buf, sizeof(buf))
    ERR_clear_error()
    return buf.decode("utf-8", "replace")


cdef str _name_str(X509_NAME* name):
    cdef BIO* bio = BIO_new(BIO_s_mem())
    cdef char* data = NULL
    cdef long n
    if bio == NULL:
        raise MemoryError()
    try:
        X509_NAME_print_ex(bio, name, 0, XN_FLAG_RFC2253)
        n = BIO_get_mem_data(bio, &data)
        return data[:n].decode("utf-8", "replace") if n > 0 else ""
    finally:
        BIO_free(bio)


cdef object _common_name(X509* x):
    # fp_subject_cn, the engine's reader: None without a CN or with several (ambiguous, so
    # no CN-based rule or template can accept it), else the CN as proper UTF-8.
    cdef ASN1_STRING* d = NULL
    cdef unsigned char* utf8 = NULL
    cdef int n
    if fp_subject_cn(x, &d) != FP_CN_ONE:
        return None
    n = ASN1_STRING_to_UTF8(&utf8, d)
    if n < 0:
        ERR_clear_error()
        return None
    try:
        return utf8[:n].decode("utf-8", "replace")
    finally:
        OPENSSL_free(utf8)


cdef object _tm_timestamp(const ASN1_TIME* t):
    import calendar
    cdef tm v
    if t == NULL or ASN1_TIME_to_tm(t, &v) != 1:
        return None
    return calendar.timegm((v.tm_year + 1900, v.tm_mon + 1, v.tm_mday, v.tm_hour, v.tm_min, v.tm_sec, 0, 0, 0))


def certificate_info(bytes der not None):
    """Fields of a DER certificate for policy code: subject and issuer (RFC 2253), cn,
    subject alternative names, serial (hex), SHA-256 fingerprint (hex), validity (Unix time)."""
    cdef const unsigned char* p = der
    cdef X509* x = d2i_X509(NULL, &p, len(der))
    cdef GENERAL_NAMES* names
    cdef GENERAL_NAME* gn
    cdef unsigned char md[64]
    cdef unsigned int mdlen = 0
    cdef BIGNUM* bn
    cdef char* hexs
    cdef int i, num
    cdef const unsigned char* data
    if x == NULL:
        ERR_clear_error()
        raise ValueError("not a DER certificate")
    try:
        dns, emails, uris, ips = [], [], [], []
        names = <GENERAL_NAMES*>X509_get_ext_d2i(x, NID_subject_alt_name, NULL, NULL)
        if names != NULL:
            num = OPENSSL_sk_num(<OPENSSL_STACK*>names)
            for i in range(num):
                gn = <GENERAL_NAME*>OPENSSL_sk_value(<OPENSSL_STACK*>names, i)
                if gn.type in (GEN_DNS, GEN_EMAIL, GEN_URI):
                    data = ASN1_STRING_get0_data(gn.d.ia5)
                    v = data[:ASN1_STRING_length(gn.d.ia5)].decode("ascii", "replace")
                    (dns if gn.type == GEN_DNS else emails if gn.type == GEN_EMAIL else uris).append(v)
                elif gn.type == GEN_IPADD:
                    import ipaddress
                    data = ASN1_STRING_get0_data(gn.d.iPAddress)
                    raw = data[:ASN1_STRING_length(gn.d.iPAddress)]
                    if len(raw) in (4, 16):
                        ips.append(str(ipaddress.ip_address(raw)))
            GENERAL_NAMES_free(names)
        serial = None
        bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(x), NULL)
        if bn != NULL:
            hexs = BN_bn2hex(bn)
            if hexs != NULL:
                serial = hexs.decode().lower()
                OPENSSL_free(hexs)
            BN_free(bn)
        fingerprint = None
        if X509_digest(x, EVP_sha256(), md, &mdlen) == 1:
            fingerprint = md[:mdlen].hex()
        ERR_clear_error()
        return {
            "subject": _name_str(X509_get_subject_name(x)),
            "issuer": _name_str(X509_get_issuer_name(x)),
            "cn": _common_name(x),
            "san_dns": dns,
            "san_email": emails,
            "san_uri": uris,
            "san_ip": ips,
            "serial": serial,
            "fingerprint_sha256": fingerprint,
            "not_before": _tm_timestamp(X509_get0_notBefore(x)),
            "not_after": _tm_timestamp(X509_get0_notAfter(x)),
        }
    finally:
        X509_free(x)


def openssl_version():
    """The version string of the OpenSSL library this module is linked against."""
    return OpenSSL_version(OPENSSL_VERSION).decode()


def tls_library():
    """(name, version, static): "OpenSSL" or "AWS-LC", the version the library reports at run time
    (AWS-LC: "5.5.0", built into the package; OpenSSL: OpenSSL_version(), e.g. "OpenSSL 3.0.19 ...")."""
    return (FP_TLS_LIBRARY.decode(),
            FP_TLS_LIBRARY_VERSION.decode() if FP_TLS_STATIC else OpenSSL_version(OPENSSL_VERSION).decode(),
            bool(FP_TLS_STATIC))


cdef class TLSContext:
    """A server-side SSL_CTX: certificate chain, key, protocol floor, ciphers, client CA."""

    cdef SSL_CTX* ctx
    cdef readonly str verify
    cdef readonly bint has_client_ca

    def __cinit__(self):
        self.ctx = NULL

    def __init__(self, str cert not None, str key not None, *, str min_version="TLSv1.2",
                 str ciphers="HIGH:!aNULL:!MD5", ciphersuites=None, client_ca=None,
                 str verify="none", int verify_depth=1, crl=None, int num_tickets=1,
                 bint session_tickets=True):
        cdef int encrypted = 0
        cdef bytes b
        ERR_clear_error()
        self.ctx = SSL_CTX_new(TLS_server_method())
        if self.ctx == NULL:
            raise MemoryError(_last_error())
        ctx = self.ctx

        SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION
                            | SSL_OP_CIPHER_SERVER_PREFERENCE
                            | SSL_OP_IGNORE_UNEXPECTED_EOF)
        # Partial writes for backpressure; a retried SSL_write may come from a moved buffer.
        # Record buffers of quiet sessions are released by the engine (SSL_free_buffers), not
        # by SSL_MODE_RELEASE_BUFFERS, which would malloc/free them for every record.
        SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
        SSL_CTX_set_session_id_context(ctx, <const unsigned char*>b"fastproxy", 9)
        # Resumption by stateless tickets only: a server-side cache would keep every TLS 1.2
        # session, client certificate included, in memory (20480 by default).
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF)
        # One TLS 1.3 ticket is enough for a device to resume; each costs an encryption per
        # handshake (OpenSSL's default is two).
        SSL_CTX_set_num_tickets(ctx, num_tickets)
        if not session_tickets:
            # HAProxy's no-tls-tickets: no resumption at all (the session cache is off too),
            # every device makes a full handshake; TLS 1.3 sends no ticket.
            SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET)
            SSL_CTX_set_num_tickets(ctx, 0)

        if min_version == "TLSv1.3":
            SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)
        elif min_version == "TLSv1.2":
            SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)
        else:
            raise TLSConfigError(f"unsupported version {min_version!r}", key="tls_min_version")

        b = ciphers.encode()
        if SSL_CTX_set_cipher_list(ctx, b) != 1:
            raise TLSConfigError(f"no usable cipher in {ciphers!r}: {_last_error()}", key="tls_ciphers")
        if ciphersuites is not None:
            b = ciphersuites.encode()
            if SSL_CTX_set_ciphersuites(ctx, b) != 1:
                raise TLSConfigError(f"no usable TLS 1.3 suite in {ciphersuites!r}: {_last_error()}",
                                     key="tls_ciphersuites")

        b = cert.encode()
        if SSL_CTX_use_certificate_chain_file(ctx, b) != 1:
            raise TLSConfigError(f"cannot load certificate chain from {cert}: {_last_error()}", key="tls_cert")

        SSL_CTX_set_default_passwd_cb(ctx, _no_password)
        SSL_CTX_set_default_passwd_cb_userdata(ctx, &encrypted)
        b = key.encode()
        rc = SSL_CTX_use_PrivateKey_file(ctx, b, SSL_FILETYPE_PEM)
        SSL_CTX_set_default_passwd_cb(ctx, NULL)
        SSL_CTX_set_default_passwd_cb_userdata(ctx, NULL)
        if encrypted:
            ERR_clear_error()
            raise TLSConfigError(
                f"{key} is an encrypted private key; fastproxy needs an unencrypted one "
                f"(decrypt it with: openssl pkey -in {key} -out {key}.plain, and protect the file's permissions)",
                key="tls_key")
        if rc != 1:
            why = _last_error()
            if "key values mismatch" in why:    # OpenSSL 3 checks the pair while loading the key
                raise TLSConfigError(f"private key {key} does not match certificate {cert}", key="tls_key")
            raise TLSConfigError(f"cannot load private key from {key}: {why}", key="tls_key")
        if SSL_CTX_check_private_key(ctx) != 1:
            raise TLSConfigError(f"private key {key} does not match certificate {cert}: {_last_error()}",
                                 key="tls_key")

        SSL_CTX_set_alpn_select_cb(ctx, _alpn_select, NULL)

        self.verify = verify
        self.has_client_ca = client_ca is not None
        if verify not in ("none", "optional", "required"):
            raise TLSConfigError(f"expected required, optional or none, got {verify!r}", key="verify")
        if verify != "none":
            if client_ca is None:
                raise TLSConfigError(f"verify {verify} needs client_ca", key="client_ca")
            self._load_client_ca(client_ca)
            if crl is not None:
                self._load_crl(crl)
            mode = SSL_VERIFY_PEER
            if verify == "required":
                mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT
                SSL_CTX_set_verify(ctx, mode, _verify_required)
            else:
                SSL_CTX_set_verify(ctx, mode, _verify_optional)
            SSL_CTX_set_verify_depth(ctx, verify_depth)
            # AWS-LC: keep only the certificate's SHA-256 after the handshake, and seal
            # tickets ourselves with the certificate inside (tls_peer.h); OpenSSL: nothing.
            if fp_ctx_setup_identity(ctx) != 0:
                raise MemoryError(_last_error())

    cdef _load_client_ca(self, str path):
        import os
        cdef bytes b = path.encode()
        if os.path.isdir(path):
            ok = SSL_CTX_load_verify_locations(self.ctx, NULL, b)
        else:
            ok = SSL_CTX_load_verify_locations(self.ctx, b, NULL)
            if ok == 1:
                # Tell clients which CAs we accept, so they pick the right certificate.
                names = SSL_load_client_CA_file(b)
                if names != NULL:
                    SSL_CTX_set_client_CA_list(self.ctx, names)
        if ok != 1:
            raise TLSConfigError(f"cannot load CA certificates from {path}: {_last_error()}", key="client_ca")

    cdef _load_crl(self, str path):
        cdef bytes b = path.encode()
        store = SSL_CTX_get_cert_store(self.ctx)
        if X509_STORE_load_file(store, b) != 1:
            raise TLSConfigError(f"cannot load CRL from {path}: {_last_error()}", key="crl")
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL)

    def capsule(self):
        """A PyCapsule holding the SSL_CTX*; valid while this object lives."""
        return PyCapsule_New(<void*>self.ctx, CAPSULE_NAME, NULL)

    def __dealloc__(self):
        if self.ctx != NULL:
            SSL_CTX_free(self.ctx)
            self.ctx = NULL
