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

# The HTTP hot path: the protocol modules are plain Python (the reference, used as-is when not built)
# compiled by Cython with the .pxd files next to them, which turn their classes into extension types
# with typed attributes; the compiled module takes precedence on import.
http_modules = [
    Extension(f"fastlb.http.{name}", [f"fastlb/http/{name}.py"], extra_compile_args=compile_args)
    for name in ("runtime", "protocol", "upstream", "routing")
] + [Extension("fastlb.http._head", ["fastlb/http/_head.pyx"], extra_compile_args=compile_args)]
# (pool.py stays plain Python: compiled by Cython 3.3, its `async with asyncio.timeout()` connect loop
# crashed the process on a failed connect.)

# Per-connection byte counts from TCP_INFO (fastlb/observe.py); observe.py falls back to ctypes without it.
sockinfo = Extension("fastlb._sockinfo", ["fastlb/_sockinfo.pyx"], extra_compile_args=compile_args)

setup(
    ext_modules=cythonize(
        [core, relay, sockinfo, *http_modules],
        compiler_directives=directives,
        annotate=os.environ.get("FASTLB_CYTHON_ANNOTATE") == "1",
    )
)
