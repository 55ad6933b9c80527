"""A blocking HTTP/2 test client on the `h2` package: many streams on one connection, and the raw frames
the flood tests send (tests/test_http2.py, tests/test_http2_floods.py)."""
from __future__ import annotations

import socket
import ssl
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hpack import Encoder
from hyperframe.frame import Frame, HeadersFrame, SettingsFrame

DEFAULT_TIMEOUT = 10.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Response:
    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.status = 0
        self.body = b""
        self.ended = False
        self.reset: int | None = None            # RST_STREAM error code
        self.trailers: list[tuple[str, str]] = []
        self.interim: list[list[tuple[str, str]]] = []      # 1xx heads, in order

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class H2Client:
    """One HTTP/2 connection: h2c with prior knowledge, or h2 over TLS when `context` is given."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None, server_name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, validate: bool = True) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_name)
            assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        self.sock = sock
        self.timeout = timeout
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                           validate_outbound_headers=validate,
                                           normalize_outbound_headers=validate,
                                           validate_inbound_headers=True)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.responses: dict[int, Response] = {}
        self.goaway: int | None = None           # GOAWAY error code received
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, authority: str = "test", headers=(), body: bytes | None = None,
                end: bool = True) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority),
                  *headers]
        self.conn.send_headers(stream_id, fields, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.responses[stream_id] = Response()
        self.flush()
        return stream_id

    def receive_once(self) -> bool:
        """Reads once and handles the events; False when the connection is closed."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for event in events:
            response = self.responses.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.ResponseReceived):
                response.headers = list(event.headers)
                response.status = int(response.header(":status"))
            elif isinstance(event, h2.events.InformationalResponseReceived):
                response.interim.append(list(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                response.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                response.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                response.ended = True
            elif isinstance(event, h2.events.StreamReset):
                if response is not None:
                    response.reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
        try:
            self.flush()
        except OSError:
            self.closed = True
            return False
        return True

    def wait(self, stream_ids, timeout: float | None = None) -> dict[int, Response]:
        """Reads until every stream in stream_ids ended or was reset (or the connection closed)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not all(self.responses[s].ended or self.responses[s].reset is not None for s in stream_ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams not done: {[s for s in stream_ids if not self.responses[s].ended]}")
            if not self.receive_once():
                break
        return {s: self.responses[s] for s in stream_ids}

    def get(self, path: str, **options) -> Response:
        stream_id = self.request("GET", path, **options)
        return self.wait([stream_id])[stream_id]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "H2Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- raw frames: what a normal client never sends -----------------------------------------------------

def raw_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    return sock


def headers_frame(stream_id: int, block: bytes, flags=("END_HEADERS", "END_STREAM")) -> bytes:
    frame = HeadersFrame(stream_id)
    frame.data = block
    frame.flags = set(flags)
    return frame.serialize()


def request_block(encoder: Encoder, path: str = "/flood", extra=()) -> bytes:
    return encoder.encode([(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "t"),
                           *extra])


def read_frames(sock: socket.socket, done) -> list:
    """The frames fastlb sends, read until done(frames) holds."""
    buffer = b""
    frames = []
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while time.monotonic() < deadline:
        data = sock.recv(1 << 16)
        assert data, "fastlb closed the connection"
        buffer += data
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9:9 + length]))
            buffer = buffer[9 + length:]
            frames.append(frame)
        if done(frames):
            return frames
    raise AssertionError("fastlb did not send the frames awaited")
