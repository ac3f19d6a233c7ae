"""What `fastproxy check` (and `serve` at start) tells an operator beyond the schema: problems
of the deployment that would only show at the first client.

- a listen address another socket already holds (or that is not one of this host's);
- a server certificate (or a certificate of its chain) that expired, is not valid yet, or
  expires within EXPIRY_WARNING_DAYS;
- a certificate file without the intermediate its certificate needs (the nginx/HAProxy
  `cert.pem` instead of `fullchain.pem` mistake);
- a client CA certificate that expired or expires within EXPIRY_WARNING_DAYS.

A key that does not match its certificate is not a warning: loading the TLS context already
refuses it (a configuration error naming `tls_key`), before these checks run.

Certificates are read with the compiled `fastproxy._tls.certificate_info` (OpenSSL), so
nothing beyond fastproxy itself is needed at run time. Every check is best effort: a file
that cannot be read here was already reported by the context loader, and is skipped.
"""
from __future__ import annotations

import base64
import errno
import os
import re
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any

from .config import Address, Config, ListenerConfig

__all__ = ["deployment_warnings", "EXPIRY_WARNING_DAYS"]

EXPIRY_WARNING_DAYS = 30
_DAY = 86400
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.S)
_CERT_SUFFIXES = (".crt", ".pem", ".cer", ".ca-bundle")
_MAX_CERT_FILE = 4 << 20


def deployment_warnings(cfg: Config, *, now: float | None = None) -> list[str]:
    """Warnings (one line each, starting with the listener's name) about cfg's deployment."""
    now = time.time() if now is None else now
    out: list[str] = []
    roots = _TrustedRoots()
    for lc in cfg.listeners:
        out += _listen_warnings(lc)
        if lc.tls_cert:
            out += _server_cert_warnings(lc, lc.tls_cert, now, roots)
        if lc.client_ca:
            out += _client_ca_warnings(lc, lc.client_ca, now)
    return out


# ----------------------------------------------------------------------------- listen addresses


def _listen_warnings(lc: ListenerConfig) -> list[str]:
    out = []
    for a in lc.listen:
        if a.is_unix or a.port == 0:
            continue
        err = _probe_bind(a)
        if err == errno.EADDRINUSE:
            if _held_by_us(a.port):
                continue        # a reload: this proxy (or its workers) holds it
            out.append(f"{lc.name}: listen address {a} is already in use: another socket holds it "
                       "(another process, or this configuration already being served)")
        elif err == errno.EADDRNOTAVAIL:
            out.append(f"{lc.name}: listen address {a} is not an address of this host: "
                       "fastproxy serve cannot listen on it")
    return out


def _probe_bind(a: Address) -> int:
    """errno of binding a the way the proxy does, but without SO_REUSEPORT (which would share
    the port with any other SO_REUSEPORT socket of the same user); 0 when it binds."""
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return e.errno or 0
    with s:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # TIME_WAIT is no conflict
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((a.host, a.port))
        except OSError as e:
            return e.errno or 0
    return 0


def _held_by_us(port: int) -> bool:
    """Whether a TCP socket bound to port belongs to this process or one of its descendants
    (a reload checks the configuration while its own workers hold the ports)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except (OSError, ValueError, IndexError):
            continue
    inodes.discard("0")
    if not inodes:
        return False
    for pid in _self_and_descendants():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return True
    return False


def _self_and_descendants() -> list[int]:
    me = os.getpid()
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            parent[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [me], [me]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


# ----------------------------------------------------------------------------- certificates


def _certs_in(path: str) -> list[dict[str, Any]]:
    """certificate_info of each PEM certificate in path, in file order ([] if unreadable)."""
    try:
        from ._tls import certificate_info
    except ImportError:         # no compiled engine: build_context already said so
        return []
    try:
        if os.path.getsize(path) > _MAX_CERT_FILE:
            return []
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    out = []
    for m in _PEM_CERT.finditer(data):
        try:
            out.append(certificate_info(base64.b64decode(m.group(1))))
        except ValueError:
            continue
    return out


def _self_signed(info: dict[str, Any]) -> bool:
    return bool(info["subject"]) and info["subject"] == info["issuer"]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _validity(info: dict[str, Any], now: float) -> str | None:
    """'expired on …', 'is not valid before …', 'expires on … (in N days)' or None."""
    not_before, not_after = info.get("not_before"), info.get("not_after")
    if not_after is not None and not_after <= now:
        return f"expired on {_when(not_after)}"
    if not_before is not None and not_before > now:
        return f"is not valid before {_when(not_before)}"
    if not_after is not None and not_after - now < EXPIRY_WARNING_DAYS * _DAY:
        days = int((not_after - now) // _DAY)
        left = "less than a day" if days == 0 else "1 day" if days == 1 else f"{days} days"
        return f"expires on {_when(not_after)} (in {left})"
    return None


def _server_cert_warnings(lc: ListenerConfig, path: str, now: float, roots: _TrustedRoots) -> list[str]:
    certs = _certs_in(path)
    if not certs:
        return []
    out = []
    leaf = certs[0]
    v = _validity(leaf, now)
    if v:
        out.append(f"{lc.name}: server certificate {path} ({leaf['subject']}) {v}: "
                   + ("clients refuse it; renew it" if not v.startswith("expires") else "renew it"))
    for i, c in enumerate(certs[1:], start=2):
        v = _validity(c, now)
        if v:
            out.append(f"{lc.name}: certificate #{i} in {path} ({c['subject']}), part of the chain sent "
                       f"to clients, {v}: replace it with the issuer's current certificate")
    out += _chain_warnings(lc, path, certs, roots)
    return out


def _chain_warnings(lc: ListenerConfig, path: str, certs: list[dict[str, Any]], roots: _TrustedRoots) -> list[str]:
    """The nginx/HAProxy expectation: the file is the certificate followed by the intermediates
    up to (not necessarily including) a root. Incomplete: the certificate is not self-signed,
    its issuer is not in the file, and that issuer is not a root this host trusts (system store,
    the listener's client CA, or a self-signed certificate in a file next to this one)."""
    leaf = certs[0]
    issuer = leaf["issuer"]
    if _self_signed(leaf) or any(c["subject"] == issuer for c in certs[1:]):
        return []
    if roots.is_root(issuer, lc.client_ca):
        return []
    directory = os.path.dirname(os.path.abspath(path))
    holder = None
    for sib, infos in _siblings(directory, path):
        if not any(c["subject"] == issuer for c in infos):
            continue
        if infos[0]["fingerprint_sha256"] == leaf["fingerprint_sha256"]:
            return [f"{lc.name}: certificate file {path} holds no intermediate: its issuer '{issuer}' is not in "
                    f"the file, so clients that lack it fail the handshake; {sib} next to it holds the "
                    f"certificate with its chain: use that"]
        issuing = next(c for c in infos if c["subject"] == issuer)
        if _self_signed(issuing):
            return []           # issued directly by a root CA kept next to it (dev-certs' ca.crt)
        holder = holder or sib
    if holder:
        return [f"{lc.name}: certificate file {path} holds no intermediate: its issuer '{issuer}' is in "
                f"{holder} but not in the file, so clients that lack it fail the handshake; use a file with "
                f"the certificate followed by {os.path.basename(holder)} (like fullchain.pem)"]
    return [f"{lc.name}: certificate file {path} holds no intermediate: its issuer '{issuer}' is not in the "
            f"file nor a trusted root, so clients that lack it fail the handshake; append the intermediate "
            f"(like fullchain.pem), or keep your own root CA next to the file if clients trust it directly"]


def _siblings(directory: str, path: str) -> Iterable[tuple[str, list[dict[str, Any]]]]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    me = os.path.realpath(path)
    for n in names:
        p = os.path.join(directory, n)
        if not n.lower().endswith(_CERT_SUFFIXES) or "key" in n.lower() or os.path.realpath(p) == me:
            continue
        if os.path.isfile(p):
            yield p, _certs_in(p)


class _TrustedRoots:
    """Subjects of self-signed certificates this host trusts (the default OpenSSL CA file),
    read once and only when a chain check needs them."""

    def __init__(self) -> None:
        self._system: set[str] | None = None

    def is_root(self, subject: str, client_ca: str | None) -> bool:
        if self._system is None:
            self._system = set()
            paths = ssl.get_default_verify_paths()
            for f in {paths.cafile, paths.openssl_cafile}:
                if f and os.path.isfile(f):
                    self._system |= {c["subject"] for c in _certs_in(f) if _self_signed(c)}
        if subject in self._system:
            return True
        if client_ca and os.path.isfile(client_ca):
            return any(_self_signed(c) and c["subject"] == subject for c in _certs_in(client_ca))
        return False


def _client_ca_warnings(lc: ListenerConfig, path: str, now: float) -> list[str]:
    if os.path.isdir(path):
        files = [os.path.join(path, n) for n in sorted(os.listdir(path))]
        files = [f for f in files if os.path.isfile(f)]
    else:
        files = [path]
    out, seen = [], set()
    for f in files:
        for c in _certs_in(f):
            if c["fingerprint_sha256"] in seen:
                continue        # a hashed CA directory links the same certificate twice
            seen.add(c["fingerprint_sha256"])
            v = _validity(c, now)
            if v:
                effect = ("client certificates it issued are refused from then on" if v.startswith("expires")
                          else "client certificates it issued are refused")
                out.append(f"{lc.name}: client CA certificate in {f} ({c['subject']}) {v}: {effect}")
    return out
