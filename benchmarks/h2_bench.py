"""HTTP/2 clients: fastlb against HAProxy with h2load, h2c (prior knowledge) and h2 over TLS, same run;
and gRPC unary calls to HTTP/2 backends (workload `grpc`).

    python benchmarks/h2_bench.py [--rounds 3] [--duration 5] [--clients 16] [--streams 16]
        [--workloads h2c,h2,grpc]

Both proxies in HTTP mode, one process / thread each, in front of the two nginx backends of
benchmarks/harness.py (HTTP/1.1, keep-alive): HAProxy with `bind ... proto h2` style detection of the
preface on its plain bind and `bind ... ssl crt ... alpn h2,http/1.1` on its TLS bind; fastlb with a
plain bind and a TLS bind (`--h2 true`, the default). h2load (nghttp2-client) runs `-c CLIENTS -m
STREAMS` for DURATION seconds on the load CPU; the proxies are alone on the proxy CPU. Targets are
alternated within each round (A B, then B A) and the ratios of each round's pair are reported as a
median, with each proxy's CPU time (user + kernel, /proc) per request.

Workload `grpc`: gRPC-shaped unary calls, h2c from h2load (POST of one gRPC message, `content-type:
application/grpc`, `te: trailers`) to each proxy's plain bind, and from the proxy over HTTP/2 to two
nginx h2c backends (fastlb `--backend HOST:PORT,proto=h2`, HAProxy `server ... proto h2`) that answer each
call 200 with a body and the trailer `grpc-status: 0`, as a gRPC server does (nginx, not a grpcio
server: a Python server would be what is measured).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness as h  # noqa: E402
from tls_bench import SERVER_NAME, make_certificate  # noqa: E402

H2LOAD_DONE = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded")


def haproxy_h2_conf(plain: int, secure: int, backends: list[int], pem: str, maxconn: int) -> str:
    return h.haproxy_text("http", maxconn, [f"{h.HOST}:{plain}", f"{h.HOST}:{secure} ssl crt {pem} alpn h2,http/1.1"],
                          backends, global_lines=["ssl-default-bind-options ssl-min-ver TLSv1.2"],
                          defaults_lines=["option http-keep-alive"], backend_lines=["http-reuse always"])


GRPC_PATH = "/bench.Echo/Unary"
GRPC_REQUEST = b"\x00\x00\x00\x00\x05hello"         # one uncompressed gRPC message


def grpc_backend_conf(tmp: str, ports: list[int]) -> str:
    """nginx answering every call on h2c like a gRPC server: 200, a body, then the trailer grpc-status 0."""
    servers = "".join(textwrap.dedent(f"""\
        server {{
            listen {h.HOST}:{port} http2 backlog=4096;
            keepalive_requests 100000000;
            location / {{
                default_type application/grpc;
                add_trailer grpc-status 0 always;
                return 200 "grpc-shaped";
            }}
        }}
        """) for port in ports)
    return h.nginx_common(tmp, "grpc-backends", 12000) + "http {\n" + textwrap.indent(
        h.nginx_http_common(tmp, "grpc-backends") + servers, "    ") + "}\n"


def haproxy_grpc_conf(port: int, backends: list[int], maxconn: int) -> str:
    return h.haproxy_text("http", maxconn, [f"{h.HOST}:{port} proto h2"], backends,
                          backend_lines=["http-reuse always"], server_options=" proto h2")


def start_grpc_targets(bench: h.Bench, names: list[str]) -> dict[str, tuple[h.Proc, int]]:
    """The gRPC backends (nginx h2c, on the load CPU) and each proxy in front of them: name -> (proc, port)."""
    ports = h.free_ports(2)
    conf = os.path.join(bench.tmp, "grpc-backends.conf")
    with open(conf, "w") as f:
        f.write(grpc_backend_conf(bench.tmp, ports))
    backends = bench.procs.start("grpc-backends", [h.which("nginx"), "-p", bench.tmp, "-e",
                                                   os.path.join(bench.tmp, "grpc-backends.error.log"), "-c", conf,
                                                   "-g", "daemon off;"], cpu=bench.load_cpu, log_dir=bench.tmp)
    for port in ports:
        h.wait_listening(port, backends)
    targets = {}
    for name in names:
        port = h.free_port()
        if name == "haproxy":
            cmd, env, cwd = h.haproxy_command(bench.tmp, "haproxy-grpc",
                                              haproxy_grpc_conf(port, ports, h.haproxy_maxconn()))
        else:
            env = dict(os.environ, PYTHONPATH=h.REPO_ROOT)
            cmd = [sys.executable, "-m", "fastlb", "--mode", "http", "--bind", f"{h.HOST}:{port}",
                   *(a for p in ports for a in ("--backend", f"{h.HOST}:{p},proto=h2")), "--log-level", "warning"]
            cwd = h.REPO_ROOT
        proc = bench.start_proxy(f"{name}-grpc", cmd, env, cwd)
        h.wait_listening(port, proc)
        check = subprocess.run(["nghttp", "-v", "-d", bench.grpc_request, "-H", "content-type: application/grpc",
                                "-H", "te: trailers", f"http://{h.HOST}:{port}{GRPC_PATH}"],
                               capture_output=True, timeout=10)
        if b"grpc-status: 0" not in check.stdout:
            raise RuntimeError(f"{name}: the gRPC call's trailers did not come through\n{check.stdout[-800:]!r}\n"
                               f"{proc.log_tail()}")
        targets[name] = (proc, port)
    return targets


# The fastlb variants measured: who serves HTTP/2 streams (FASTLB_H2_ENGINE).
H2_ENGINES = {"fastlb": "0", "fastlb-eh2": "1"}
H2_ENGINE_NAMES = {"python": ["fastlb"], "c": ["fastlb-eh2"], "both": ["fastlb", "fastlb-eh2"]}


def start_targets(bench: h.Bench, pem: str, names: list[str]) -> dict[str, tuple[h.Proc, int, int]]:
    b1, b2 = bench.backend_ports
    targets = {}
    for name in names:
        plain, secure = h.free_ports(2)
        if name == "haproxy":
            cmd, env, cwd = h.haproxy_command(bench.tmp, "haproxy-h2",
                                              haproxy_h2_conf(plain, secure, [b1, b2], pem, h.haproxy_maxconn()))
        else:
            # FASTLB_H2_ENGINE (fastlb/http/_eh2.pxi): the HTTP engine serves the streams itself, or the
            # Python path (fastlb/http2/) does.
            env = dict(os.environ, PYTHONPATH=h.REPO_ROOT, FASTLB_H2_ENGINE=H2_ENGINES[name])
            cmd = [sys.executable, "-m", "fastlb", "--mode", "http", "--bind", f"{h.HOST}:{plain}",
                   "--bind", f"{h.HOST}:{secure},ssl,cert={pem}", "--backend", f"{h.HOST}:{b1}",
                   "--backend", f"{h.HOST}:{b2}", "--log-level", "warning"]
            cwd = h.REPO_ROOT
        proc = bench.start_proxy(name, cmd, env, cwd)
        h.wait_listening(plain, proc)
        h.wait_listening(secure, proc)
        for url, flag in ((f"http://{h.HOST}:{plain}/", "--http2-prior-knowledge"),
                          (f"https://{SERVER_NAME}:{secure}/", "--http2")):
            check = subprocess.run(["curl", "-sk", flag, "--resolve", f"{SERVER_NAME}:{secure}:{h.HOST}",
                                    "-w", "%{http_version}", "-o", "/dev/null", url],
                                   capture_output=True, timeout=10)
            if check.stdout != b"2":
                raise RuntimeError(f"{name}: {url} not served over HTTP/2 ({check.stdout!r})\n{proc.log_tail()}")
        targets[name] = (proc, plain, secure)
    return targets


def run_h2load(bench: h.Bench, url: str, args) -> int:
    cmd = [h.which("taskset") or "taskset", "-c", bench.load_cpu, h.which("h2load"), "-c", str(args.clients),
           "-m", str(args.streams), "-D", str(args.duration), "-t", "1", url]
    if url.endswith(GRPC_PATH):
        cmd[-1:-1] = ["-d", bench.grpc_request, "-H", "content-type: application/grpc", "-H", "te: trailers"]
    p = bench.procs.start("h2load", cmd, stdout=subprocess.PIPE)
    out, _ = p.popen.communicate(timeout=args.duration + 60)
    bench.procs.stop(p)
    text = out.decode(errors="replace")
    match = H2LOAD_DONE.search(text)
    if p.popen.returncode != 0 or not match:
        raise RuntimeError(f"h2load failed ({p.popen.returncode}):\n{text[-1500:]}")
    succeeded = int(match.group(4))
    if succeeded < int(match.group(3)):
        h.log(f"    h2load: {int(match.group(3)) - succeeded} requests failed")
    return succeeded


def measure(bench: h.Bench, proc: h.Proc, url: str, args) -> dict:
    cpu0 = h.tree_cpu(proc.pid)
    count = run_h2load(bench, url, args)
    cpu = h.cpu_delta(cpu0, h.tree_cpu(proc.pid))
    return {"count": count, "rate": count / args.duration,
            "cpu_us": (cpu["user_s"] + cpu["sys_s"]) * 1e6 / max(count, 1), "proxy_cpu_share": cpu["cpu_share"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measurement")
    parser.add_argument("--clients", type=int, default=16, help="h2load -c: connections")
    parser.add_argument("--streams", type=int, default=16, help="h2load -m: concurrent streams per connection")
    parser.add_argument("--workloads", default="h2c,h2")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--proxy-cpu", default="1")
    parser.add_argument("--h2-engine", choices=list(H2_ENGINE_NAMES), default="python",
                        help="who serves fastlb's HTTP/2 streams: the Python path (fastlb), the HTTP engine "
                             "(fastlb-eh2, FASTLB_H2_ENGINE=1), or both in the same run (h2c and h2 only)")
    args = parser.parse_args(argv)
    h.ensure_tools(["haproxy", "nginx", "h2load", "nghttp", "taskset", "curl"])
    h.raise_nofile_limit()
    workloads = args.workloads.split(",")
    fastlbs = H2_ENGINE_NAMES[args.h2_engine] if set(workloads) - {"grpc"} else ["fastlb"]
    names = [*fastlbs, "haproxy"]
    bench = h.Bench(load_cpu=args.load_cpu, proxy_cpu=args.proxy_cpu)
    results: dict[str, dict[str, list[dict]]] = {
        w: {n: [] for n in (["fastlb", "haproxy"] if w == "grpc" else names)} for w in workloads}
    try:
        bench.start_backends()
        pem = make_certificate(bench.tmp)
        targets = start_targets(bench, pem, names) if set(workloads) - {"grpc"} else {}
        if "grpc" in workloads:
            bench.grpc_request = os.path.join(bench.tmp, "grpc-request.bin")
            with open(bench.grpc_request, "wb") as f:
                f.write(GRPC_REQUEST)
            grpc_targets = start_grpc_targets(bench, ["fastlb", "haproxy"])
        h.log(f"fastlb vs HAProxy, HTTP/2 clients; {args.rounds} rounds x {args.duration}s; h2load -c "
              f"{args.clients} -m {args.streams}; load CPU {args.load_cpu}, proxy CPU {args.proxy_cpu}")
        for rnd in range(1, args.rounds + 1):
            for workload in workloads:
                order = names if rnd % 2 else names[::-1]
                if workload == "grpc":
                    # one fastlb for gRPC whatever --h2-engine says: a proto=h2 backend keeps the engine off
                    order = ["fastlb", "haproxy"] if rnd % 2 else ["haproxy", "fastlb"]
                for name in order:
                    if workload == "grpc":
                        proc, port = grpc_targets[name]
                        url = f"http://{h.HOST}:{port}{GRPC_PATH}"
                    else:
                        proc, plain, secure = targets[name]
                        url = f"http://{h.HOST}:{plain}/" if workload == "h2c" else f"https://{h.HOST}:{secure}/"
                    m = measure(bench, proc, url, args)
                    results[workload][name].append(m)
                    h.log(f"round {rnd} {workload:4} {name:10} {m['rate']:9,.0f} req/s  proxy cpu "
                          f"{m['cpu_us']:6.1f} us/req, {m['proxy_cpu_share'] * 100:3.0f}% of a CPU")
                    time.sleep(0.5)           # (between measurements: let the last connections close)
    finally:
        bench.close()
    rows = []
    for workload, fastlb in [(w, name) for w in workloads for name in (fastlbs if w != "grpc" else ["fastlb"])]:
        f, hp = results[workload][fastlb], results[workload]["haproxy"]
        rate_ratio = statistics.median(a["rate"] / b["rate"] for a, b in zip(f, hp))
        cpu_ratio = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in zip(f, hp))
        rows.append([f"{workload} {fastlb}", f"{statistics.median(m['rate'] for m in f):,.0f}",
                     f"{statistics.median(m['rate'] for m in hp):,.0f}", f"{rate_ratio:.2f}",
                     f"{statistics.median(m['cpu_us'] for m in f):.1f}",
                     f"{statistics.median(m['cpu_us'] for m in hp):.1f}", f"{cpu_ratio:.2f}"])
    print(h.render_table(["workload", "fastlb req/s", "haproxy req/s", "req/s ratio", "fastlb us/req",
                          "haproxy us/req", "cpu ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
