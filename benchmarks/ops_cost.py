"""What metrics and the access log cost per relayed connection: CPU microseconds (user + system, from
/proc/PID/stat) of one fastlb worker per connection, with operations off and on, in one run, alternating
A B A B so drift hits both alike.

    python3 benchmarks/ops_cost.py [--connections 3000] [--rounds 4]

A: `fastlb --mode tcp --bind ... --backend ...` (no admin, no access log: no observer at all)
metrics: the same with `--admin PORT` (counters, connect histogram, TCP_INFO at close)
metrics+log: and `--access-log FILE` (one text entry per connection, formatted and written in batches)
Each connection: connect, read the backend's name line, send a line, read its echo, close.

First, in-process and much less noisy: the CPU of what a worker adds when a connection closes
(`Observer.tcp_closed` with two TCP_INFO reads on real uvloop sockets, the connect histogram, and the
access-log entry with its share of formatting and writing), over 50,000 calls.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from procs import Processes, free_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_connections(port: int, count: int) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(b"ping\n")
            reader.readline()


def in_process_cost(calls: int = 50000) -> None:
    import asyncio
    import types

    import uvloop

    sys.path.insert(0, str(REPO))
    from fastlb.config import build, parse_backend, parse_bind
    from fastlb.observe import AccessLog, Observer
    from fastlb.pool import BackendPool

    async def run() -> None:
        loop = asyncio.get_running_loop()
        accepted = []

        class Accept(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                accepted.append(transport)

        server = await loop.create_server(Accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for sock in clients:
            sock.sendall(b"ping\n")
        while len(accepted) < 2:
            await asyncio.sleep(0.01)
        config = build({"binds": [parse_bind("127.0.0.1:1")], "backends": [parse_backend("127.0.0.1:2")]}, {})
        backend = BackendPool(config, loop, 100).primaries[0]
        client = types.SimpleNamespace(backend=backend, transport=accepted[0], peer=accepted[1], eofs=3,
                                       started=time.monotonic(), connect_seconds=0.0003,
                                       source=("127.0.0.1", 5555))
        for name, observer in (("metrics", Observer(loop)),
                               ("metrics+log", Observer(loop, access_log=AccessLog(loop, os.devnull, "text")))):
            start = time.process_time()
            for _ in range(calls):
                observer.tcp_closed(client, None)
                backend.traffic.connect_time.observe(0.0004)
            if observer.access_log is not None:
                observer.access_log.flush()
            print(f"in-process, {name:12}: {(time.process_time() - start) / calls * 1e6:5.2f} us CPU per connection")
        server.close()
        for sock in clients:
            sock.close()

    uvloop.run(run())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    in_process_cost()
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="fastlb-ops-cost-")
    try:
        _, ports = procs.backends("a", "b")
        backends = [arg for p in ports.values() for arg in ("--backend", f"127.0.0.1:{p}")]
        targets = {}
        for name, extra in (("off", []), ("metrics", ["--admin", str(free_port())]),
                            ("metrics+log", ["--admin", str(free_port()), "--access-log",
                                             os.path.join(tmp, "access.log")])):
            port = free_port()
            proc = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", *backends, *extra)
            targets[name] = (port, proc.pid)
        results: dict[str, list[float]] = {name: [] for name in targets}
        for round_number in range(args.rounds):
            order = list(targets.items())
            if round_number % 2:
                order.reverse()            # no target always runs first, or always right after another
            for name, (port, pid) in order:
                run_connections(port, 200)            # warm up
                before = cpu_seconds(pid)
                run_connections(port, args.connections)
                # The access log flushes on a timer and closes are counted after the client's: let the
                # worker finish what this round caused before reading its clock.
                time.sleep(0.7)
                results[name].append((cpu_seconds(pid) - before) / args.connections * 1e6)
        for name, values in results.items():
            print(f"{name:12}: {statistics.median(values):6.1f} us CPU per connection "
                  f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")
        off = statistics.median(results["off"])
        for name in ("metrics", "metrics+log"):
            on = statistics.median(results[name])
            print(f"cost of {name}: {on - off:+.1f} us per connection ({(on / off - 1) * 100:+.1f} %)")
        lines = sum(1 for _ in open(os.path.join(tmp, "access.log")))
        print(f"access log lines written: {lines}")
    finally:
        procs.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
