"""Backends for health tests: `python tests/health_backend.py KIND:NAME:PORT [...]`.

KIND is
- `http200` / `http500`: answers every HTTP request with that status, body `NAME\\n`, and closes;
- `blackhole`: accepts connections and never sends a byte.
Prints `ready` once every port listens.
"""
import asyncio
import sys


class HttpAnswer(asyncio.Protocol):
    def __init__(self, name: bytes, status: int) -> None:
        self.name = name
        self.status = status
        self.transport = None
        self.received = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            body = self.name + b"\n"
            reason = b"OK" if self.status == 200 else b"Internal Server Error"
            self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (self.status, reason, len(body), body))
            self.transport.close()


class BlackHole(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport     # held open, never answered

    def data_received(self, data: bytes) -> None:
        pass


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in specs:
        kind, name, port = spec.split(":")
        if kind == "blackhole":
            factory = BlackHole
        else:
            status = int(kind.removeprefix("http"))
            factory = lambda name=name, status=status: HttpAnswer(name.encode(), status)  # noqa: E731
        servers.append(await loop.create_server(factory, "127.0.0.1", int(port), reuse_address=True))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except KeyboardInterrupt:
        pass
