"""Builds fastlb._core (and the small fastlb._sockinfo) from Cython; generated C and binaries are never committed.

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

# Per-connection byte counts from TCP_INFO (fastlb/observe.py); observe.py falls back to ctypes without it.
sockinfo = Extension("fastlb._sockinfo", ["fastlb/_sockinfo.pyx"], extra_compile_args=compile_args)

setup(
    ext_modules=cythonize(
        [core, sockinfo],
        compiler_directives=directives,
        annotate=os.environ.get("FASTLB_CYTHON_ANNOTATE") == "1",
    )
)
