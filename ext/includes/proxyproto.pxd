# Declarations of the C PROXY protocol builder and parser (ext/src/proxy_v2.h): the one copy,
# cimported by the engine's stages and by the _proxyproto wrapper.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from openssl cimport SSL

cdef extern from "proxy_v2.h" nogil:
    ctypedef struct pp_str:
        const uint8_t *ptr
        size_t len

    ctypedef struct pp2_info:
        uint8_t command
        uint8_t fam
        uint16_t src_port
        uint16_t dst_port
        uint8_t src_addr[108]
        uint8_t dst_addr[108]
        uint32_t flags
        pp_str alpn
        pp_str authority
        pp_str unique_id
        uint8_t ssl_client
        uint32_t ssl_verify
        pp_str ssl_version
        pp_str ssl_cn
        pp_str ssl_key_alg
        pp_str ssl_sig_alg
        pp_str ssl_cipher
        pp_str netns
        pp_str extra_tlvs
        long noop_len
        size_t max_len

    ctypedef struct pp_result:
        int version
        size_t header_len
        uint8_t command
        uint8_t fam
        uint16_t src_port
        uint16_t dst_port
        uint8_t src_addr[108]
        uint8_t dst_addr[108]
        const uint8_t *tlv
        size_t tlv_len
        int has_crc32c
        uint32_t crc32c
        const char *reason
        size_t error_offset

    ctypedef struct pp_tlv:
        uint8_t type
        uint16_t len
        const uint8_t *value

    ctypedef struct pp_tlv_iter:
        const uint8_t *p
        const uint8_t *end

    int PP_VALID, PP_NEED_MORE, PP_INVALID
    int PP_ERR_CAP, PP_ERR_MAX_LEN, PP_ERR_ARG, PP_ERR_TOO_LONG
    int PP2_F_CRC32C, PP2_F_SSL
    int PP2_CMD_LOCAL, PP2_CMD_PROXY
    int PP2_TYPE_ALPN, PP2_TYPE_AUTHORITY, PP2_TYPE_CRC32C, PP2_TYPE_UNIQUE_ID
    int PP2_TYPE_SSL, PP2_TYPE_NETNS
    int PP2_SUBTYPE_SSL_VERSION, PP2_SUBTYPE_SSL_CN, PP2_SUBTYPE_SSL_CIPHER
    int PP2_SUBTYPE_SSL_SIG_ALG, PP2_SUBTYPE_SSL_KEY_ALG
    int PP2_TCP4, PP2_TCP6, PP2_UDP4, PP2_UDP6, PP2_UNIX_STREAM, PP2_UNIX_DGRAM, PP2_AF_UNSPEC
    int PP2_DEFAULT_MAX_LEN, PP_PARSE_DEFAULT_MAX, PP2_MAX_HEADER_LEN
    int PP2_VERIFY_NO_CERT

    void pp2_info_init(pp2_info *info)
    int pp2_build(const pp2_info *info, uint8_t *out, size_t cap)
    long pp2_build_size(const pp2_info *info)
    int pp1_build(const pp2_info *info, char *out, size_t cap)
    int pp_parse_ex(const uint8_t *buf, size_t len, size_t max_len, pp_result *res)
    void pp_tlv_iter_init(pp_tlv_iter *it, const uint8_t *area, size_t len)
    int pp_tlv_next(pp_tlv_iter *it, pp_tlv *out)
    int pp_tlv_ssl_open(const pp_tlv *ssl, uint8_t *client, uint32_t *verify, pp_tlv_iter *sub)
    uint32_t pp_crc32c(const uint8_t *buf, size_t len)
    long pp_find_ctl(const uint8_t *s, size_t len)
    int pp_format_ipv4(const uint8_t *a, char *out, size_t cap)
    int pp_format_ipv6(const uint8_t *a, char *out, size_t cap)
