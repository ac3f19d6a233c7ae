/*
 * mqtt_connect.h - strict, allocation-free parser for the MQTT CONNECT packet.
 *
 * Part of fastproxy. Plain C99: no allocation, no global or static mutable state, no I/O.
 *
 * Supported protocol versions (protocol name / protocol level pairs):
 *   MQTT 3.1    "MQIsdp" / 3   (IBM MQTT V3.1 Protocol Specification)
 *   MQTT 3.1.1  "MQTT"   / 4   (OASIS MQTT Version 3.1.1, section 3.1 CONNECT)
 *   MQTT 5.0    "MQTT"   / 5   (OASIS MQTT Version 5.0,   section 3.1 CONNECT)
 *
 * The parser works on "the bytes received so far" and is meant to be called again with the
 * longer buffer whenever more bytes arrive (the same model as HAProxy's src/mqtt.c). It has
 * three outcomes:
 *
 *   MQTT_NEED_MORE  the bytes so far are a valid prefix of a CONNECT: read more, call again.
 *   MQTT_INVALID    the bytes can never become a valid CONNECT. *err says why, whether a
 *                   CONNACK may be sent, in which format and with which code.
 *   MQTT_VALID      *out describes the packet: pointers into buf, lengths, decoded values, and
 *                   out->packet_len, the total length of the CONNECT (fixed header included).
 *                   Bytes at buf[packet_len..len) belong to later packets; they are untouched.
 *
 * The outcome only depends on the bytes, never on how they were split into reads: for every
 * prefix P of a buffer B, parse(P) is either MQTT_NEED_MORE or exactly parse(B). An invalid
 * packet is reported as soon as the bytes received prove it invalid (a first byte that is not
 * CONNECT fails with 1 byte; a declared length above max_size fails once the protocol level is
 * known, long before the body arrives).
 */
#ifndef FASTPROXY_MQTT_CONNECT_H
#define FASTPROXY_MQTT_CONNECT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Outcomes of mqtt_parse_connect() ------------------------------------------------------ */
#define MQTT_NEED_MORE 0
#define MQTT_VALID 1
#define MQTT_INVALID 2

/* ---- Fixed header (3.1.1 section 2.2, 5.0 section 2.1) -------------------------------------- */
#define MQTT_CPT_CONNECT 1                       /* control packet type 1 (upper nibble) */
#define MQTT_CPT_CONNACK 2
#define MQTT_MAX_REMAINING_LENGTH 268435455u     /* largest 4-byte Variable Byte Integer */
#define MQTT_MAX_PACKET_SIZE (MQTT_MAX_REMAINING_LENGTH + 5u)

/* ---- Protocol level (3.1.1 section 3.1.2.2, 5.0 section 3.1.2.2) ---------------------------- */
#define MQTT_LEVEL_3_1 3      /* protocol name "MQIsdp" */
#define MQTT_LEVEL_3_1_1 4    /* protocol name "MQTT" */
#define MQTT_LEVEL_5_0 5      /* protocol name "MQTT" */

/* ---- Connect Flags (3.1.1 section 3.1.2.3, 5.0 section 3.1.2.3) ----------------------------- */
#define MQTT_CONNECT_FLAG_RESERVED 0x01
#define MQTT_CONNECT_FLAG_CLEAN_START 0x02   /* "Clean Session" in 3.1 and 3.1.1 */
#define MQTT_CONNECT_FLAG_WILL 0x04
#define MQTT_CONNECT_FLAG_WILL_QOS_MASK 0x18
#define MQTT_CONNECT_FLAG_WILL_QOS_SHIFT 3
#define MQTT_CONNECT_FLAG_WILL_RETAIN 0x20
#define MQTT_CONNECT_FLAG_PASSWORD 0x40
#define MQTT_CONNECT_FLAG_USERNAME 0x80

/* ---- CONNACK Return Codes, MQTT 3.1 / 3.1.1 (3.1.1 section 3.2.2.3, table 3.1) -------------- */
#define MQTT_CONNACK_ACCEPTED 0x00
#define MQTT_CONNACK_UNACCEPTABLE_PROTOCOL_VERSION 0x01
#define MQTT_CONNACK_IDENTIFIER_REJECTED 0x02
#define MQTT_CONNACK_SERVER_UNAVAILABLE 0x03
#define MQTT_CONNACK_BAD_USER_NAME_OR_PASSWORD 0x04
#define MQTT_CONNACK_NOT_AUTHORIZED 0x05

/* ---- Reason Codes, MQTT 5.0 (section 2.4; those valid in CONNACK: section 3.2.2.2) --------- */
#define MQTT_RC_SUCCESS 0x00
#define MQTT_RC_UNSPECIFIED_ERROR 0x80
#define MQTT_RC_MALFORMED_PACKET 0x81
#define MQTT_RC_PROTOCOL_ERROR 0x82
#define MQTT_RC_IMPLEMENTATION_SPECIFIC_ERROR 0x83
#define MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION 0x84
#define MQTT_RC_CLIENT_IDENTIFIER_NOT_VALID 0x85
#define MQTT_RC_BAD_USER_NAME_OR_PASSWORD 0x86
#define MQTT_RC_NOT_AUTHORIZED 0x87
#define MQTT_RC_SERVER_UNAVAILABLE 0x88
#define MQTT_RC_SERVER_BUSY 0x89
#define MQTT_RC_BANNED 0x8A
#define MQTT_RC_BAD_AUTHENTICATION_METHOD 0x8C
#define MQTT_RC_TOPIC_NAME_INVALID 0x90
#define MQTT_RC_PACKET_TOO_LARGE 0x95
#define MQTT_RC_QUOTA_EXCEEDED 0x97
#define MQTT_RC_PAYLOAD_FORMAT_INVALID 0x99
#define MQTT_RC_RETAIN_NOT_SUPPORTED 0x9A
#define MQTT_RC_QOS_NOT_SUPPORTED 0x9B
#define MQTT_RC_USE_ANOTHER_SERVER 0x9C
#define MQTT_RC_SERVER_MOVED 0x9D
#define MQTT_RC_CONNECTION_RATE_EXCEEDED 0x9F

/* ---- Property identifiers, MQTT 5.0 (section 2.2.2.2, table 2-4) ----------------------------
 * Allowed in CONNECT properties (section 3.1.2.11): 0x11 0x21 0x27 0x22 0x19 0x17 0x26 0x15 0x16
 * Allowed in Will Properties  (section 3.1.3.2):   0x18 0x01 0x02 0x03 0x08 0x09 0x26           */
#define MQTT_PROP_PAYLOAD_FORMAT_INDICATOR 0x01          /* Byte */
#define MQTT_PROP_MESSAGE_EXPIRY_INTERVAL 0x02           /* Four Byte Integer */
#define MQTT_PROP_CONTENT_TYPE 0x03                      /* UTF-8 Encoded String */
#define MQTT_PROP_RESPONSE_TOPIC 0x08                    /* UTF-8 Encoded String */
#define MQTT_PROP_CORRELATION_DATA 0x09                  /* Binary Data */
#define MQTT_PROP_SUBSCRIPTION_IDENTIFIER 0x0B           /* Variable Byte Integer */
#define MQTT_PROP_SESSION_EXPIRY_INTERVAL 0x11           /* Four Byte Integer */
#define MQTT_PROP_ASSIGNED_CLIENT_IDENTIFIER 0x12        /* UTF-8 Encoded String */
#define MQTT_PROP_SERVER_KEEP_ALIVE 0x13                 /* Two Byte Integer */
#define MQTT_PROP_AUTHENTICATION_METHOD 0x15             /* UTF-8 Encoded String */
#define MQTT_PROP_AUTHENTICATION_DATA 0x16               /* Binary Data */
#define MQTT_PROP_REQUEST_PROBLEM_INFORMATION 0x17       /* Byte */
#define MQTT_PROP_WILL_DELAY_INTERVAL 0x18               /* Four Byte Integer */
#define MQTT_PROP_REQUEST_RESPONSE_INFORMATION 0x19      /* Byte */
#define MQTT_PROP_RESPONSE_INFORMATION 0x1A              /* UTF-8 Encoded String */
#define MQTT_PROP_SERVER_REFERENCE 0x1C                  /* UTF-8 Encoded String */
#define MQTT_PROP_REASON_STRING 0x1F                     /* UTF-8 Encoded String */
#define MQTT_PROP_RECEIVE_MAXIMUM 0x21                   /* Two Byte Integer */
#define MQTT_PROP_TOPIC_ALIAS_MAXIMUM 0x22               /* Two Byte Integer */
#define MQTT_PROP_TOPIC_ALIAS 0x23                       /* Two Byte Integer */
#define MQTT_PROP_MAXIMUM_QOS 0x24                       /* Byte */
#define MQTT_PROP_RETAIN_AVAILABLE 0x25                  /* Byte */
#define MQTT_PROP_USER_PROPERTY 0x26                     /* UTF-8 String Pair */
#define MQTT_PROP_MAXIMUM_PACKET_SIZE 0x27               /* Four Byte Integer */
#define MQTT_PROP_WILDCARD_SUBSCRIPTION_AVAILABLE 0x28   /* Byte */
#define MQTT_PROP_SUBSCRIPTION_IDENTIFIER_AVAILABLE 0x29 /* Byte */
#define MQTT_PROP_SHARED_SUBSCRIPTION_AVAILABLE 0x2A     /* Byte */

/* A span of buf. ptr == NULL: the field is absent. ptr != NULL, len == 0: present and empty. */
typedef struct mqtt_bytes {
    const uint8_t *ptr;
    uint32_t len;
} mqtt_bytes;

/* Filled by mqtt_parse_connect() on MQTT_VALID. Every span points into the parsed buffer and is
 * valid as long as that buffer is. Strings are well-formed UTF-8 without U+0000 (not
 * NUL-terminated). */
typedef struct mqtt_connect {
    size_t packet_len;          /* fixed header + remaining length: where the next packet starts */
    uint32_t remaining_len;
    uint8_t header_len;         /* 2..5: first byte + Remaining Length varint */
    uint8_t level;              /* MQTT_LEVEL_3_1, MQTT_LEVEL_3_1_1 or MQTT_LEVEL_5_0 */
    uint8_t flags;              /* raw Connect Flags byte */
    uint8_t will_qos;           /* 0..2 (0 when there is no will) */
    uint16_t keepalive;         /* seconds */
    mqtt_bytes protocol_name;   /* "MQTT" or "MQIsdp" */
    mqtt_bytes client_id;       /* always present, may be empty */
    mqtt_bytes will_topic;      /* present iff the Will Flag is set */
    mqtt_bytes will_payload;    /* present iff the Will Flag is set */
    mqtt_bytes username;        /* present iff the User Name Flag is set */
    mqtt_bytes password;        /* present iff the Password Flag is set (binary) */
    size_t client_id_offset;    /* offset of the ClientId's 2-byte length prefix in buf */

    /* MQTT 5.0 only (zero / absent otherwise). The raw property blocks (without their length
     * prefix) can be walked with mqtt_property_iter_init()/mqtt_property_next(). */
    mqtt_bytes properties;              /* CONNECT Properties, section 3.1.2.11 */
    mqtt_bytes will_properties;         /* Will Properties, section 3.1.3.2 */
    uint64_t props_present;             /* bit (1 << id) for each CONNECT property id seen */
    uint64_t will_props_present;        /* bit (1 << id) for each Will property id seen */
    uint32_t session_expiry_interval;   /* 0x11 */
    uint32_t maximum_packet_size;       /* 0x27 */
    uint16_t receive_maximum;           /* 0x21 */
    uint16_t topic_alias_maximum;       /* 0x22 */
    uint8_t request_response_information; /* 0x19 */
    uint8_t request_problem_information;  /* 0x17 */
    uint32_t user_property_count;       /* 0x26 in CONNECT properties */
    mqtt_bytes authentication_method;   /* 0x15 */
    mqtt_bytes authentication_data;     /* 0x16 */
    uint32_t will_delay_interval;       /* 0x18 */
    uint32_t message_expiry_interval;   /* 0x02 */
    uint8_t payload_format_indicator;   /* 0x01 */
    mqtt_bytes content_type;            /* 0x03 */
    mqtt_bytes response_topic;          /* 0x08 */
    mqtt_bytes correlation_data;        /* 0x09 */
    uint32_t will_user_property_count;  /* 0x26 in Will Properties */
} mqtt_connect;

/* Filled by mqtt_parse_connect() on MQTT_INVALID. */
typedef struct mqtt_connect_error {
    const char *reason;     /* short static string for logs, e.g. "reserved connect flag set" */
    size_t offset;          /* offset in buf of the field found to be invalid */
    uint8_t rc5;            /* MQTT 5.0 reason code that classifies the error, whatever the
                               version: 0x81 malformed, 0x82 protocol error, 0x84 unsupported
                               protocol version, 0x90 topic name invalid, 0x95 packet too large */
    uint8_t send_connack;   /* 1: send CONNACK(connack_level, reason_code), then close.
                               0: close the connection without a CONNACK (3.1.1 section 4.8:
                               a malformed 3.x packet gets no CONNACK; or the version is unknown) */
    uint8_t connack_level;  /* CONNACK format when send_connack: 3 or 4 (4 bytes) or 5 (5 bytes) */
    uint8_t reason_code;    /* the code for that CONNACK: a 3.x return code or a 5.0 reason code */
    uint8_t level;          /* protocol level byte as received (if have_level) */
    uint8_t have_level;     /* 1 if the protocol level byte was received */
} mqtt_connect_error;

/*
 * Parse the CONNECT at the start of buf[0..len). max_size bounds the whole packet (fixed header
 * included, as MQTT 5.0's Maximum Packet Size); pass MQTT_MAX_PACKET_SIZE for no extra limit.
 * out must not be NULL; err may be NULL. Returns MQTT_NEED_MORE, MQTT_VALID or MQTT_INVALID.
 * *out is meaningful only on MQTT_VALID, *err only on MQTT_INVALID, with one exception: on
 * MQTT_NEED_MORE, out->packet_len is the declared length of the whole packet once the fixed
 * header is complete (0 before). The parser keeps no state, so each call re-reads the prefix;
 * a caller fed by a slow sender may wait until it holds out->packet_len bytes before calling
 * again, which bounds the work to two parses per packet (the checks on the first bytes, which
 * usually arrive together, have already run by then).
 */
int mqtt_parse_connect(const uint8_t *buf, size_t len, size_t max_size,
                       mqtt_connect *out, mqtt_connect_error *err);

/* ---- Walking a property block of a VALID CONNECT -------------------------------------------- */
typedef struct mqtt_property {
    uint8_t id;         /* MQTT_PROP_* */
    uint32_t value;     /* Byte, Two/Four Byte Integer and Variable Byte Integer properties */
    mqtt_bytes str;     /* UTF-8 string or binary value; User Property: the name */
    mqtt_bytes str2;    /* User Property: the value */
} mqtt_property;

typedef struct mqtt_property_iter {
    const uint8_t *p;
    size_t pos, len;
} mqtt_property_iter;

void mqtt_property_iter_init(mqtt_property_iter *it, mqtt_bytes block);
/* 1: *prop holds the next property; 0: end of block; -1: block malformed (never happens for a
 * block taken from a VALID mqtt_connect). */
int mqtt_property_next(mqtt_property_iter *it, mqtt_property *prop);

/* ---- Builders -------------------------------------------------------------------------------- */

/* Error results of the builders (negative). */
#define MQTT_BUILD_E_SPACE (-1)     /* the output does not fit in cap bytes */
#define MQTT_BUILD_E_ARG (-2)       /* bad level / reason code, or new ClientId invalid */
#define MQTT_BUILD_E_PACKET (-3)    /* the mqtt_connect does not describe pkt */
#define MQTT_BUILD_E_TOO_LARGE (-4) /* the result would exceed the MQTT maximum packet size */

/*
 * Write a CONNACK refusing (or accepting, reason_code 0) a connection, Session Present 0:
 *   level 3 or 4: 20 02 00 RC      (3.1.1 section 3.2; RC must be 0x00..0x05)
 *   level 5:      20 03 00 RC 00   (5.0 section 3.2, empty properties; RC must be a reason code
 *                                   that section 3.2.2.2 allows in a CONNACK)
 * Returns the number of bytes written (4 or 5) or a negative MQTT_BUILD_E_*.
 */
int mqtt_build_connack(uint8_t level, uint8_t reason_code, uint8_t *out, size_t cap);

/*
 * The CONNACK code that means MQTT 5.0 reason code rc5 in protocol level `level`:
 * level 5 -> rc5 itself if CONNACK may carry it; level 3/4 -> the 3.x return code with the same
 * meaning (0x84 -> 0x01, 0x85 -> 0x02, 0x88/0x89 -> 0x03, 0x86 -> 0x04, 0x87/0x8A -> 0x05).
 * Returns -1 when there is none: close the connection without a CONNACK.
 */
int mqtt_connack_code(uint8_t level, uint8_t rc5);

/*
 * Re-encode the CONNECT pkt[0..c->packet_len), which c describes (a MQTT_VALID result of
 * mqtt_parse_connect on pkt), with its ClientId replaced by new_id[0..new_id_len), into
 * out[0..cap). Everything else is copied byte for byte; the Remaining Length is re-encoded.
 * new_id must be well-formed UTF-8 without U+0000, at most 65535 bytes. out must not overlap pkt.
 * Returns the new packet length or a negative MQTT_BUILD_E_*.
 */
long mqtt_rewrite_client_id(const uint8_t *pkt, size_t pkt_len, const mqtt_connect *c,
                            const uint8_t *new_id, size_t new_id_len, uint8_t *out, size_t cap);

/*
 * Whether the packets in buf[0..len) that follow a CONNECT (what came with it in the first
 * reads) include another CONNECT: a protocol violation ([MQTT-3.1.0-2]) the proxy refuses
 * before the broker sees either. Walks fixed headers only (type nibble, Remaining Length) and
 * stops at the first incomplete or malformed one. Returns the offset of that CONNECT, or -1.
 */
long mqtt_find_connect(const uint8_t *buf, size_t len);

/* 0 if s[0..n) is well-formed UTF-8 (no surrogates, no overlong forms, <= U+10FFFF) without
 * U+0000 (3.1.1 section 1.5.3, 5.0 section 1.5.4) and without the code points Mosquitto refuses
 * as malformed: controls U+0001..U+001F, U+007F..U+009F and non-characters (U+FDD0..U+FDEF,
 * U+nFFFE, U+nFFFF). 1 if it contains U+0000; 2 if ill-formed; 3 if well-formed but holding
 * such a control or non-character (and no U+0000). */
int mqtt_utf8_check(const uint8_t *s, size_t n);

#ifdef __cplusplus
}
#endif

#endif /* FASTPROXY_MQTT_CONNECT_H */
