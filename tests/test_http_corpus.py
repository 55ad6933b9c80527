"""The hostile request corpus (tests/http_corpus.py) against a real fastlb: each request gets the
right 4xx (or a close), none reaches the backend, and fastlb keeps serving good requests."""
import socket
import time

import httptools
import pytest

from http_client import Client, requests_seen
from http_corpus import CASES, CLOSE
from procs import Processes, free_port


@pytest.fixture(scope="module", autouse=True)
def on_each_path(http_engine):
    """Every test here runs on the C engine and on the Python path alone (conftest's http_engine)."""


@pytest.fixture(scope="module")
def balancer(http_engine):
    """One fastlb for the whole corpus, on each HTTP data path (conftest's http_engine)."""
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a")
        port = free_port()
        processes.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                         "--max-uri-length", "2k", "--max-header-size", "8k", "--max-headers", "50",
                         "--max-body-size", "1k", "--http-request-timeout", "1s")
        yield port, backend
    finally:
        processes.cleanup()


def answer(port: int, data: bytes) -> tuple[int | None, bool]:
    """Sends data; returns (status of the response, or None if there was none; closed by fastlb)."""
    with Client(port, timeout=5) as client:
        try:
            client.send(data)
        except (BrokenPipeError, ConnectionResetError):
            return None, True
        try:
            response = client.read_response()
        except (ConnectionError, socket.timeout, TimeoutError):
            return None, client.closed(timeout=3)
        except httptools.HttpParserError:          # not HTTP/1.1: an HTTP/2 GOAWAY (the preface case)
            return None, client.closed(timeout=3)
        return response.status, client.closed(timeout=3)


def test_corpus_is_large_and_unique():
    names = [name for name, _, _ in CASES]
    assert len(names) >= 100 and len(set(names)) == len(names)


@pytest.mark.parametrize("name, data, expected", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(balancer, name, data, expected):
    port, backend = balancer
    before = len(backend.lines)
    status, closed = answer(port, data)
    assert closed, f"{name}: connection left open"
    if expected == CLOSE:
        assert status is None or 400 <= status < 500, (name, status)
    else:
        assert status == expected, (name, status)
    # fastlb still serves, and nothing of the hostile request reached the backend.
    with Client(port) as client:
        response = client.request("GET", f"/alive-after-{name}")
        assert response.status == 200
    # The backend logs the request before answering it, but its output is read by a thread: wait for
    # the line, then everything logged since `before` is known.
    backend.wait_for_line(f" /alive-after-{name} ", start=before)
    seen = [r["url"] for r in requests_seen(backend, before)]
    assert seen == [f"/alive-after-{name}"], (name, seen)
