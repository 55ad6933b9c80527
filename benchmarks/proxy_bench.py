"""Throughput, latency and CPU per request of fastlb against HAProxy and nginx, in one run.

    python benchmarks/proxy_bench.py                       # defaults: 3 rounds x 5 s, -c64, plus 1 MiB bulk
    python benchmarks/proxy_bench.py --connections 64,256 --rounds 5 --duration 10
    python benchmarks/proxy_bench.py --targets direct,haproxy-tcp,nginx-http
    python benchmarks/proxy_bench.py --custom 'relay:tcp={python} /tmp/relay.py {bind} {b1} {b2}'

Method (shared/PERF-NOTES.md): two nginx backends (one worker) and wrk -t1 on the load CPU, each proxy alone
on the proxy CPU (taskset), every target started once and kept running, then rounds of A B C A B C ...
for each workload; the median of the rounds is reported, and each ratio to HAProxy is the median of the
per-round ratios (paired runs cancel most of the machine's drift). Proxy CPU time is utime+stime from
/proc/PID/stat summed over the proxy's process tree, before and after each run, divided by the requests.
Results go to benchmarks/results/proxy-<stamp>.json and .png. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402


def default_targets() -> str:
    return ",".join(["direct", *(f"fastlb-{m}" for m in h.FASTLB_MODES), "haproxy-tcp", "haproxy-http",
                     "nginx-http"])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default=default_targets(),
                   help="comma-separated, measured in this order (default: %(default)s)")
    p.add_argument("--custom", action="append", default=[], metavar="NAME:MODE=CMD",
                   help="an extra target: a command with {python} {bind} {port} {b1} {b2} placeholders, "
                        "compared with haproxy-MODE; it is appended to --targets")
    p.add_argument("--duration", type=int, default=5, help="whole seconds per wrk run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of A B C ... (>= 3; default %(default)s)")
    p.add_argument("--extra-rounds", type=int, default=2,
                   help="up to this many more rounds while some target has fewer than --rounds quiet runs "
                        "(default %(default)s; 0: exactly --rounds rounds)")
    p.add_argument("--keep-noisy", action="store_true",
                   help="take noisy runs into the medians too (default: only quiet runs when there are >= 2)")
    p.add_argument("--warmup", type=int, default=1, help="whole seconds of warm-up per target, 0: none (default %(default)s)")
    p.add_argument("--connections", default="64", help="wrk -c for small responses, comma list, e.g. 64,256")
    p.add_argument("--bulk-connections", type=int, default=8, help="wrk -c for the 1 MiB case (default %(default)s)")
    p.add_argument("--no-bulk", action="store_true", help="skip the 1 MiB case")
    p.add_argument("--load-cpu", default="0", help="CPU of wrk and the backends (default %(default)s)")
    p.add_argument("--proxy-cpu", default="1", help="CPU of the proxy under test (default %(default)s)")
    p.add_argument("--proxy-cpu-quota", type=float, default=None, metavar="F",
                   help="give each proxy only F of its CPU (a cgroup quota, e.g. 0.5), so that the proxies, "
                        "not the load generator, are the bottleneck and req/s compares their cost per request")
    p.add_argument("--fastlb-cmd", default=None,
                   help=f"override fastlb's command template (default: {h.FASTLB_CMD!r})")
    p.add_argument("--fastlb-args", default="", help="extra flags appended to fastlb's command")
    p.add_argument("--noise-threshold", type=float, default=0.10,
                   help="other processes' CPU (share of one CPU) above which a run counts as noisy (default %(default)s)")
    p.add_argument("--noisy-retries", type=int, default=1,
                   help="re-run a noisy run this many times, keeping the quietest (default %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help="before re-running a noisy run, wait up to this many seconds for a quiet second "
                        "(default %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=10.0, help="seconds for a target to listen")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG (no matplotlib needed)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    p.add_argument("--list-targets", action="store_true", help="print the known targets and exit")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.rounds < 3:
        h.log(f"warning: --rounds {a.rounds} < 3: medians of fewer than 3 runs are not what the issue asks for")
    if a.duration <= 0 or a.duration > 600:
        p.error("--duration must be in (0, 600] seconds")
    try:
        a.connections = [int(c) for c in a.connections.split(",") if c.strip()]
    except ValueError:
        p.error("--connections wants integers, e.g. 64,256")
    return a


def workloads(args) -> list[dict]:
    w = [{"name": f"small-c{c}", "path": h.SMALL_PATH, "connections": c, "bulk": False} for c in args.connections]
    if not args.no_bulk:
        w.append({"name": f"bulk-1MiB-c{args.bulk_connections}", "path": h.BULK_PATH,
                  "connections": args.bulk_connections, "bulk": True})
    return w


def select_runs(runs: list[dict], keep_noisy: bool) -> list[dict]:
    """The runs the medians are taken over: the quiet ones of each (workload, target) when there are at
    least 2 of them (and keep_noisy is off), else all of them."""
    by: dict = {}
    for r in runs:
        if "error" not in r:
            by.setdefault((r["workload"], r["target"]), []).append(r)
    out = []
    for rs in by.values():
        quiet = [r for r in rs if not r.get("noisy")]
        out.extend(rs if keep_noisy or len(quiet) < 2 else quiet)
    return out


def paired_ratios(rs: list[dict], refs: list[dict], metric: str) -> list[float]:
    """Per-round ratios: each run divided by the reference's run of the same round."""
    ref_by_round = {x["round"]: x for x in refs}
    return [r[metric] / ref_by_round[r["round"]][metric] for r in rs
            if r["round"] in ref_by_round and ref_by_round[r["round"]][metric]]


def summarize(runs: list[dict], targets: list[h.Target], wls: list[dict], keep_noisy: bool = False) -> dict:
    """Per workload and target: medians over the selected runs, spread, median of per-round ratios to HAProxy."""
    all_by, by = {}, {}
    for r in runs:
        if "error" not in r:
            all_by.setdefault((r["workload"], r["target"]), []).append(r)
    for r in select_runs(runs, keep_noisy):
        by.setdefault((r["workload"], r["target"]), []).append(r)
    out = {}
    for wl in wls:
        rows = {}
        for t in targets:
            rs = by.get((wl["name"], t.name), [])
            if not rs:
                continue
            metric = "mib_per_s" if wl["bulk"] else "rps"
            vals = [r[metric] for r in rs]
            ref_name = f"haproxy-{t.spec.mode}"
            ratios = paired_ratios(rs, by.get((wl["name"], ref_name), []), metric)
            if not ratios:  # no round where both were selected: pair over all runs
                ratios = paired_ratios(all_by.get((wl["name"], t.name), []),
                                       all_by.get((wl["name"], ref_name), []), metric)
            rows[t.name] = {
                "mode": t.spec.mode, "kind": t.spec.kind, "runs": len(rs), "metric": metric,
                "runs_total": len(all_by.get((wl["name"], t.name), [])),
                "rounds_used": [r["round"] for r in rs],
                "median": h.median(vals), "min": min(vals), "max": max(vals), "spread": h.spread(vals),
                "ratio_ref": ref_name if ratios else None, "ratio": h.median(ratios),
                "rps": h.median(r["rps"] for r in rs),
                "mib_per_s": h.median(r["mib_per_s"] for r in rs),
                "p50_us": h.median(r.get("lat_p50_us") for r in rs),
                "p99_us": h.median(r.get("lat_p99_us") for r in rs),
                "cpu_us_per_req": h.median(r.get("cpu_us_per_req") for r in rs),
                "user_us_per_req": h.median(r.get("user_us_per_req") for r in rs),
                "sys_us_per_req": h.median(r.get("sys_us_per_req") for r in rs),
                "proxy_cpu_share": h.median(r.get("proxy_cpu_share") for r in rs),
                "load_cpu_busy": h.median((r.get("load_cpu_usage") or {}).get("busy") for r in rs),
                "steal_max": max([(r.get("proxy_cpu_usage") or {}).get("steal", 0) for r in rs]
                                 + [(r.get("load_cpu_usage") or {}).get("steal", 0) for r in rs]),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "other_cpu_max": max(r["foreign"]["share"] for r in rs),
                "other_cpu_median": h.median(r["foreign"]["share"] for r in rs),
                "noisy_runs": sum(1 for r in rs if r.get("noisy")),
                "bytes_per_response": h.median(r["bytes"] / r["requests"] for r in rs if r["requests"]),
            }
        out[wl["name"]] = rows
    return out


def print_tables(summary: dict, wls: list[dict], unavailable: dict, failed: dict) -> str:
    text = []
    for wl in wls:
        rows = summary.get(wl["name"], {})
        bulk = wl["bulk"]
        headers = ["target", "MiB/s" if bulk else "req/s", "spread", "x HAProxy", "p50", "p99",
                   "CPU us/MiB (user+sys)" if bulk else "CPU us/req (user+sys)", "proxy CPU", "other CPU", "runs", "errors"]
        table = []
        for name, s in rows.items():
            val = f"{s['median']:,.0f}" if not bulk else f"{s['median']:,.1f}"
            ratio = f"{s['ratio']:.2f} ({s['ratio_ref'][8:]})" if s["ratio"] is not None else "-"
            if s["cpu_us_per_req"] is not None:
                cpu = f"{s['cpu_us_per_req']:.1f} ({s['user_us_per_req']:.1f}+{s['sys_us_per_req']:.1f})"
                share = f"{s['proxy_cpu_share'] * 100:.0f}%"
            else:
                cpu, share = "-", "-"
            sp = f"{s['spread'] * 100:.0f}%" if s["spread"] is not None else "-"
            other = f"{s['other_cpu_median'] * 100:.0f}%"
            used = f"{s['runs']}/{s['runs_total']}" + (f" ({s['noisy_runs']} noisy)" if s["noisy_runs"] else "")
            table.append([name, val, sp, ratio, h.fmt_us(s["p50_us"]), h.fmt_us(s["p99_us"]), cpu, share,
                          other, used, str(s["errors"])])
        for name, why in {**unavailable, **failed}.items():
            table.append([name, "NOT RUN", "", "", "", "", "", "", "", "", ""])
        text.append(f"\n### {wl['name']}: wrk -t1 -c{wl['connections']} GET {wl['path']}\n")
        text.append(h.render_table(headers, table))
    out = "\n".join(text)
    print(out, flush=True)
    return out


def draw_chart(plt, summary: dict, wls: list[dict], path: str, title: str) -> None:
    n = len(wls) + 1
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.2 + 2.4 * n), squeeze=False)
    axes = axes[:, 0]
    for ax, wl in zip(axes, wls):
        rows = summary.get(wl["name"], {})
        names = list(rows)
        med = [rows[k]["median"] for k in names]
        lo = [rows[k]["median"] - rows[k]["min"] for k in names]
        hi = [rows[k]["max"] - rows[k]["median"] for k in names]
        colors = ["#d62728" if rows[k]["kind"] in ("fastlb", "custom") else
                  "#7f7f7f" if rows[k]["kind"] == "direct" else "#1f77b4" for k in names]
        ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
        ax.invert_yaxis()
        for i, k in enumerate(names):
            r = rows[k]["ratio"]
            label = f" {med[i]:,.0f}" + (f"  x{r:.2f} {rows[k]['ratio_ref']}" if r is not None else "")
            ax.text(rows[k]["max"], i, label, va="center", fontsize=8)
        ax.set_xlabel("MiB/s (median, whiskers min-max)" if wl["bulk"] else "req/s (median, whiskers min-max)")
        ax.set_title(f"{wl['name']}: wrk -t1 -c{wl['connections']} GET {wl['path']}", fontsize=10)
        ax.set_xlim(0, max([rows[k]["max"] for k in names] + [1]) * 1.5)
    ax = axes[-1]
    first = summary.get(wls[0]["name"], {}) if wls else {}
    names = [k for k, v in first.items() if v["cpu_us_per_req"] is not None]
    user = [first[k]["user_us_per_req"] for k in names]
    sys_ = [first[k]["sys_us_per_req"] for k in names]
    ax.barh(names, user, color="#2ca02c", label="user")
    ax.barh(names, sys_, left=user, color="#ff7f0e", label="kernel")
    ax.invert_yaxis()
    for i, k in enumerate(names):
        ax.text(user[i] + sys_[i], i, f" {user[i]:.1f} + {sys_[i]:.1f} us", va="center", fontsize=8)
    ax.set_xlabel("proxy CPU microseconds per request (median)")
    ax.set_title(f"{wls[0]['name'] if wls else ''}: proxy CPU per request", fontsize=10)
    ax.set_xlim(0, max([u + s for u, s in zip(user, sys_)] + [1]) * 1.35)
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    custom = [h.parse_custom_target(c) for c in args.custom]
    names = args.targets + "".join("," + c.name for c in custom)
    specs = h.resolve_targets(names, custom)
    if args.list_targets:
        for name, spec in {**h.builtin_targets(), **{c.name: c for c in custom}}.items():
            print(f"{name:14} {spec.kind:8} {spec.mode}")
        return 0

    h.ensure_tools(["haproxy", "nginx", "wrk", "taskset"])
    plt = None if args.no_chart else h.ensure_matplotlib()
    h.raise_nofile_limit()
    cpus = os.sched_getaffinity(0)
    for c in (args.load_cpu, args.proxy_cpu):
        if not c.isdigit() or int(c) not in cpus:
            raise SystemExit(f"CPU {c} is not available here (have {sorted(cpus)}): see --load-cpu/--proxy-cpu")
    if args.load_cpu == args.proxy_cpu:
        h.log("warning: the proxy shares its CPU with wrk and the backends: ratios will not mean much")

    wls = workloads(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    info = h.system_info()
    bench = h.Bench(load_cpu=args.load_cpu, proxy_cpu=args.proxy_cpu, fastlb_cmd=args.fastlb_cmd,
                    fastlb_extra=args.fastlb_args, keep_tmp=args.keep_tmp,
                    proxy_cpu_quota=args.proxy_cpu_quota)
    runs: list[dict] = []
    targets: list[h.Target] = []
    unavailable: dict[str, str] = {}
    failed: dict[str, str] = {}
    try:
        bench.start_backends()

        for spec in specs:
            t = bench.start_target(spec, args.startup_timeout)
            if t.error:
                unavailable[t.name] = t.error
                h.log(f"\n*** {t.name} is NOT measured: it did not start or did not proxy correctly:\n"
                      + "\n".join("    " + line for line in t.error.splitlines()[-15:]) + "\n")
            else:
                targets.append(t)
                aff = h.tree_affinity(t.pid) if t.pid else {}
                h.log(f"{t.name:14} port {t.port}" + (f"  pids/cpus {aff}" if aff else "  (no proxy)"))
                if t.pid and any(v != args.proxy_cpu for v in aff.values()):
                    h.log(f"warning: {t.name} is not pinned to CPU {args.proxy_cpu}: {aff}")
        if not targets:
            raise SystemExit("no target could be started")
        est = len(targets) * (len(wls) * args.rounds * (args.duration + 0.6) + args.warmup + 0.5)
        h.log(f"{len(targets)} targets x {len(wls)} workloads x {args.rounds} rounds x {args.duration:g}s: "
              f"about {est / 60:.1f} min; load CPU {args.load_cpu}, proxy CPU {args.proxy_cpu}, "
              f"loadavg {' '.join(info['loadavg'])}")

        for t in targets:  # warm-up: connection pools, caches, allocator arenas
            if args.warmup > 0:
                h.run_wrk(bench, t.port, h.SMALL_PATH, max(args.connections), args.warmup)

        max_rounds = args.rounds + max(0, args.extra_rounds)
        for rnd in range(1, max_rounds + 1):
            if rnd > args.rounds:
                short = [f"{wl['name']}/{t.name}" for wl in wls for t in targets if t.name not in failed
                         and sum(1 for r in runs if r["workload"] == wl["name"] and r["target"] == t.name
                                 and "error" not in r and not r.get("noisy")) < args.rounds]
                if not short:
                    break
                h.log(f"extra round {rnd}/{max_rounds}: fewer than {args.rounds} quiet runs for {', '.join(short)}")
            for wl in wls:
                for t in targets:
                    if t.name in failed:
                        continue
                    rec = {"round": rnd, "workload": wl["name"], "target": t.name, "mode": t.spec.mode,
                           "connections": wl["connections"], "path": wl["path"]}
                    if t.proc and not t.proc.alive():
                        failed[t.name] = f"exited with {t.proc.popen.returncode} during the run"
                        h.log(f"*** {t.name} died:\n{t.proc.log_tail()}")
                        continue
                    try:
                        best = None
                        for attempt in range(1 + max(0, args.noisy_retries)):
                            if attempt:
                                h.wait_quiet(bench.procs, args.noise_threshold, args.quiet_wait)
                            m = h.measure(bench, t, wl["path"], wl["connections"], args.duration)
                            m["attempt"] = attempt + 1
                            if best is None or m["foreign"]["share"] < best["foreign"]["share"]:
                                best = m
                            if m["foreign"]["share"] <= args.noise_threshold:
                                break
                            top = m["foreign"]["top"][0] if m["foreign"]["top"] else {}
                            h.log(f"    noisy: other processes used {m['foreign']['share'] * 100:.0f}% of a CPU "
                                  f"(top: pid {top.get('pid')} {top.get('comm')} {h.cmdline(top.get('pid', 0))[:60]!r} "
                                  f"{top.get('cpu_share', 0) * 100:.0f}%)")
                        best["noisy"] = best["foreign"]["share"] > args.noise_threshold
                        rec.update(best)
                    except Exception as e:
                        rec["error"] = str(e)
                        h.log(f"*** {t.name} {wl['name']} round {rnd}: {e}")
                        if t.proc and not t.proc.alive():
                            failed[t.name] = f"exited with {t.proc.popen.returncode} during the run"
                    runs.append(rec)
                    if "error" not in rec:
                        val = (f"{rec['mib_per_s']:8,.1f} MiB/s" if wl["bulk"] else f"{rec['rps']:8,.0f} req/s")
                        cpu = (f" cpu {rec['cpu_us_per_req']:6.1f} us/req ({rec['proxy_cpu_share'] * 100:3.0f}% of a CPU)"
                               if "cpu_us_per_req" in rec else "")
                        steal = max((rec.get("proxy_cpu_usage") or {}).get("steal", 0),
                                    (rec.get("load_cpu_usage") or {}).get("steal", 0))
                        errs = sum(rec["errors"].values())
                        h.log(f"[round {rnd}] {wl['name']:16} {t.name:14} {val}  p99 "
                              f"{h.fmt_us(rec.get('lat_p99_us')):>8}{cpu}"
                              f"  other {rec['foreign']['share'] * 100:3.0f}%"
                              + (f"  steal {steal * 100:.0f}%" if steal > 0.01 else "")
                              + ("  NOISY" if rec["noisy"] else "")
                              + (f"  ERRORS {errs}" if errs else ""))
    finally:
        bench.close()

    summary = summarize(runs, [t for t in targets], wls, args.keep_noisy) if runs else {}
    title = (f"fastlb proxy bench {stamp}: {args.rounds} rounds x {args.duration:g}s, proxy on CPU {args.proxy_cpu}, "
             f"wrk+backends on CPU {args.load_cpu}")
    print(f"\n{title}")
    tables = print_tables(summary, wls, unavailable, failed)
    for name, why in {**unavailable, **failed}.items():
        print(f"\nNOT RUN {name}: " + "\n    ".join(why.splitlines()[-6:]))
    print("\nmedians over the quiet runs when there are >= 2 (--keep-noisy: all); spread: (max-min)/median; "
          "x HAProxy: median of per-round ratios to haproxy-MODE; proxy CPU: share of one CPU used by the proxy "
          "tree; other CPU: median share of a CPU used by processes this run did not start; runs: used/measured")
    json_path = h.results_path("proxy", "json", stamp)
    with open(json_path, "w") as f:
        json.dump({"stamp": stamp, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                   "args": vars(args), "system": info, "backends": bench.backend_ports,
                   "workloads": wls, "unavailable": unavailable, "failed": failed,
                   "summary": summary, "tables": tables, "runs": runs}, f, indent=1, default=str)
    print(f"\nJSON: {json_path}")
    if plt is not None and summary:
        png = h.results_path("proxy", "png", stamp)
        draw_chart(plt, summary, wls, png, title)
        print(f"chart: {png}")
    return 0 if not failed else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        h.log("interrupted: every started process was stopped")
        sys.exit(130)
