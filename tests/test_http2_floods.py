"""The HTTP/2 attacks that broke other servers, against a running fastlb on loopback: each test attacks
one connection, then asserts that fastlb is up, serves another client (HTTP/1.1 and HTTP/2), and that
its memory (RSS of the process and its children) grew by less than RSS_BOUND over the attack.

The bound each test proves is named in its docstring; the limits are fastlb's defaults
(docs/http2.md): 100 concurrent streams, a 64 KiB header list, a 64 KiB stream window, 400 control
frames at once, libnghttp2's 8 CONTINUATION frames and RST_STREAM rate.
"""
import os
import socket
import time

import pytest

pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")
import h2.errors  # noqa: E402
import h2.settings  # noqa: E402
from hpack import Encoder  # noqa: E402
from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame, PingFrame, RstStreamFrame,  # noqa: E402
                              SettingsFrame)

from h2_client import (PREFACE, H2Client, headers_frame, raw_connection, read_frames,  # noqa: E402
                       request_block)
from http_client import Client, requests_seen  # noqa: E402
from procs import Processes, free_port, wait_until  # noqa: E402

RSS_BOUND = 64 * 1024 * 1024          # bytes fastlb may grow by during one attack
ATTACK_SECONDS = 20                   # every attack loop ends by then at the latest


def rss(pid: int) -> int:
    """Resident bytes of pid and its children (a master with workers)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        pids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


@pytest.fixture(scope="module", autouse=True)
def on_each_path(http_engine):
    """Every test here runs with the C engine serving the HTTP/2 connections (fastlb/http/_eh2.pxi),
    then with the Python path alone."""
    return http_engine


@pytest.fixture
def target():
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a", "b")
        port = free_port()
        args = ["--bind", f"127.0.0.1:{port}"]
        for p in ports.values():
            args += ["--backend", f"127.0.0.1:{p}"]
        proc = processes.fastlb(*args, "--response-timeout", "30s")
        with H2Client(port) as warm:                     # the first HTTP/2 connection's imports are done
            assert warm.get("/warm").status == 200
        yield {"port": port, "proc": proc, "backend": backend, "baseline": rss(proc.pid)}
    finally:
        processes.cleanup()


def still_serving(target) -> None:
    """fastlb is up, answers an HTTP/1.1 and an HTTP/2 client, and stayed within RSS_BOUND."""
    assert target["proc"].popen.poll() is None, target["proc"].output()
    with Client(target["port"]) as client:
        assert client.request("GET", "/after-attack-h1").status == 200
    with H2Client(target["port"]) as client:
        assert client.get("/after-attack-h2").status == 200
    grown = rss(target["proc"].pid) - target["baseline"]
    assert grown < RSS_BOUND, f"RSS grew by {grown >> 20} MiB"


def send_until_closed(sock: socket.socket, frames, target) -> bool:
    """Sends the frames (an iterable of bytes) until fastlb closes the connection or they run out;
    reads and drops what fastlb sends. True when fastlb ended the connection; RSS checked meanwhile."""
    deadline = time.monotonic() + ATTACK_SECONDS
    sock.setblocking(False)
    peak = 0
    try:
        for n, data in enumerate(frames):
            if time.monotonic() > deadline:
                return False
            view = memoryview(data)
            while view:
                try:
                    sent = sock.send(view)
                    view = view[sent:]
                except BlockingIOError:
                    if not drain(sock):
                        return True
                    time.sleep(0.001)
                except (BrokenPipeError, ConnectionResetError):
                    return True
            if n % 512 == 0:
                if not drain(sock):
                    return True
                peak = max(peak, rss(target["proc"].pid))
                assert peak - target["baseline"] < RSS_BOUND, f"RSS grew by {(peak - target['baseline']) >> 20} MiB"
        # Everything sent: fastlb may still be reading it.
        end = time.monotonic() + 5
        while time.monotonic() < end:
            if not drain(sock):
                return True
            time.sleep(0.01)
        return False
    finally:
        sock.close()


def drain(sock: socket.socket) -> bool:
    """Reads what is there; False when the connection is closed."""
    try:
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return False
    except BlockingIOError:
        return True
    except (ConnectionResetError, OSError):
        return False


# ---- the attacks ----------------------------------------------------------------------------------

def test_rapid_reset(target):
    """CVE-2023-44487: HEADERS then RST_STREAM, in a loop. Bound: the connection ends (GOAWAY) after the
    control budget, so far fewer than the 20000 requests sent reach a backend."""
    start = len(target["backend"].lines)
    client = H2Client(target["port"])

    def frames():
        for _ in range(20000):
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [(":method", "GET"), (":path", "/reset"), (":scheme", "http"),
                                                 (":authority", "t")], end_stream=True)
            client.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            yield client.conn.data_to_send()

    assert send_until_closed(client.sock, frames(), target)
    still_serving(target)
    reached = [r for r in requests_seen(target["backend"], start) if r["url"] == "/reset"]
    assert len(reached) < 2000


def test_continuation_flood(target):
    """CVE-2024-27316: a HEADERS frame followed by CONTINUATION frames without end. Bound: libnghttp2
    ends the connection after 8 CONTINUATION frames; nothing of the endless header list is kept."""
    sock = raw_connection(target["port"])
    encoder = Encoder()
    first = headers_frame(1, request_block(encoder), flags=("END_STREAM",))

    def frames():
        yield first
        filler = encoder.encode([("x-filler", "v" * 8000)])
        for _ in range(100000):
            frame = ContinuationFrame(1)
            frame.data = filler
            yield frame.serialize()

    assert send_until_closed(sock, frames(), target)
    still_serving(target)


def test_hpack_bomb(target):
    """A 4 KB field put in the HPACK table once, then referenced by one byte thousands of times per
    header block: 60 MB decoded from each 15 KB frame. Bound: fields past the 64 KiB header list are not
    kept (each stream is answered 431), so no request reaches a backend and memory stays flat."""
    sock = raw_connection(target["port"])
    encoder = Encoder()
    table_entry = encoder.encode([("x-bomb", "b" * 4000)])        # literal, indexed: dynamic index 62

    def frames():
        for n in range(200):
            block = request_block(encoder, "/bomb") + (table_entry if n == 0 else b"") + b"\xbe" * 15000
            yield headers_frame(2 * n + 1, block)

    send_until_closed(sock, frames(), target)       # closed or not: bounded either way, checked below
    still_serving(target)
    assert not [r for r in requests_seen(target["backend"], 0) if r["url"] == "/bomb"]


def test_hpack_bomb_is_answered_431(target):
    with H2Client(target["port"]) as client:
        response = client.get("/bomb", headers=[("x-bomb", "b" * 4000)] * 20)
    assert response.status == 431


@pytest.mark.parametrize("kind", ["settings", "ping", "empty-data"])
def test_control_and_empty_frame_floods(target, kind):
    """CVE-2019-9515 (SETTINGS), 9512 (PING), 9518 (empty frames): frames that cost the server work and
    are no request, sent without reading the answers. Bound: after 400 of them at once (refilled at 40
    a second) the connection ends with GOAWAY; the ACKs queued for a client that does not read are
    capped at 100 by libnghttp2."""
    sock = raw_connection(target["port"])
    if kind == "settings":
        frame = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}).serialize()
    elif kind == "ping":
        frame = PingFrame(0, opaque_data=b"12345678").serialize()
    else:
        sock.sendall(headers_frame(1, request_block(Encoder(), "/slow?ms=20000"), flags=("END_HEADERS",)))
        empty = DataFrame(1)
        empty.data = b""
        frame = empty.serialize()
    assert send_until_closed(sock, (frame for _ in range(200000)), target)
    still_serving(target)


def test_too_many_concurrent_streams(target):
    """1000 streams opened at once to a backend that never answers. Bound: 100 open at a time (the
    advertised SETTINGS_MAX_CONCURRENT_STREAMS); the other 900 are refused (REFUSED_STREAM) before any
    request of theirs is made."""
    start = len(target["backend"].lines)
    encoder = Encoder()
    sock = raw_connection(target["port"])
    try:
        sock.sendall(b"".join(headers_frame(2 * n + 1, request_block(encoder, "/hang")) for n in range(1000)))
        frames = read_frames(sock, lambda frames: sum(isinstance(f, RstStreamFrame) for f in frames) >= 900)
        # Then a PING: by its ACK fastlb has written all it had to say about those streams.
        sock.sendall(PingFrame(0, opaque_data=b"lastping").serialize())
        frames += read_frames(sock, lambda frames: any(isinstance(f, PingFrame) and "ACK" in f.flags
                                                       for f in frames))
        refused = [f for f in frames if isinstance(f, RstStreamFrame)]
        assert len(refused) == 900 and min(f.stream_id for f in refused) == 201
        assert {f.error_code for f in refused} == {h2.errors.ErrorCodes.REFUSED_STREAM}
        wait_until(lambda: len([r for r in requests_seen(target["backend"], start) if r["url"] == "/hang"])
                   == 100, what="the 100 streams taken at the backends")
        still_serving(target)
    finally:
        sock.close()


def test_window_size_abuse_and_slow_reader(target):
    """Streams asking for large responses from a client that announces a zero window (and another that
    never reads its socket). Bound: a response is read from its backend only while fastlb holds less
    than 256 KiB of it; the client's connection is not read while its socket does not drain."""
    clients = []
    try:
        for zero_window in (True, False):
            sock = socket.create_connection(("127.0.0.1", target["port"]), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 0} if zero_window else {}
            encoder = Encoder()
            sock.sendall(PREFACE + SettingsFrame(0, settings=settings).serialize()
                         + b"".join(headers_frame(2 * n + 1, request_block(encoder, "/big?n=20000000"))
                                    for n in range(50)))
            clients.append(sock)
        # 50 streams x 2 connections x 20 MB asked for: 2 GB if buffered.
        deadline = time.monotonic() + 5
        peak = 0
        while time.monotonic() < deadline:
            peak = max(peak, rss(target["proc"].pid))
            time.sleep(0.2)
        assert peak - target["baseline"] < RSS_BOUND, f"RSS grew by {(peak - target['baseline']) >> 20} MiB"
        still_serving(target)
    finally:
        for sock in clients:
            sock.close()


def test_header_block_never_finished():
    """Slowloris over HTTP/2: a HEADERS frame without END_HEADERS and no CONTINUATION, which blocks the
    connection. Bound: the connection ends after --http-request-timeout."""
    processes = Processes()
    try:
        backend, ports = processes.http_backends("a")
        port = free_port()
        processes.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                         "--http-request-timeout", "1s")
        sock = raw_connection(port)
        try:
            sock.sendall(headers_frame(1, request_block(Encoder(), "/never"), flags=("END_STREAM",)))
            frames = read_frames(sock, lambda frames: any(isinstance(f, GoAwayFrame) for f in frames))
            assert next(f for f in frames if isinstance(f, GoAwayFrame)).error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
            sock.settimeout(5)
            assert drain_blocking(sock) == b""           # then closed
        finally:
            sock.close()
    finally:
        processes.cleanup()


def drain_blocking(sock: socket.socket) -> bytes:
    """Reads until the connection closes; what came after (b"" if nothing)."""
    rest = b""
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return rest
        rest += data


def test_a_client_whose_close_comes_with_its_last_bytes_is_closed_at_once(target):
    """The FIN right behind the preface and SETTINGS (often in the same edge-triggered event as them):
    fastlb reads on to the end and closes, instead of holding the connection to the 60 s idle timeout."""
    sock = socket.create_connection(("127.0.0.1", target["port"]))
    try:
        sock.sendall(PREFACE + SettingsFrame(0).serialize())
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(15)                       # well under the keep-alive timeout (60 s)
        while sock.recv(1 << 16):
            pass                                  # fastlb's SETTINGS, maybe a GOAWAY, then the end
    finally:
        sock.close()
    still_serving(target)
