"""A request-desync harness: an oracle backend that parses every byte it receives, and seeded random
sequences of client exchanges sent through a real fastlb.

The oracle (`OracleBackend`) is a *correct* HTTP/1.1 server whose behaviour per request is chosen by the
client (`X-Act`): answer normally, answer early (before reading the body, or half-way through it: it then
reads and discards the rest, as a correct server keeping the connection does), answer 1xx first, answer
101 to an Upgrade and echo the tunnel, close or reset after the head, end a body by closing, answer a HEAD,
204 or 304. It checks, per connection, that every byte it reads is a request fastlb's client sent: each
carries `X-Seq: N` and a body derived from N (`body_for`), so bytes of another request, a request line hidden
in a body or header value, or a stray byte left by a reused connection all show up as a *violation*: an
unknown or repeated sequence number (a non-idempotent request delivered twice), a method or path other than
the one sent, a body other than the one sent, or bytes that do not parse.

The client side (`run_sequence`) sends 1-3 requests on one connection (one at a time or pipelined), some
aborted mid-body, some with `Expect: 100-continue` or Upgrade, and checks each response it reads answers
its own request (`X-Seq` echoed) or is fastlb's own error; after the sequence fastlb must still answer.

`run_sample(port, seed, count)` drives `count` sequences; tests/test_desync.py runs a bounded sample on both
HTTP data paths and benchmarks/desync_run.py a long run.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from dataclasses import dataclass, field

from procs import Processes, free_port

# Bait inside bodies: a whole request a backend would run if it ever read body bytes as a request head.
BAIT = b"\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil\r\nX-Seq: 999999999\r\n\r\n"
METHODS = ("GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH")
IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}
ACTIONS = ("ok", "ok", "ok", "early", "mid", "interim", "close", "reset", "eof-body", "chunked",
           "no-body-204", "no-body-304")
BODY_SIZES = (0, 1, 17, 300, 5000, 70_000)        # 70 kB: over fastlb's replay limit and one read
IO_TIMEOUT = 8.0


def body_for(seq: int, size: int) -> bytes:
    """The body request `seq` carries: its number, bait, filler; the oracle recomputes and compares."""
    unit = b"<%d>" % seq + BAIT + b"x" * (seq % 13)
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class Sent:
    seq: int
    method: str
    path: str
    body: bytes
    upgrade: bool
    seen: int = 0


@dataclass
class Registry:
    """What the clients sent (by sequence number) and what the oracle saw that it should not have."""
    sent: dict[int, Sent] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    next_seq: int = 1
    paths_seen: list[str] = field(default_factory=list)

    def new(self, method: str, path: str, body: bytes, upgrade: bool) -> Sent:
        seq = self.next_seq
        self.next_seq += 1
        sent = Sent(seq, method, path, body, upgrade)
        self.sent[seq] = sent
        return sent


class Malformed(Exception):
    pass


class OracleBackend:
    """The strict backend: an asyncio server on 127.0.0.1 (see the module docstring)."""

    def __init__(self, registry: Registry, name: str = "oracle", check_bodies: bool = True) -> None:
        self.registry = registry
        self.check_bodies = check_bodies       # False: any body is accepted (a backend that trusts framing)
        self.name = name
        self.server = None
        self.port = 0
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        self.server.close()

    def violation(self, text: str) -> None:
        self.registry.violations.append(f"{self.name}: {text}")

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.violation(f"connection ended inside a request head: {exc.partial[:80]!r}")
                    return
                except asyncio.LimitOverrunError:
                    self.violation("request head over 64 KiB")
                    return
                if not await self.one_request(head, reader, writer):
                    return
        except Malformed as exc:
            self.violation(str(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass                      # fastlb closed or reset the connection (client abort, timeout)
        except asyncio.CancelledError:
            pass                      # the run is over: an idle keep-alive connection ends with it
        finally:
            writer.transport.abort()

    async def one_request(self, head: bytes, reader, writer) -> bool:
        """Reads one request (head already read) and answers it; False when the connection ends."""
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or not parts[1].startswith(b"/"):
            raise Malformed(f"bad request line {lines[0][:100]!r}")
        method, path = parts[0].decode("latin-1"), parts[1].decode("latin-1")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise Malformed(f"bad header line {line[:100]!r} (request {lines[0][:60]!r})")
            lname = name.lower()
            if lname in headers and lname in (b"content-length", b"transfer-encoding", b"host", b"x-seq"):
                raise Malformed(f"repeated {name!r} in {lines[0][:60]!r}")
            headers[lname] = value.strip()
        self.registry.paths_seen.append(path)
        try:
            seq = int(headers.get(b"x-seq", b"-1"))
        except ValueError:
            raise Malformed(f"bad X-Seq {headers.get(b'x-seq')!r}") from None
        sent = self.registry.sent.get(seq)
        if sent is None:
            raise Malformed(f"a request nobody sent: {lines[0][:80]!r} X-Seq {seq}")
        if sent.method != method or sent.path != path:
            raise Malformed(f"request {seq} arrived as {method} {path}, sent as {sent.method} {sent.path}")
        sent.seen += 1
        if sent.seen > 1 and sent.method not in IDEMPOTENT:
            self.violation(f"non-idempotent request {seq} ({method}) delivered {sent.seen} times")
        if b"transfer-encoding" in headers and b"content-length" in headers:
            raise Malformed(f"request {seq}: both Content-Length and Transfer-Encoding")
        if b"host" not in headers:
            raise Malformed(f"request {seq}: no Host")
        action = headers.get(b"x-act", b"ok").decode()
        chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
        length = int(headers.get(b"content-length", b"0"))
        upgrade = b"upgrade" in headers.get(b"connection", b"").lower()
        tag = b"X-Seq: %d\r\n" % seq
        if action == "reset":
            writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if action == "early":                          # before reading any of the body
            writer.write(b"HTTP/1.1 401 Unauthorized\r\n" + tag + b"Content-Length: 6\r\n\r\ndenied")
            await writer.drain()
        body = await self.read_body(reader, seq, chunked, length,
                                    writer if action == "mid" else None, tag)
        if self.check_bodies and body != sent.body:
            raise Malformed(f"request {seq}: body of {len(body)} bytes is not the {len(sent.body)} sent "
                            f"(starts {body[:40]!r})")
        if action in ("early", "mid"):
            return True
        if action == "close":
            return False
        if upgrade and action == "ok" and sent.upgrade:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n"
                         + tag + b"\r\n")
            await writer.drain()
            while True:                               # the tunnel: echo until the other side ends
                data = await reader.read(65536)
                if not data:
                    return False
                writer.write(data)
        reply = b"seq=%d" % seq
        if action == "interim":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        if action == "eof-body":
            writer.write(b"HTTP/1.1 200 OK\r\n" + tag + b"Connection: close\r\n\r\n" + reply)
            await writer.drain()
            return False
        if action == "chunked" and method != "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\n" + tag + b"Transfer-Encoding: chunked\r\n\r\n"
                         + b"%x\r\n%s\r\n0\r\n\r\n" % (len(reply), reply))
        elif action == "no-body-204":
            writer.write(b"HTTP/1.1 204 No Content\r\n" + tag + b"\r\n")
        elif action == "no-body-304":
            writer.write(b"HTTP/1.1 304 Not Modified\r\n" + tag + b"Content-Length: 6\r\n\r\n")
        elif method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\n" + tag + b"Content-Length: %d\r\n\r\n" % len(reply))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n" + tag + b"Content-Length: %d\r\n\r\n" % len(reply) + reply)
        await writer.drain()
        return True

    async def read_body(self, reader, seq: int, chunked: bool, length: int, answer_midway, tag) -> bytes:
        """The body by its framing (strict chunked decoding); `answer_midway`: a 401 after half of it."""
        if not chunked:
            half = length // 2
            first = await reader.readexactly(half) if half else b""
            if answer_midway is not None:
                answer_midway.write(b"HTTP/1.1 401 Unauthorized\r\n" + tag + b"Content-Length: 6\r\n\r\ndenied")
                await answer_midway.drain()
            return first + (await reader.readexactly(length - half) if length - half else b"")
        body = bytearray()
        answered = answer_midway is None
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";")[0]
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Malformed(f"request {seq}: bad chunk size {line[:40]!r}") from None
            if size == 0:
                trailer = await reader.readuntil(b"\r\n")
                while trailer != b"\r\n":
                    trailer = await reader.readuntil(b"\r\n")
                if not answered:
                    answer_midway.write(b"HTTP/1.1 401 Unauthorized\r\n" + tag + b"Content-Length: 6\r\n\r\ndenied")
                    await answer_midway.drain()
                return bytes(body)
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise Malformed(f"request {seq}: chunk not followed by CRLF")
            if not answered:
                answered = True
                answer_midway.write(b"HTTP/1.1 401 Unauthorized\r\n" + tag + b"Content-Length: 6\r\n\r\ndenied")
                await answer_midway.drain()


# ---- the client side ---------------------------------------------------------------------------------

@dataclass
class Planned:
    """One request of a sequence, as the generator chose it."""
    method: str
    framing: str          # "none", "length", "chunked"
    size: int
    action: str
    upgrade: bool
    expect: bool
    abort: bool           # the client leaves after half of the body


def plan_sequence(rng: random.Random) -> tuple[list[Planned], bool]:
    """1-3 requests on one connection, and whether they are pipelined (sent in one write)."""
    count = rng.choice((1, 1, 2, 3))
    planned = []
    for index in range(count):
        method = rng.choice(METHODS)
        framing = rng.choice(("none", "none", "length", "length", "chunked"))
        if method in ("GET", "HEAD", "OPTIONS", "DELETE") and rng.random() < 0.7:
            framing = "none"
        size = 0 if framing == "none" else rng.choice(BODY_SIZES)
        upgrade = rng.random() < 0.2
        action = rng.choice(ACTIONS)
        if upgrade and rng.random() < 0.5:
            action = "ok"            # the oracle answers 101 to an Upgrade it is told to accept
        expect = framing != "none" and size > 0 and rng.random() < 0.15
        abort = index == count - 1 and size > 1 and rng.random() < 0.1
        planned.append(Planned(method, framing, size, action, upgrade, expect, abort))
    return planned, count > 1 and rng.random() < 0.5


def encode(registry: Registry, plan: Planned, host: str, path: str | None = None) -> tuple[Sent, bytes, bytes]:
    """(the registry entry, the request head, its body bytes as framed)."""
    path = path or f"/r/{registry.next_seq}"
    body = body_for(registry.next_seq, plan.size)
    sent = registry.new(plan.method, path, body, plan.upgrade)
    lines = [f"{plan.method} {path} HTTP/1.1", f"Host: {host}", f"X-Seq: {sent.seq}", f"X-Act: {plan.action}"]
    if plan.upgrade:
        lines += ["Connection: upgrade", "Upgrade: echo"]
    if plan.expect:
        lines.append("Expect: 100-continue")
    if plan.framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        framed = body
    elif plan.framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4000]), body[i:i + 4000])
                          for i in range(0, len(body), 4000)) + b"0\r\n\r\n"
    else:
        framed = b""
    return sent, ("\r\n".join(lines) + "\r\n\r\n").encode(), framed


class ResponseReader:
    """Reads responses off a client connection: (status, headers, body); None at a close."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, head_request: bool) -> tuple[int, dict, bytes] | None:
        while True:
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            lines = head[:-4].split(b"\r\n")
            try:
                status = int(lines[0].split(b" ")[1])
            except (IndexError, ValueError):
                raise ValueError(f"bad response head {head[:200]!r}") from None
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200 and status != 101:
                continue                                      # interim responses
            if head_request or status in (101, 204, 304):
                return status, headers, b""
            try:
                if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                    body = bytearray()
                    while True:
                        size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                        if size == 0:
                            await self.reader.readuntil(b"\r\n")
                            return status, headers, bytes(body)
                        body += await self.reader.readexactly(size)
                        await self.reader.readexactly(2)
                if b"content-length" in headers:
                    return status, headers, await self.reader.readexactly(int(headers[b"content-length"]))
                return status, headers, await self.reader.read()       # until close
            except (asyncio.IncompleteReadError, ConnectionError):
                return None


async def run_sequence(port: int, registry: Registry, rng: random.Random, host: str = "desync.test") -> list[str]:
    """One connection's worth of requests; returns the client-side violations found."""
    planned, pipelined = plan_sequence(rng)
    problems: list[str] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    responses = ResponseReader(reader, writer)
    try:
        encoded = [encode(registry, plan, host) for plan in planned]
        if pipelined and not any(p.expect or p.abort or p.upgrade for p in planned):
            writer.write(b"".join(head + body for _, head, body in encoded))
            await writer.drain()
            for (sent, _, _), plan in zip(encoded, planned):
                if not await check_response(responses, sent, plan, problems):
                    return problems
            return problems
        for (sent, head, body), plan in zip(encoded, planned):
            if plan.expect:
                writer.write(head)
                await writer.drain()
                # Body after a 100 (or straight after a short wait: RFC 9110 10.1.1 lets a client go on).
                try:
                    await asyncio.wait_for(reader.readuntil(b"HTTP/1.1 100 Continue\r\n\r\n"), 2.0)
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ConnectionError):
                    return problems         # a final answer came instead (or none): the sequence ends
                writer.write(body)
            elif plan.abort:
                writer.write(head + body[:len(body) // 2])
                await writer.drain()
                await asyncio.sleep(rng.choice((0, 0.01)))
                return problems
            else:
                writer.write(head + body)
            await writer.drain()
            if not await check_response(responses, sent, plan, problems):
                return problems
            if plan.upgrade:
                return problems             # after an Upgrade request fastlb closes (or tunnels, checked)
        return problems
    except (ConnectionError, asyncio.TimeoutError):
        return problems
    finally:
        writer.transport.abort()


async def check_response(responses: ResponseReader, sent: Sent, plan: Planned, problems: list[str]) -> bool:
    """Reads the answer to `sent`; False when the connection ended (or a tunnel was checked). fastlb
    answers within its response timeout (5 s) or closes: silence for IO_TIMEOUT is a lost request."""
    try:
        answer = await asyncio.wait_for(responses.read(plan.method == "HEAD"), IO_TIMEOUT)
    except asyncio.TimeoutError:
        problems.append(f"request {sent.seq} ({plan}): neither an answer nor a close in {IO_TIMEOUT}s")
        return False
    if answer is None:
        return False
    status, headers, body = answer
    seq = headers.get(b"x-seq")
    if seq is None:
        if status < 400:
            problems.append(f"request {sent.seq}: status {status} without X-Seq (not fastlb's error)")
        return headers.get(b"connection", b"").lower() != b"close"
    if int(seq) != sent.seq:
        problems.append(f"request {sent.seq} got the response to request {int(seq)}")
        return False
    if status == 101:
        if not sent.upgrade:
            problems.append(f"request {sent.seq}: 101 to a request that did not ask to upgrade")
            return False
        responses.writer.write(b"ping-%d" % sent.seq)
        echo = await asyncio.wait_for(responses.reader.readexactly(len(b"ping-%d" % sent.seq)), IO_TIMEOUT)
        if echo != b"ping-%d" % sent.seq:
            problems.append(f"request {sent.seq}: tunnel echoed {echo!r}")
        return False
    if status == 200 and plan.method != "HEAD" and body != b"seq=%d" % sent.seq:
        problems.append(f"request {sent.seq}: body {body[:40]!r}")
    return headers.get(b"connection", b"").lower() != b"close"


async def still_serving(port: int, registry: Registry) -> str | None:
    """A plain GET through fastlb after the sequences: None when it is answered by the oracle."""
    sent, head, _ = encode(registry, Planned("GET", "none", 0, "ok", False, False, False), "desync.test")
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        answer = await asyncio.wait_for(ResponseReader(reader, writer).read(False), IO_TIMEOUT)
        writer.close()
    except (OSError, asyncio.TimeoutError) as exc:
        return f"fastlb stopped answering: {exc!r}"
    if answer is None or answer[0] != 200:
        return f"fastlb answered a plain GET with {answer and answer[0]}"
    return None


async def run_sample(port: int, registry: Registry, seed: int, count: int, concurrency: int = 4) -> list[str]:
    """`count` sequences from `seed`, `concurrency` connections at a time (so backend connections are
    reused across clients); returns every violation (the oracle's and the clients')."""
    rng = random.Random(seed)
    seeds = [rng.getrandbits(32) for _ in range(count)]
    problems: list[str] = []
    queue = list(reversed(seeds))

    async def worker() -> None:
        while queue:
            sequence_seed = queue.pop()
            try:
                problems.extend(await asyncio.wait_for(
                    run_sequence(port, registry, random.Random(sequence_seed)), 3 * IO_TIMEOUT))
            except asyncio.TimeoutError:
                problems.append(f"sequence {sequence_seed}: no progress in {3 * IO_TIMEOUT}s")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stopped = await still_serving(port, registry)
    if stopped:
        problems.append(stopped)
    return problems + registry.violations


@contextlib.asynccontextmanager
async def through_fastlb(check_bodies: bool = True, backends: int = 1, extra: tuple = ()):
    """(fastlb's port, the registry, the first oracle): a fastlb in front of `backends` oracle backends
    sharing one registry; `extra`: more fastlb flags."""
    registry = Registry()
    oracles = [OracleBackend(registry, f"oracle{i}", check_bodies) for i in range(backends)]
    args = []
    for oracle in oracles:
        args += ["--backend", f"127.0.0.1:{await oracle.start()}"]
    processes = Processes()
    try:
        port = free_port()
        processes.fastlb("--bind", f"127.0.0.1:{port}", *args, "--response-timeout", "5s", *extra)
        yield port, registry, oracles[0]
    finally:
        processes.cleanup()
        for oracle in oracles:
            await oracle.close()
