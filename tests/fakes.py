"""Stand-ins for the network in in-process tests (uvicorn's style): a transport that records what a
protocol writes, and a fake `loop.create_connection` whose answer per port the test sets."""
import asyncio

HANG = "hang"          # FakeNetwork answer: a connect that never completes


class FakeTransport:
    """What fastlb's protocols call on an asyncio transport; `data` is everything written."""

    def __init__(self, peer=("127.0.0.1", 5555)):
        self.peer = peer
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.eof = False
        self.reading = True

    def write(self, data):
        assert not self.closed, "write after close"
        self.data += data

    def write_eof(self):
        self.eof = True

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def is_closing(self):
        return self.closed

    def is_reading(self):
        return self.reading

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def get_write_buffer_size(self):
        return 0

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def take(self) -> bytes:
        """What was written since the last take."""
        data, self.data = bytes(self.data), bytearray()
        return data


class FakeNetwork:
    """Replaces loop.create_connection: a connect to a port accepts (a FakeTransport, listed in
    `connections` with its protocol), raises the exception `answers` holds for the port, or hangs
    (HANG). Every attempt's port is listed in `attempts`."""

    def __init__(self, loop):
        self.answers = {}
        self.attempts = []
        self.connections = []
        loop.create_connection = self.create_connection

    async def create_connection(self, protocol_factory, host, port, **tls):
        self.attempts.append(port)
        answer = self.answers.get(port)
        if answer == HANG:
            await asyncio.Event().wait()
        if isinstance(answer, BaseException):
            raise answer
        protocol = protocol_factory()
        transport = FakeTransport(peer=(host, port))
        protocol.connection_made(transport)
        self.connections.append((transport, protocol))
        return transport, protocol
