"""Memory per relayed connection: RSS of the proxy's process tree with N idle connections, minus before.

    python benchmarks/memory_bench.py                           # fastlb-tcp and haproxy-tcp, 5,000 connections
    python benchmarks/memory_bench.py --targets haproxy-tcp,haproxy-http --connections 2000 --rounds 3
    python benchmarks/memory_bench.py --custom 'relay:tcp={python} /tmp/relay.py {bind} {b1} {b2}'

For each target (a fresh proxy process per round, targets alternated A B A B): start it, warm it up with a
few short connections, read its tree's RSS and open fds, then a separate client process opens N
connections through it, each completing one small GET (so the relay, or the HTTP keep-alive state, is
fully set up), and keeps them open and idle. With all N open: RSS and fds again. The figure is
(RSS with N open - RSS before) / N, in KiB per client connection; in tcp mode that covers the client and
the backend side of each relayed connection. The fd delta per connection is printed as a check
(about 2 in tcp mode: client + backend socket; about 1 in http mode with pooled backend connections).

Open files are capped (20,000 per process on our machines, a hard limit): the client runs in its own
process, the proxy gets the harness's raised soft limit, and N is checked against the limit up front.
Every phase is bounded in time (--timeout). Results: benchmarks/results/memory-<stamp>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def default_targets() -> str:
    return ",".join([*(f"fastlb-{m}" for m in h.FASTLB_MODES), "haproxy-tcp"])


# --------------------------------------------------------------------------------------------------
# The client process: `memory_bench.py --client PORT N DEADLINE_S`
# --------------------------------------------------------------------------------------------------

async def _one(port: int, timeout: float, sem: asyncio.Semaphore, keep: list) -> bool:
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(h.HOST, port), timeout)
        except (OSError, asyncio.TimeoutError):
            return False
        try:
            writer.write(REQUEST)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            if not head.startswith(b"HTTP/1.1 200"):
                writer.close()
                return False
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return False
        keep.append((reader, writer))
        return True


async def _client(port: int, n: int, deadline_s: float, concurrency: int) -> None:
    keep: list = []
    sem = asyncio.Semaphore(concurrency)
    per_conn_timeout = max(5.0, deadline_s / 4)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(_one(port, per_conn_timeout, sem, keep) for _ in range(n))), deadline_s)
        ok = sum(results)
    except asyncio.TimeoutError:
        ok = len(keep)
    print(f"READY {ok} {n - ok}", flush=True)
    # Idle until the harness writes a line or closes stdin (bounded by the deadline again).
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), deadline_s)
    except asyncio.TimeoutError:
        pass
    alive = sum(1 for r, w in keep if not r.at_eof() and not w.is_closing())
    for _, w in keep:
        w.close()
    print(f"CLOSED {alive}", flush=True)


def client_main(argv: list[str]) -> int:
    port, n, deadline_s, concurrency = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    h.raise_nofile_limit()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < n + 64:
        print(f"ERROR open-files limit {soft} < {n + 64}", flush=True)
        return 2
    asyncio.run(_client(port, n, deadline_s, concurrency))
    return 0


# --------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=default_targets(), help="comma-separated (default: %(default)s)")
    p.add_argument("--custom", action="append", default=[], metavar="NAME:MODE=CMD",
                   help="an extra target command with {python} {bind} {port} {b1} {b2} placeholders")
    p.add_argument("--connections", type=int, default=5000, help="idle connections (default %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="fresh proxy per round, targets alternated (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=200, help="connections being set up at once (default %(default)s)")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on each phase, seconds (default %(default)s)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds to wait before reading RSS (default %(default)s)")
    p.add_argument("--load-cpu", default="0", help="CPU of the backends and the client (default %(default)s)")
    p.add_argument("--proxy-cpu", default="1", help="CPU of the proxy (default %(default)s)")
    p.add_argument("--fastlb-cmd", default=None, help=f"override fastlb's command (default: {h.FASTLB_CMD!r})")
    p.add_argument("--fastlb-args", default="", help="extra flags appended to fastlb's command")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    return p.parse_args(argv)


def rss_settled(pid: int, settle: float) -> int:
    """Tree RSS after `settle` seconds, then the larger of two readings 0.2 s apart (pages still faulting in)."""
    time.sleep(settle)
    a = h.tree_rss_bytes(pid)
    time.sleep(0.2)
    return max(a, h.tree_rss_bytes(pid))


def measure_target(bench: h.Bench, spec: h.TargetSpec, args) -> dict:
    t = bench.start_target(spec)
    if t.error:
        return {"target": spec.name, "error": t.error}
    rec: dict = {"target": spec.name, "mode": spec.mode}
    client = None
    try:
        # Warm-up: a few complete request/response exchanges on short connections.
        for _ in range(20):
            h.http_get(t.port, h.SMALL_PATH)
        rss0 = rss_settled(t.pid, args.settle)
        fds0 = h.tree_fd_count(t.pid)
        bfds0 = h.tree_fd_count(bench.backends.pid)
        t0 = time.monotonic()
        client = bench.procs.start(
            "client", [sys.executable, os.path.abspath(__file__), "--client", str(t.port), str(args.connections),
                       str(args.timeout), str(args.concurrency)],
            cpu=args.load_cpu, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = _read_line(client, args.timeout + 10)
        if not line.startswith("READY"):
            raise RuntimeError(f"client: {line or 'no answer'}")
        ok, bad = (int(x) for x in line.split()[1:3])
        rec["setup_s"] = time.monotonic() - t0
        rss1 = rss_settled(t.pid, args.settle)
        fds1 = h.tree_fd_count(t.pid)
        bfds1 = h.tree_fd_count(bench.backends.pid)
        if t.proc and not t.proc.alive():
            raise RuntimeError(f"{spec.name} died with {ok} connections open:\n{t.proc.log_tail()}")
        client.popen.stdin.write(b"close\n")
        client.popen.stdin.flush()
        closed = _read_line(client, 30)
        rss2 = rss_settled(t.pid, args.settle)
        rec.update(
            connections=ok, failed=bad, rss_before=rss0, rss_open=rss1, rss_after_close=rss2,
            kib_per_conn=(rss1 - rss0) / 1024 / max(ok, 1),
            fds_per_conn=(fds1 - fds0) / max(ok, 1),
            backend_conns=bfds1 - bfds0,
            still_open_at_close=int(closed.split()[1]) if closed.startswith("CLOSED") else None,
        )
    except Exception as e:
        rec["error"] = str(e)
    finally:
        if client:
            bench.procs.stop(client)
        if t.proc:
            bench.procs.stop(t.proc)
    return rec


def _read_line(proc: h.Proc, timeout: float) -> str:
    """One line from a child's stdout, bounded in time (select on the pipe)."""
    import select
    fd = proc.popen.stdout
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if r:
            chunk = os.read(fd.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0].decode(errors="replace").strip()
        elif not proc.alive():
            break
    return buf.decode(errors="replace").strip()


def main(argv=None) -> int:
    args = parse_args(argv)
    custom = [h.parse_custom_target(c) for c in args.custom]
    names = args.targets + "".join("," + c.name for c in custom)
    specs = h.resolve_targets(names, custom, allowed_kinds=("fastlb", "haproxy", "nginx", "custom"))
    h.ensure_tools(["haproxy", "nginx", "taskset"])
    soft, hard = h.raise_nofile_limit()
    need = 2 * args.connections + 200
    if soft < need:
        raise SystemExit(f"{args.connections} connections need about {need} open files in the proxy (client and "
                         f"backend side), but the limit is {soft} (hard {hard}): use --connections "
                         f"{max(100, (soft - 200) // 2)} or less")
    bench = h.Bench(load_cpu=args.load_cpu, proxy_cpu=args.proxy_cpu, fastlb_cmd=args.fastlb_cmd,
                    fastlb_extra=args.fastlb_args, backend_connections=2 * args.connections + 1000,
                    keep_tmp=args.keep_tmp)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    info = h.system_info()
    recs = []
    try:
        bench.start_backends()
        for rnd in range(1, args.rounds + 1):
            for spec in specs:
                rec = measure_target(bench, spec, args)
                rec["round"] = rnd
                recs.append(rec)
                if "error" in rec:
                    h.log(f"[{rnd}/{args.rounds}] {spec.name:14} NOT MEASURED: " + rec["error"].strip().replace("\n", "\n    "))
                else:
                    h.log(f"[{rnd}/{args.rounds}] {spec.name:14} {rec['connections']} conns ({rec['failed']} failed) "
                          f"in {rec['setup_s']:.1f}s: {rec['kib_per_conn']:.2f} KiB/conn, "
                          f"{rec['fds_per_conn']:.2f} fds/conn, backend conns +{rec['backend_conns']}, "
                          f"RSS {rec['rss_before'] / 2**20:.1f} -> {rec['rss_open'] / 2**20:.1f} -> "
                          f"{rec['rss_after_close'] / 2**20:.1f} MiB")
    finally:
        bench.close()

    rows = []
    summary = {}
    for spec in specs:
        rs = [r for r in recs if r["target"] == spec.name and "error" not in r]
        if not rs:
            err = next((r["error"] for r in recs if r["target"] == spec.name), "")
            rows.append([spec.name, spec.mode, "NOT RUN", "", "", "", ""])
            summary[spec.name] = {"error": err}
            continue
        s = {"mode": spec.mode, "kib_per_conn": h.median(r["kib_per_conn"] for r in rs),
             "all": [round(r["kib_per_conn"], 2) for r in rs],
             "fds_per_conn": h.median(r["fds_per_conn"] for r in rs),
             "connections": min(r["connections"] for r in rs), "failed": max(r["failed"] for r in rs),
             "rss_before_mib": h.median(r["rss_before"] for r in rs) / 2**20}
        summary[spec.name] = s
        rows.append([spec.name, spec.mode, f"{s['kib_per_conn']:.2f}", " / ".join(f"{v:.2f}" for v in s["all"]),
                     f"{s['fds_per_conn']:.2f}", f"{s['rss_before_mib']:.1f}",
                     f"{s['connections']}" + (f" ({s['failed']} failed)" if s["failed"] else "")])
    title = f"memory per idle connection, {args.connections} connections, median of {args.rounds} rounds ({stamp})"
    table = h.render_table(["target", "mode", "KiB/conn", "per round", "fds/conn", "RSS before MiB", "connections"],
                           rows, right=[False, False, True, True, True, True, True])
    print(f"\n{title}\n\n{table}\n")
    for name, s in summary.items():
        if "error" in s:
            print(f"NOT RUN {name}: " + "\n    ".join(s["error"].strip().splitlines()[-8:]))
    path = h.results_path("memory", "json", stamp)
    with open(path, "w") as f:
        json.dump({"stamp": stamp, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                   "args": vars(args), "system": info, "summary": summary, "table": table, "runs": recs},
                  f, indent=1, default=str)
    print(f"JSON: {path}")
    return 0 if all("error" not in s for s in summary.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        sys.exit(client_main(sys.argv[2:]))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        h.log("interrupted: every started process was stopped")
        sys.exit(130)
