"""Logger names, error-log set-up and the access log.

The access log is one line per connection, made from its record (fastproxy.record) by a
log_format: a named format (`default`, `nginx-stream`, `json`) or an nginx-style template of
$variables. Lines go to a file (O_APPEND, one os.write each), stdout/stderr, or syslog
(RFC 3164 over a unix datagram socket or UDP). SIGUSR1 reopens the files (reopen_logs).

The default format, byte for byte what fastproxy has always written:
  $remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time $reason $clientid $cn
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .record import Record

if TYPE_CHECKING:
    from .config import Config

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


# ----------------------------------------------------------------------------- formats

LOG_FORMATS: dict[str, str] = {
    # fastproxy's own line: the seed's nginx stream format plus reason, ClientId and CN.
    "default": "$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time "
               "$reason $clientid $cn",
    # The nginx seed's `log_format mqtt_log`, exactly.
    "nginx-stream": "$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time",
    # One JSON object per line, one key per variable (see _json_line).
    "json": "",
}

# Every $variable a template may use (also the keys of the json format, time_local aside).
ACCESS_VARIABLES: tuple[str, ...] = (
    "remote_addr", "remote_port", "time_local", "time_iso8601", "msec", "listener", "protocol",
    "ssl_protocol", "ssl_cipher", "websocket", "status", "reason", "bytes_sent", "bytes_received",
    "session_time", "clientid", "username", "cn", "upstream_addr", "pid",
)

_VAR_RE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class _Clock:
    """Time stamps of a session's end, strftime'd once per second rather than per line."""

    def __init__(self) -> None:
        self._sec = -1
        self._local = ""
        self._iso = ""

    def _tick(self, t: float) -> None:
        sec = int(t)
        if sec != self._sec:
            tm = time.localtime(sec)
            self._local = time.strftime("%d/%b/%Y:%H:%M:%S %z", tm)
            iso = time.strftime("%Y-%m-%dT%H:%M:%S%z", tm)
            self._iso = iso[:-2] + ":" + iso[-2:]     # nginx: +01:00, not +0100
            self._sec = sec

    def local(self, t: float) -> str:
        self._tick(t)
        return self._local

    def iso8601(self, t: float) -> str:
        self._tick(t)
        return self._iso


def _upstream_addr(up: str | None) -> str | None:
    """The broker's address: a named upstream's record value is "name (address)"."""
    if up and up.endswith(")") and " (" in up:
        return up[up.index(" (") + 2:-1]
    return up


def _websocket(r: Mapping[str, Any]) -> str | None:
    if not r.get("websocket"):
        return None
    return "wss" if str(r["protocol"]).startswith("TLS") else "ws"


def _ssl_protocol(r: Mapping[str, Any]) -> str | None:
    p = str(r["protocol"])
    return p if p.startswith("TLSv") else None


# How each variable is rendered in a text line, as a Python expression of r (the record), t (the
# session's end time) and c (a _Clock). Unknown: "-". Text a client or an operator chose goes
# through _field, so a line keeps its fields.
_TEXT: dict[str, str] = {
    "remote_addr": "r['addr']",
    "remote_port": "str(r['port'])",
    "time_local": "c.local(t)",
    "time_iso8601": "c.iso8601(t)",
    "msec": "f'{t:.3f}'",
    "listener": "_field(r['listener'])",
    "protocol": "r['protocol']",
    "ssl_protocol": "(_ssl_protocol(r) or '-')",
    "ssl_cipher": "_field(r['cipher'])",
    "websocket": "(_websocket(r) or '-')",
    "status": "str(r['status'])",
    "reason": "r['reason']",
    "bytes_sent": "str(r['bytes_sent'])",
    "bytes_received": "str(r['bytes_received'])",
    "session_time": "f\"{r['duration']:.3f}\"",
    "clientid": "_field(r['client_id'])",
    "username": "_field(r.get('username'))",
    "cn": "_field(r['cn'])",
    "upstream_addr": "_field(_upstream_addr(r['upstream']))",
    "pid": "str(_getpid())",
}
assert tuple(_TEXT) == ACCESS_VARIABLES


def parse_log_format(fmt: str) -> list[str | tuple[str]]:
    """A named format's or a template's parts: literal text and (variable,). Raises ValueError
    naming an unknown $variable."""
    if not isinstance(fmt, str) or not fmt:
        raise ValueError(f"expected a format name ({', '.join(LOG_FORMATS)}) or a template of $variables, "
                         f"got {fmt!r}")
    template = LOG_FORMATS.get(fmt, fmt)
    if fmt == "json":
        return []
    if any(not ch.isprintable() and ch != "\t" for ch in template):
        raise ValueError("a log_format template must be one line of printable text (tabs allowed)")
    parts: list[str | tuple[str]] = []
    pos = 0
    for m in _VAR_RE.finditer(template):
        name = m.group(1) or m.group(2)
        if name not in _TEXT:
            raise ValueError(f"unknown variable ${name} in log_format {fmt!r}; "
                             f"known: {' '.join('$' + v for v in ACCESS_VARIABLES)}")
        if m.start() > pos:
            parts.append(template[pos:m.start()])
        parts.append((name,))
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    if not any(isinstance(p, tuple) for p in parts):
        raise ValueError(f"{fmt!r} is neither a format name ({', '.join(LOG_FORMATS)}) nor a template "
                         "with $variables such as '$remote_addr $status $clientid'")
    return parts


def _json_line(r: Mapping[str, Any], t: float, clock: _Clock) -> str:
    """One JSON object, the same keys in the same order on every line (ACCESS_VARIABLES but
    time_local); null for unknown.
    ASCII only (json escapes the rest), so no byte of client text can end or split a line."""
    return json.dumps({
        "remote_addr": r["addr"],
        "remote_port": r["port"],
        "time_iso8601": clock.iso8601(t),
        "msec": round(t, 3),
        "listener": r["listener"],
        "protocol": r["protocol"],
        "ssl_protocol": _ssl_protocol(r),
        "ssl_cipher": r["cipher"],
        "websocket": _websocket(r),
        "status": r["status"],
        "reason": r["reason"],
        "bytes_sent": r["bytes_sent"],
        "bytes_received": r["bytes_received"],
        "session_time": round(r["duration"], 3),
        "clientid": r["client_id"] or None,
        "username": r.get("username") or None,
        "cn": r["cn"] or None,
        "upstream_addr": _upstream_addr(r["upstream"]),
        "pid": os.getpid(),
    }, ensure_ascii=True, separators=(",", ":")) + "\n"


def compile_log_format(fmt: str) -> Callable[[Record], str]:
    """The function that turns a record into its line (with the newline). Raises ValueError.
    A template becomes one Python expression, compiled once: a line costs about what the
    hand-written f-string of earlier versions did."""
    clock = _Clock()
    if fmt == "json":
        def json_render(rec: Record) -> str:
            r: Mapping[str, Any] = rec
            return _json_line(r, r["start"] + r["duration"], clock)
        return json_render
    expr = " + ".join(_TEXT[p[0]] if isinstance(p, tuple) else repr(p) for p in parse_log_format(fmt))
    source = f"def render(r):\n    t = r['start'] + r['duration']\n    return {expr} + '\\n'\n"
    scope: dict[str, Any] = {"c": clock, "_field": _field, "_ssl_protocol": _ssl_protocol,
                             "_websocket": _websocket, "_upstream_addr": _upstream_addr, "_getpid": os.getpid}
    exec(compile(source, f"<log_format {fmt[:40]!r}>", "exec"), scope)   # noqa: S102 - our own text
    render: Callable[[Record], str] = scope["render"]
    return render


# ----------------------------------------------------------------------------- targets

SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8,
    "cron": 9, "authpriv": 10, "ftp": 11, "local0": 16, "local1": 17, "local2": 18, "local3": 19,
    "local4": 20, "local5": 21, "local6": 22, "local7": 23,
}
SYSLOG_SEVERITIES = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4, "warn": 4,
                     "notice": 5, "info": 6, "debug": 7}
SYSLOG_MAX = 8192      # longer lines are cut (rsyslog's default maxMessageSize)
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


def parse_syslog_target(value: str) -> str:
    """Check and normalise 'syslog:unix:PATH' or 'syslog:udp:HOST[:PORT]' (port 514), each with
    optional ',facility=F,severity=S,tag=T'. The host is resolved now. Returns
    'syslog:udp:IP:PORT,facility=local7,severity=info,tag=fastproxy'. Raises ValueError."""
    head, *opts = value.split(",")
    kind, _, where = head[len("syslog:"):].partition(":")
    out = {"facility": "local7", "severity": "info", "tag": "fastproxy"}
    for o in opts:
        k, sep, v = o.strip().partition("=")
        if not sep or k not in out:
            raise ValueError(f"unknown syslog option {o.strip()!r}; expected facility=, severity= or tag=")
        if k == "facility" and v not in SYSLOG_FACILITIES:
            raise ValueError(f"unknown syslog facility {v!r}; expected one of {', '.join(SYSLOG_FACILITIES)}")
        if k == "severity" and v not in SYSLOG_SEVERITIES:
            raise ValueError(f"unknown syslog severity {v!r}; expected one of {', '.join(SYSLOG_SEVERITIES)}")
        if k == "tag" and not _TAG_RE.match(v):
            raise ValueError(f"syslog tag must be 1-32 letters, digits, '_', '.' or '-', got {v!r}")
        out[k] = v
    if kind == "unix":
        if not where.startswith("/"):
            raise ValueError(f"syslog:unix: needs an absolute socket path such as /dev/log, got {value!r}")
        addr = where
    elif kind == "udp":
        if where.startswith("["):
            host, sep, port_s = where[1:].partition("]")
            port_s = port_s[1:] if port_s.startswith(":") else port_s
        else:
            host, sep, port_s = where.partition(":")
        port_s = port_s or "514"
        if not host or not port_s.isdigit() or not (0 < int(port_s) < 65536):
            raise ValueError(f"expected syslog:udp:HOST:PORT such as syslog:udp:127.0.0.1:514, got {value!r}")
        try:
            infos = socket.getaddrinfo(host, int(port_s), type=socket.SOCK_DGRAM)
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve syslog host {host!r}: {e.strerror}") from None
        infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
        ip = str(infos[0][4][0])
        addr = f"[{ip}]:{port_s}" if ":" in ip else f"{ip}:{port_s}"
    else:
        raise ValueError(f"expected syslog:unix:/dev/log or syslog:udp:HOST:PORT, got {value!r}")
    return f"syslog:{kind}:{addr}," + ",".join(f"{k}={v}" for k, v in out.items())


class _Sink:
    """Where lines go. write() takes one whole line."""

    def write(self, line: str) -> None:
        raise NotImplementedError

    def reopen(self) -> bool:
        """Reopen a file; False when there is nothing to reopen."""
        return False

    def close(self) -> None:
        pass


class _FdSink(_Sink):
    """A file (O_APPEND, one os.write per line: workers sharing it never interleave partial
    lines) or stdout/stderr."""

    def __init__(self, fd: int, path: str | None = None) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str) -> "_FdSink":
        return cls(cls._open(path), path)

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, line: str) -> None:
        if self.fd >= 0:
            try:
                os.write(self.fd, line.encode("utf-8", "replace"))
            except OSError:
                pass  # a full disk must not take the proxy down

    def reopen(self) -> bool:
        """Point the descriptor at a new file of the same name (logrotate moved the old one).
        dup2 swaps it atomically: a concurrent write goes whole to the old file or to the new."""
        if self.path is None or self.fd < 0:
            return False
        new = self._open(self.path)
        try:
            os.dup2(new, self.fd, inheritable=False)
        finally:
            os.close(new)
        return True

    def close(self) -> None:
        with _REOPEN_LOCK:   # not while reopen_logs() dup2s onto this descriptor
            if self.path is not None and self.fd >= 0:
                os.close(self.fd)
            self.fd = -1


class _SyslogSink(_Sink):
    """RFC 3164 messages, one per line, over a unix datagram socket (as glibc's syslog(3)
    sends them: no host name) or UDP (with the host name). Never blocks the records thread:
    a message the socket cannot take now (or with no syslog daemon listening) is dropped and
    counted."""

    def __init__(self, target: str) -> None:
        head, *opts = target.split(",")
        o = dict(x.split("=", 1) for x in opts)
        kind, _, where = head[len("syslog:"):].partition(":")
        self.pri = SYSLOG_FACILITIES[o.get("facility", "local7")] * 8 + SYSLOG_SEVERITIES[o.get("severity", "info")]
        self.tag = o.get("tag", "fastproxy")
        self.target = head
        self.dropped = 0
        self._warned: float = -1e9     # monotonic time of the last "dropped" warning
        self._dropped_since = 0
        self._addr: Any
        if kind == "unix":
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._addr = where
            self._host = ""
        else:
            host, _, port = where.rpartition(":")
            host = host.strip("[]")
            self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
            self._addr = (host, int(port))
            self._host = (socket.gethostname().split(".")[0] or "localhost") + " "
        self._sock.setblocking(False)
        self._sec = -1
        self._stamp = ""

    def write(self, line: str) -> None:
        now = int(time.time())
        if now != self._sec:
            tm = time.localtime(now)
            self._stamp = time.strftime("%b ", tm) + f"{tm.tm_mday:2d}" + time.strftime(" %H:%M:%S", tm)
            self._sec = now
        head = f"<{self.pri}>{self._stamp} {self._host}{self.tag}[{os.getpid()}]: ".encode()
        data = head + line.rstrip("\n").encode("utf-8", "replace")
        try:
            self._sock.sendto(data[:SYSLOG_MAX], self._addr)
        except OSError as e:
            # EAGAIN (the daemon is behind), ENOENT / ECONNREFUSED (no daemon at the path), ...:
            # dropped and counted; the access log must never stop or slow the proxy. The error
            # log says so, at most once a minute.
            self.dropped += 1
            self._dropped_since += 1
            mono = time.monotonic()
            if mono - self._warned >= 60.0:
                server_log.warning("access log %s: %d line(s) dropped since the last such message: %s",
                                   self.target, self._dropped_since, e.strerror or e)
                self._warned, self._dropped_since = mono, 0

    def close(self) -> None:
        self._sock.close()


_REOPENABLE: "weakref.WeakSet[_Sink]" = weakref.WeakSet()
_REOPEN_LOCK = threading.Lock()


def open_sink(target: str | None) -> _Sink | None:
    """The sink of a normalised target (config's access_log): None for off."""
    if not target or target == "off":
        return None
    if target in ("-", "stdout"):
        return _FdSink(sys.stdout.fileno())
    if target == "stderr":
        return _FdSink(sys.stderr.fileno())
    if target.startswith("syslog:"):
        return _SyslogSink(target)
    sink = _FdSink.open(target)
    _REOPENABLE.add(sink)
    return sink


def reopen_logs(level: int = logging.INFO) -> int:
    """SIGUSR1: reopen every access-log file of this process and the error-log file, so
    logrotate can rename them and signal (no copytruncate). Returns how many were reopened."""
    n = 0
    with _REOPEN_LOCK:
        for sink in list(_REOPENABLE):
            try:
                n += sink.reopen()
            except OSError as e:
                server_log.error("SIGUSR1: cannot reopen access log %s: %s (still writing to the old file)",
                                 getattr(sink, "path", "?"), e.strerror)
        for h in logging.getLogger(ROOT).handlers:
            if isinstance(h, logging.FileHandler):
                try:
                    stream = h._open()
                except OSError as e:
                    server_log.error("SIGUSR1: cannot reopen error log %s: %s (still writing to the old file)",
                                     h.baseFilename, e.strerror)
                    continue
                old = h.setStream(stream)
                if old is not None:
                    old.close()
                n += 1
    server_log.log(level, "SIGUSR1: reopened %d log file(s)", n)
    return n


# ----------------------------------------------------------------------------- the access log


class AccessLog:
    """One access log: a format (LOG_FORMATS name or a $variable template) and a target (a file,
    '-'/'stdout', 'stderr', syslog:..., or None/'off' for none).

    To a file: one os.write per line on an O_APPEND descriptor, so workers sharing the file
    never interleave partial lines.
    """

    def __init__(self, target: str | None, log_format: str = "default", *, sink: _Sink | None = None) -> None:
        self._render = compile_log_format(log_format)
        self._sink = sink if sink is not None else open_sink(target)
        self._default_clock = _Clock()

    @property
    def enabled(self) -> bool:
        return self._sink is not None

    def line(self, record: Record) -> str:
        """The line of one record, with its newline."""
        return self._render(record)

    def log(self, record: Record) -> None:
        if self._sink is not None:
            self._sink.write(self._render(record))

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
        """The default format's line from loose values (kept for callers of earlier versions)."""
        t = end_time if end_time is not None else time.time()
        return (
            f"{addr} [{self._default_clock.local(t)}] {protocol} {status} "
            f"{sent} {received} {duration:.3f} {reason} {_field(clientid)} {_field(cn)}\n"
        )

    def write(self, line: str) -> None:
        if self._sink is not None:
            self._sink.write(line)

    def reopen(self) -> bool:
        return self._sink.reopen() if self._sink is not None else False

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            _REOPENABLE.discard(self._sink)
        self._sink = None


class AccessLogs:
    """The access logs of one Proxy: each listener's (its own access_log / log_format, else the
    top-level ones), by the engine's listener index. A target used by several listeners is
    opened once. `override` (Proxy(access_log=...)) serves every listener."""

    def __init__(self, config: "Config", override: AccessLog | None = None) -> None:
        self._own: list[AccessLog] = []
        self._sinks: list[_Sink] = []
        per_listener: list[AccessLog | None] = []
        if override is not None:
            self._own.append(override)
            per_listener = [override] * len(config.listeners)
        else:
            sinks: dict[str, _Sink | None] = {}
            logs: dict[tuple[str, str], AccessLog] = {}
            try:
                for lc in config.listeners:
                    target = lc.access_log if lc.access_log is not None else config.access_log
                    fmt = lc.log_format or config.log_format
                    if not target or target == "off":
                        per_listener.append(None)
                        continue
                    if (target, fmt) not in logs:
                        if target not in sinks:
                            sinks[target] = open_sink(target)
                        logs[target, fmt] = AccessLog(target, fmt, sink=sinks[target])
                    per_listener.append(logs[target, fmt])
            except BaseException:
                for s in sinks.values():
                    if s is not None:
                        s.close()
                raise
            self._sinks = [s for s in sinks.values() if s is not None]
        # the engine numbers listen addresses in order, listener by listener
        self._by_index = [per_listener[i] for i, lc in enumerate(config.listeners) for _ in lc.listen]

    @property
    def enabled(self) -> bool:
        return any(a is not None for a in self._by_index)

    def get(self, index: int) -> AccessLog | None:
        """The access log of the engine's listener `index`, None when it has none."""
        return self._by_index[index]

    def log(self, index: int, record: Record) -> None:
        a = self._by_index[index]
        if a is not None:
            a.log(record)

    def close(self) -> None:
        for a in self._own:
            a.close()
        for s in self._sinks:
            s.close()
            _REOPENABLE.discard(s)
        self._own = []
        self._sinks = []
        self._by_index = [None] * len(self._by_index)


RecordHook = Callable[[Record], None]   # Proxy(on_record=...)
