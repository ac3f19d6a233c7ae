"""Declares the compiled extensions; metadata lives in pyproject.toml.

Build switches (environment variables):
  FASTPROXY_DEBUG=1     -O0 -g, Cython boundscheck/assertions on, FASTPROXY_DEBUG macro (live counters)
  FASTPROXY_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (run with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
  FASTPROXY_ANNOTATE=1  write Cython HTML annotation next to the sources
  FASTPROXY_TLS=awslc   AWS-LC instead of the system OpenSSL: its static archives become one private
                        fastproxy/libfastproxy-awslc.so (symbols versioned FASTPROXY_AWSLC_<its version>);
                        FASTPROXY_AWSLC=PREFIX is its install (default: where scripts/build-awslc puts it,
                        ${FASTPROXY_CACHE:-~/.cache/fastproxy}/aws-lc-VERSION/prefix, VERSION pinned in
                        scripts/build-awslc); FASTPROXY_AWSLC_TARBALL=PATH builds it first from that
                        source tarball (scripts/build-awslc: cmake, ninja, g++; cached)
  FASTPROXY_ABI3=1      CPython's limited API (stable ABI) of 3.11: modules named *.abi3.so, the wheel tagged
                        cp311-abi3, so one wheel per architecture installs on 3.11, 3.12, 3.13, 3.14...
                        (scripts/build-wheels sets it). Off by default: a source build is for the interpreter
                        that builds it, may use the whole C API, and also works on 3.10.
"""
import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - pyproject lists Cython as a build requirement
    sys.exit("fastproxy: building needs Cython (pip install cython), or build with `pip install .`")

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("FASTPROXY_DEBUG") == "1"
SANITIZE = os.environ.get("FASTPROXY_SANITIZE") == "1"
TLS = os.environ.get("FASTPROXY_TLS", "openssl")
if TLS not in ("openssl", "awslc"):
    sys.exit(f"fastproxy: FASTPROXY_TLS={TLS!r}: expected openssl (the default) or awslc")
ABI3 = os.environ.get("FASTPROXY_ABI3") == "1"
# Py_LIMITED_API=0x030B0000: only the stable ABI of CPython 3.11 (the first whose limited API has the
# buffer protocol that Cython's memoryviews and the parsers' PyObject_GetBuffer need).
LIMITED_API = 0x030B0000


def _awslc_pinned_version() -> str:
    """The AWS-LC release pinned in scripts/build-awslc (its VERSION=), the one place it is named."""
    try:
        with open(os.path.join(HERE, "scripts", "build-awslc")) as f:
            for line in f:
                if line.startswith("VERSION="):
                    return line.split("=", 1)[1].strip()
    except OSError:  # an sdist has no scripts/: FASTPROXY_AWSLC must name the install
        pass
    return "VERSION"


AWSLC = os.environ.get("FASTPROXY_AWSLC") or os.path.join(
    os.environ.get("FASTPROXY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastproxy"),
    f"aws-lc-{_awslc_pinned_version()}", "prefix")


def _build_awslc_from(tarball: str) -> str:
    """FASTPROXY_AWSLC_TARBALL: build AWS-LC from that source tarball with scripts/build-awslc
    (cached; it checks the tarball's SHA-256 against the pinned release) and use its prefix."""
    import subprocess

    script = os.path.join(HERE, "scripts", "build-awslc")
    if not os.path.exists(script):
        sys.exit(f"fastproxy: FASTPROXY_AWSLC_TARBALL is set but {script} is missing")
    r = subprocess.run(["bash", script], env=dict(os.environ, AWSLC_TARBALL=os.path.abspath(tarball)),
                       stdout=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"fastproxy: building AWS-LC from {tarball} failed (scripts/build-awslc, exit {r.returncode})")
    return r.stdout.strip().splitlines()[-1]


if (TLS == "awslc" and os.environ.get("FASTPROXY_AWSLC_TARBALL") and not os.environ.get("FASTPROXY_AWSLC")
        and any(a.startswith(("build", "bdist", "install", "develop", "editable")) for a in sys.argv[1:])):
    AWSLC = _build_awslc_from(os.environ["FASTPROXY_AWSLC_TARBALL"])


def _awslc_libdir() -> str | None:
    for d in ("lib", "lib64"):
        lib = os.path.join(AWSLC, d)
        if all(os.path.exists(os.path.join(lib, a)) for a in ("libssl.a", "libcrypto.a")):
            return lib
    return None


def _check_awslc() -> None:
    base = os.path.join(AWSLC, "include", "openssl", "base.h")
    try:
        with open(base) as f:
            is_awslc = "OPENSSL_IS_AWSLC" in f.read()
    except OSError:
        is_awslc = False
    if not is_awslc or _awslc_libdir() is None:
        sys.exit(
            f"fastproxy: FASTPROXY_TLS=awslc but no AWS-LC install at {AWSLC}\n"
            "  (include/openssl/base.h defining OPENSSL_IS_AWSLC, lib/libssl.a, lib/libcrypto.a).\n"
            "  Build it with scripts/build-awslc, or point FASTPROXY_AWSLC at an install prefix."
        )


def _check_openssl_headers() -> None:
    """Fail early with a sentence rather than a wall of compiler errors."""
    if TLS == "awslc":
        _check_awslc()
        return
    for inc in ("/usr/include", "/usr/local/include", os.environ.get("OPENSSL_INCLUDE", "")):
        if inc and os.path.exists(os.path.join(inc, "openssl", "ssl.h")):
            return
    if os.environ.get("OPENSSL_INCLUDE") is None and os.path.exists("/usr/include/aarch64-linux-gnu"):
        return
    sys.exit(
        "fastproxy: OpenSSL headers not found (openssl/ssl.h).\n"
        "  On Debian/Ubuntu: sudo apt-get install libssl-dev gcc python3-dev\n"
        "  Or point OPENSSL_INCLUDE at the directory that holds openssl/ssl.h."
    )


cflags = ["-Wall", "-Wno-unused-function", "-Wno-unreachable-code"]
ldflags: list[str] = []
macros = []
if DEBUG:
    cflags += ["-O0", "-g3"]
    macros.append(("FASTPROXY_DEBUG", "1"))
else:
    cflags += ["-O2"]
if SANITIZE:
    cflags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    ldflags += ["-fsanitize=address,undefined"]
if ABI3:
    if sys.version_info < (3, 11):
        sys.exit("fastproxy: FASTPROXY_ABI3=1 needs Python >= 3.11 to build (the limited API of 3.11)")
    # Cython sees Py_LIMITED_API and generates limited-API code (CYTHON_LIMITED_API).
    macros.append(("Py_LIMITED_API", f"0x{LIMITED_API:08X}"))

include_dirs = [os.path.join("ext", "includes"), os.path.join("ext", "src")]
if os.environ.get("OPENSSL_INCLUDE"):
    include_dirs.append(os.environ["OPENSSL_INCLUDE"])
library_dirs = [os.environ["OPENSSL_LIB"]] if os.environ.get("OPENSSL_LIB") else []
# The TLS modules' libraries: the system's shared libssl/libcrypto, or AWS-LC.
# AWS-LC must exist ONCE in the process: linked statically into each module, every module has its
# own copy, and objects made by one copy (an SSL_CTX in _tls, its cipher list) are used by another
# (the engine's SSL_do_handshake), which compares them by address: TLS 1.2 finds "no shared
# cipher". So its static archives (ssl before crypto, whole) are linked into one private shared
# object beside the modules, AWSLC_SHLIB, with every symbol under the version FASTPROXY_AWSLC
# (AWS-LC uses OpenSSL's names; Python's _ssl binds OPENSSL_3.0.0-versioned ones, never these), and
# the TLS modules load it through an rpath of $ORIGIN.
AWSLC_SHLIB = "libfastproxy-awslc.so"
AWSLC_VERSION_SCRIPT = "ext/src/awslc.map"  # the symbol version's name there is FASTPROXY_AWSLC_@VERSION@


def _awslc_header_version() -> str:
    """AWSLC_VERSION_NUMBER_STRING of the AWS-LC being linked ("5.5.0")."""
    import re

    with open(os.path.join(AWSLC, "include", "openssl", "base.h")) as f:
        m = re.search(r'#define\s+AWSLC_VERSION_NUMBER_STRING\s+"([^"]+)"', f.read())
    if not m:
        sys.exit(f"fastproxy: no AWSLC_VERSION_NUMBER_STRING in {AWSLC}/include/openssl/base.h")
    return m.group(1)
ssl_libraries = ["ssl", "crypto"]
ssl_depends: list[str] = []
if TLS == "awslc":
    include_dirs.insert(0, os.path.join(AWSLC, "include"))
    _lib = _awslc_libdir() or os.path.join(AWSLC, "lib")
    ssl_libraries = []
    ssl_depends = [os.path.join(_lib, "libssl.a"), os.path.join(_lib, "libcrypto.a")]

# The plain C parsers (MQTT CONNECT, PROXY v1/v2, WebSocket) are compiled once into a static library and
# linked into each module that calls them: the engine's stages without a Python hop, the
# wrappers (_mqtt, _proxyproto) for tests and fuzzers.
PARSERS = ["ext/src/mqtt_connect.c", "ext/src/proxy_v2.c", "ext/src/ws.c"]
WITH_PARSERS: set[str] = set()
WITH_SSL: set[str] = set()


class build_ext(_build_ext):
    """Compiles PARSERS once and links the objects into the extensions that ask for them."""

    def build_extensions(self) -> None:
        objects = self.compiler.compile(PARSERS, output_dir=self.build_temp, macros=macros,
                                        include_dirs=include_dirs, extra_postargs=cflags)
        for e in self.extensions:
            if e.name in WITH_PARSERS:
                e.extra_objects = list(objects)
        if TLS == "awslc":
            self._link_awslc()
        super().build_extensions()

    def copy_extensions_to_source(self) -> None:
        """--inplace: the modules, and AWS-LC's shared object they load from their directory."""
        super().copy_extensions_to_source()
        if TLS == "awslc":
            import shutil

            src = os.path.join(self.build_lib, "fastproxy", AWSLC_SHLIB)
            shutil.copy2(src, os.path.join("fastproxy", AWSLC_SHLIB))

    def _link_awslc(self) -> None:
        """AWS-LC's archives as one shared object next to the modules (see AWSLC_SHLIB)."""
        out_dir = os.path.dirname(self.get_ext_fullpath("fastproxy._tls"))
        os.makedirs(out_dir, exist_ok=True)
        # the version script names the release actually linked (no second place to bump)
        os.makedirs(self.build_temp, exist_ok=True)
        version_script = os.path.join(self.build_temp, "awslc.map")
        with open(AWSLC_VERSION_SCRIPT) as f, open(version_script, "w") as out:
            out.write(f.read().replace("@VERSION@", _awslc_header_version()))
        self.compiler.link_shared_object(
            [], os.path.join(out_dir, AWSLC_SHLIB),
            extra_postargs=["-Wl,--whole-archive", *ssl_depends, "-Wl,--no-whole-archive",
                            f"-Wl,--version-script={version_script}", "-Wl,-Bsymbolic",
                            f"-Wl,-soname,{AWSLC_SHLIB}", "-lpthread"] + ldflags)
        for e in self.extensions:
            if e.name in WITH_SSL:
                e.extra_link_args = [f"-L{out_dir}", f"-l:{AWSLC_SHLIB}", "-Wl,-rpath,$ORIGIN"] + e.extra_link_args


def ext(name: str, *, ssl: bool = False, parsers: bool = False, sources: tuple[str, ...] = ()) -> Extension:
    """fastproxy.<name> from ext/fastproxy/<name>.pyx (its .pxd beside it) and C `sources`."""
    e = Extension(
        f"fastproxy.{name}",
        [f"ext/fastproxy/{name}.pyx", *sources],
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=(ssl_libraries if ssl else []) + ["m"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
        py_limited_api=ABI3,
        # a change in a C file rebuilds (relinks) the modules that include or link it
        depends=sorted(glob.glob("ext/src/*.h") + glob.glob("ext/includes/*.h") + (PARSERS if parsers else [])
                       + (ssl_depends if ssl else [])),
    )
    if ssl:
        WITH_SSL.add(e.name)
    if parsers:
        WITH_PARSERS.add(e.name)
    return e


# The engine is one module per stage of a connection's path (ext/fastproxy/_defs.pxd draws it).
extensions = [
    ext("_tls", ssl=True),
    ext("_mqtt", parsers=True),
    ext("_proxyproto", parsers=True),
    ext("_balance"),
    ext("_sim"),
    ext("_transport", ssl=True),
    ext("_admission"),
    ext("_wscodec", ssl=True, parsers=True),
    ext("_conn", ssl=True, parsers=True),
    ext("_relay", ssl=True),
    ext("_upstream", ssl=True, parsers=True),
    ext("_identity", ssl=True, parsers=True),
    ext("_websocket", ssl=True, parsers=True),
    ext("_ingress", ssl=True, parsers=True),
    ext("_engine", ssl=True),
    ext("_loadgen", ssl=True, sources=("ext/src/loadgen.c",)),
]

# FASTPROXY_ONLY=_mqtt,_tls builds a subset (quick iteration on one module).
_only = [m for m in os.environ.get("FASTPROXY_ONLY", "").split(",") if m]
if _only:
    extensions = [e for e in extensions if e.name.split(".")[-1] in _only]

def _check_compiler() -> None:
    import shlex
    import shutil
    import sysconfig

    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "gcc")
    exe = shlex.split(cc)[0] if cc else "gcc"
    if shutil.which(exe) is None:
        sys.exit(
            f"fastproxy: no C compiler found ({exe!r}).\n"
            "  On Debian/Ubuntu: sudo apt-get install gcc python3-dev libssl-dev\n"
            "  Or install a prebuilt wheel (no compiler needed)."
        )


_BUILDING = any(a.startswith(("build", "bdist", "install", "develop", "editable")) for a in sys.argv[1:])
if _BUILDING:
    _check_compiler()
    _check_openssl_headers()

setup(
    cmdclass={"build_ext": build_ext},
    # the wheel's tag: cp311-abi3 (any CPython >= 3.11) instead of cpXY-cpXY
    options={"bdist_wheel": {"py_limited_api": "cp311"}} if ABI3 else {},
    ext_modules=cythonize(
        extensions,
        include_path=["ext", "ext/includes"],
        nthreads=int(os.environ.get("FASTPROXY_JOBS", "0")) or None,
        language_level=3,
        annotate=os.environ.get("FASTPROXY_ANNOTATE") == "1",
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
)
