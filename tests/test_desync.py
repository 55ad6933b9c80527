"""Request desync: the two holes of issue 13 as regression tests, and a seeded random sample of the
desync harness (tests/desync.py), each on both HTTP data paths (the C engine with its hand-over to the
Python path, and the Python path alone)."""
import asyncio
import os
import textwrap

import pytest

from desync import Planned, encode, run_sample, through_fastlb
from http_client import Client, requests_seen
from procs import Processes, free_port

SAMPLE_SEED = int(os.environ.get("FASTLB_DESYNC_SEED", "20261207"))
SAMPLE_SIZE = int(os.environ.get("FASTLB_DESYNC_SEQUENCES", "300"))


async def read_response(reader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return int(head.split(b" ")[1]), head + await reader.readexactly(length)


def test_upgrade_body_cannot_smuggle_a_request(engine):
    """Issue 13, hole 1: an Upgrade request with a body, answered early (401) by a backend that then
    reads the body it expects. Before the fix fastlb held the body back and parked the connection, so
    the next client's head became the rest of that body and a request line hidden in one of its header
    values (`GET /admin`) ran at the backend. Now the body is forwarded, the tunnel never starts, and the
    next request arrives as sent."""
    async def scenario():
        async with through_fastlb(check_bodies=False) as (port, registry, _):   # trusts framing, as most do
            # The second request, as fastlb forwards it, starts with this prefix; the hidden request line
            # follows it inside the X-Hide value. The first body is exactly as long as the prefix.
            prefix = b"GET /public HTTP/1.1\r\nHost: h\r\nX-Hide: "
            first, first_head, _ = encode(registry, Planned("POST", "length", 0, "early", True, False, False), "h")
            first_head = first_head.replace(b"Content-Length: 0", b"Content-Length: %d" % len(prefix))
            body = b"z" * len(prefix)
            first.body = body
            second = registry.new("GET", "/public", b"", False)
            # `Upgrade` without `Connection: upgrade`: not an upgrade, but it sends the request to the
            # Python path even with the C engine on (where the first request's connection was parked).
            second_head = (b"GET /public HTTP/1.1\r\nHost: h\r\nX-Hide: GET /admin HTTP/1.1\r\nX-Seq: %d\r\n"
                           b"Upgrade: x\r\n\r\n" % second.seq)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(first_head + body)
            status, _ = await read_response(reader)
            assert status == 401                     # an ordinary response to an Upgrade request
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(second_head)
            status, response = await read_response(reader)
            writer.close()
            assert status == 200 and b"X-Seq: %d" % second.seq in response, response
            assert "/admin" not in registry.paths_seen
            assert registry.paths_seen == [first.path, "/public"], registry.paths_seen
            assert registry.violations == []
    asyncio.run(scenario())


def test_upgrade_body_reaches_the_backend_before_the_switch(engine):
    """RFC 9110 7.8: the request, body included, is complete before a switch. A backend that reads the
    body and then answers 101 gets the body (it waited for it, and the client got a 504 before), then
    the tunnel carries the client's bytes after it."""
    async def scenario():
        async with through_fastlb() as (port, registry, _):
            sent, head, body = encode(registry, Planned("POST", "length", 300, "ok", True, False, False), "h")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + body + b"tunnel-bytes")    # the new protocol's bytes right behind the body
            status, _ = await read_response(reader)
            assert status == 101
            assert await asyncio.wait_for(reader.readexactly(12), 10) == b"tunnel-bytes"
            writer.close()
            assert sent.seen == 1 and registry.violations == []
    asyncio.run(scenario())


@pytest.fixture
def routed(tmp_path, monkeypatch, request):
    processes = Processes()
    try:
        backends, ports = processes.http_backends("web", "admin")
        port = free_port()
        path = tmp_path / "lb.toml"
        path.write_text(textwrap.dedent(f"""\
            default_pool = "web"
            [[bind]]
            address = "127.0.0.1:{port}"
            [[pool]]
            name = "web"
            backend = ["127.0.0.1:{ports['web']}"]
            [[pool]]
            name = "admin"
            backend = ["127.0.0.1:{ports['admin']}"]
            [[route]]
            pool = "admin"
            path_prefix = "/admin"
            [[route]]
            pool = "admin"
            host = "admin.example.com"
            """))
        processes.fastlb("--config", str(path), wait_port=port)
        yield port, backends
    finally:
        processes.cleanup()


def test_absolute_form_routes_like_its_origin_form_twin(engine, routed):
    """Issue 13, hole 2: the target's authority replaces Host, and routes see the origin-form path the
    backend gets, so `GET http://h/admin/x` goes where `GET /admin/x` with `Host: h` goes."""
    port, backends = routed
    start = len(backends.lines)
    with Client(port) as client:
        client.send(b"GET /admin/x HTTP/1.1\r\nHost: h\r\n\r\n")
        twin = client.read_response()
        client.send(b"GET http://h/admin/x HTTP/1.1\r\nHost: other\r\n\r\n")
        absolute = client.read_response()
        client.send(b"GET HTTP://admin.example.com/ HTTP/1.1\r\nHost: web.example.com\r\n\r\n")
        by_host = client.read_response()
        client.send(b"GET http://web.example.com?q=1 HTTP/1.1\r\nHost: admin.example.com\r\n\r\n")
        empty_path = client.read_response()
    assert twin.header("X-Backend") == absolute.header("X-Backend") == "admin"
    assert by_host.header("X-Backend") == "admin"
    assert empty_path.header("X-Backend") == "web"
    seen = requests_seen(backends, start, at_least=4)
    assert [r["url"] for r in seen] == ["/admin/x", "/admin/x", "/", "/?q=1"]
    for request, host in zip(seen, ["h", "h", "admin.example.com", "web.example.com"]):
        headers = {k.lower(): v for k, v in request["headers"]}
        assert headers["host"] == host and headers["x-forwarded-host"] == host, request


@pytest.mark.parametrize("target, method, status", [
    (b"*", b"OPTIONS", 200), (b"*", b"GET", 400), (b"*/test", b"OPTIONS", 400),
    (b"http://user@h/", b"GET", 400), (b"ftp://h/", b"GET", 400), (b"http:///x", b"GET", 400),
    (b"http://h h/", b"GET", 400),
])
def test_request_target_forms(engine, routed, target, method, status):
    """Only origin-form, absolute-form (http/https, an authority without userinfo) and `OPTIONS *`."""
    port, backends = routed
    start = len(backends.lines)
    with Client(port) as client:
        client.send(method + b" " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        try:
            response = client.read_response()
            got = response.status
        except (ConnectionError, OSError):
            got = None
    if status == 200:
        assert got == 200
        assert requests_seen(backends, start, at_least=1)[0]["url"] == "*"
    else:
        assert got in (status, None)
        with Client(port) as client:
            assert client.request("GET", "/after").status == 200
        assert [r["url"] for r in requests_seen(backends, start, at_least=1)] == ["/after"]


@pytest.mark.parametrize("backends, extra", [(1, ()), (2, ("--retry-on", "all-retryable-errors"))],
                         ids=["one-backend", "two-backends-retry-all"])
def test_desync_harness_sample(engine, backends, extra):
    """A seeded sample of random request sequences (FASTLB_DESYNC_SEED, FASTLB_DESYNC_SEQUENCES): no
    request the clients did not send reaches a backend, no response goes to the wrong request; also with
    retries of every kind moving requests between two backends."""
    async def scenario():
        async with through_fastlb(backends=backends, extra=extra) as (port, registry, oracle):
            return await run_sample(port, registry, SAMPLE_SEED, SAMPLE_SIZE), registry, oracle
    problems, registry, oracle = asyncio.run(scenario())
    assert not problems, f"seed {SAMPLE_SEED} ({engine} engine): {len(problems)} problems:\n" + \
        "\n".join(problems[:20])
    # The sample exercised what it is for: many requests delivered, connections reused across clients.
    delivered = sum(1 for sent in registry.sent.values() if sent.seen)
    assert delivered > SAMPLE_SIZE // 2 and oracle.connections * backends < delivered, \
        (delivered, oracle.connections)
