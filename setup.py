"""Builds fastlb._core (with fastlb._relay and the small fastlb._sockinfo) from Cython; generated C and
binaries are never committed.

The HTTP protocol modules (fastlb/http/runtime.py, protocol.py, upstream.py, routing.py) are compiled
too; delete their .so files (or never build) to run them as plain Python.

Environment knobs (uvloop's setup.py has the same ones as flags):
  FASTLB_CYTHON_ANNOTATE=1   write the HTML annotation next to _core.pyx
  FASTLB_DEBUG=1             -O0 -g and Cython linetrace, for profilers and gdb
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTLB_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}
macros = [("XXH_INLINE_ALL", None)]
compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
if DEBUG:
    directives["linetrace"] = True
    macros.append(("CYTHON_TRACE", "1"))

core = Extension(
    "fastlb._core",
    ["fastlb/_core.pyx"],
    include_dirs=["fastlb/vendor"],
    define_macros=macros,
    extra_compile_args=compile_args,
)
relay = Extension("fastlb._relay", ["fastlb/_relay.pyx"], extra_compile_args=compile_args)
# `--relay epoll`: the C relay thread (fastlb/_crelay.pyx), which also terminates TLS (fastlb/_ctls.pxi)
# with the system OpenSSL (libssl-dev).
crelay = Extension("fastlb._crelay", ["fastlb/_crelay.pyx"], libraries=["ssl", "crypto"],
                   extra_compile_args=compile_args)

# The per-request path of HTTP mode: plain Python modules (the reference, used as they are when not
# built) compiled by Cython; the .pxd files beside the protocol modules turn their classes into extension
# types with typed attributes, and a compiled module takes precedence on import. They keep Python's
# semantics (bounds checks, negative indexes): compiled with the core's wraparound=False, pool.py's
# `tried[-1]` read out of bounds and crashed the process.
python_modules = [
    Extension(f"fastlb.http.{name}", [f"fastlb/http/{name}.py"], extra_compile_args=compile_args)
    for name in ("runtime", "protocol", "upstream", "routing", "fast", "reuse")
] + [Extension("fastlb.pool", ["fastlb/pool.py"], extra_compile_args=compile_args)]
python_directives = {"language_level": 3, "annotation_typing": False}
head_scanner = Extension("fastlb.http._head", ["fastlb/http/_head.pyx"], extra_compile_args=compile_args)
# The C engine of HTTP mode (fastlb/http/fast.py says when it serves).
# It terminates TLS binds with the system OpenSSL too (fastlb/http/_etls.pxi), and serves HTTP/2 clients
# with libnghttp2 (fastlb/http/_eh2.pxi).
http_engine = Extension("fastlb.http._fast", ["fastlb/http/_fast.pyx"], libraries=["ssl", "crypto", "nghttp2"],
                        extra_compile_args=compile_args)
# Admission control's table (rate limits, connection counts, CIDR lists), cimported by the HTTP engine.
admission = Extension("fastlb._admission", ["fastlb/_admission.pyx"], extra_compile_args=compile_args)
# HTTP/2 for HTTP mode's clients (fastlb/http2/): libnghttp2's server session (libnghttp2-dev).
http2 = Extension("fastlb.http2._nghttp2", ["fastlb/http2/_nghttp2.pyx"], libraries=["nghttp2"],
                  extra_compile_args=compile_args)
annotate = os.environ.get("FASTLB_CYTHON_ANNOTATE") == "1"
# Cython and the C compiler run on every core: a build compiles a dozen large modules, and the wheel,
# the sdist and the container image each build them once more.
JOBS = os.cpu_count() or 1

# The access log's C formatter and writer thread (fastlb/observe.py's AccessLog and the HTTP engine use it).
access_log = Extension("fastlb._accesslog", ["fastlb/_accesslog.pyx"], extra_compile_args=compile_args)

# Per-connection byte counts from TCP_INFO (fastlb/observe.py); observe.py falls back to ctypes without it.
sockinfo = Extension("fastlb._sockinfo", ["fastlb/_sockinfo.pyx"], extra_compile_args=compile_args)

setup(
    ext_modules=[
        *cythonize([core, relay, crelay, sockinfo, access_log, head_scanner, http_engine, admission,
                    http2],
                   compiler_directives=directives, annotate=annotate, nthreads=JOBS),
        *cythonize(python_modules, compiler_directives=python_directives, annotate=annotate, nthreads=JOBS),
    ],
    options={"build_ext": {"parallel": JOBS}},
)
