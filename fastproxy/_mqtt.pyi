"""Stub for the compiled MQTT CONNECT module (ext/_mqtt.pyx over ext/src/mqtt_connect.c).

Use it through fastproxy.mqtt, which re-exports these functions.
"""
from fastproxy.mqtt import ConnectInfo

_Buffer = bytes | bytearray | memoryview

MAX_PACKET_SIZE: int

def parse_connect(data: _Buffer, max_size: int | None = 65536) -> ConnectInfo | None:
    """None: need more bytes. Raises fastproxy.errors.MQTTProtocolError subclasses."""

def build_connack(version: int, reason_code: int) -> bytes: ...
def connack_code(version: int, reason_code: int) -> int | None: ...
def rewrite_client_id(data: _Buffer, new_id: str | bytes) -> bytes: ...
def _parse_repeat(data: bytes, iterations: int, max_size: int | None = 65536) -> int: ...
