# Declarations of the C PROXY protocol builder (ext/src/proxy_v2.h), with its OpenSSL helper.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from openssl cimport SSL

cdef extern from *:
    """
    #define PP2_WITH_OPENSSL 1
    #include "proxy_v2.h"
    """
    ctypedef struct pp_str:
        const uint8_t* ptr
        size_t len
    ctypedef struct pp2_info:
        uint32_t flags
        size_t max_len
        pp_str ssl_cn
    ctypedef struct pp2_ssl_scratch:
        pass
    unsigned PP2_F_CRC32C
    unsigned PP2_WANT_ALPN, PP2_WANT_AUTHORITY, PP2_WANT_SSL, PP2_WANT_CN
    unsigned PP2_WANT_KEY_ALG, PP2_WANT_SIG_ALG, PP2_WANT_CIPHER
    ctypedef struct pp_result:
        size_t header_len
        uint8_t command
        uint8_t fam
        uint16_t src_port
        uint16_t dst_port
        uint8_t src_addr[108]
        uint8_t dst_addr[108]
        const char* reason
    int PP_VALID, PP_NEED_MORE, PP_INVALID
    int PP2_CMD_PROXY, PP2_TCP4, PP2_TCP6
    int pp_parse_ex(const uint8_t* buf, size_t len, size_t max_len, pp_result* res) nogil
    void pp2_info_init(pp2_info* info) nogil
    int pp2_info_set_sockaddrs(pp2_info* info, const void* src, const void* dst) nogil
    int pp2_info_set_ssl(pp2_info* info, const SSL* ssl, unsigned want, pp2_ssl_scratch* scratch) nogil
    int pp2_build(const pp2_info* info, uint8_t* out, size_t cap) nogil
    int pp1_build(const pp2_info* info, char* out, size_t cap) nogil
    long pp_find_ctl(const uint8_t* s, size_t len) nogil
