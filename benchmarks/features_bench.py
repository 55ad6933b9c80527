"""fastlb against HAProxy with the features a real deployment turns on, one profile at a time, in one run.

    python benchmarks/features_bench.py --proxy-cpu-quota 0.5            # every profile, 3 rounds x 5 s
    python benchmarks/features_bench.py --profiles plain,log --rounds 5

Profiles (the same settings on both proxies; issue 16):
- plain:   X-Forwarded-For only (HAProxy `option forwardfor`);
- log:     an access log line per request to a file (fastlb `--access-log FILE`, text; HAProxy
           `option httplog` to stdout, which goes to a file);
- headers: one request header set and one response header set;
- sticky:  an inserted cookie, indirect, nocache (wrk sends the cookie back on every request);
- sticky-source: the client address pinned to a backend (fastlb `--sticky source`; HAProxy
           `stick-table type ip` + `stick on src`);
- sticky-learn: a session id in a cookie pinned to a backend (fastlb `--sticky learn:JSESSIONID
           --store redis://` on a real Redis the bench starts, the id's mapping put in Redis first as
           another balancer would have; HAProxy `stick-table type string` + `stick on
           req.cook(JSESSIONID)`, its own table: HAProxy has no Redis; wrk sends the cookie);
- tls:     TLS termination (keep-alive HTTPS, ECDSA P-256, ALPN http/1.1);
- all:     the four together.

Method: benchmarks/harness.py's (two nginx backends and wrk -t1 -c64 on the load CPU; each proxy pinned
to the proxy CPU, within `--proxy-cpu-quota` of it when given). For each profile both proxies are
started, then rounds alternate them (fastlb first in odd rounds, HAProxy first in even ones); ratios are
per round, the median is reported. CPU/request: utime+stime of the proxy's processes (/proc) over the
run, divided by the requests completed. The last column is what fastlb's start log says served HTTP:
`c` (the C engine) or `python (reason)`.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
from tls_bench import make_certificate, SERVER_NAME  # noqa: E402

PROFILES = ("plain", "log", "headers", "sticky", "sticky-source", "sticky-learn", "tls", "all")
FEATURES = {"plain": (), "log": ("log",), "headers": ("headers",), "sticky": ("sticky",),
            "sticky-source": ("source",), "sticky-learn": ("learn",), "tls": ("tls",),
            "all": ("log", "headers", "sticky", "tls")}
SESSION = "JSESSIONID"
SESSION_ID = "bench-session-1"      # the id wrk sends (sticky-learn), mapped in Redis to the first backend
REQUEST_HEADER = ("X-Env", "prod")
RESPONSE_HEADER = ("X-Frame-Options", "DENY")
COOKIE = "SRV"
SECRET = b"features-bench-cookie-secret-0123456789"
ENGINE_LINE = re.compile(r"HTTP engine (c|python \(.*\))")


def fastlb_command(features, port: int, backends, tmp: str, pem: str, redis_port: int | None = None) -> list[str]:
    bind = f"{h.HOST}:{port}" + (f",ssl,cert={pem}" if "tls" in features else "")
    cmd = [sys.executable, "-m", "fastlb", "--mode", "http", "--bind", bind, "--algorithm", "roundrobin",
           "--workers", "1", "--log-level", "info",
           *(arg for b in backends for arg in ("--backend", f"{h.HOST}:{b}"))]
    if "log" in features:
        cmd += ["--access-log", os.path.join(tmp, f"fastlb-access-{port}.log")]
    if "headers" in features:
        cmd += ["--request-header-set", "%s: %s" % REQUEST_HEADER,
                "--response-header-set", "%s: %s" % RESPONSE_HEADER]
    if "sticky" in features:
        secret = os.path.join(tmp, "cookie.key")
        with open(secret, "wb") as f:
            f.write(SECRET)
        cmd += ["--sticky", f"cookie:{COOKIE},indirect,nocache", "--cookie-secret-file", secret]
    if "source" in features:
        cmd += ["--sticky", "source"]
    if "learn" in features:
        cmd += ["--sticky", f"learn:{SESSION}", "--store", f"redis://{h.HOST}:{redis_port}"]
    return cmd


def start_redis(bench: h.Bench, backends) -> int:
    """A redis-server on the load CPU (no persistence) holding SESSION_ID -> the first backend, as a
    balancer that learned it would have written it (fastlb/sticky.py's key and backend id)."""
    from fastlb.sticky import UNSECRET_KEY, SessionStore, backend_id
    port = h.free_port()
    proc = bench.procs.start("redis", [h.which("redis-server"), "--port", str(port), "--bind", h.HOST,
                                       "--save", "", "--appendonly", "no", "--dir", bench.tmp],
                             cpu=bench.load_cpu, log_dir=bench.tmp)
    h.wait_listening(port, proc)
    key = SessionStore.store_key(f"default:learn:{SESSION}".encode(), SESSION_ID.encode())
    ident = backend_id(UNSECRET_KEY, "default", f"{h.HOST}:{backends[0]}")
    subprocess.run([h.which("redis-cli"), "-h", h.HOST, "-p", str(port), "SET", key, ident],
                   check=True, capture_output=True, timeout=10)
    return port


def haproxy_config(features, port: int, backends, pem: str) -> str:
    """harness.haproxy_conf's http mode with the profile's features added."""
    from tls_bench import TLS12_CIPHERS
    text = h.haproxy_conf("http", port, backends, h.haproxy_maxconn())
    if "tls" in features:
        text = text.replace(f"    bind {h.HOST}:{port}\n", f"    bind {h.HOST}:{port} ssl crt {pem} alpn http/1.1\n")
        text = text.replace("global\n", "global\n    ssl-default-bind-options ssl-min-ver TLSv1.2\n"
                                        f"    ssl-default-bind-ciphers {TLS12_CIPHERS}\n", 1)
    if "log" in features:
        # stdout is the proxy's log file (harness.Procs): one line per request, written as it ends.
        text = text.replace("global\n", "global\n    log stdout format raw local0\n", 1)
        text = text.replace("defaults\n", "defaults\n    log global\n    option httplog\n", 1)
    extra = ""
    if "headers" in features:
        extra += "    http-request set-header %s %s\n" % REQUEST_HEADER
        extra += "    http-response set-header %s %s\n" % RESPONSE_HEADER
    if "sticky" in features:
        extra += f"    cookie {COOKIE} insert indirect nocache\n"
        for i, b in enumerate(backends, 1):
            text = text.replace(f"    server s{i} {h.HOST}:{b}\n", f"    server s{i} {h.HOST}:{b} cookie s{i}\n")
    if "source" in features:
        extra += "    stick-table type ip size 100k expire 30m\n    stick on src\n"
    if "learn" in features:
        extra += (f"    stick-table type string len 64 size 100k expire 30m\n"
                  f"    stick on req.cook({SESSION})\n")
    return text.replace("    balance roundrobin\n", "    balance roundrobin\n" + extra)


def sticky_cookie(port: int, scheme: str) -> str:
    """`NAME=value` of the cookie the proxy inserts (what wrk then sends back on every request)."""
    out = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-D", "-", f"{scheme}://{h.HOST}:{port}/"],
                         capture_output=True, timeout=10, text=True).stdout
    for line in out.splitlines():
        if line.lower().startswith("set-cookie: " + COOKIE.lower() + "="):
            return line.split(": ", 1)[1].split(";")[0]
    raise RuntimeError(f"no Set-Cookie {COOKIE} from port {port}:\n{out}")


def start(bench: h.Bench, name: str, features, pem: str, tree: str,
          redis_port: int | None = None) -> tuple[h.Target, list[str], str]:
    """One proxy of a profile, running and probed: (target, wrk headers, scheme)."""
    target = h.Target(h.TargetSpec(name, "fastlb" if name.startswith("fastlb") else "haproxy", "http"))
    target.port = h.free_port()
    if target.spec.kind == "fastlb":
        cmd = fastlb_command(features, target.port, bench.backend_ports, bench.tmp, pem, redis_port)
        env, cwd = dict(os.environ, PYTHONPATH=tree), tree
    else:
        cmd, env, cwd = h.haproxy_command(bench.tmp, name,
                                          haproxy_config(features, target.port, bench.backend_ports, pem))
    target.proc = bench.start_proxy(name, cmd, env, cwd)
    h.wait_listening(target.port, target.proc)
    scheme = "https" if "tls" in features else "http"
    probe = subprocess.run(["curl", "-sk", f"{scheme}://{h.HOST}:{target.port}/"], capture_output=True, timeout=10)
    if probe.stdout != h.SMALL_BODY:
        raise RuntimeError(f"{name}: probe answered {probe.stdout[:100]!r}\n{target.proc.log_tail()}")
    headers = [f"Cookie: {sticky_cookie(target.port, scheme)}"] if "sticky" in features else []
    if "learn" in features:
        headers = [f"Cookie: {SESSION}={SESSION_ID}"]
    return target, headers, scheme


def engine_of(target: h.Target) -> str:
    match = ENGINE_LINE.search(target.proc.log_tail(200))
    return match.group(1) if match else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5, help="whole seconds per wrk run (default %(default)s)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--load-cpu", default="0")
    p.add_argument("--proxy-cpu", default="1")
    p.add_argument("--proxy-cpu-quota", type=float, default=None, metavar="F",
                   help="each proxy gets only F of its CPU (proxy_bench's option)")
    p.add_argument("--fastlb-tree", default=h.REPO_ROOT,
                   help="a built fastlb checkout to run (default: this one; another for a before/after)")
    args = p.parse_args(argv)
    profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    unknown = set(profiles) - set(PROFILES)
    if unknown:
        p.error(f"unknown profiles {sorted(unknown)}; known: {', '.join(PROFILES)}")
    h.ensure_tools(["haproxy", "nginx", "wrk", "taskset", "curl", "openssl"]
                   + (["redis-server", "redis-cli"] if "sticky-learn" in profiles else []))
    h.raise_nofile_limit()
    bench = h.Bench(load_cpu=args.load_cpu, proxy_cpu=args.proxy_cpu, proxy_cpu_quota=args.proxy_cpu_quota)
    rows = []
    try:
        bench.start_backends()
        pem = make_certificate(bench.tmp)
        redis_port = start_redis(bench, bench.backend_ports) if "sticky-learn" in profiles else None
        for profile in profiles:
            features = FEATURES[profile]
            started = [start(bench, f"{kind}-{profile}", features, pem, os.path.abspath(args.fastlb_tree),
                             redis_port)
                       for kind in ("fastlb", "haproxy")]
            for target, headers, scheme in started:       # warm-up
                h.run_wrk(bench, target.port, "/", args.connections, 1, headers=headers, scheme=scheme)
            runs: dict[str, list[dict]] = {"fastlb": [], "haproxy": []}
            for round_number in range(args.rounds):
                order = started if round_number % 2 == 0 else started[::-1]
                for target, headers, scheme in order:
                    result = h.measure(bench, target, "/", args.connections, args.duration,
                                       headers=headers, scheme=scheme)
                    errors = sum(result["errors"].values()) + result.get("non_2xx", 0)
                    runs[target.spec.kind].append(result)
                    h.log(f"{profile} round {round_number + 1} {target.name}: {result['rps']:,.0f} req/s, "
                          f"{result.get('cpu_us_per_req', 0):.1f} us CPU/req, p99 "
                          f"{h.fmt_us(result.get('lat_p99_us'))}, errors {errors}")
            fast, ha = runs["fastlb"], runs["haproxy"]
            rows.append([
                profile,
                f"{h.median(f['cpu_us_per_req'] / r['cpu_us_per_req'] for f, r in zip(fast, ha)):.2f}",
                f"{h.median(f['rps'] / r['rps'] for f, r in zip(fast, ha)):.2f}",
                f"{h.fmt_us(h.median(f.get('lat_p99_us') for f in fast))} vs "
                f"{h.fmt_us(h.median(r.get('lat_p99_us') for r in ha))}",
                f"{h.median(f['cpu_us_per_req'] for f in fast):.1f} vs {h.median(r['cpu_us_per_req'] for r in ha):.1f}",
                engine_of(started[0][0])])
            for target, _, _ in started:
                bench.procs.stop(target.proc)
    finally:
        bench.close()
    quota = f", proxies held to {args.proxy_cpu_quota} CPU" if args.proxy_cpu_quota else ""
    print(f"\nfastlb from {os.path.abspath(args.fastlb_tree)}; wrk -t1 -c{args.connections}, {args.rounds} rounds "
          f"x {args.duration} s, proxy on CPU {args.proxy_cpu}{quota}; ratios: median of per-round fastlb/HAProxy\n")
    print(h.render_table(["profile", "fastlb CPU/req ÷ HAProxy's", "req/s ratio", "p99 fastlb vs HAProxy",
                          "CPU us/req fastlb vs HAProxy", "fastlb HTTP engine"],
                         rows, right=[False, True, True, True, True, False]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
