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
