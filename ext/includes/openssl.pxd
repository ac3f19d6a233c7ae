# Declarations of the OpenSSL (>= 3.0) / AWS-LC C API used by _tls and _engine, all nogil.
# Macros such as SSL_CTX_set_mode are declared as functions; Cython emits the macro call.

cdef extern from "openssl/ssl.h" nogil:
    ctypedef struct SSL_CTX
    ctypedef struct SSL
    ctypedef struct SSL_METHOD
    ctypedef struct SSL_SESSION
    ctypedef struct X509
    ctypedef struct X509_NAME
    ctypedef struct X509_STORE
    ctypedef struct X509_STORE_CTX
    ctypedef struct EVP_PKEY
    ctypedef struct BIO
    ctypedef struct stack_st_X509_NAME "STACK_OF(X509_NAME)"

    const SSL_METHOD* TLS_server_method()
    SSL_CTX* SSL_CTX_new(const SSL_METHOD* meth)
    void SSL_CTX_free(SSL_CTX* ctx)
    int SSL_CTX_up_ref(SSL_CTX* ctx)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX* ctx, const char* file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX* ctx, const char* file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX* ctx)
    ctypedef int (*pem_password_cb)(char* buf, int size, int rwflag, void* userdata)
    void SSL_CTX_set_default_passwd_cb(SSL_CTX* ctx, pem_password_cb cb)
    void SSL_CTX_set_default_passwd_cb_userdata(SSL_CTX* ctx, void* u)
    int SSL_CTX_set_min_proto_version(SSL_CTX* ctx, int version)
    int SSL_CTX_set_cipher_list(SSL_CTX* ctx, const char* s)
    int SSL_CTX_set_ciphersuites(SSL_CTX* ctx, const char* s)
    unsigned long SSL_CTX_set_options(SSL_CTX* ctx, unsigned long op)
    long SSL_CTX_set_mode(SSL_CTX* ctx, long mode)
    void SSL_CTX_set_read_ahead(SSL_CTX* ctx, int yes)
    long SSL_CTX_set_session_cache_mode(SSL_CTX* ctx, long mode)
    int SSL_CTX_set_session_id_context(SSL_CTX* ctx, const unsigned char* sid_ctx, unsigned int len)
    int SSL_CTX_set_num_tickets(SSL_CTX* ctx, size_t num)
    int SSL_CTX_load_verify_locations(SSL_CTX* ctx, const char* CAfile, const char* CApath)
    ctypedef int (*verify_cb)(int ok, X509_STORE_CTX* ctx)
    void SSL_CTX_set_verify(SSL_CTX* ctx, int mode, verify_cb cb)
    void SSL_CTX_set_verify_depth(SSL_CTX* ctx, int depth)
    stack_st_X509_NAME* SSL_load_client_CA_file(const char* file)
    void SSL_CTX_set_client_CA_list(SSL_CTX* ctx, stack_st_X509_NAME* list)
    X509_STORE* SSL_CTX_get_cert_store(const SSL_CTX* ctx)
    ctypedef int (*alpn_select_cb_t)(SSL* ssl, const unsigned char** out, unsigned char* outlen,
                                     const unsigned char* inp, unsigned int inlen, void* arg)
    void SSL_CTX_set_alpn_select_cb(SSL_CTX* ctx, alpn_select_cb_t cb, void* arg)
    int SSL_select_next_proto(unsigned char** out, unsigned char* outlen, const unsigned char* server,
                              unsigned int server_len, const unsigned char* client, unsigned int client_len)

    SSL* SSL_new(SSL_CTX* ctx)
    void SSL_free(SSL* ssl)
    int SSL_set_fd(SSL* ssl, int fd)
    void SSL_set_accept_state(SSL* ssl)
    int SSL_do_handshake(SSL* ssl)
    int SSL_read(SSL* ssl, void* buf, int num)
    int SSL_write(SSL* ssl, const void* buf, int num)
    int SSL_pending(const SSL* ssl)
    int SSL_get_error(const SSL* ssl, int ret)
    int SSL_shutdown(SSL* ssl)
    void SSL_set_quiet_shutdown(SSL* ssl, int mode)
    const char* SSL_get_version(const SSL* ssl)
    const char* SSL_get_cipher_name(const SSL* ssl)
    void SSL_get0_alpn_selected(const SSL* ssl, const unsigned char** data, unsigned int* len)
    X509* SSL_get_peer_certificate(const SSL* ssl)
    const char* SSL_get_servername(const SSL* ssl, int type)

    int SSL_ERROR_NONE, SSL_ERROR_SSL, SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE
    int SSL_ERROR_SYSCALL, SSL_ERROR_ZERO_RETURN
    int SSL_FILETYPE_PEM
    int TLS1_2_VERSION, TLS1_3_VERSION
    long SSL_MODE_ENABLE_PARTIAL_WRITE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, SSL_MODE_RELEASE_BUFFERS
    unsigned long SSL_OP_NO_RENEGOTIATION, SSL_OP_NO_COMPRESSION, SSL_OP_CIPHER_SERVER_PREFERENCE
    unsigned long SSL_OP_NO_TICKET
    long SSL_SESS_CACHE_SERVER, SSL_SESS_CACHE_OFF
    int SSL_VERIFY_NONE, SSL_VERIFY_PEER, SSL_VERIFY_FAIL_IF_NO_PEER_CERT
    int SSL_TLSEXT_ERR_OK, SSL_TLSEXT_ERR_NOACK
    int OPENSSL_NPN_NEGOTIATED
    int TLSEXT_NAMETYPE_host_name

cdef extern from "openssl/bio.h" nogil:
    ctypedef struct BIO_METHOD
    int BIO_TYPE_SOURCE_SINK
    int BIO_CTRL_FLUSH
    int BIO_CTRL_EOF
    int BIO_get_new_index()
    BIO_METHOD* BIO_meth_new(int type, const char* name)
    int BIO_meth_set_write(BIO_METHOD* m, int (*w)(BIO*, const char*, int) noexcept nogil)
    int BIO_meth_set_read(BIO_METHOD* m, int (*r)(BIO*, char*, int) noexcept nogil)
    int BIO_meth_set_ctrl(BIO_METHOD* m, long (*c)(BIO*, int, long, void*) noexcept nogil)
    int BIO_meth_set_create(BIO_METHOD* m, int (*c)(BIO*) noexcept nogil)
    BIO* BIO_new(const BIO_METHOD* m)
    void BIO_set_data(BIO* b, void* ptr)
    void* BIO_get_data(BIO* b)
    void BIO_set_init(BIO* b, int init)
    void BIO_set_retry_read(BIO* b)
    void BIO_set_retry_write(BIO* b)
    void BIO_clear_retry_flags(BIO* b)
    void SSL_set_bio(SSL* s, BIO* rbio, BIO* wbio)
    int SSL_has_pending(const SSL* s)

cdef extern from "openssl/x509.h" nogil:
    X509_NAME* X509_get_subject_name(const X509* x)
    int X509_NAME_get_text_by_NID(X509_NAME* name, int nid, char* buf, int len)
    void X509_free(X509* x)
    int i2d_X509(X509* x, unsigned char** out)
    int NID_commonName
    int X509_V_OK
    const char* X509_verify_cert_error_string(long n)
    int X509_STORE_CTX_get_error(X509_STORE_CTX* ctx)
    int X509_STORE_set_flags(X509_STORE* st, unsigned long flags)
    unsigned long X509_V_FLAG_CRL_CHECK, X509_V_FLAG_CRL_CHECK_ALL

cdef extern from "openssl/crypto.h" nogil:
    void OPENSSL_free(void* p)
    const char* OpenSSL_version(int t)
    int OPENSSL_VERSION

cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_get_error()
    unsigned long ERR_peek_error()
    unsigned long ERR_peek_last_error()
    void ERR_clear_error()
    int ERR_GET_REASON(unsigned long e)

# What differs between OpenSSL and AWS-LC is hidden here (ext/includes/ssl_compat.h): the .pyx
# files call the OpenSSL names, which resolve to its fp_* shims (the OpenSSL functions themselves
# on OpenSSL).
cdef extern from "ssl_compat.h" nogil:
    unsigned long SSL_OP_IGNORE_UNEXPECTED_EOF
    X509* SSL_get1_peer_certificate(const SSL* ssl)
    int SSL_free_buffers "fp_SSL_free_buffers"(SSL* ssl)
    long SSL_get_verify_result "fp_SSL_get_verify_result"(const SSL* ssl)
    int X509_STORE_load_file "fp_X509_STORE_load_file"(X509_STORE* st, const char* file)
    void ERR_error_string_n "fp_ERR_error_string_n"(unsigned long e, char* buf, size_t len)
    const char* ERR_reason_error_string "fp_ERR_reason_error_string"(unsigned long e)
    const char* FP_TLS_LIBRARY          # "OpenSSL" or "AWS-LC"
    const char* FP_TLS_LIBRARY_VERSION  # AWS-LC: "5.5.0"; OpenSSL: OPENSSL_VERSION_TEXT (compile time)
    int FP_TLS_STATIC                   # 1: built into the package (AWS-LC), 0: the system's libssl

# Certificate inspection (_tls.certificate_info)
cdef extern from "openssl/x509v3.h" nogil:
    ctypedef struct ASN1_STRING
    ctypedef struct ASN1_INTEGER
    ctypedef struct ASN1_TIME
    ctypedef struct X509_NAME_ENTRY
    ctypedef struct BIGNUM
    ctypedef struct EVP_MD
    ctypedef struct OPENSSL_STACK
    ctypedef struct GENERAL_NAMES
    ctypedef union GENERAL_NAME_d:
        ASN1_STRING* ia5
        ASN1_STRING* iPAddress
    ctypedef struct GENERAL_NAME:
        int type
        GENERAL_NAME_d d
    int GEN_EMAIL, GEN_DNS, GEN_URI, GEN_IPADD
    int NID_subject_alt_name
    unsigned long XN_FLAG_RFC2253
    X509* d2i_X509(X509** px, const unsigned char** inp, long len)
    X509_NAME* X509_get_issuer_name(const X509* x)
    int X509_NAME_print_ex(BIO* out, const X509_NAME* nm, int indent, unsigned long flags)
    int X509_NAME_get_index_by_NID(X509_NAME* name, int nid, int lastpos)
    X509_NAME_ENTRY* X509_NAME_get_entry(const X509_NAME* name, int loc)
    ASN1_STRING* X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY* ne)
    int ASN1_STRING_to_UTF8(unsigned char** out, const ASN1_STRING* inp)
    const unsigned char* ASN1_STRING_get0_data(const ASN1_STRING* x)
    int ASN1_STRING_length(const ASN1_STRING* x)
    ASN1_INTEGER* X509_get_serialNumber(X509* x)
    BIGNUM* ASN1_INTEGER_to_BN(const ASN1_INTEGER* ai, BIGNUM* bn)
    char* BN_bn2hex(const BIGNUM* a)
    void BN_free(BIGNUM* a)
    const EVP_MD* EVP_sha256()
    const EVP_MD* EVP_sha1()
    int EVP_Digest(const void* data, size_t count, unsigned char* md, unsigned int* size,
                   const EVP_MD* type, void* impl)
    int EVP_EncodeBlock(unsigned char* t, const unsigned char* f, int n)
    int X509_digest(const X509* data, const EVP_MD* type, unsigned char* md, unsigned int* len)
    const ASN1_TIME* X509_get0_notAfter(const X509* x)
    const ASN1_TIME* X509_get0_notBefore(const X509* x)
    void* X509_get_ext_d2i(const X509* x, int nid, int* crit, int* idx)
    void GENERAL_NAMES_free(GENERAL_NAMES* a)
    int OPENSSL_sk_num(const OPENSSL_STACK* st)
    void* OPENSSL_sk_value(const OPENSSL_STACK* st, int i)
    const BIO_METHOD* BIO_s_mem()
    int BIO_free(BIO* b)
    long BIO_get_mem_data(BIO* b, char** pp)

# The one subject-CN reader (ext/src/x509_cn.h): identity rules, PROXY CN TLV, policy's cn.
cdef extern from "x509_cn.h" nogil:
    int FP_CN_ONE, FP_CN_NONE, FP_CN_MANY
    int fp_subject_cn(X509* cert, ASN1_STRING** out)

# The client certificate as the engine keeps it, on both libraries (ext/src/tls_peer.h).
cdef extern from "tls_peer.h" nogil:
    ctypedef struct fp_peer:
        unsigned char* der
        unsigned char* cn
        int der_len
        int cn_raw_len
        int cn_len
        unsigned char presented
        unsigned char from_ticket
    void fp_peer_init(fp_peer* p)
    void fp_peer_clear(fp_peer* p)
    void fp_peer_drop_der(fp_peer* p)
    void fp_peer_on_verify(X509_STORE_CTX* x)
    void fp_peer_after_handshake(fp_peer* p, SSL* ssl)
    void fp_ssl_setup(SSL* ssl)
    int SSL_set_app_data(SSL* ssl, void* arg)

cdef extern from "time.h" nogil:
    cdef struct tm:
        int tm_sec, tm_min, tm_hour, tm_mday, tm_mon, tm_year

cdef extern from "openssl/asn1.h" nogil:
    int ASN1_TIME_to_tm(const ASN1_TIME* s, tm* t)
