"""Logger names, error-log set-up and the access-log line.

The access log is one line per connection in the nginx stream format of the seed
configuration, plus the end reason, MQTT ClientId and certificate CN:
  $remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time $reason $clientid $cn
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

from .record import Record

ROOT = "fastproxy"
ACCESS = "fastproxy.access"
SERVER = "fastproxy.server"
TLS = "fastproxy.tls"
UPSTREAM = "fastproxy.upstream"
WORKER = "fastproxy.worker"
POLICY = "fastproxy.policy"

server_log = logging.getLogger(SERVER)
tls_log = logging.getLogger(TLS)
upstream_log = logging.getLogger(UPSTREAM)
policy_log = logging.getLogger(POLICY)


def setup_error_log(target: str, level: str) -> None:
    """Send fastproxy's own messages to stderr ('-') or a file."""
    root = logging.getLogger(ROOT)
    root.setLevel(level.upper())
    for h in list(root.handlers):
        root.removeHandler(h)
    if target in ("-", "stderr"):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif target == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(target)
    fmt = logging.Formatter("%(asctime)s [%(levelname)s] %(process)d %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    handler.setFormatter(fmt)
    root.addHandler(handler)
    root.propagate = False


def _field(value: str | None) -> str:
    """'-' for unknown; spaces, quotes and control characters escaped so a line stays parseable."""
    if not value:
        return "-"
    if value.isprintable() and " " not in value and '"' not in value:
        return value
    return "".join(c if c.isprintable() and c not in ' "\\' else "\\x%02x" % ord(c) for c in value)


class AccessLog:
    """Formats engine records into lines and appends them to a file descriptor.

    One os.write per line on an O_APPEND descriptor, so workers sharing the file never
    interleave partial lines.
    """

    def __init__(self, target: str | None) -> None:
        self._fd = -1
        self._own = False
        if target in ("-", "stdout"):
            self._fd = sys.stdout.fileno()
        elif target == "stderr":
            self._fd = sys.stderr.fileno()
        elif target:
            self._fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._own = True
        self._sec = -1
        self._stamp = ""

    @property
    def enabled(self) -> bool:
        return self._fd >= 0

    def _time_local(self, t: float) -> str:
        sec = int(t)
        if sec != self._sec:  # strftime once per second, not per line
            self._sec = sec
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(sec))
        return self._stamp

    def format(
        self,
        addr: str,
        protocol: str,
        status: int,
        sent: int,
        received: int,
        duration: float,
        reason: str,
        clientid: str | None = None,
        cn: str | None = None,
        end_time: float | None = None,
    ) -> str:
        return (
            f"{addr} [{self._time_local(end_time if end_time is not None else time.time())}] {protocol} {status} "
            f"{sent} {received} {duration:.3f} {reason} {_field(clientid)} {_field(cn)}\n"
        )

    def write(self, line: str) -> None:
        if self._fd >= 0:
            try:
                os.write(self._fd, line.encode("utf-8", "replace"))
            except OSError:
                pass  # a full disk must not take the proxy down

    def close(self) -> None:
        if self._own and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


RecordHook = Callable[[Record], None]   # Proxy(on_record=...)
