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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], cpu: int | None = None, env: dict | None = None,
              **kwargs) -> subprocess.Popen:
        if cpu is not None and shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
            args = ["taskset", "-c", str(cpu), *args]
        env = dict(env or os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, **kwargs)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


def start_backends(procs: Processes, count: int) -> list[int]:
    ports = [free_port() for _ in range(count)]
    proc = procs.start([sys.executable, str(HERE / "payment_app.py"), *(f"app{i + 1}:{p}" for i, p in enumerate(ports))],
                       cpu=0, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("payment_app did not start")
    return ports


def start_fastlb(procs: Processes, port: int, backends: list[int], workdir: Path) -> subprocess.Popen:
    secret = workdir / "cookie-secret"
    secret.write_text(os.urandom(32).hex())
    args = [sys.executable, "-m", "fastlb", "--mode", "http", "--bind", f"127.0.0.1:{port}",
            "--sticky", "cookie:SRV", "--cookie-secret-file", str(secret), "--log-level", "warning"]
    for backend in backends:
        args += ["--backend", f"127.0.0.1:{backend}"]
    return procs.start(args, cpu=1)


def start_haproxy(procs: Processes, port: int, backends: list[int], workdir: Path) -> subprocess.Popen:
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
    return procs.start(["haproxy", "-f", str(config), "-db"], cpu=1)


BALANCERS = {"fastlb": start_fastlb, "haproxy": start_haproxy}


def run_locust(procs: Processes, name: str, port: int, time_limit: float, workdir: Path) -> dict:
    summary = workdir / f"{name}.json"
    env = dict(os.environ, TIME_LIMIT=str(time_limit), LOADTEST_SUMMARY=str(summary))
    args = [sys.executable, "-m", "locust", "-f", f"{HERE / 'locustfile.py'},{HERE / 'step_shape.py'}",
            "--headless", "--host", f"http://127.0.0.1:{port}", "--only-summary",
            "--csv", str(RESULTS / name), "--html", str(RESULTS / f"{name}.html")]
    proc = procs.start(args, cpu=0, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        output, _ = proc.communicate(timeout=time_limit + 60)
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
    procs = Processes()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fastlb-loadtest-") as tmp:
            workdir = Path(tmp)
            backends = start_backends(procs, options.backends)
            for name in targets:
                port = free_port()
                balancer = BALANCERS[name](procs, port, backends, workdir)
                wait_port(port, balancer)
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
