"""fastproxy: a fast, MQTT-aware TLS front end for MQTT brokers.

Python decides (configuration, policy, logging), the compiled engine moves bytes.

    import fastproxy
    cfg = fastproxy.build_config({"listen": "0.0.0.0:8883", "upstream": "127.0.0.1:1883",
                                  "tls_cert": "server.crt", "tls_key": "server.key"})
    fastproxy.Proxy(cfg).run()
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import Address, Config, ListenerConfig, build_config, load_config
from .errors import ConfigError, EngineError, EngineNotBuiltError, FastproxyError, TLSConfigError


def __getattr__(name: str):  # lazy: importing the package must not need the compiled engine
    if name in ("Proxy", "serve", "check_config"):
        from . import server

        return getattr(server, name)
    raise AttributeError(name)


__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "EngineError",
    "EngineNotBuiltError",
    "FastproxyError",
    "ListenerConfig",
    "Proxy",
    "TLSConfigError",
    "build_config",
    "check_config",
    "load_config",
    "serve",
    "__version__",
]
