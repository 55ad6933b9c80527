"""The HTTP tests again on the Python path alone (`FASTLB_HTTP_ENGINE=python`): test_http.py and the
hostile-request corpus run by default where the C engine (fastlb/http/_fast.pyx) takes the requests it
can serve and hands the rest to the Python path; here the Python path serves everything, so each
behaviour written once is proven on both data paths (the `Test_UV_TCP` / `Test_AIO_TCP` way)."""
import pytest

from test_http import *              # noqa: F401,F403  (collected again, under the fixture below)
from test_http_corpus import *       # noqa: F401,F403


@pytest.fixture(scope="module", autouse=True)
def python_path():
    # Module scope and autouse: set before the module's shared fastlb starts.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLB_HTTP_ENGINE", "python")
        yield
