#!/usr/bin/env python3
"""Atheris harness: the compiled CONNECT parser (fastproxy._mqtt) under AddressSanitizer, checked
against the pure-Python reference parser on every input (differential fuzzing).

Not collected by pytest (the name does not match test_*.py); run it by hand. Exact commands and
results: docs/mqtt-parser.md. In short, from the repository root:

    pip install atheris
    # an ASan+UBSan build of fastproxy._mqtt in build/asan (the in-tree module is left alone)
    mkdir -p build/asan/fastproxy && cp fastproxy/*.py build/asan/fastproxy/
    FASTPROXY_SANITIZE=1 FASTPROXY_ONLY=_mqtt python3 setup.py build_ext --force \\
        --build-lib build/asan --build-temp build/asan-tmp
    PYTHONPATH=build/asan \\
        LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \\
        ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \\
        PYTHONMALLOC=malloc FUZZ_DIFF=0 python3 tests/fuzz/fuzz_connect.py -runs=1000000 [CORPUS_DIR ...]

(FASTPROXY_SANITIZE=1 ... build_ext --inplace works too, but then the in-tree module only loads
with the LD_PRELOAD above until it is rebuilt without FASTPROXY_SANITIZE.)

libstdc++ is preloaded so that ASan can intercept the C++ exceptions atheris uses to report a
failing check (without it a failure ends in an ASan "CHECK failed ... __cxa_throw" instead of the
Python traceback). With gcc's libasan preloaded atheris gets no coverage feedback (it warns about
it): the run is then generative (the structured mode builds real CONNECTs from random bytes)
rather than coverage-guided. For coverage-guided runs use a normal build, where atheris follows
the instrumented reference parser, whose checks mirror the C ones (FUZZ_DIFF=1, the default),
and the libFuzzer harness ext/src/fuzz_mqtt_connect.c for the C code itself.

Without a corpus directory a temporary one is seeded with CONNECTs from the reference encoder.
FUZZ_DIFF=0 skips the (slower) comparison with the reference and only looks for crashes;
FUZZ_EXACT_BUFFERS=0 passes bytes objects instead of exact-size malloc() blocks.

Each input: byte 0 picks max_size and a mode; the rest is either the packet as is, the packet
after a CONNECT first byte, or a structured CONNECT (all versions, flags, v5 properties) built
by the reference encoder from the fuzzer's bytes and then mutated. Checked on every input:
  - no crash, no sanitizer report, only MQTTProtocolError subclasses raised;
  - the C parser's verdict equals the reference's (need more / valid with the same fields /
    invalid with the same reason, offset and CONNACK);
  - a VALID CONNECT can have its ClientId rewritten and still parses; its strict prefixes need
    more bytes; an INVALID one's CONNACK can be built.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import tempfile

import importlib.util

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: mqtt_reference
if importlib.util.find_spec("fastproxy") is None:  # else: an installed / PYTHONPATH build
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # repository root

with atheris.instrument_imports(include=["mqtt_reference"]):
    import mqtt_reference as ref

from fastproxy import mqtt  # noqa: E402
from fastproxy.errors import MQTTProtocolError  # noqa: E402

DIFF = os.environ.get("FUZZ_DIFF", "1") != "0"
LIMITS = (mqtt.MAX_PACKET_SIZE, 65536, 64, 16)


# Under AddressSanitizer, hand the parser a malloc() block of exactly len(data) bytes (a bytes
# object has a trailing NUL and, with pymalloc, no redzone): a read one byte past the end is then
# reported. Run with PYTHONMALLOC=malloc too, so Python's own objects get redzones.
EXACT = os.environ.get("FUZZ_EXACT_BUFFERS", "1") != "0"
_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.argtypes = [ctypes.c_void_p]


def parse_exact(data: bytes, max_size: int):
    if not EXACT:
        return mqtt.parse_connect(data, max_size)
    n = len(data)
    block = _libc.malloc(max(n, 1))
    if not block:
        raise MemoryError
    try:
        ctypes.memmove(block, data, n)
        with memoryview((ctypes.c_char * n).from_address(block)) as view:
            return mqtt.parse_connect(view, max_size)
    finally:
        _libc.free(block)


def c_outcome(data: bytes, max_size: int):
    try:
        info = parse_exact(data, max_size)
    except MQTTProtocolError as e:
        return ("invalid", e.v5_reason_code, e.reason, e.offset, e.send_connack,
                e.connack_version if e.send_connack else None,
                e.reason_code if e.send_connack else None, e.version), None
    if info is None:
        return ("need_more",), None
    return ("valid", dataclasses.asdict(info)), info


ref_outcome = ref.reference_outcome


CONNECT_PROPS = [0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16]
WILL_PROPS = [0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26]
ALL_IDS = CONNECT_PROPS + WILL_PROPS + [0x23, 0x24, 0x0B, 0x7F]


def _string(fdp: atheris.FuzzedDataProvider) -> bytes:
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6))  # raw: may be ill-formed
    return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12)).encode("utf-8")


def _props(fdp: atheris.FuzzedDataProvider, ids: list[int]) -> list:
    props = []
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        pid = fdp.PickValueInList(ALL_IDS if fdp.ConsumeIntInRange(0, 15) == 0 else ids)
        kind = ref.PROPERTY_TYPES.get(pid, "byte")
        if kind == "byte":
            value = fdp.PickValueInList([0, 1, 1, 2, 255])
        elif kind == "u16":
            value = fdp.ConsumeIntInRange(0, 0xFFFF)
        elif kind == "u32":
            value = fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
        elif kind == "pair":
            value = (_string(fdp), _string(fdp))
        else:
            value = _string(fdp)
        props.append((pid, value))
    return props


def structured(body: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(body)
    version = fdp.PickValueInList([3, 4, 5])
    will = None
    if fdp.ConsumeBool():
        will = ref.Will(_string(fdp) or b"t", fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)),
                        fdp.ConsumeIntInRange(0, 2), fdp.ConsumeBool(),
                        _props(fdp, WILL_PROPS) if version == 5 else [])
    username = _string(fdp) if fdp.ConsumeBool() else None
    password = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)) if fdp.ConsumeBool() else None
    if version != 5 and username is None and fdp.ConsumeIntInRange(0, 3):
        password = None
    packet = bytearray(ref.encode_connect(
        version, _string(fdp), clean_start=fdp.ConsumeBool(), keepalive=fdp.ConsumeIntInRange(0, 0xFFFF),
        will=will, username=username, password=password,
        properties=_props(fdp, CONNECT_PROPS) if version == 5 else ()))
    # A few mutations, driven by the remaining bytes.
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if not packet:
            break
        i = fdp.ConsumeIntInRange(0, len(packet) - 1)
        what = fdp.ConsumeIntInRange(0, 3)
        if what == 0:
            packet[i] = fdp.ConsumeIntInRange(0, 255)
        elif what == 1:
            del packet[i]
        elif what == 2:
            packet.insert(i, fdp.ConsumeIntInRange(0, 255))
        else:
            del packet[i:]
    return bytes(packet) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4))


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    max_size = LIMITS[data[0] & 3]
    mode = (data[0] >> 2) % 3
    body = data[1:]
    if mode == 0:
        packet = body
    elif mode == 1:
        packet = b"\x10" + body
    else:
        packet = structured(body)

    got, info = c_outcome(packet, max_size)
    if DIFF:
        want = ref_outcome(packet, max_size)
        if got != want:
            raise AssertionError(f"parsers disagree on {packet!r} (max_size {max_size}):\n"
                                 f"  C:         {got}\n  reference: {want}")
    if info is not None:
        n = info.packet_length
        if parse_exact(packet[:n - 1 - (data[-1] % n)], max_size) is not None:
            raise AssertionError(f"prefix of a complete CONNECT did not need more: {packet!r}")
        new_id = "fuzz-" + "x" * (data[-1] % 200)
        out = mqtt.rewrite_client_id(packet, new_id)
        again = mqtt.parse_connect(out, None)
        if again is None or again.client_id != new_id or out[again.packet_length:] != packet[n:]:
            raise AssertionError(f"rewrite_client_id broke {packet!r}")
    elif got[0] == "invalid" and got[4]:
        mqtt.build_connack(got[5], got[6])


def _seed_corpus() -> str:
    seeds = [
        ref.encode_connect(4, "c"),
        ref.encode_connect(3, "c", username="u", password=b"p"),
        ref.encode_connect(4, "", will=ref.Will("a/b", b"x", 1, True), username="u", password=b"p"),
        ref.encode_connect(5, "c", properties=[(pid, 1 if ref.PROPERTY_TYPES[pid] != "pair" else ("k", "v"))
                                             for pid in (0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26)]),
        ref.encode_connect(5, "c", properties=[("authentication_method", "M"), ("authentication_data", b"d")],
                           will=ref.Will("w", b"", 2, False, [(0x18, 1), (0x01, 1), (0x02, 5), (0x03, "t"),
                                                              (0x08, "r"), (0x09, b"c"), (0x26, ("a", "b"))]),
                           username="u", password=b"p"),
    ]
    d = tempfile.mkdtemp(prefix="fuzz_connect_corpus_")
    for i, s in enumerate(seeds):
        for first in (0x01, 0x05):  # mode 0 and mode 1 (first byte dropped), max_size 65536
            payload = s if first == 0x01 else s[1:]
            with open(os.path.join(d, f"seed{i}_{first}"), "wb") as f:
                f.write(bytes([first]) + payload)
    return d


def main() -> None:
    import fastproxy._mqtt

    print(f"fuzz_connect: {fastproxy._mqtt.__file__} diff={DIFF} exact_buffers={EXACT}",
          file=sys.stderr, flush=True)
    argv = list(sys.argv)
    if not any(os.path.isdir(a) for a in argv[1:] if not a.startswith("-")):
        argv.append(_seed_corpus())
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
