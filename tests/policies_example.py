"""Policy hooks for tests/test_policy.py.

Loaded in the test process (`import policies_example`, tests/ is on sys.path) and by the proxy
subprocess as `--policy tests.policies_example:NAME` (the subprocess runs in the repository
root with it on PYTHONPATH). Settings come from environment variables so that one module works
for both.
"""
from __future__ import annotations

import json
import os

from fastproxy.mqtt import ConnectInfo, ReasonCode
from fastproxy.policy import Allow, Deny, PeerCertificate, Route

ALLOWLIST_ENV = "FASTPROXY_TEST_ALLOWLIST"  # file of allowed ClientIds
RECORD_ENV = "FASTPROXY_TEST_POLICY_RECORD"  # file the recording hook appends JSON lines to


def read_allowed(path: str) -> set[str]:
    """One ClientId per line; blank lines and '#' comments ignored."""
    with open(path, encoding="utf-8") as f:
        return {ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")}


def make_allow_list(path: str):
    """The README's example: only ClientIds listed in a file may connect. The file is read on
    every CONNECT, so edits apply to the next client without a restart."""

    def allow_list(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
        if connect.client_id in read_allowed(path):
            return None
        return Deny(ReasonCode.NOT_AUTHORIZED, "ClientId not on the allow list")

    return allow_list


def allow_list(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """`--policy tests.policies_example:allow_list`, with the file named by $FASTPROXY_TEST_ALLOWLIST."""
    return make_allow_list(os.environ[ALLOWLIST_ENV])(connect, cert, client)


def route_eu(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """ClientIds starting with 'eu-' go to the upstream named 'eu'; 'nowhere-' to an unknown name."""
    if connect.client_id.startswith("eu-"):
        return Route("eu")
    if connect.client_id.startswith("nowhere-"):
        return Route("no-such-upstream")
    return None


def rename(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """The broker sees 'renamed-<ClientId>'."""
    return Allow(client_id="renamed-" + connect.client_id)


def broken(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """A hook with a bug for ClientIds starting with 'crash': it raises."""
    if connect.client_id.startswith("crash"):
        raise RuntimeError("policy bug for " + connect.client_id)
    return None


def wrong_type(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """Returns something that is not a decision."""
    return "yes"


def record(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """Appends what it was given, as JSON, to $FASTPROXY_TEST_POLICY_RECORD; allows."""
    entry = {
        "connect": {name: _jsonable(getattr(connect, name)) for name in connect.__dataclass_fields__},
        "connect_repr": repr(connect),
        "cert": None if cert is None else {
            "cn": cert.cn, "verified": cert.verified, "subject": cert.subject, "issuer": cert.issuer,
            "fingerprint_sha256": cert.fingerprint_sha256, "serial": cert.serial, "der": cert.der.hex(),
        },
        "client": list(client),
    }
    with open(os.environ[RECORD_ENV], "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    return None


def _jsonable(v):
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


NOT_CALLABLE = 42


def prefix_tenant(connect: ConnectInfo, cert: PeerCertificate | None, client: tuple[str, int]):
    """A typical multi-tenant hook: the broker sees 'tenant-a/<ClientId>'."""
    return Allow(client_id="tenant-a/" + connect.client_id)
