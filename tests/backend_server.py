"""A test backend: `python tests/backend_server.py [--show-peer] NAME:[HOST:]PORT[@CERT] ...`.

With @CERT (a PEM file holding certificate and key) that port speaks TLS. With --show-peer the
greeting is `NAME PEER_IP`, which tells which balancer node connected.

Each connection gets `NAME\n` first, then an echo of everything it sends; when the client half-closes,
the echo is flushed and the backend half-closes too. One process serves every NAME:PORT given and prints
`ready` once all listen.
"""
import asyncio
import ssl
import sys


SHOW_PEER = "--show-peer" in sys.argv   # greet with `NAME PEER_IP`: which balancer node connected


class Echo(asyncio.Protocol):
    def __init__(self, name: bytes) -> None:
        self.name = name
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        greeting = self.name
        if SHOW_PEER:
            greeting += b" " + transport.get_extra_info("peername")[0].encode()
        transport.write(greeting + b"\n")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        if not self.transport.can_write_eof():
            return False             # TLS: no half-close, the transport closes
        self.transport.write_eof()
        return True


async def main(specs: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in specs:
        spec, _, cert = spec.partition("@")
        name, _, address = spec.partition(":")
        host, _, port = address.rpartition(":")
        context = None
        if cert:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert)
        servers.append(await loop.create_server(lambda name=name: Echo(name.encode()), host or "127.0.0.1",
                                                int(port), reuse_address=True, ssl=context))
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main([arg for arg in sys.argv[1:] if arg != "--show-peer"]))
    except KeyboardInterrupt:
        pass
