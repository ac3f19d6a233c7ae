"""TLS settings → OpenSSL contexts (the compiled fastproxy._tls), with errors that name keys."""
from __future__ import annotations

from .config import CLI_SOURCE, ListenerConfig, key_path
from .errors import TLSConfigError


def openssl_version() -> str:
    """Version of the OpenSSL library the compiled modules are linked against."""
    from ._tls import openssl_version as v

    return v()


def tls_library() -> tuple[str, str, bool]:
    """("OpenSSL" | "AWS-LC", its version, linked statically into the compiled modules)."""
    from ._tls import tls_library as t

    return t()


def build_context(lc: ListenerConfig, *, source: str = CLI_SOURCE, index: int = 0, n_listeners: int = 1):
    """The TLSContext for a listener, or None for a plain TCP listener.

    Loads certificate, key and CA files now, so `fastproxy check` catches what nginx -t would.
    """
    if not lc.tls:
        return None
    from ._tls import TLSContext

    assert lc.tls_cert is not None and lc.tls_key is not None
    try:
        return TLSContext(
            lc.tls_cert,
            lc.tls_key,
            min_version=lc.tls_min_version,
            ciphers=lc.tls_ciphers,
            ciphersuites=lc.tls_ciphersuites,
            client_ca=lc.client_ca,
            verify=lc.verify,
            verify_depth=lc.verify_depth,
            crl=lc.crl,
            session_tickets=lc.tls_session_tickets,
        )
    except TLSConfigError as e:
        key = key_path(source, n_listeners, index, e.key or "tls_cert")
        raise TLSConfigError(e.problem, source=source, key=key) from None
