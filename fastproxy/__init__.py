"""fastproxy: a fast, MQTT-aware TLS front end for MQTT brokers.

Python decides (configuration, policy, logging), the compiled engine moves bytes.

    import fastproxy
    cfg = fastproxy.build_config({"listen": "0.0.0.0:8883", "upstream": "127.0.0.1:1883",
                                  "tls_cert": "server.crt", "tls_key": "server.key"})
    fastproxy.Proxy(cfg).run()
"""
from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

from .config import Address, Config, ListenerConfig, build_config, load_config
from .errors import ConfigError, EngineError, EngineNotBuiltError, FastproxyError, TLSConfigError
from .record import Record

if TYPE_CHECKING:  # what mypy sees; at run time __getattr__ below imports them on first use
    from .server import Proxy, check_config, serve
else:

    def __getattr__(name: str) -> object:  # lazy: importing the package must not need the compiled engine
        if name in ("Proxy", "serve", "check_config"):
            from . import server

            return getattr(server, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "EngineError",
    "EngineNotBuiltError",
    "FastproxyError",
    "ListenerConfig",
    "Proxy",
    "Record",
    "TLSConfigError",
    "build_config",
    "check_config",
    "load_config",
    "serve",
    "__version__",
]
