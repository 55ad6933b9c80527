"""What admin changes cost as the number of backends grows (issue 20, item 13): the time of one add
through the admin API, and the workers' p99 latency under load while adds run, at 10, 1,000 and 10,000
backends; also the time of one /metrics scrape and, with --fill api, of adding them all through the API.

    python3 benchmarks/admin_scale.py [--sizes 10,1000,10000] [--seconds 5] [--fill config|api]
                                      [--repo PATH]

Setup per size N: two real HTTP backends (tests/http_backend.py) that take the traffic, and N-2 more
backends with weight 0 (listed, counted, snapshotted and changed like any other, never picked: N real
listeners would need more file descriptors than the box allows). fastlb runs with `--workers 2`, an admin
bind and a token; the N backends come from the config file (`--fill config`, the default: works on any
fastlb version, for a before/after comparison) or are added one by one through the API (`--fill api`).

Then, for `--seconds`: `wrk -t1 -c8` GETs through fastlb while this script adds and removes a probe
backend through the API about ten times a second; printed: the median time of one add (POST /api/backends until the
201, which comes once every worker applied it), the p99 (and p50) wrk measured, the same p99 without
admin traffic, and the time of one GET /metrics. `--repo PATH` runs the fastlb of another checkout
(built in place) instead of this one: the "before" column. The box is shared and noisy: compare runs
made back to back, and read ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import WRK_DONE_LUA, parse_wrk_output, which  # noqa: E402
from procs import Processes, free_port, port_open, wait_until  # noqa: E402

TOKEN = "admin-scale-benchmark-token-0123"
REAL = ("a", "b")
CHURN_PAUSE = 0.05        # between two add+remove pairs: an operator's script, not a flood of the admin bind


def bulk_address(i: int) -> str:
    """The i-th weight-0 backend: distinct loopback addresses, nothing listens (never picked)."""
    return f"127.{10 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}:9"


class Admin:
    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body=None, timeout: float = 60.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=json.dumps(body) if body is not None else None,
                               headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def add(self, address: str, weight: int) -> float:
        started = time.perf_counter()
        status, data = self.call("POST", "/api/backends", {"address": address, "weight": weight})
        if status != 201:
            raise RuntimeError(f"add {address}: {status} {data[:200]!r}")
        return time.perf_counter() - started

    def remove(self, address: str) -> None:
        status, data = self.call("DELETE", f"/api/backends/{address}")
        if status != 200:
            raise RuntimeError(f"remove {address}: {status} {data[:200]!r}")


def start_fastlb(procs: Processes, tmp: str, repo: Path, real_ports: dict, bulk: int) -> tuple[int, Admin, object]:
    port, admin_port = free_port(), free_port()
    token = os.path.join(tmp, "token")
    Path(token).write_text(TOKEN + "\n")
    lines = [f'workers = 2\nlog_level = "warning"\n[[bind]]\naddress = "127.0.0.1:{port}"\n']
    for name in REAL:
        lines.append(f'[[backend]]\naddress = "127.0.0.1:{real_ports[name]}"\n')
    lines += [f'[[backend]]\naddress = "{bulk_address(i)}"\nweight = 0\n' for i in range(bulk)]
    config = os.path.join(tmp, "lb.toml")
    Path(config).write_text("".join(lines))
    # Run the chosen checkout's fastlb (its own directory first on the path).
    code = f"import sys, runpy; sys.path.insert(0, {str(repo)!r}); runpy.run_module('fastlb', run_name='__main__')"
    lb = procs.start([sys.executable, "-c", code, "--config", config, "--admin", str(admin_port),
                      "--admin-token-file", token], "fastlb")
    wait_until(lambda: port_open(admin_port) and port_open(port), timeout=120, what="fastlb and its admin bind")
    admin = Admin(admin_port)
    wait_until(lambda: json.loads(admin.call("GET", "/api/backends")[1])["workers"] == 2, timeout=60,
               what="both workers reporting")
    return port, admin, lb


def run_wrk(port: int, seconds: int, tmp: str) -> dict:
    script = os.path.join(tmp, "done.lua")
    Path(script).write_text(WRK_DONE_LUA)
    out = subprocess.run([which("wrk"), "-t1", "-c8", f"-d{seconds}s", "--latency", "--timeout", "5s",
                          "-s", script, f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 60)
    return parse_wrk_output(out.stdout)


def measure(size: int, seconds: int, fill: str, repo: Path) -> dict:
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _, real_ports = procs.http_backends(*REAL)
            bulk = size - len(REAL)
            port, admin, _ = start_fastlb(procs, tmp, repo, real_ports, 0 if fill == "api" else bulk)
            result = {"backends": size}
            if fill == "api":
                started = time.perf_counter()
                for i in range(bulk):
                    admin.add(bulk_address(i), 0)
                result["fill_seconds"] = time.perf_counter() - started
            listed = json.loads(admin.call("GET", "/api/backends")[1])["pools"][0]["backends"]
            assert len(listed) == size, (len(listed), size)
            quiet = run_wrk(port, seconds, tmp)
            adds: list[float] = []
            stop = threading.Event()

            def churn() -> None:
                probe = "127.9.9.9:9"
                while not stop.wait(CHURN_PAUSE):
                    adds.append(admin.add(probe, 0))
                    admin.remove(probe)

            thread = threading.Thread(target=churn, daemon=True)
            thread.start()
            loaded = run_wrk(port, seconds, tmp)
            stop.set()
            thread.join(60)
            started = time.perf_counter()
            status, metrics = admin.call("GET", "/metrics")
            result.update({
                "add_ms": statistics.median(adds) * 1e3 if adds else None, "adds": len(adds),
                "p50_ms": loaded["lat_p50_us"] / 1e3, "p99_ms": loaded["lat_p99_us"] / 1e3,
                "p99_quiet_ms": quiet["lat_p99_us"] / 1e3, "rps": loaded["rps"],
                "errors": sum(loaded["errors"].values()),
                "metrics_s": time.perf_counter() - started, "metrics_mb": len(metrics) / 1e6,
            })
            return result
    finally:
        procs.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,10000")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--fill", choices=("config", "api"), default="config")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose fastlb runs (built in place)")
    args = parser.parse_args()
    print(f"fastlb from {args.repo}, backends from the {args.fill}, wrk -t1 -c8 {args.seconds}s (shared box)")
    print("| backends | one add | adds | p50 | p99 while adding | p99 no adds | req/s | errors | /metrics |"
          + (" fill via API |" if args.fill == "api" else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.fill == "api" else ""))
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.seconds, args.fill, args.repo)
        add = f"{r['add_ms']:.1f} ms" if r["add_ms"] is not None else "-"
        print(f"| {size:,} | {add} | {r['adds']} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
              f"{r['p99_quiet_ms']:.2f} ms | {r['rps']:,.0f} | {r['errors']} | "
              f"{r['metrics_s']:.2f} s ({r['metrics_mb']:.1f} MB) |"
              + (f" {r['fill_seconds']:.1f} s |" if "fill_seconds" in r else ""), flush=True)


if __name__ == "__main__":
    main()
