# Declarations of the C MQTT CONNECT parser and builders (ext/src/mqtt_connect.h): the one copy,
# cimported by the engine's stages and by the _mqtt wrapper.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "mqtt_connect.h" nogil:
    enum:
        MQTT_NEED_MORE
        MQTT_VALID
        MQTT_INVALID
        MQTT_MAX_REMAINING_LENGTH
        MQTT_MAX_PACKET_SIZE
        MQTT_LEVEL_5_0
        MQTT_CONNECT_FLAG_CLEAN_START
        MQTT_CONNECT_FLAG_WILL_RETAIN
        MQTT_PROP_PAYLOAD_FORMAT_INDICATOR
        MQTT_PROP_MESSAGE_EXPIRY_INTERVAL
        MQTT_PROP_CONTENT_TYPE
        MQTT_PROP_RESPONSE_TOPIC
        MQTT_PROP_CORRELATION_DATA
        MQTT_PROP_SESSION_EXPIRY_INTERVAL
        MQTT_PROP_REQUEST_PROBLEM_INFORMATION
        MQTT_PROP_WILL_DELAY_INTERVAL
        MQTT_PROP_REQUEST_RESPONSE_INFORMATION
        MQTT_PROP_RECEIVE_MAXIMUM
        MQTT_PROP_TOPIC_ALIAS_MAXIMUM
        MQTT_PROP_USER_PROPERTY
        MQTT_PROP_MAXIMUM_PACKET_SIZE
        MQTT_BUILD_E_SPACE
        MQTT_BUILD_E_ARG
        MQTT_BUILD_E_PACKET
        MQTT_BUILD_E_TOO_LARGE

    ctypedef struct mqtt_bytes:
        const uint8_t *ptr
        uint32_t len

    ctypedef struct mqtt_connect:
        size_t packet_len
        uint32_t remaining_len
        uint8_t header_len
        uint8_t level
        uint8_t flags
        uint8_t will_qos
        uint16_t keepalive
        mqtt_bytes protocol_name
        mqtt_bytes client_id
        mqtt_bytes will_topic
        mqtt_bytes will_payload
        mqtt_bytes username
        mqtt_bytes password
        size_t client_id_offset
        mqtt_bytes properties
        mqtt_bytes will_properties
        uint64_t props_present
        uint64_t will_props_present
        uint32_t session_expiry_interval
        uint32_t maximum_packet_size
        uint16_t receive_maximum
        uint16_t topic_alias_maximum
        uint8_t request_response_information
        uint8_t request_problem_information
        uint32_t user_property_count
        mqtt_bytes authentication_method
        mqtt_bytes authentication_data
        uint32_t will_delay_interval
        uint32_t message_expiry_interval
        uint8_t payload_format_indicator
        mqtt_bytes content_type
        mqtt_bytes response_topic
        mqtt_bytes correlation_data
        uint32_t will_user_property_count

    ctypedef struct mqtt_connect_error:
        const char *reason
        size_t offset
        uint8_t rc5
        uint8_t send_connack
        uint8_t connack_level
        uint8_t reason_code
        uint8_t level
        uint8_t have_level

    ctypedef struct mqtt_property:
        uint8_t id
        uint32_t value
        mqtt_bytes str
        mqtt_bytes str2

    ctypedef struct mqtt_property_iter:
        pass

    int mqtt_parse_connect(const uint8_t *buf, size_t len, size_t max_size,
                           mqtt_connect *out, mqtt_connect_error *err)
    void mqtt_property_iter_init(mqtt_property_iter *it, mqtt_bytes block)
    int mqtt_property_next(mqtt_property_iter *it, mqtt_property *prop)
    int mqtt_build_connack(uint8_t level, uint8_t reason_code, uint8_t *out, size_t cap)
    int mqtt_connack_code(uint8_t level, uint8_t rc5)
    long mqtt_find_connect(const uint8_t *buf, size_t len)
    long mqtt_rewrite_client_id(const uint8_t *pkt, size_t pkt_len, const mqtt_connect *c,
                                const uint8_t *new_id, size_t new_id_len,
                                uint8_t *out, size_t cap)
