"""Declares the compiled extensions; metadata lives in pyproject.toml.

Build switches (environment variables):
  FASTPROXY_DEBUG=1     -O0 -g, Cython boundscheck/assertions on, FASTPROXY_DEBUG macro (live counters)
  FASTPROXY_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (run with LD_PRELOAD=$(gcc -print-file-name=libasan.so))
  FASTPROXY_ANNOTATE=1  write Cython HTML annotation next to the sources
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


def _check_openssl_headers() -> None:
    """Fail early with a sentence rather than a wall of compiler errors."""
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

include_dirs = [os.path.join("ext", "includes"), os.path.join("ext", "src")]
if os.environ.get("OPENSSL_INCLUDE"):
    include_dirs.append(os.environ["OPENSSL_INCLUDE"])
library_dirs = [os.environ["OPENSSL_LIB"]] if os.environ.get("OPENSSL_LIB") else []

# The plain C parsers (MQTT CONNECT, PROXY v1/v2, WebSocket) are compiled once into a static library and
# linked into each module that calls them: the engine's stages without a Python hop, the
# wrappers (_mqtt, _proxyproto) for tests and fuzzers.
PARSERS = ["ext/src/mqtt_connect.c", "ext/src/proxy_v2.c", "ext/src/ws.c"]
WITH_PARSERS: set[str] = set()


class build_ext(_build_ext):
    """Compiles PARSERS once and links the objects into the extensions that ask for them."""

    def build_extensions(self) -> None:
        objects = self.compiler.compile(PARSERS, output_dir=self.build_temp, macros=macros,
                                        include_dirs=include_dirs, extra_postargs=cflags)
        for e in self.extensions:
            if e.name in WITH_PARSERS:
                e.extra_objects = list(objects)
        super().build_extensions()


def ext(name: str, *, ssl: bool = False, parsers: bool = False) -> Extension:
    """fastproxy.<name> from ext/fastproxy/<name>.pyx (its .pxd beside it)."""
    e = Extension(
        f"fastproxy.{name}",
        [f"ext/fastproxy/{name}.pyx"],
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=(["ssl", "crypto"] if ssl else []) + ["m"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        define_macros=macros,
        # a change in a C file rebuilds (relinks) the modules that include or link it
        depends=sorted(glob.glob("ext/src/*.h") + glob.glob("ext/includes/*.h") + (PARSERS if parsers else [])),
    )
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
