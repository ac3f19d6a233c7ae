# cython: language_level=3
"""TLS server contexts (SSL_CTX) built from validated settings.

Owns the OpenSSL configuration side only; record I/O happens in _engine, which receives the
SSL_CTX* through a PyCapsule (capsule()) and keeps this object alive while it uses it.
"""
from libc.string cimport strlen
from cpython.pycapsule cimport PyCapsule_New

from openssl cimport *

from fastproxy.errors import TLSConfigError

cdef const char* CAPSULE_NAME = b"fastproxy.SSL_CTX"
# ALPN protocol list in wire format (length-prefixed): MQTT's registered id.
cdef const unsigned char* ALPN_MQTT = b"\x04mqtt"


cdef int _no_password(char* buf, int size, int rwflag, void* userdata) noexcept nogil:
    # Encrypted keys are refused: a proxy restarted unattended cannot ask for a passphrase.
    (<int*>userdata)[0] = 1
    return 0


cdef int _verify_optional(int ok, X509_STORE_CTX* ctx) noexcept nogil:
    # `verify optional`: finish the handshake whatever the chain says; the result is kept in
    # SSL_get_verify_result for policy to decide.
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


def openssl_version():
    """The version string of the OpenSSL library this module is linked against."""
    return OpenSSL_version(OPENSSL_VERSION).decode()


cdef class TLSContext:
    """A server-side SSL_CTX: certificate chain, key, protocol floor, ciphers, client CA."""

    cdef SSL_CTX* ctx
    cdef readonly str verify
    cdef readonly bint has_client_ca

    def __cinit__(self):
        self.ctx = NULL

    def __init__(self, str cert not None, str key not None, *, str min_version="TLSv1.2",
                 str ciphers="HIGH:!aNULL:!MD5", ciphersuites=None, client_ca=None,
                 str verify="none", int verify_depth=1, crl=None, int num_tickets=2):
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
        SSL_CTX_set_num_tickets(ctx, num_tickets)

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
            raise TLSConfigError(f"cannot load private key from {key}: {_last_error()}", key="tls_key")
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
                SSL_CTX_set_verify(ctx, mode, NULL)
            else:
                SSL_CTX_set_verify(ctx, mode, _verify_optional)
            SSL_CTX_set_verify_depth(ctx, verify_depth)

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
