import glob
import os

import pytest

from procs import REPO, Processes


def pytest_configure(config):
    """Compiled modules shadow their Python sources: testing a stale one would test old code."""
    stale = []
    fastlb = REPO / "fastlb"
    # What each compiled module includes or cimports beyond its own .py/.pxd/.pyx.
    extra = {
        "_core": glob.glob(str(fastlb / "core" / "*.pxi")),
        "_crelay": [fastlb / "_ctls.pxi", fastlb / "_posix.pxd", fastlb / "_openssl.pxd"],
        "_fast": [*glob.glob(str(fastlb / "http" / "*.pxi")), fastlb / "_posix.pxd", fastlb / "_admission.pxd",
                  fastlb / "_openssl.pxd", fastlb / "constants.pxd", fastlb / "http2" / "nghttp2.pxd"],
        "_nghttp2": [fastlb / "http2" / "nghttp2.pxd"],
        "_head": [fastlb / "http" / "_scan.pxi"],
        "_admission": [fastlb / "constants.pxd"],
    }
    for built in glob.glob(str(fastlb / "**" / "*.so"), recursive=True):
        stem = built.split(".cpython-")[0]
        sources = [stem + ext for ext in (".py", ".pxd", ".pyx") if os.path.exists(stem + ext)]
        sources += [str(path) for path in extra.get(os.path.basename(stem), ()) if os.path.exists(path)]
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


# ---- data paths: each behaviour written once, run on every path (uvloop's Test_UV_TCP / Test_AIO_TCP way) ----

HTTP_ENGINES = ("c", "python")       # FASTLB_HTTP_ENGINE: the C engine (handing the rest over), the Python path alone


def _serving_on(engine):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLB_HTTP_ENGINE", engine)      # read by every fastlb started meanwhile
        yield engine


@pytest.fixture(params=HTTP_ENGINES)
def engine(request):
    """The test runs once on each HTTP data path."""
    yield from _serving_on(request.param)


@pytest.fixture(scope="module", params=HTTP_ENGINES)
def http_engine(request):
    """`engine` for a whole module, for the modules whose every test uses it (autouse there): their
    shared fastlb starts once per path, and the variable stays set until the module's tests on that
    path are done."""
    yield from _serving_on(request.param)


# --mode tcp data paths: the C relay as fastlb chooses it (its own thread unless pinned to one CPU), the
# C relay inline in the event loop's thread (FASTLB_RELAY_INLINE=1), and the uvloop relay.
TCP_RELAYS = {"default": (None, None), "inline": ("epoll", "1"), "uvloop": ("uvloop", None)}


@pytest.fixture(params=list(TCP_RELAYS))
def tcp_relay(request, procs, monkeypatch):
    """Every `--mode tcp` fastlb the test starts through `procs` relays on this path."""
    procs.relay, inline = TCP_RELAYS[request.param]
    if inline is not None:
        monkeypatch.setenv("FASTLB_RELAY_INLINE", inline)
    return request.param
