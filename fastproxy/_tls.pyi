"""Typed interface of the compiled TLS context module (ext/_tls.pyx)."""

from typing import Any

def openssl_version() -> str: ...
def tls_library() -> tuple[str, str, bool]: ...
def certificate_info(der: bytes) -> dict[str, Any]: ...

class TLSContext:
    verify: str
    has_client_ca: bool
    def __init__(
        self,
        cert: str,
        key: str,
        *,
        min_version: str = ...,
        ciphers: str = ...,
        ciphersuites: str | None = ...,
        client_ca: str | None = ...,
        verify: str = ...,
        verify_depth: int = ...,
        crl: str | None = ...,
        num_tickets: int = ...,
        session_tickets: bool = ...,
    ) -> None: ...
    def capsule(self) -> object: ...
