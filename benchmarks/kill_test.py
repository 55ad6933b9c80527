"""Kill test: a backend is SIGKILLed under load and restarted; how many client requests fail?

    python benchmarks/kill_test.py [--mode tcp,http] [--targets fastlb,haproxy] [--rounds 2] [--duration 12]

For each mode, each round and each target (alternated: fastlb, haproxy, fastlb, haproxy, ...), on
127.0.0.1: three backends (one process each), the balancer in front of them with the same health
settings (checks every 200 ms, rise 2, fall 2, 2 retries with redispatch, 500 ms connect timeout), and
one client loop. At `--kill-at` seconds backend b is SIGKILLed, at `--restart-at` it is restarted on its
port; the loop runs `--duration` seconds in all. Compared: the client's failures, and how long after
its restart b answers again.

A mode is one entry of MODES: the balancers' settings for it, the backend, and the client loop.
- `tcp`: echo backends (tests/backend_server.py); new connection after new connection (read the
  backend's name, send a line, read its echo). The kill happens between two connections: a connection
  in flight on a killed backend is lost whatever the balancer does, so what counts is failed *new*
  connections. Both with TCP checks.
- `http`: HTTP backends (tests/http_backend.py); keep-alive GETs on one client connection, nothing
  held back at the kill: a GET in flight on b must be re-sent elsewhere by the balancer. fastlb:
  `--mode http --check http --retry-on all-retryable-errors` (passive outlier detection is on by
  default); HAProxy: `mode http`, `option httpchk`, `observe layer7`, `retry-on all-retryable-errors`.

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
from http_client import KeepAliveLoad  # noqa: E402
from procs import (BACKEND_SERVER, HTTP_BACKEND, ConnectionLoad, Processes, free_port, port_open,  # noqa: E402
                   wait_until)

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


def fastlb_http(port: int, backends: list[int], tmp: str) -> list[str]:
    args = [sys.executable, "-m", "fastlb", "--mode", "http", "--bind", f"127.0.0.1:{port}",
            "--check", "http", "--check-path", "/health", "--check-interval", f"{CHECK_INTERVAL_MS}ms",
            "--rise", str(RISE), "--fall", str(FALL), "--retries", str(RETRIES),
            "--connect-timeout", f"{CONNECT_TIMEOUT_MS}ms", "--retry-on", "all-retryable-errors"]
    for backend in backends:
        args += ["--backend", f"127.0.0.1:{backend}"]
    return args


def haproxy_http(port: int, backends: list[int], tmp: str) -> list[str]:
    servers = "".join(f"    server s{i} 127.0.0.1:{b} check\n" for i, b in enumerate(backends))
    config = textwrap.dedent(f"""\
        global
            nbthread 1
        defaults
            mode http
            timeout connect {CONNECT_TIMEOUT_MS}ms
            timeout client 30s
            timeout server 30s
            timeout http-keep-alive 30s
            retries {RETRIES}
            option redispatch 1
            retry-on all-retryable-errors
        frontend fe
            bind 127.0.0.1:{port}
            default_backend be
        backend be
            balance roundrobin
            option httpchk GET /health
            http-check expect status 200
            default-server inter {CHECK_INTERVAL_MS}ms rise {RISE} fall {FALL} observe layer7
        """) + servers
    path = os.path.join(tmp, f"haproxy-{port}.cfg")
    with open(path, "w") as f:
        f.write(config)
    return [which("haproxy") or "haproxy", "-db", "-f", path]


@dataclass
class Mode:
    targets: dict            # target name -> command builder(port, backend ports, tmp dir)
    ready_pattern: dict      # target name -> a log line that says it serves (None: wait for the port)
    backend: str             # the backend script: `python SCRIPT NAME:PORT`, prints `ready`
    load: type               # the client loop: Load(port, max_seconds=...), .start(), .stop(), .answers


MODES = {
    "tcp": Mode(targets={"fastlb": fastlb_tcp, "haproxy": haproxy_tcp},
                ready_pattern={"fastlb": r"listening on", "haproxy": None},
                backend=BACKEND_SERVER, load=ConnectionLoad),
    "http": Mode(targets={"fastlb": fastlb_http, "haproxy": haproxy_http},
                 ready_pattern={"fastlb": r"listening on", "haproxy": None},
                 backend=HTTP_BACKEND, load=KeepAliveLoad),
}


@dataclass
class Result:
    target: str
    mode: str
    round: int
    attempts: int = 0          # tcp: connections; http: requests
    failed: int = 0
    back_after_restart_s: float | None = None
    failures: list = field(default_factory=list)


def run_once(target: str, mode: str, round_number: int, args, tmp: str) -> Result:
    procs = Processes()
    result = Result(target, mode, round_number)
    spec = MODES[mode]
    try:
        backends, ports = {}, {}
        for name in "abc":
            ports[name] = free_port()
            backends[name] = procs.start([sys.executable, spec.backend, f"{name}:{ports[name]}"], name)
            backends[name].wait_for_line(r"^ready$")
        port = free_port()
        balancer = procs.start(spec.targets[target](port, list(ports.values()), tmp), target)
        pattern = spec.ready_pattern[target]
        if pattern:
            balancer.wait_for_line(pattern)
        wait_until(lambda: port_open(port), what=f"{target} listening")
        load = spec.load(port, max_seconds=args.duration + 30).start()
        started = time.monotonic()
        try:
            wait_until(lambda: time.monotonic() - started >= args.kill_at, timeout=args.duration + 5,
                       what="kill time", interval=0.05)
            if hasattr(load, "between_connections"):     # tcp: a connection in flight cannot be saved
                with load.between_connections():
                    backends["b"].kill()
            else:                                          # http: requests in flight are re-sent
                backends["b"].kill()
            wait_until(lambda: time.monotonic() - started >= args.restart_at, timeout=args.duration + 5,
                       what="restart time", interval=0.05)
            backends["b"] = procs.start([sys.executable, spec.backend, f"b:{ports['b']}"], "b")
            backends["b"].wait_for_line(r"^ready$")
            restarted = time.monotonic()
            wait_until(lambda: time.monotonic() - started >= args.duration, timeout=args.duration + 5,
                       what="end of the run", interval=0.05)
        finally:
            load.stop()
        back = load.first_answer_by("b", since=restarted)
        result.attempts = len(load.answers) + len(load.failures)
        result.failed = len(load.failures)
        result.back_after_restart_s = round(back - restarted, 3) if back else None
        result.failures = [f"{t - started:.3f}s {what}" for t, what in load.failures[:10]]
    finally:
        procs.cleanup()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="tcp,http", help="comma-separated modes (default tcp,http)")
    parser.add_argument("--targets", default="fastlb,haproxy", help="comma-separated (default both)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, targets alternated (default 2)")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of load per run (default 12)")
    parser.add_argument("--kill-at", type=float, default=3.0)
    parser.add_argument("--restart-at", type=float, default=7.0)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"unknown mode in {args.mode!r}; known: {', '.join(MODES)}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for mode in modes:
        unknown = [t for t in targets if t not in MODES[mode].targets]
        if unknown:
            parser.error(f"unknown target(s) {unknown} in mode {mode}; known: {sorted(MODES[mode].targets)}")
    if "haproxy" in targets and not which("haproxy"):
        parser.error("haproxy is not installed (apt-get install haproxy)")
    if not args.kill_at < args.restart_at < args.duration:
        parser.error("need --kill-at < --restart-at < --duration")

    def stop(signum, frame):
        raise KeyboardInterrupt           # unwinds through every `finally`, which kills what was started
    signal.signal(signal.SIGTERM, stop)

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="fastlb-kill-") as tmp:
        for mode in modes:
            for round_number in range(1, args.rounds + 1):
                for target in targets:
                    print(f"round {round_number}: {target} ({mode}) ...", file=sys.stderr, flush=True)
                    results.append(run_once(target, mode, round_number, args, tmp))

    rows = [[r.target, r.mode, str(r.round), str(r.attempts), str(r.failed),
             f"{r.back_after_restart_s:.2f}" if r.back_after_restart_s is not None else "never"]
            for r in results]
    print(f"kill test: b SIGKILLed at {args.kill_at:g}s, restarted at {args.restart_at:g}s, "
          f"{args.duration:g}s of load (tcp: new connections, http: keep-alive GETs); checks every "
          f"{CHECK_INTERVAL_MS}ms, rise {RISE}, fall {FALL}, retries {RETRIES} with redispatch")
    print(render_table(["target", "mode", "round", "connections/requests", "failed",
                        "b back after restart (s)"],
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
