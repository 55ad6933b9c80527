"""What session persistence costs: proxy CPU per request, sticky rules vs plain round robin.

    python3 benchmarks/sticky_cost.py [--rounds 5] [--duration 5] [--connections 64]
        [--targets roundrobin,cookie] [--baseline-tree DIR]

--baseline-tree DIR also runs every target from another built checkout (e.g. `git archive` of an older
commit, built in place), as NAME@base in the same rounds: before/after figures from one run.

Method (shared/PERF-NOTES.md): two nginx backends and wrk -t1 on CPU 0, each fastlb (one worker) alone on
CPU 1 with taskset; every target started once and kept running, then rounds of A B C ... in one run, each
wrk run sending the same request (with a valid sticky cookie, so the cookie rule verifies and re-sends it
on every request: HAProxy's `insert` without `indirect`). CPU is utime + stime of the proxy from
/proc/PID/stat over the wrk run, divided by the requests wrk completed. The figure reported is the
median over rounds of each target's CPU per request over round robin's in the same round.

Targets: roundrobin (no persistence), cookie (cookie:SRV insert, signed), source (stick table of client
addresses, memory store), learn (learn:JSESSIONID, the request carrying a known session id).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SECRET = b"sticky-cost-benchmark-secret-0123456789"


def http_head(port: int, path: str, headers: str = "") -> bytes:
    with socket.create_connection((h.HOST, port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{headers}Connection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.partition(b"\r\n\r\n")[0]


def set_cookie(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"set-cookie: " + name.lower() + b"="):
            return line.split(b": ", 1)[1].split(b";")[0]
    raise RuntimeError(f"no Set-Cookie {name!r} in:\n{head.decode()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--proxy-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--targets", default="", help="comma-separated subset of the targets (roundrobin first)")
    parser.add_argument("--baseline-tree", default="", help="a built checkout to run each target from too")
    args = parser.parse_args(argv)
    h.ensure_tools(["nginx", "wrk", "taskset"])
    procs = h.Procs()
    tmp = tempfile.mkdtemp(prefix="sticky-cost-")
    try:
        backend_ports = h.free_ports(2)
        conf = os.path.join(tmp, "backends.conf")
        with open(conf, "w") as f:
            f.write(h.backend_nginx_conf(tmp, backend_ports))
        nginx = procs.start("backends", [h.which("nginx"), "-p", tmp, "-e", os.path.join(tmp, "err.log"),
                                         "-c", conf, "-g", "daemon off;"], cpu=args.load_cpu, log_dir=tmp)
        for port in backend_ports:
            h.wait_listening(port, nginx)
        secret_file = os.path.join(tmp, "cookie.key")
        with open(secret_file, "wb") as f:
            f.write(SECRET)
        targets = {"roundrobin": [], "cookie": ["--sticky", "cookie:SRV", "--cookie-secret-file", secret_file],
                   "cookie-indirect": ["--sticky", "cookie:SRV,indirect", "--cookie-secret-file", secret_file],
                   "source": ["--sticky", "source"], "learn": ["--sticky", "learn:JSESSIONID"]}
        if args.targets:
            targets = {name: targets[name] for name in args.targets.split(",")}
        trees = {name: h.REPO_ROOT for name in targets}
        if args.baseline_tree:
            base = os.path.abspath(args.baseline_tree)
            targets = {f"{n}{suffix}": extra for n, extra in targets.items() for suffix in ("", "@base")}
            trees = {name: base if name.endswith("@base") else h.REPO_ROOT for name in targets}
        ports = {}
        running = {}
        for name, extra in targets.items():
            port = ports[name] = h.free_port()
            cmd = [sys.executable, "-m", "fastlb", "--bind", f"{h.HOST}:{port}", "--log-level", "warning",
                   *(a for p in backend_ports for a in ("--backend", f"{h.HOST}:{p}")), *extra]
            running[name] = procs.start(f"fastlb-{name}", cmd, cpu=args.proxy_cpu, log_dir=tmp,
                                        env=dict(os.environ, PYTHONPATH=trees[name]), cwd=trees[name])
            h.wait_listening(port, running[name])
        # The request every target gets: a valid insert cookie, and a session id the learn rule knows.
        cookie = set_cookie(http_head(ports[next(n for n in targets if n.startswith("cookie"))], "/"),
                            b"SRV").decode()
        session = "JSESSIONID=bench-session-1"
        # nginx sets no JSESSIONID, so the learn target's table lookup misses on every request (and an
        # unknown id is not recorded): the same cookie parse and dict lookup a hit costs.
        headers = ["-H", f"Cookie: SRV={cookie}; {session}"]
        results: dict[str, list[dict]] = {name: [] for name in targets}
        for round_number in range(args.rounds):
            for name in targets:
                proc = running[name]
                before = h.tree_cpu(proc.pid)
                cmd = [h.which("taskset"), "-c", args.load_cpu, h.which("wrk"), "-t1", f"-c{args.connections}",
                       f"-d{args.duration:g}s", *headers, f"http://{h.HOST}:{ports[name]}/"]
                wrk = procs.start("wrk", cmd, stdout=-1)
                out, _ = wrk.popen.communicate(timeout=args.duration + 30)
                procs.procs.remove(wrk)
                after = h.tree_cpu(proc.pid)
                parsed = h.parse_wrk_output(out.decode())
                delta = h.cpu_delta(before, after)
                requests = parsed["requests"]
                errors = sum(parsed["errors"].values()) + parsed.get("non_2xx", 0)
                us = (delta["user_s"] + delta["sys_s"]) * 1e6 / max(1, requests)
                results[name].append({"us": us, "user_us": delta["user_s"] * 1e6 / max(1, requests),
                                      "rps": parsed["rps"], "errors": errors})
                print(f"round {round_number + 1} {name:20s} {parsed['rps']:9.0f} req/s "
                      f"{us:6.2f} us CPU/request  errors {errors}", flush=True)
        h.print_cpu_ratio_table(results, lambda name: "roundrobin@base" if name.endswith("@base") else "roundrobin",
                                "roundrobin")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
