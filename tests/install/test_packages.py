"""The sdist and the wheel hold the whole package, checked against the tree: every module and data file
that git tracks under fastlb/, a compiled extension for every Cython source, and no generated C."""
from __future__ import annotations

import subprocess
import tarfile
import zipfile

from procs import REPO

GENERATED = (".c", ".o", ".cpp")                       # Cython's output and objects: build artefacts
BUILD_FILES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md")


def tracked(under: str) -> set[str]:
    """The files git tracks under a folder of the tree."""
    out = subprocess.run(["git", "ls-files", "--", under], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def compiled_modules(names: set[str]) -> set[str]:
    """Extension modules in a file list, by module path: fastlb/_core.cpython-311-x86_64-linux-gnu.so ->
    fastlb/_core."""
    return {name.split(".cpython-")[0] for name in names if name.endswith(".so")}


def test_wheel_holds_every_tracked_file_and_extension_and_no_generated_c(built):
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
    package = tracked("fastlb")
    assert package, "git ls-files found nothing under fastlb/"
    assert not package - names, f"missing from the wheel: {sorted(package - names)}"
    # Every module of a subpackage, not just the top one: the wheel once lacked fastlb/http/*.py.
    assert {n for n in package if n.startswith("fastlb/http/") and n.endswith(".py")} <= names
    extensions = compiled_modules(names)
    cython_sources = {n.rsplit(".", 1)[0] for n in package if n.endswith(".pyx")}
    assert cython_sources <= extensions, f"no extension for {sorted(cython_sources - extensions)}"
    assert {"fastlb/http/_fast", "fastlb/http/runtime", "fastlb/pool", "fastlb/http2/_nghttp2"} <= extensions
    generated = sorted(n for n in names if n.endswith(GENERATED))
    assert not generated, f"generated files in the wheel: {generated}"
    annotations = sorted(n for n in names if n.endswith(".html") and n != "fastlb/stats.html")
    assert not annotations, f"Cython annotations in the wheel: {annotations}"


def test_sdist_holds_every_tracked_file_and_no_generated_c(built):
    with tarfile.open(built.sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(f"{root}/") for n in tar.getnames()}
    expected = tracked("fastlb") | set(BUILD_FILES)
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    generated = sorted(n for n in names if n.endswith(GENERATED))
    assert not generated, f"generated files in the sdist: {generated}"
    assert not compiled_modules(names), "compiled modules in the sdist"
