# Declarations of the C MQTT CONNECT parser and builders (ext/src/mqtt_connect.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "mqtt_connect.h" nogil:
    int MQTT_NEED_MORE, MQTT_VALID, MQTT_INVALID
    ctypedef struct mqtt_bytes:
        const uint8_t* ptr
        uint32_t len
    ctypedef struct mqtt_connect:
        size_t packet_len
        uint8_t level
        uint16_t keepalive
        mqtt_bytes client_id
        mqtt_bytes username
    ctypedef struct mqtt_connect_error:
        const char* reason
        uint8_t send_connack
        uint8_t connack_level
        uint8_t reason_code
    int mqtt_parse_connect(const uint8_t* buf, size_t len, size_t max_size,
                           mqtt_connect* out, mqtt_connect_error* err)
    int mqtt_build_connack(uint8_t level, uint8_t reason_code, uint8_t* out, size_t cap)
    int mqtt_connack_code(uint8_t level, uint8_t rc5)
    long mqtt_rewrite_client_id(const uint8_t* pkt, size_t pkt_len, const mqtt_connect* c,
                                const uint8_t* new_id, size_t new_id_len, uint8_t* out, size_t cap)
