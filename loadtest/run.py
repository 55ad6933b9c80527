"""Find the peak sustainable rate of payment-style traffic through fastlb, and through HAProxy.

    python loadtest/run.py [--targets fastlb,haproxy] [--backends 3] [--time-limit 90]

Starts loadtest/payment_app.py (N backends on 127.0.0.1), then for each target a balancer with
cookie stickiness in front of them (fastlb: --sticky cookie:SRV; HAProxy: cookie SRV insert), and
runs Locust headless with the step shape, bounded by --time-limit. Prints, per target, the peak
step within limits (users, req/s, p50, p99, errors) and why the run stopped; Locust's CSV and HTML
reports go to loadtest/results/. Every process it starts is stopped by PID, also on Ctrl-C.

The balancer is pinned to CPU 1, Locust and the backends to CPU 0 (taskset), as in benchmarks/.
Locust itself (Python, one process) limits the rate it can offer: the figures compare balancers
under the same offered load, they are not either balancer's ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import harness as h  # noqa: E402  (the benchmarks' process registry and port helpers)
RESULTS = HERE / "results"


def start(procs: h.Procs, name: str, cmd: list[str], cpu: str, **kwargs) -> h.Proc:
    """A process pinned to `cpu` that can import fastlb from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(kwargs.pop("env", {}))
    return procs.start(name, cmd, cpu=cpu if (os.cpu_count() or 1) > 1 else None, env=env, cwd=str(REPO),
                       **kwargs)


def start_backends(procs: h.Procs, count: int) -> list[int]:
    ports = h.free_ports(count)
    proc = start(procs, "payment_app", [sys.executable, str(HERE / "payment_app.py"),
                                        *(f"app{i + 1}:{p}" for i, p in enumerate(ports))],
                 cpu="0", stdout=subprocess.PIPE)
    if proc.popen.stdout.readline().strip() != b"ready":
        raise RuntimeError("payment_app did not start")
    return ports


def start_fastlb(procs: h.Procs, port: int, backends: list[int], workdir: Path) -> h.Proc:
    secret = workdir / "cookie-secret"
    secret.write_text(os.urandom(32).hex())
    args = [sys.executable, "-m", "fastlb", "--mode", "http", "--bind", f"127.0.0.1:{port}",
            "--sticky", "cookie:SRV", "--cookie-secret-file", str(secret), "--log-level", "warning"]
    for backend in backends:
        args += ["--backend", f"127.0.0.1:{backend}"]
    return start(procs, "fastlb", args, cpu="1")


def start_haproxy(procs: h.Procs, port: int, backends: list[int], workdir: Path) -> h.Proc:
    servers = "\n".join(f"  server app{i + 1} 127.0.0.1:{p} cookie app{i + 1}" for i, p in enumerate(backends))
    config = workdir / "haproxy.cfg"
    config.write_text(f"""global
  nbthread 1
  maxconn 4000
defaults
  mode http
  option forwardfor
  http-reuse always
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend payment
  bind 127.0.0.1:{port}
  default_backend apps
backend apps
  balance roundrobin
  cookie SRV insert indirect nocache
{servers}
""")
    return start(procs, "haproxy", ["haproxy", "-f", str(config), "-db"], cpu="1")


BALANCERS = {"fastlb": start_fastlb, "haproxy": start_haproxy}


def run_locust(procs: h.Procs, name: str, port: int, time_limit: float, workdir: Path) -> dict:
    summary = workdir / f"{name}.json"
    env = {"TIME_LIMIT": str(time_limit), "LOADTEST_SUMMARY": str(summary)}
    args = [sys.executable, "-m", "locust", "-f", f"{HERE / 'locustfile.py'},{HERE / 'step_shape.py'}",
            "--headless", "--host", f"http://127.0.0.1:{port}", "--only-summary",
            "--csv", str(RESULTS / name), "--html", str(RESULTS / f"{name}.html")]
    proc = start(procs, f"locust-{name}", args, cpu="0", stdout=subprocess.PIPE, env=env)
    try:
        output = proc.popen.communicate(timeout=time_limit + 60)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise RuntimeError(f"locust against {name} did not stop within {time_limit + 60:.0f}s")
    totals = re.search(r"LOADTEST totals: (.*)", output)
    result = json.loads(summary.read_text()) if summary.exists() else {"peak": None, "stopped": "no summary"}
    result["totals"] = totals.group(1) if totals else "?"
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="fastlb,haproxy")
    parser.add_argument("--backends", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=90.0, help="seconds per target (default 90)")
    options = parser.parse_args()
    targets = [t for t in options.targets.split(",") if t]
    unknown = [t for t in targets if t not in BALANCERS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(BALANCERS)}")
    RESULTS.mkdir(exist_ok=True)
    procs = h.Procs()        # stops everything by PID at exit, on errors and on signals
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fastlb-loadtest-") as tmp:
            workdir = Path(tmp)
            backends = start_backends(procs, options.backends)
            for name in targets:
                port = h.free_port()
                balancer = BALANCERS[name](procs, port, backends, workdir)
                h.wait_listening(port, balancer, timeout=15)
                print(f"{name}: locust step run (at most {options.time_limit:g}s) ...", flush=True)
                results[name] = run_locust(procs, name, port, options.time_limit, workdir)
                procs.stop(balancer)
    finally:
        procs.stop_all()
    print(f"\n{'target':<10} {'users':>6} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>7}  stopped because")
    for name, result in results.items():
        peak = result["peak"] or {}
        print(f"{name:<10} {peak.get('users', '-'):>6} {peak.get('rps', '-'):>8} {peak.get('p50_ms', '-'):>7} "
              f"{peak.get('p99_ms', '-'):>7} {peak.get('errors', '-'):>7}  {result['stopped']}")
        print(f"{'':<10} totals: {result['totals']}")
    with open(RESULTS / f"peak-{time.strftime('%Y%m%d-%H%M%S')}.json", "w") as out:
        json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
