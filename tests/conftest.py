import glob
import os

import pytest

from procs import REPO, Processes


def pytest_configure(config):
    """Compiled modules shadow their Python sources: testing a stale one would test old code."""
    stale = []
    for built in glob.glob(str(REPO / "fastlb" / "**" / "*.so"), recursive=True):
        stem = built.split(".cpython-")[0]
        sources = [stem + ext for ext in (".py", ".pxd", ".pyx") if os.path.exists(stem + ext)]
        sources += glob.glob(str(REPO / "fastlb" / "core" / "*.pxi")) if stem.endswith("_core") else []
        sources += [str(REPO / "fastlb" / "_ctls.pxi")] if stem.endswith("_crelay") else []
        sources += glob.glob(str(REPO / "fastlb" / "http" / "*.pxi")) if "/http/_" in stem else []
        sources += [str(REPO / "fastlb" / "_posix.pxd")] if stem.endswith(("_crelay", "_fast")) else []
        sources += [str(REPO / "fastlb" / "_admission.pxd")] if stem.endswith("_fast") else []
        sources += [str(REPO / "fastlb" / "constants.pxd")] if stem.endswith(("_fast", "_admission")) else []
        if any(os.path.getmtime(src) > os.path.getmtime(built) for src in sources):
            stale.append(os.path.relpath(built, REPO))
    if stale:
        pytest.exit(f"compiled modules older than their sources: {', '.join(stale)}; "
                    f"run `python3 setup.py build_ext --inplace` (or `make build`)", returncode=3)


@pytest.fixture
def procs():
    processes = Processes()
    try:
        yield processes
    finally:
        processes.cleanup()
