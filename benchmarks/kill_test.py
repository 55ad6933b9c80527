"""Kill test: a backend is SIGKILLed under load and restarted; how many client requests fail?

    python benchmarks/kill_test.py [--mode tcp] [--targets fastlb,haproxy] [--rounds 2] [--duration 12]

For each round and each target (alternated: fastlb, haproxy, fastlb, haproxy, ...), on 127.0.0.1:
three echo backends (tests/backend_server.py, one process each), the balancer in front of them with the
same health settings (checks every 200 ms, rise 2, fall 2, 2 retries with redispatch, 500 ms connect
timeout), and one client loop making new connection after new connection (read the backend's name,
send a line, read its echo). At `--kill-at` seconds backend b is SIGKILLed, at `--restart-at` it is
restarted on its port; the loop runs `--duration` seconds in all. The kill happens between two
connections: a connection in flight on a killed backend is lost whatever the balancer does, so what is
compared is failed *new* connections, and how long after its restart b answers again.

Modes: `tcp` now. A mode is one entry of MODES (the balancers' settings for it, and the client's
exchange); `http` (keep-alive GETs, HAProxy `mode http` with `option httpchk` and `observe layer7`)
is added there once fastlb's HTTP mode exists.

Every process is started in its own session and killed by PID (process group) at the end, on an
error, or on SIGTERM/SIGINT. Results are printed as a table and written to
benchmarks/results/kill-<stamp>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import render_table, which  # noqa: E402
from procs import BACKEND_SERVER, ConnectionLoad, Processes, free_port, wait_until  # noqa: E402

CHECK_INTERVAL_MS = 200
RISE = 2
FALL = 2
RETRIES = 2
CONNECT_TIMEOUT_MS = 500


def fastlb_tcp(port: int, backends: list[int], tmp: str) -> list[str]:
    args = [sys.executable, "-m", "fastlb", "--mode", "tcp", "--bind", f"127.0.0.1:{port}",
            "--check", "tcp", "--check-interval", f"{CHECK_INTERVAL_MS}ms", "--rise", str(RISE),
            "--fall", str(FALL), "--retries", str(RETRIES), "--connect-timeout", f"{CONNECT_TIMEOUT_MS}ms"]
    for backend in backends:
        args += ["--backend", f"127.0.0.1:{backend}"]
    return args


def haproxy_tcp(port: int, backends: list[int], tmp: str) -> list[str]:
    servers = "".join(f"    server s{i} 127.0.0.1:{b} check\n" for i, b in enumerate(backends))
    config = textwrap.dedent(f"""\
        global
            nbthread 1
        defaults
            mode tcp
            timeout connect {CONNECT_TIMEOUT_MS}ms
            timeout client 30s
            timeout server 30s
            retries {RETRIES}
            option redispatch 1
        frontend fe
            bind 127.0.0.1:{port}
            default_backend be
        backend be
            balance roundrobin
            default-server inter {CHECK_INTERVAL_MS}ms rise {RISE} fall {FALL}
        """) + servers
    path = os.path.join(tmp, f"haproxy-{port}.cfg")
    with open(path, "w") as f:
        f.write(config)
    return [which("haproxy") or "haproxy", "-db", "-f", path]


@dataclass
class Mode:
    targets: dict            # target name -> command builder(port, backend ports, tmp dir)
    ready_pattern: dict      # target name -> a log line that says it serves (None: wait for the port)


MODES = {
    "tcp": Mode(targets={"fastlb": fastlb_tcp, "haproxy": haproxy_tcp},
                ready_pattern={"fastlb": r"listening on", "haproxy": None}),
}


@dataclass
class Result:
    target: str
    mode: str
    round: int
    connections: int = 0
    failed: int = 0
    back_after_restart_s: float | None = None
    failures: list = field(default_factory=list)


def run_once(target: str, mode: str, round_number: int, args, tmp: str) -> Result:
    procs = Processes()
    result = Result(target, mode, round_number)
    try:
        backends, ports = {}, {}
        for name in "abc":
            ports[name] = free_port()
            backends[name] = procs.start([sys.executable, BACKEND_SERVER, f"{name}:{ports[name]}"], name)
            backends[name].wait_for_line(r"^ready$")
        port = free_port()
        balancer = procs.start(MODES[mode].targets[target](port, list(ports.values()), tmp), target)
        pattern = MODES[mode].ready_pattern[target]
        if pattern:
            balancer.wait_for_line(pattern)
        from procs import port_open
        wait_until(lambda: port_open(port), what=f"{target} listening")
        load = ConnectionLoad(port, max_seconds=args.duration + 30).start()
        started = time.monotonic()
        try:
            wait_until(lambda: time.monotonic() - started >= args.kill_at, timeout=args.duration + 5,
                       what="kill time", interval=0.05)
            with load.between_connections():
                backends["b"].kill()
            wait_until(lambda: time.monotonic() - started >= args.restart_at, timeout=args.duration + 5,
                       what="restart time", interval=0.05)
            backends["b"] = procs.start([sys.executable, BACKEND_SERVER, f"b:{ports['b']}"], "b")
            backends["b"].wait_for_line(r"^ready$")
            restarted = time.monotonic()
            wait_until(lambda: time.monotonic() - started >= args.duration, timeout=args.duration + 5,
                       what="end of the run", interval=0.05)
        finally:
            load.stop()
        back = load.first_answer_by("b", since=restarted)
        result.connections = len(load.answers) + len(load.failures)
        result.failed = len(load.failures)
        result.back_after_restart_s = round(back - restarted, 3) if back else None
        result.failures = [f"{t - started:.3f}s {what}" for t, what in load.failures[:10]]
    finally:
        procs.cleanup()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="tcp")
    parser.add_argument("--targets", default="fastlb,haproxy", help="comma-separated (default both)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, targets alternated (default 2)")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per run (default 12)")
    parser.add_argument("--kill-at", type=float, default=3.0)
    parser.add_argument("--restart-at", type=float, default=7.0)
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in MODES[args.mode].targets]
    if unknown:
        parser.error(f"unknown target(s) {unknown} in mode {args.mode}; known: {sorted(MODES[args.mode].targets)}")
    if "haproxy" in targets and not which("haproxy"):
        parser.error("haproxy is not installed (apt-get install haproxy)")
    if not args.kill_at < args.restart_at < args.duration:
        parser.error("need --kill-at < --restart-at < --duration")

    def stop(signum, frame):
        raise KeyboardInterrupt           # unwinds through every `finally`, which kills what was started
    signal.signal(signal.SIGTERM, stop)

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fastlb-kill-") as tmp:
        for round_number in range(1, args.rounds + 1):
            for target in targets:
                print(f"round {round_number}: {target} ({args.mode}) ...", file=sys.stderr, flush=True)
                results.append(run_once(target, args.mode, round_number, args, tmp))

    rows = [[r.target, r.mode, str(r.round), str(r.connections), str(r.failed),
             f"{r.back_after_restart_s:.2f}" if r.back_after_restart_s is not None else "never"]
            for r in results]
    print(f"kill test: b SIGKILLed at {args.kill_at:g}s, restarted at {args.restart_at:g}s, "
          f"{args.duration:g}s of new connections; checks every {CHECK_INTERVAL_MS}ms, rise {RISE}, "
          f"fall {FALL}, retries {RETRIES} with redispatch")
    print(render_table(["target", "mode", "round", "connections", "failed", "b back after restart (s)"],
                       rows, [False, False, True, True, True, True]))
    for r in results:
        for failure in r.failures:
            print(f"  {r.target} round {r.round}: {failure}")
    os.makedirs(REPO / "benchmarks" / "results", exist_ok=True)
    out = REPO / "benchmarks" / "results" / f"kill-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "results": [asdict(r) for r in results]}, indent=2))
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
