# The PROXY builder's OpenSSL helper (ext/src/proxy_v2.h under PP2_WITH_OPENSSL): for the stages that
# hold an SSL*; the plain wrapper (_proxyproto) does without OpenSSL.
from openssl cimport SSL, fp_peer
from proxyproto cimport pp2_info
cdef extern from *:
    """
    #define PP2_WITH_OPENSSL 1
    #include "proxy_v2.h"
    """
    ctypedef struct pp2_ssl_scratch:
        pass
    unsigned PP2_WANT_ALPN, PP2_WANT_AUTHORITY, PP2_WANT_SSL, PP2_WANT_CN
    unsigned PP2_WANT_KEY_ALG, PP2_WANT_SIG_ALG, PP2_WANT_CIPHER
    int pp2_info_set_sockaddrs(pp2_info* info, const void* src, const void* dst) nogil
    int pp2_info_set_ssl(pp2_info* info, const SSL* ssl, const fp_peer* peer, long verify_result,
                         unsigned want, pp2_ssl_scratch* scratch) nogil
