"""What admission control costs: proxy CPU per request with limits that never trip, and memory under
100k distinct keys.

    python3 benchmarks/admission_cost.py [--rounds 5] [--duration 5] [--connections 64] [--keys 100000]

CPU (shared/PERF-NOTES.md's method, through benchmarks/harness.py's Bench and measure): two nginx backends
and wrk -t1 on CPU 0, each fastlb (one worker, HTTP engine on) alone on CPU 1; every target started once,
then rounds of A B C ... in one run; every request carries `X-Api-Key: bench-key` and a Cookie `sid`.
CPU is utime + stime of the proxy from /proc/PID/stat over the wrk run, divided by the requests wrk
completed; the figure is the median over rounds of each target's CPU per request over `plain`'s in the
same round. Targets:
  plain      no admission control
  limits     --rate-limit source=1000000/s (never trips) --max-conn-per-source 10000 and a 1,000-network
             --access-file deny list: what the engine checks in C per connection and per request
  header     --rate-limit header:X-Api-Key=1000000/s: the engine records the header and checks it in C
  cookie     --rate-limit cookie:sid=1000000/s: the same, the cookie found in the Cookie header in C
  query      --rate-limit query:k=1000000/s: the Python path (the engine is off), for scale

Memory: one fastlb with --rate-limit header:X-Api-Key=1/s,missing=allow (the harness's probes carry no
key) and --rate-limit-table-size 65536 is sent `--keys` requests each with its own key (pipelined, 500
per write), then as many again; its RSS is read after start, after the first batch and after the second. The table is allocated whole at start
(capacity x 88 bytes, zeroed pages that become resident as entries are first used), so RSS may grow by
that much and no more, whatever the number of keys.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

TABLE_SIZE = 65536
ENTRY_BYTES = 88                  # sizeof(Entry) in fastlb/_admission.pxd
PIPELINE = 500


def deny_file(path: str) -> str:
    with open(path, "w") as f:
        for i in range(1000):               # 1,000 networks in 100.64.0.0/10 (none is the client)
            f.write(f"deny 100.{64 + i // 256}.{i % 256}.0/24\n")
    return path


def send_keys(port: int, first: int, count: int) -> int:
    """`count` requests with keys first..first+count-1 on one keep-alive connection; returns the 200s.
    Responses are counted by their status lines as they stream in (a tail shorter than the pattern is
    kept across reads, so a line split between two reads counts once)."""
    ok = seen = 0
    status, good = b"HTTP/1.1 ", b"HTTP/1.1 200"
    with socket.create_connection((h.HOST, port), timeout=30) as s:
        tail_seen = tail_ok = b""
        for start in range(first, first + count, PIPELINE):
            batch = b"".join(b"GET / HTTP/1.1\r\nHost: bench\r\nX-Api-Key: key-%d\r\n\r\n" % i
                             for i in range(start, min(start + PIPELINE, first + count)))
            s.sendall(batch)
            seen -= batch.count(b"GET ")
            while seen < 0:
                chunk = s.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("closed by fastlb")
                data, data_ok = tail_seen + chunk, tail_ok + chunk
                seen += data.count(status)
                ok += data_ok.count(good)
                tail_seen, tail_ok = data[-(len(status) - 1):], data_ok[-(len(good) - 1):]
    return ok


def table_cost_ns(n: int = 1_000_000) -> float:
    """In process, the robust figure: what one check of a `source` rule in the C table costs, in ns (the
    same cdef method the engine calls; the Python call around it measured with a no-op and taken off)."""
    import time
    from fastlb._admission import Limiter
    table = Limiter(TABLE_SIZE, [(1e-6, 1.0, 0, 0, -1, -1, b"")], [b"default"], 0)
    key, check, now = b"192.0.2.77", table.check_key, table.now
    checks, calls = [], []
    for _ in range(5):                      # the fastest of 5 runs of each: the least disturbed
        start = time.perf_counter()
        for _ in range(n):
            check(0, key)
        checks.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n):
            now()
        calls.append(time.perf_counter() - start)
    return (min(checks) - min(calls)) / n * 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--proxy-cpu", default="1")
    parser.add_argument("--load-cpu", default="0")
    parser.add_argument("--targets", default="plain,limits,header,cookie,query")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    h.ensure_tools(["nginx", "wrk", "taskset"])
    bench = h.Bench(load_cpu=args.load_cpu, proxy_cpu=args.proxy_cpu)
    try:
        bench.start_backends()
        all_targets = {
            "plain": "",
            "limits": "--rate-limit source=1000000/s --max-conn-per-source 10000 --access-file "
                      + deny_file(os.path.join(bench.tmp, "access.txt")),
            "header": "--rate-limit header:X-Api-Key=1000000/s",
            "cookie": "--rate-limit cookie:sid=1000000/s",
            "query": "--rate-limit query:k=1000000/s",
        }
        targets = []
        for name in args.targets.split(","):
            spec = h.TargetSpec(name, "fastlb", "http", f"{h.FASTLB_CMD} --log-level info {all_targets[name]}")
            target = bench.start_target(spec)
            if target.error:
                raise SystemExit(f"{name}: {target.error}")
            targets.append(target)
        results: dict[str, list[dict]] = {t.name: [] for t in targets}
        for round_number in range(args.rounds):
            for target in targets:
                m = h.measure(bench, target, h.SMALL_PATH, args.connections, args.duration,
                              wrk_args=["-H", "X-Api-Key: bench-key", "-H", "Cookie: sid=bench-session"])
                results[target.name].append(m)
                errors = sum(m["errors"].values()) + m.get("non_2xx", 0)
                print(f"round {round_number + 1} {target.name:8s} {m['rps']:9.0f} req/s "
                      f"{m['cpu_us_per_req']:6.2f} us CPU/request errors {errors}", flush=True)
        if "plain" in results:
            h.print_cpu_ratio_table(results, lambda name: "plain", "plain", "cpu_us_per_req", "user_us_per_req")
            cost = table_cost_ns()
            plain_us = statistics.median(r["cpu_us_per_req"] for r in results["plain"])
            print(f"in process: one source-rule check in the C table {cost:.0f} ns = "
                  f"{cost / 10 / plain_us:.2f} % of plain's {plain_us:.2f} us CPU per request")
        for target in targets:
            logged = [line for line in open(target.proc.log_path).read().splitlines() if "HTTP engine" in line]
            print(f"{target.name}: {logged[-1].split('INFO ')[-1] if logged else '?'}")
        if not args.skip_memory:
            spec = h.TargetSpec("keys", "fastlb", "http", f"{h.FASTLB_CMD} --rate-limit "
                                f"header:X-Api-Key=1/s,missing=allow --rate-limit-table-size {TABLE_SIZE}")
            target = bench.start_target(spec)
            if target.error:
                raise SystemExit(f"keys: {target.error}")
            send_keys(target.port, 0, 1000)                  # warm up (imports, buffers)
            rss = [h.tree_rss_bytes(target.pid)]
            ok = send_keys(target.port, 1000, args.keys)
            rss.append(h.tree_rss_bytes(target.pid))
            ok += send_keys(target.port, 1000 + args.keys, args.keys)
            rss.append(h.tree_rss_bytes(target.pid))
            mib = [r / 2 ** 20 for r in rss]
            print(f"\nmemory: table bound {TABLE_SIZE} keys x {ENTRY_BYTES} B = "
                  f"{TABLE_SIZE * ENTRY_BYTES / 2 ** 20:.1f} MiB (allocated at start, resident as entries are used)")
            print(f"RSS after start {mib[0]:.1f} MiB, after {args.keys} distinct keys {mib[1]:.1f} MiB, "
                  f"after {2 * args.keys} {mib[2]:.1f} MiB ({ok} of {2 * args.keys} requests answered 200)")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
