"""TLS passthrough routing: the server name of a ClientHello, read without terminating TLS.

The relay buffers what the client sends first (fastlb/l4.py `PendingClient`), asks `client_hello_sni`
after each read, and once it answers, connects to a backend of the routed group and replays the buffer
unchanged, so the TLS session is between the client and the backend.

The ClientHello may span several TLS records (large key shares); handshake fragments are joined until the
whole message is there. Anything that is not a TLS handshake is refused (NotTLS); a ClientHello larger
than MAX_CLIENT_HELLO is refused too, so a client cannot make the relay buffer without bound.
"""
from __future__ import annotations

MAX_CLIENT_HELLO = 65536
RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXTENSION_SERVER_NAME = 0
NAME_TYPE_HOST = 0


class NotTLS(ValueError):
    """The bytes are not a TLS ClientHello (or a malformed one)."""


class _NeedMore(Exception):
    pass


NEED_MORE = object()     # client_hello_sni(): the ClientHello is not complete yet


def client_hello_sni(data: bytes) -> str | None | object:
    """The SNI host name in a buffer starting with a ClientHello: the name (lower case), None when the
    ClientHello has none, or NEED_MORE. Raises NotTLS."""
    try:
        hello = _handshake_message(data)
    except _NeedMore:
        return NEED_MORE
    return _server_name(hello)


def _handshake_message(data: bytes) -> bytes:
    """The first handshake message, joined from as many records as it spans."""
    message = bytearray()
    offset = 0
    needed = None
    while needed is None or len(message) < needed:
        if len(data) < offset + 5:
            if offset == 0 and data and data[0] != RECORD_HANDSHAKE:
                raise NotTLS("not a TLS handshake record")
            raise _NeedMore
        content_type, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3:offset + 5])
        if content_type != RECORD_HANDSHAKE or major != 3 or length == 0 or length > 16384 + 2048:
            raise NotTLS("not a TLS handshake record")
        if len(data) < offset + 5 + length:
            raise _NeedMore
        message += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if needed is None and len(message) >= 4:
            if message[0] != HANDSHAKE_CLIENT_HELLO:
                raise NotTLS("the first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(message[1:4])
            if needed > MAX_CLIENT_HELLO:
                raise NotTLS(f"ClientHello of {needed} bytes is too large")
    return bytes(message[4:needed])


def _server_name(hello: bytes) -> str | None:
    reader = _Reader(hello)
    reader.skip(2 + 32)                      # legacy version, random
    reader.skip(reader.int(1))               # session id
    reader.skip(reader.int(2))               # cipher suites
    reader.skip(reader.int(1))               # compression methods
    if reader.remaining() == 0:
        return None                          # no extensions at all
    extensions = _Reader(reader.take(reader.int(2)))
    while extensions.remaining():
        kind = extensions.int(2)
        body = extensions.take(extensions.int(2))
        if kind != EXTENSION_SERVER_NAME:
            continue
        names = _Reader(body)
        names = _Reader(names.take(names.int(2)))
        while names.remaining():
            name_type = names.int(1)
            name = names.take(names.int(2))
            if name_type == NAME_TYPE_HOST:
                try:
                    return name.decode("ascii").lower().rstrip(".")
                except UnicodeDecodeError:
                    raise NotTLS("server name is not ASCII") from None
        return None
    return None


class _Reader:
    __slots__ = ("data", "offset")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, length: int) -> bytes:
        if length > self.remaining():
            raise NotTLS("truncated ClientHello")
        start = self.offset
        self.offset += length
        return self.data[start:self.offset]

    def skip(self, length: int) -> None:
        self.take(length)

    def int(self, size: int) -> int:
        return int.from_bytes(self.take(size))


def route(routes: dict[str, str], server_name: str | None, default: str = "default") -> str:
    """The backend group for a server name: an exact route, then a `*.parent` one, then `default`."""
    if server_name:
        group = routes.get(server_name)
        if group is not None:
            return group
        _, dot, parent = server_name.partition(".")
        if dot:
            group = routes.get("*." + parent)
            if group is not None:
                return group
    return default
