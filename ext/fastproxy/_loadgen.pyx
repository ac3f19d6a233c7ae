# cython: language_level=3
"""The compiled load generator of `fastproxy bench` (ext/src/loadgen.c): one call runs a whole
scenario on one epoll loop with the GIL released and returns its counters; no Python runs per
handshake or per message, so the generator's own cost stays small next to the proxy's."""
from libc.string cimport memset, strlen
from loadgen cimport *

from fastproxy.errors import BenchError

SCENARIOS = {"handshake": LG_HANDSHAKE, "idle": LG_IDLE, "publish": LG_PUBLISH}
MAX_SOURCES = LG_MAX_SOURCES
MAX_CONNS = LG_MAX_CONNS

STOPPED = {0: "", 1: "stop_fd", 2: "done", 3: "timeout"}


cdef int _copy(char* dst, size_t cap, str value, str what) except -1:
    """value into a fixed char array (NUL-terminated); BenchError when it does not fit."""
    cdef bytes b = value.encode()
    if <size_t>len(b) >= cap or b"\0" in b:
        raise BenchError(f"load generator: {what} {value!r} is too long or not a string")
    memset(dst, 0, cap)
    for i in range(len(b)):
        dst[i] = b[i]
    return 0


def run(str scenario, *, str host, int port, int conns, int concurrency=64, bint tls=True, str ca="",
        str cert="", str key="", str ca_key="", sources=(), str prefix="d", int keepalive=60, int qos=0,
        int payload=64, int batch=1, double rate=0.0, long long messages=0, double duration=0.0,
        double timeout=60.0, double conn_timeout=15.0, bint reconnect=False, double retry=1.0,
        int stop_fd=-1, int notify_fd=-1, str sub_host="", int sub_port=0):
    """Runs one scenario (see ext/src/loadgen.h) and returns its counters as a dict; times are
    time.monotonic() seconds. BenchError when a parameter or a file cannot be used."""
    cdef lg_params p
    cdef lg_result r
    cdef char err[512]
    cdef int rc
    if scenario not in SCENARIOS:
        raise BenchError(f"load generator: unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
    sources = list(sources)
    if len(sources) > LG_MAX_SOURCES:
        raise BenchError(f"load generator: at most {LG_MAX_SOURCES} source addresses")
    if not 1 <= conns <= LG_MAX_CONNS or concurrency < 1 or not 0 <= qos <= 1 or not 0 <= payload <= LG_MAX_PAYLOAD \
            or not 1 <= batch <= LG_MAX_BATCH or timeout <= 0 or not 0 <= keepalive <= 65535 or not 0 < port < 65536:
        raise BenchError("load generator: a parameter is out of range")
    memset(&p, 0, sizeof(p))
    p.scenario = SCENARIOS[scenario]
    _copy(p.host, sizeof(p.host), host, "host")
    p.port = port
    _copy(p.sub_host, sizeof(p.sub_host), sub_host, "subscriber host")
    p.sub_port = sub_port
    for i, s in enumerate(sources):
        _copy(p.sources[i], 48, str(s), "source address")
    p.n_sources = len(sources)
    p.tls = tls
    _copy(p.ca_file, sizeof(p.ca_file), ca, "CA file")
    _copy(p.cert_file, sizeof(p.cert_file), cert, "certificate file")
    _copy(p.key_file, sizeof(p.key_file), key, "key file")
    _copy(p.ca_key_file, sizeof(p.ca_key_file), ca_key, "CA key file")
    if len(prefix.encode()) > 20:
        raise BenchError("load generator: the ClientId prefix is longer than 20 bytes")
    _copy(p.prefix, sizeof(p.prefix), prefix, "prefix")
    p.conns = conns
    p.concurrency = concurrency
    p.keepalive_s = keepalive
    p.qos = qos
    p.payload = payload
    p.batch = batch
    p.rate = rate
    p.messages = messages
    p.duration_s = duration
    p.timeout_s = timeout
    p.conn_timeout_s = conn_timeout
    p.reconnect = reconnect
    p.retry_s = retry
    p.stop_fd = stop_fd
    p.notify_fd = notify_fd
    with nogil:
        rc = lg_run(&p, &r, err, sizeof(err))
    if rc != 0:
        raise BenchError(err[:strlen(err)].decode(errors="replace"))
    return {
        "scenario": scenario,
        "conns": conns,
        "started": r.started,
        "connack_ok": r.connack_ok,
        "refused": r.refused,
        "failed": r.failed,
        "fail_connect": r.fail_connect,
        "fail_tls": r.fail_tls,
        "fail_mqtt": r.fail_mqtt,
        "fail_timeout": r.fail_timeout,
        "closed_by_peer": r.closed_by_peer,
        "reconnects": r.reconnects,
        "last_refusal": None if r.last_refusal < 0 else r.last_refusal,
        "first_error": r.first_error[:strlen(r.first_error)].decode(errors="replace"),
        "published": r.published,
        "acked": r.acked,
        "delivered": r.delivered,
        "pings": r.pings,
        "bytes_sent": r.bytes_sent,
        "live_end": r.live_end,
        "live_max": r.live_max,
        "t_start": r.t_start,
        "t_ready": r.t_ready or None,
        "t_send_start": r.t_send_start or None,
        "t_send_end": r.t_send_end or None,
        "t_end": r.t_end,
        "t_first_drop": r.t_first_drop or None,
        "t_all_back": r.t_all_back or None,
        "setup_ms_mean": r.setup_ms_sum / r.setup_n if r.setup_n else None,
        "setup_ms_max": r.setup_ms_max if r.setup_n else None,
        "stopped": STOPPED.get(r.stopped, ""),
    }
