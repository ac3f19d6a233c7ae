"""The one error hierarchy of fastproxy.

Everything fastproxy raises on purpose derives from FastproxyError. A configuration problem
is also a ValueError (callers that validate input can catch either). OS errors stay OSError.
"""
from __future__ import annotations


class FastproxyError(Exception):
    """Root of every error fastproxy raises on purpose."""


class ConfigError(FastproxyError, ValueError):
    """A configuration value is missing, malformed or inconsistent.

    The message names where the value came from (file or command line), the key path and
    the problem, so it can be printed to a user as is.
    """

    def __init__(self, problem: str, *, source: str | None = None, key: str | None = None) -> None:
        self.problem = problem
        self.source = source
        self.key = key
        where = ""
        if source and key:
            where = f"{source}: {key}: "
        elif source:
            where = f"{source}: "
        elif key:
            where = f"{key}: "
        super().__init__(f"{where}{problem}")


class TLSConfigError(ConfigError):
    """A certificate, key, CA or TLS parameter cannot be used."""


class EngineError(FastproxyError):
    """The compiled engine could not be set up (epoll, sockets, limits)."""


class EngineNotBuiltError(FastproxyError, ImportError):
    """The compiled extension modules are missing: the package was not built."""


class ProxyProtocolError(FastproxyError, ValueError):
    """A PROXY protocol header cannot be built or parsed (see fastproxy.proxy_protocol)."""


class InvalidProxyHeaderError(ProxyProtocolError):
    """Received bytes are not a valid PROXY protocol v1/v2 header.

    `reason` is the parser's static explanation, `offset` the byte offset it points at.
    """

    def __init__(self, reason: str, offset: int = 0) -> None:
        self.reason = reason
        self.offset = offset
        super().__init__(f"invalid PROXY protocol header: {reason} (at byte {offset})")


class ProxyHeaderTooLongError(ProxyProtocolError):
    """A built header would exceed the caller's limit (default 500 bytes, Mosquitto's cap)."""

    def __init__(self, length: int | None, max_length: int) -> None:
        self.length = length
        self.max_length = max_length
        what = f"{length} bytes" if length is not None else "the header"
        super().__init__(f"PROXY protocol header too long: {what} > limit of {max_length} bytes")


class MQTTProtocolError(FastproxyError):
    """A client broke the MQTT protocol; raised by fastproxy.mqtt.parse_connect.

    How to answer it:
      send_connack     True: send build_connack(connack_version, reason_code), then close.
                       False: close without a CONNACK (MQTT 3.x malformed packet, or the
                       protocol version is not known yet).
      connack_version  CONNACK format: 3 or 4 (4 bytes) or 5 (5 bytes); None without a CONNACK.
      reason_code      The code for that CONNACK (a 3.x return code or a 5.0 reason code). Without
                       a CONNACK it equals v5_reason_code.
      v5_reason_code   The MQTT 5.0 reason code that classifies the error whatever the version
                       (0x81 malformed, 0x82 protocol error, 0x84 unsupported protocol version,
                       0x85 client identifier not valid, 0x90 topic name invalid, 0x95 packet
                       too large): for logs and counters.
      reason           Short static description, e.g. "reserved connect flag set".
      version          The protocol level the client sent, None if not received yet.
      offset           Offset in the packet of the field found to be invalid.

    The keyword arguments have defaults so that BaseException's pickling, which calls
    cls(reason) and then restores the attributes, works (errors can cross process boundaries).
    """

    def __init__(
        self,
        reason: str,
        *,
        reason_code: int = 0x81,
        send_connack: bool = False,
        connack_version: int | None = None,
        v5_reason_code: int | None = None,
        version: int | None = None,
        offset: int = 0,
    ) -> None:
        self.reason = reason
        self.reason_code = reason_code
        self.send_connack = send_connack
        self.connack_version = connack_version
        self.v5_reason_code = reason_code if v5_reason_code is None else v5_reason_code
        self.version = version
        self.offset = offset
        super().__init__(reason)

    def __str__(self) -> str:
        answer = (
            f"CONNACK 0x{self.reason_code:02x}" if self.send_connack else "close without CONNACK"
        )
        return f"{self.reason} (offset {self.offset}; {answer})"


class MalformedConnect(MQTTProtocolError):
    """The CONNECT is a Malformed Packet (MQTT 5.0 reason code 0x81): bad lengths, flags,
    UTF-8, property identifiers, trailing bytes."""


class ConnectProtocolError(MQTTProtocolError):
    """The CONNECT is well-formed but breaks a protocol rule (0x82): first packet not CONNECT,
    duplicate property, out-of-range property value, authentication data without method."""


class UnsupportedProtocolVersion(MQTTProtocolError):
    """Unknown protocol name, or a protocol name/level pair other than MQIsdp/3, MQTT/4, MQTT/5
    (0x84; answered with 3.x CONNACK 0x01 when the client asked for a level below 5)."""


class ClientIdNotValid(MQTTProtocolError):
    """The ClientId is well-formed UTF-8 but holds a control character or a non-character,
    which Mosquitto refuses (0x85; answered with 3.x CONNACK 0x02 identifier rejected)."""


class TopicNameInvalid(MQTTProtocolError):
    """The Will Topic (or the will's Response Topic) is not a valid Topic Name: empty or with a
    wildcard character (0x90)."""


class PacketTooLarge(MQTTProtocolError):
    """The CONNECT is larger than the configured maximum packet size (0x95)."""


class BenchError(FastproxyError):
    """`fastproxy bench` cannot run or measure: a missing broker binary, a setting the load
    generator cannot meet, a process that did not start. The message says what to do."""
