"""TLS termination: fastlb against HAProxy, same certificate, same ciphers, same run.

    python benchmarks/tls_bench.py [--rounds 3] [--duration 5] [--clients 4]

Three workloads, each proxy terminating TLS and relaying plaintext to two nginx backends (HAProxy in
`mode tcp`, fastlb in its tcp mode, one process / thread each):
- `full`: new connections per second, each a full handshake and one small HTTP/1.0 request
  (`openssl s_time -new -www /`, --clients processes in parallel);
- `resumed`: the same with session resumption (`openssl s_time -reuse`, TLS 1.2: s_time does not resume
  TLS 1.3 sessions);
- `keepalive`: HTTPS requests per second over 64 keep-alive connections (`wrk -t1 -c64`).

Method (shared/PERF-NOTES.md): backends and load on CPU 0, the proxy alone on CPU 1, targets alternated
within each round (A B A B), ratios taken per round and their median reported. Besides rates, the proxy's
CPU time (user + kernel, from /proc) per connection or request is reported: when the load generator is
the bottleneck (handshakes cost the client too), rates tie and the CPU cost is what tells the proxies apart.

The certificate is ECDSA P-256 (made here with the openssl CLI); both proxies get the same PEM file,
TLS 1.2-1.3, fastlb's TLS 1.2 cipher list and OpenSSL's default TLS 1.3 suites, ALPN http/1.1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness as h  # noqa: E402
from fastlb.tls import TLS12_CIPHERS  # noqa: E402

SERVER_NAME = "bench.test"


def make_certificate(directory: str) -> str:
    """An ECDSA P-256 self-signed certificate and its key in one PEM file (what both proxies load)."""
    cert, key = os.path.join(directory, "bench.crt"), os.path.join(directory, "bench.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={SERVER_NAME}",
                    "-addext", f"subjectAltName=DNS:{SERVER_NAME}"], check=True, capture_output=True)
    pem = os.path.join(directory, "bench.pem")
    with open(pem, "w") as out:
        out.write(open(cert).read() + open(key).read())
    return pem


def haproxy_tls_conf(port: int, backends: list[int], pem: str, maxconn: int) -> str:
    """HAProxy with fastlb's TLS settings: 1.2-1.3, the same 1.2 ciphers (1.3 suites: OpenSSL's
    defaults in both), ALPN http/1.1; server cipher order and session tickets are HAProxy's defaults."""
    return h.haproxy_text("tcp", maxconn, [f"{h.HOST}:{port} ssl crt {pem} alpn http/1.1"], backends,
                          global_lines=["ssl-default-bind-options ssl-min-ver TLSv1.2",
                                        f"ssl-default-bind-ciphers {TLS12_CIPHERS}"])


def start_targets(bench: h.Bench, pem: str, names: list[str]) -> dict[str, tuple[h.Proc, int]]:
    b1, b2 = bench.backend_ports
    targets = {}
    for name in names:
        port = h.free_port()
        if name == "haproxy":
            cmd, env, cwd = h.haproxy_command(bench.tmp, "haproxy-tls",
                                              haproxy_tls_conf(port, [b1, b2], pem, h.haproxy_maxconn()))
        else:
            env = dict(os.environ, PYTHONPATH=h.REPO_ROOT)
            cmd = [sys.executable, "-m", "fastlb", "--mode", "tcp", "--bind", f"{h.HOST}:{port},ssl,cert={pem}",
                   "--backend", f"{h.HOST}:{b1}", "--backend", f"{h.HOST}:{b2}", "--log-level", "warning"]
            cwd = h.REPO_ROOT
        proc = bench.start_proxy(name, cmd, env, cwd)
        h.wait_listening(port, proc)
        check = subprocess.run(["curl", "-sk", "--resolve", f"{SERVER_NAME}:{port}:{h.HOST}",
                                f"https://{SERVER_NAME}:{port}/"], capture_output=True, timeout=10)
        if check.stdout != h.SMALL_BODY:
            raise RuntimeError(f"{name}: HTTPS probe answered {check.stdout[:100]!r}\n{proc.log_tail()}")
        targets[name] = (proc, port)
    return targets


S_TIME_TOTAL = re.compile(r"(\d+) connections in (\d+) real seconds")


def run_s_time(bench: h.Bench, port: int, reuse: bool, clients: int, duration: int) -> int:
    """Connections made by `clients` parallel `openssl s_time` processes on the load CPU."""
    cmd = [h.which("taskset") or "taskset", "-c", bench.load_cpu, "openssl", "s_time", "-connect",
           f"{h.HOST}:{port}", "-time", str(duration), "-www", "/", "-reuse" if reuse else "-new"]
    if reuse:
        # s_time reuses a session only under TLS 1.2 (under 1.3 it never offers the ticket: every
        # connection would be a full handshake, shown as '*' instead of 'r').
        cmd.append("-tls1_2")
    procs = [bench.procs.start("s_time", cmd, stdout=subprocess.PIPE) for _ in range(clients)]
    total = 0
    for p in procs:
        out, _ = p.popen.communicate(timeout=duration + 30)
        bench.procs.stop(p)
        text = out.decode(errors="replace")
        match = S_TIME_TOTAL.search(text)
        if p.popen.returncode != 0 or not match:
            raise RuntimeError(f"s_time failed ({p.popen.returncode}):\n{text[-1500:]}")
        total += int(match.group(1))
    return total


def run_wrk_https(bench: h.Bench, port: int, duration: int, connections: int = 64) -> int:
    cmd = [h.which("taskset") or "taskset", "-c", bench.load_cpu, h.which("wrk"), "-t1", f"-c{connections}",
           f"-d{duration}s", "--timeout", "5s", f"https://{h.HOST}:{port}/"]
    p = bench.procs.start("wrk", cmd, stdout=subprocess.PIPE)
    out, _ = p.popen.communicate(timeout=duration + 40)
    bench.procs.stop(p)
    text = out.decode(errors="replace")
    if p.popen.returncode != 0:
        raise RuntimeError(f"wrk failed:\n{text[-1500:]}")
    res = h.parse_wrk_output(text)
    if res.get("errors_total") or res.get("non2xx"):
        h.log(f"    wrk reported errors: {text[-400:]}")
    return int(res["requests"])


def measure(bench: h.Bench, proc: h.Proc, port: int, workload: str, args) -> dict:
    cpu0 = h.tree_cpu(proc.pid)
    t0 = time.monotonic()
    if workload == "keepalive":
        count = run_wrk_https(bench, port, args.duration)
    else:
        count = run_s_time(bench, port, workload == "resumed", args.clients, args.duration)
    wall = time.monotonic() - t0
    cpu = h.cpu_delta(cpu0, h.tree_cpu(proc.pid))
    return {"count": count, "rate": count / args.duration, "wall_s": wall,
            "cpu_us": (cpu["user_s"] + cpu["sys_s"]) * 1e6 / max(count, 1),
            "user_us": cpu["user_s"] * 1e6 / max(count, 1), "proxy_cpu_share": cpu["cpu_share"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--clients", type=int, default=4, help="parallel s_time processes")
    parser.add_argument("--workloads", default="full,resumed,keepalive")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--proxy-cpu", default="1")
    parser.add_argument("--proxy-cpu-quota", type=float, default=None, metavar="F",
                        help="give each proxy only F of its CPU (a cgroup quota, e.g. 0.5), so that the proxies, "
                             "not the load generators, are the bottleneck and rates compare their cost")
    args = parser.parse_args(argv)
    h.ensure_tools(["haproxy", "nginx", "wrk", "taskset"])
    h.raise_nofile_limit()
    workloads = args.workloads.split(",")
    names = ["fastlb", "haproxy"]
    bench = h.Bench(load_cpu=args.load_cpu, proxy_cpu=args.proxy_cpu, proxy_cpu_quota=args.proxy_cpu_quota)
    results: dict[str, dict[str, list[dict]]] = {w: {n: [] for n in names} for w in workloads}
    try:
        bench.start_backends()
        pem = make_certificate(bench.tmp)
        targets = start_targets(bench, pem, names)
        h.log(f"fastlb vs HAProxy, TLS termination; {args.rounds} rounds x {args.duration}s; "
              f"load CPU {args.load_cpu}, proxy CPU {args.proxy_cpu}")
        for rnd in range(1, args.rounds + 1):
            for workload in workloads:
                order = names if rnd % 2 else names[::-1]       # A B, then B A: drift hits both
                for name in order:
                    proc, port = targets[name]
                    m = measure(bench, proc, port, workload, args)
                    results[workload][name].append(m)
                    h.log(f"round {rnd} {workload:9} {name:8} {m['rate']:9,.0f}/s  proxy cpu "
                          f"{m['cpu_us']:6.1f} us each ({m['user_us']:5.1f} user), "
                          f"{m['proxy_cpu_share'] * 100:3.0f}% of a CPU")
    finally:
        bench.close()
    rows = []
    summary = {}
    for workload in workloads:
        f, hp = results[workload]["fastlb"], results[workload]["haproxy"]
        rate_ratio = statistics.median(a["rate"] / b["rate"] for a, b in zip(f, hp))
        cpu_ratio = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in zip(f, hp))
        summary[workload] = {"fastlb": f, "haproxy": hp, "rate_ratio": rate_ratio, "cpu_ratio": cpu_ratio}
        unit = "req/s" if workload == "keepalive" else "conn/s"
        rows.append([workload, f"{statistics.median(m['rate'] for m in f):,.0f} {unit}",
                     f"{statistics.median(m['rate'] for m in hp):,.0f} {unit}", f"{rate_ratio:.2f}x",
                     f"{statistics.median(m['cpu_us'] for m in f):.1f}",
                     f"{statistics.median(m['cpu_us'] for m in hp):.1f}", f"{cpu_ratio:.2f}x"])
    table = h.render_table(["workload", "fastlb", "HAProxy", "rate ratio", "fastlb cpu us", "HAProxy cpu us",
                            "cpu ratio"], rows, [False, True, True, True, True, True, True])
    print(table)
    os.makedirs(h.RESULTS_DIR, exist_ok=True)
    path = os.path.join(h.RESULTS_DIR, f"tls-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as out:
        json.dump({"args": vars(args), "summary": summary, "system": h.system_info()}, out, indent=1)
    h.log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
