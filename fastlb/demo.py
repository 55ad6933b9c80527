"""`fastlb demo`: a working balancer in front of demo backends it starts itself, in one process.

The demo backends are tiny HTTP/1.0 servers (one response per connection) on ephemeral ports of
127.0.0.1; fastlb proxies them in http mode (the default), so `curl` shows the round robin: each request names the
backend that answered. Ctrl-C (or SIGTERM) drains and stops everything.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from fastlb.config import BackendSpec, BindSpec, Config, parse_address
from fastlb.server import StartupError, Worker, effective_limits, setup_logging

DEFAULT_PORT = 8080

log = logging.getLogger("fastlb")


class DemoBackend(asyncio.Protocol):
    """Answers the first request of a connection with a short text naming this backend, then closes."""

    def __init__(self, number: int, port: int) -> None:
        self.body = f"hello from demo backend {number} (127.0.0.1:{port})\n".encode()
        self.transport = None
        self.received = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received or b"\n\n" in self.received or len(self.received) > 65536:
            head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(self.body)}\r\n"
                    f"Connection: close\r\n\r\n").encode()
            self.transport.write(head + self.body)
            self.transport.close()


async def _run(host: str, port: int, count: int, algorithm: str) -> int:
    loop = asyncio.get_running_loop()
    servers, backends = [], []
    for number in range(1, count + 1):
        # Bind first, then learn the port, so the protocol can name it.
        holder: dict[str, int] = {}
        server = await loop.create_server(lambda n=number, h=holder: DemoBackend(n, h["port"]),
                                          "127.0.0.1", 0)
        holder["port"] = server.sockets[0].getsockname()[1]
        servers.append(server)
        backends.append(BackendSpec("127.0.0.1", holder["port"]))
    config = Config(binds=[BindSpec(host, port)], backends=backends, algorithm=algorithm,
                    grace_period=2.0)
    maxconn, queue_size = effective_limits(config)
    worker = Worker(config.replace(queue_size=queue_size), loop, maxconn)
    try:
        await worker.start()
    except StartupError as exc:
        log.error("%s (try: fastlb demo --port OTHER)", exc)
        for server in servers:
            server.close()
        return 1
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}/"
    print(f"fastlb demo: balancing {config.binds[0].address} over {count} demo backends "
          f"({', '.join(b.address for b in backends)}), algorithm {algorithm}.\n"
          f"Try:  curl {url}        (run it a few times: the answering backend changes)\n"
          f"      for i in 1 2 3 4 5 6; do curl -s {url}; done\n"
          f"Press Ctrl-C to stop.", flush=True)
    stop = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await stop
    print("fastlb demo: stopping", flush=True)
    await worker.drain(config.grace_period)
    for server in servers:
        server.close()
        await server.wait_closed()
    print("fastlb demo: stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    from fastlb import ALGORITHMS

    parser = argparse.ArgumentParser(prog="fastlb demo", description=(
        "Start fastlb in front of demo HTTP backends it runs itself, and print what to curl."))
    parser.add_argument("--bind", default=None, metavar="HOST:PORT",
                        help=f"where the demo balancer listens (default 127.0.0.1:{DEFAULT_PORT})")
    parser.add_argument("--port", type=int, default=None, help="shorthand for --bind 127.0.0.1:PORT")
    parser.add_argument("--backends", type=int, default=3, choices=range(1, 33), metavar="N",
                        help="number of demo backends (default 3)")
    parser.add_argument("--algorithm", default="roundrobin", choices=ALGORITHMS, metavar="NAME",
                        help="balancing algorithm (default roundrobin)")
    args = parser.parse_args(argv)
    try:
        host, port = parse_address(args.bind) if args.bind else ("127.0.0.1", args.port or DEFAULT_PORT)
    except ValueError as exc:
        parser.error(f"argument --bind: {exc}")
    setup_logging("warning", 0)
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(_run(host, port, args.backends, args.algorithm))
    finally:
        loop.close()
