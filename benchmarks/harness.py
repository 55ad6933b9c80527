"""Shared pieces of the proxy benchmarks: tools, processes, configs, CPU/RSS accounting, wrk parsing.

Used by proxy_bench.py (throughput, latency, CPU per request) and memory_bench.py (RSS per connection).
The method is the one in shared/PERF-NOTES.md: nginx backends and wrk on one CPU, the proxy alone on the
other, targets alternated within one run, CPU time from /proc/PID/stat summed over the proxy's process tree.

Rules every caller gets from here:
- every process is started through `Procs`, which stops it (and its descendants) by PID on exit, on an
  exception, on Ctrl-C and on SIGTERM/SIGHUP;
- every address is 127.0.0.1; configs, logs and the 1 MiB body live in a temp dir removed at the end.

The pure functions (parse_wrk_output, parse_duration_us, parse_size_bytes, parse_count, parse_proc_stat,
median, ...) have no side effects and are unit-tested in test_harness.py.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Iterable, Sequence

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The small response: a fixed body, so a whole response (nginx's head included) is ~150 bytes.
SMALL_BODY = b"fastlb-bench ok\n"
SMALL_PATH = "/"
BULK_PATH = "/1m"
BULK_SIZE = 1 << 20

# Binary -> Debian package(s) tried in order (nginx-light is gone from Debian 13: fall back to nginx).
TOOL_PACKAGES = {
    "haproxy": ["haproxy"],
    "nginx": ["nginx-light", "nginx"],
    "wrk": ["wrk"],
    "taskset": ["util-linux"],
}
TOOL_PATHS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Pure parsing (unit-tested)
# --------------------------------------------------------------------------------------------------

_TIME_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
# wrk's format_binary uses base 1024 ("KB" means KiB); accept the IEC spellings too.
_SIZE_UNITS = {
    "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
# wrk's format_metric uses base 1000.
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def parse_duration_us(text: str) -> float:
    """'812.00us' / '1.23ms' / '2.00s' / '1.50m' -> microseconds. A bare number is taken as microseconds."""
    m = re.fullmatch(rf"\s*({_NUM})\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    unit = m.group(2).lower() or "us"
    if unit not in _TIME_UNITS_US:
        raise ValueError(f"unknown time unit {m.group(2)!r} in {text!r}")
    return float(m.group(1)) * _TIME_UNITS_US[unit]


def parse_size_bytes(text: str) -> float:
    """'123.45MB' / '1.00GB' / '512B' / '3.2KiB' -> bytes (wrk's units are base 1024)."""
    m = re.fullmatch(rf"\s*({_NUM})\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = m.group(2).lower() or "b"
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit {m.group(2)!r} in {text!r}")
    return float(m.group(1)) * _SIZE_UNITS[unit]


def parse_count(text: str) -> float:
    """'61.23k' / '1.2M' / '980' -> a number (wrk's metric units are base 1000)."""
    m = re.fullmatch(rf"\s*({_NUM})\s*([a-zA-Z]?)\s*", text)
    if not m:
        raise ValueError(f"not a count: {text!r}")
    unit = m.group(2).lower()
    if unit not in _COUNT_UNITS:
        raise ValueError(f"unknown count unit {m.group(2)!r} in {text!r}")
    return float(m.group(1)) * _COUNT_UNITS[unit]


WRK_JSON_MARK = "FASTLB-WRK-JSON "

# A wrk Lua script whose done() prints exact figures (integers, microseconds) on one line; the
# human-readable text is rounded to 2-3 significant digits. parse_wrk_output prefers these figures.
WRK_DONE_LUA = textwrap.dedent(
    """
    done = function(summary, latency, requests)
      local e = summary.errors
      io.write(string.format(
        '%s{"duration_us":%d,"requests":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,'
        .. '"write_errors":%d,"status_errors":%d,"timeouts":%d,"lat_p50_us":%d,"lat_p90_us":%d,'
        .. '"lat_p99_us":%d,"lat_p999_us":%d,"lat_max_us":%d,"lat_mean_us":%.2f}\\n',
        '%MARK%', summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency:percentile(99.9), latency.max, latency.mean))
    end
    """
).replace("%MARK%", WRK_JSON_MARK)


def parse_wrk_output(text: str) -> dict:
    """Parse wrk's stdout (with or without --latency, with or without our done() JSON line).

    Returns a dict with: requests, duration_s, bytes, rps, transfer_bps, lat_mean_us, lat_max_us,
    lat_p50_us, lat_p75_us, lat_p90_us, lat_p99_us (when --latency), errors (connect/read/write/timeout/
    status), non_2xx, exact (True when the done() JSON line was found and used). Raises ValueError when
    the text has no 'requests in' summary (wrk failed).
    """
    out: dict = {"errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}, "non_2xx": 0}
    m = re.search(rf"(\d+)\s+requests in\s+({_NUM}\s*[a-zA-Z]+),\s*({_NUM}\s*[a-zA-Z]+)\s+read", text)
    if not m:
        raise ValueError("wrk output has no 'N requests in T, B read' line:\n" + text[-2000:])
    out["requests"] = int(m.group(1))
    out["duration_s"] = parse_duration_us(m.group(2)) / 1e6
    out["bytes"] = parse_size_bytes(m.group(3))

    m = re.search(rf"Requests/sec:\s*({_NUM}\s*[a-zA-Z]?)\s*$", text, re.M)
    out["rps"] = parse_count(m.group(1)) if m else out["requests"] / max(out["duration_s"], 1e-9)
    m = re.search(rf"Transfer/sec:\s*({_NUM}\s*[a-zA-Z]*)\s*$", text, re.M)
    out["transfer_bps"] = parse_size_bytes(m.group(1)) if m else out["bytes"] / max(out["duration_s"], 1e-9)

    # Thread stats: "    Latency   812.33us  120.12us   3.01ms   91.23%"
    m = re.search(rf"^\s*Latency\s+({_NUM}\s*[a-zA-Z]+)\s+({_NUM}\s*[a-zA-Z]+)\s+({_NUM}\s*[a-zA-Z]+)", text, re.M)
    if m:
        out["lat_mean_us"] = parse_duration_us(m.group(1))
        out["lat_stdev_us"] = parse_duration_us(m.group(2))
        out["lat_max_us"] = parse_duration_us(m.group(3))

    # "  Latency Distribution\n     50%  802.00us\n     75%  ..."
    dist = re.search(r"Latency Distribution\s*\n((?:\s*\d+(?:\.\d+)?%\s+\S+\s*\n?)+)", text)
    if dist:
        for pct, val in re.findall(r"(\d+(?:\.\d+)?)%\s+(\S+)", dist.group(1)):
            key = "lat_p%s_us" % ("%g" % float(pct)).replace(".", "")  # 50 -> p50, 99.9 -> p999
            out[key] = parse_duration_us(val)

    m = re.search(r"Socket errors:\s*connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"].update(connect=int(m.group(1)), read=int(m.group(2)), write=int(m.group(3)),
                             timeout=int(m.group(4)))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
        out["errors"]["status"] = int(m.group(1))

    out["exact"] = False
    for line in text.splitlines():
        if line.startswith(WRK_JSON_MARK):
            j = json.loads(line[len(WRK_JSON_MARK):])
            out["exact"] = True
            out["requests"] = j["requests"]
            out["duration_s"] = j["duration_us"] / 1e6
            out["bytes"] = j["bytes"]
            out["rps"] = j["requests"] / max(out["duration_s"], 1e-9)
            out["transfer_bps"] = j["bytes"] / max(out["duration_s"], 1e-9)
            for k in ("lat_p50_us", "lat_p90_us", "lat_p99_us", "lat_p999_us", "lat_max_us", "lat_mean_us"):
                out[k] = float(j[k])
            out["errors"] = {"connect": j["connect_errors"], "read": j["read_errors"],
                             "write": j["write_errors"], "timeout": j["timeouts"], "status": j["status_errors"]}
            out["non_2xx"] = j["status_errors"]
    return out


def parse_proc_stat(text: str) -> dict:
    """Fields of /proc/PID/stat we need: pid, comm, state, ppid, utime, stime (ticks), starttime, rss (pages).

    comm is in parentheses and may itself contain spaces and parentheses: split at the last ')'.
    """
    lpar, rpar = text.index("("), text.rindex(")")
    rest = text[rpar + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    return {
        "pid": int(text[:lpar]),
        "comm": text[lpar + 1:rpar],
        "state": rest[0],
        "ppid": int(rest[1]),
        "utime": int(rest[11]),
        "stime": int(rest[12]),
        "starttime": int(rest[19]),
        "rss_pages": int(rest[21]),
    }


def parse_cpu_times(text: str) -> dict[str, list[int]]:
    """/proc/stat -> {'cpu': [...], 'cpu0': [...], ...}; columns user nice system idle iowait irq softirq steal."""
    out = {}
    for line in text.splitlines():
        if line.startswith("cpu"):
            parts = line.split()
            out[parts[0]] = [int(x) for x in parts[1:]]
    return out


def cpu_usage_between(before: dict[str, list[int]], after: dict[str, list[int]], cpu: str) -> dict:
    """Share of busy, idle and steal time on one CPU ('cpu0', 'cpu1') between two /proc/stat samples.

    'tasks' is the share spent in processes (user + nice + system), without irq/softirq time.
    """
    b, a = before.get(cpu), after.get(cpu)
    if not b or not a:
        return {}
    d = [y - x for x, y in zip(b, a)]
    total = sum(d[:8]) or 1
    idle = d[3] + d[4]
    steal = d[7] if len(d) > 7 else 0
    return {"busy": (total - idle - steal) / total, "idle": idle / total, "steal": steal / total,
            "tasks": (d[0] + d[1] + d[2]) / total}


def median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def spread(values: Iterable[float]) -> float | None:
    """(max - min) / median: how much the rounds of one target disagree."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return None
    med = statistics.median(vals)
    return (max(vals) - min(vals)) / med if med else None


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    if us >= 1e6:
        return f"{us / 1e6:.2f}s"
    if us >= 1e3:
        return f"{us / 1e3:.2f}ms"
    return f"{us:.0f}us"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n:,.0f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A Markdown table padded to align in a terminal."""
    right = right or [False] + [True] * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(str(c).rjust(w) if r else str(c).ljust(w)
                                 for c, w, r in zip(cells, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


# --------------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------------

def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(TOOL_PATHS))


def ensure_tools(names: Sequence[str]) -> dict[str, str]:
    """Find each binary; apt-get install the missing ones (root, Debian). Returns name -> path."""
    missing = [n for n in names if not which(n)]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"missing {', '.join(missing)}: run as root (the harness installs them with "
                             f"apt-get) or install: apt-get install {' '.join(TOOL_PACKAGES[n][0] for n in missing)}")
        if not shutil.which("apt-get"):
            raise SystemExit(f"missing {', '.join(missing)} and no apt-get here: install them by hand")
        _apt_install(missing)
        still = [n for n in names if not which(n)]
        if still:
            raise SystemExit(f"apt-get did not provide: {', '.join(still)}")
    return {n: which(n) for n in names}


def _apt_install(missing: Sequence[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Keep the packages' init scripts from starting system-wide nginx/haproxy services (port 80 etc.):
    # a temporary policy-rc.d that denies every start, removed again right after (Debian's documented way).
    policy = "/usr/sbin/policy-rc.d"
    made_policy = False
    if not os.path.exists(policy):
        with open(policy, "w") as f:
            f.write("#!/bin/sh\n# temporary, written by fastlb benchmarks/harness.py\nexit 101\n")
        os.chmod(policy, 0o755)
        made_policy = True
    try:
        log("installing " + ", ".join(missing) + " with apt-get ...")
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, timeout=600)
        for name in missing:
            for pkg in TOOL_PACKAGES[name]:
                r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", pkg],
                                   env=env, timeout=900)
                if r.returncode == 0:
                    break
            else:
                raise SystemExit(f"apt-get could not install any of {TOOL_PACKAGES[name]}")
    finally:
        if made_policy:
            os.unlink(policy)


def tool_versions() -> dict[str, str]:
    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception as e:  # a version string is informational only
            return f"unknown ({e})"
    return {
        "haproxy": first_line([which("haproxy") or "haproxy", "-v"]),
        "nginx": first_line([which("nginx") or "nginx", "-v"]),
        "wrk": first_line([which("wrk") or "wrk", "-v"]),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
    }


def ensure_matplotlib():
    """Import matplotlib (Agg), pip-installing it into this interpreter when missing. None if impossible."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib missing: pip install matplotlib ...")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], timeout=600)
        if (r.returncode != 0 and sys.executable.startswith("/usr/bin/") and os.geteuid() == 0
                and shutil.which("apt-get")):
            # Debian's own python3 refuses pip installs (PEP 668): take Debian's package instead.
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "python3-matplotlib"],
                               env=env, timeout=900)
        if r.returncode != 0:
            log("could not install matplotlib: no chart (JSON results are still written)")
            return None
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it). Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def nofile_hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


# --------------------------------------------------------------------------------------------------
# /proc accounting
# --------------------------------------------------------------------------------------------------

def read_proc_stat(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_proc_stat(f.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_proc_stat(int(entry))
            if st:
                children.setdefault(st["ppid"], []).append(st["pid"])
    return children


def process_tree(pid: int) -> list[int]:
    """pid and all its live descendants (by walking /proc ppid links)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if os.path.exists(f"/proc/{p}"):
            out.append(p)
            todo.extend(children.get(p, ()))
    return out


@dataclasses.dataclass
class CpuSample:
    utime: int  # ticks, summed over the tree
    stime: int
    t: float    # monotonic seconds
    pids: tuple[int, ...]


def tree_cpu(pid: int) -> CpuSample:
    """utime + stime of every live process in pid's tree (threads are included in a process's figures)."""
    u = s = 0
    pids = process_tree(pid)
    for p in pids:
        st = read_proc_stat(p)
        if st:
            u += st["utime"]
            s += st["stime"]
    return CpuSample(u, s, time.monotonic(), tuple(pids))


def cpu_delta(before: CpuSample, after: CpuSample) -> dict:
    """Seconds of user and system CPU between two samples, and the share of one CPU the tree used.

    A process that exited between the samples loses its ticks: warn through 'tree_changed'.
    """
    du = (after.utime - before.utime) / CLK_TCK
    ds = (after.stime - before.stime) / CLK_TCK
    wall = max(after.t - before.t, 1e-9)
    return {"user_s": du, "sys_s": ds, "wall_s": wall, "cpu_share": (du + ds) / wall,
            "tree_changed": set(before.pids) != set(after.pids)}


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS over pid's process tree."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def tree_fd_count(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return total


def tree_affinity(pid: int) -> dict[int, str]:
    out = {}
    for p in process_tree(pid):
        try:
            out[p] = ",".join(str(c) for c in sorted(os.sched_getaffinity(p)))
        except (ProcessLookupError, OSError):
            pass
    return out


def snapshot_all_cpu() -> dict[int, tuple[int, str, int]]:
    """Every process on the machine: pid -> (starttime, comm, utime+stime ticks). For the noise report."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_proc_stat(int(entry))
            if st:
                out[st["pid"]] = (st["starttime"], st["comm"], st["utime"] + st["stime"])
    return out


def foreign_cpu(before: dict, after: dict, ours: Iterable[int], wall: float, top: int = 3) -> dict:
    """CPU used between two snapshots by processes that are not ours: total share of a CPU and the top users.

    Processes that started and ended between the snapshots are missed; kernel threads (softirq work) count.
    """
    ours = set(ours)
    users = []
    for pid, (start, comm, ticks) in after.items():
        if pid in ours:
            continue
        b = before.get(pid)
        base = b[2] if b and b[0] == start else 0
        d = ticks - base
        if d > 0:
            users.append((d / CLK_TCK / wall, pid, comm))
    users.sort(reverse=True)
    return {"share": sum(u[0] for u in users),
            "top": [{"pid": pid, "comm": comm, "cpu_share": round(share, 3)} for share, pid, comm in users[:top]]}


def wait_quiet(procs: "Procs", threshold: float, max_wait: float) -> dict:
    """Wait (up to max_wait s) for a second in which other processes use <= threshold of a CPU.

    Returns the last one-second foreign-load sample. Our own processes (idle targets) are excluded.
    """
    deadline = time.monotonic() + max_wait
    while True:
        ours = {os.getpid()}
        for p in procs.procs:
            ours.update(process_tree(p.pid))
        a = snapshot_all_cpu()
        t0 = time.monotonic()
        time.sleep(1.0)
        f = foreign_cpu(a, snapshot_all_cpu(), ours, time.monotonic() - t0)
        if f["share"] <= threshold or time.monotonic() >= deadline:
            return f


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def read_cpu_times() -> dict[str, list[int]]:
    with open("/proc/stat") as f:
        return parse_cpu_times(f.read())


# --------------------------------------------------------------------------------------------------
# Processes: start, track, stop by PID
# --------------------------------------------------------------------------------------------------

class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log_path: str | None):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self.log_path = log_path
        st = read_proc_stat(self.pid)
        self.starttime = st["starttime"] if st else None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])


class Procs:
    """Registry of everything the harness starts. stop_all() runs at exit, on exceptions and on signals.

    Each process gets its own session (Ctrl-C in the terminal reaches only the harness, which then stops
    the children in order). Stopping sends SIGTERM to the PID, waits, then SIGKILLs every PID of its tree
    that is still the same process (same start time), so a recycled PID is never signalled.
    """

    def __init__(self):
        self.procs: list[Proc] = []
        self._stopped = False
        atexit.register(self.stop_all)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, self._on_signal)

    @staticmethod
    def _on_signal(signum, frame):
        raise SystemExit(128 + signum)

    def start(self, name: str, cmd: Sequence[str], *, cpu: str | None = None, log_dir: str | None = None,
              env: dict | None = None, cwd: str | None = None, stdin=subprocess.DEVNULL,
              stdout=None) -> Proc:
        if cpu is not None:
            cmd = [which("taskset") or "taskset", "-c", str(cpu), *cmd]
        log_path = None
        out = stdout
        if out is None:
            if log_dir:
                log_path = os.path.join(log_dir, f"{name}.log")
                out = open(log_path, "ab")
            else:
                out = subprocess.DEVNULL
        popen = subprocess.Popen(list(cmd), stdin=stdin, stdout=out,
                                 stderr=subprocess.STDOUT if stdout is None else None,
                                 env=env, cwd=cwd, start_new_session=True)
        if stdout is None and log_dir:
            out.close()
        p = Proc(name, popen, log_path)
        self.procs.append(p)
        return p

    def stop(self, p: Proc, grace: float = 5.0) -> None:
        if p not in self.procs:
            return
        self.procs.remove(p)
        tree = []
        for pid in process_tree(p.pid) if p.alive() else []:
            st = read_proc_stat(pid)
            if st:
                tree.append((pid, st["starttime"]))
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + grace
        for pid, start in tree:
            while True:
                st = read_proc_stat(pid)
                if not st or st["starttime"] != start or st["state"] == "Z":
                    break
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
        if p.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(5)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            try:
                self.stop(p)
            except Exception as e:  # keep stopping the others
                log(f"could not stop {p.name} (pid {p.pid}): {e}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_listening(port: int, proc: Proc | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode} before listening "
                               f"on {HOST}:{port}:\n{proc.log_tail()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                tail = proc.log_tail() if proc else ""
                raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout:.0f}s\n{tail}")
            time.sleep(0.05)


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 GET on a fresh connection: (status, headers, body). For probing targets only."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines or len(lines[0].split()) < 2:
        raise RuntimeError(f"no HTTP response on port {port}: {data[:200]!r}")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

def _nginx_user_line() -> str:
    # As root, nginx's default 'user nobody nobody' fails on Debian (no group 'nobody'): run the workers
    # as the invoking user; without root the directive is ignored anyway.
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd
    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


def nginx_common(tmp: str, name: str, connections: int) -> str:
    return textwrap.dedent(f"""\
        {_nginx_user_line()}
        worker_processes 1;
        worker_rlimit_nofile {min(nofile_hard_limit(), 2 * connections + 100)};
        pid {tmp}/{name}.pid;
        error_log {tmp}/{name}.error.log warn;
        events {{ worker_connections {connections}; multi_accept on; }}
        """)


def nginx_http_common(tmp: str, name: str) -> str:
    return textwrap.dedent(f"""\
        access_log off;
        server_tokens off;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
        client_body_temp_path {tmp}/{name}.client_body;
        proxy_temp_path {tmp}/{name}.proxy;
        fastcgi_temp_path {tmp}/{name}.fastcgi;
        uwsgi_temp_path {tmp}/{name}.uwsgi;
        scgi_temp_path {tmp}/{name}.scgi;
        """)


def backend_nginx_conf(tmp: str, ports: Sequence[int], connections: int = 12000) -> str:
    """Backends: one nginx worker listening on each port; '/' -> SMALL_BODY, '/1m' -> 1 MiB file (sendfile)."""
    www = os.path.join(tmp, "www")
    os.makedirs(www, exist_ok=True)
    with open(os.path.join(www, "1m"), "wb") as f:
        f.write(os.urandom(BULK_SIZE))
    body = SMALL_BODY.decode().replace("\n", "\\n")
    servers = "".join(textwrap.dedent(f"""\
            server {{
                listen {HOST}:{port} backlog=4096;
                location = {BULK_PATH} {{ root {www}; try_files /1m =404; }}
                location / {{ return 200 "{body}"; }}
            }}
        """) for port in ports)
    return nginx_common(tmp, "backends", connections) + "http {\n" + textwrap.indent(
        nginx_http_common(tmp, "backends") + "default_type text/plain;\nsendfile on;\ntcp_nopush on;\n"
        + servers, "    ") + "}\n"


def nginx_proxy_conf(tmp: str, port: int, backends: Sequence[int], connections: int = 12000) -> str:
    """nginx as the proxy: 1 worker, upstream keep-alive, X-Forwarded-For, streaming (no temp files)."""
    ups = "".join(f"        server {HOST}:{b};\n" for b in backends)
    http = textwrap.dedent(f"""\
        upstream be {{
        {ups.strip()}
            keepalive 1024;
            keepalive_requests 10000000;
            keepalive_timeout 300s;
        }}
        server {{
            listen {HOST}:{port} backlog=4096;
            location / {{
                proxy_pass http://be;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header Host $host;
                proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                proxy_max_temp_file_size 0;
            }}
        }}
        """)
    return nginx_common(tmp, "nginx-proxy", connections) + "http {\n" + textwrap.indent(
        nginx_http_common(tmp, "nginx-proxy") + http, "    ") + "}\n"


def haproxy_text(mode: str, maxconn: int, binds: Sequence[str], backends: Sequence[int], *,
                 global_lines: Sequence[str] = (), defaults_lines: Sequence[str] = (),
                 backend_lines: Sequence[str] = (), server_options: str = "") -> str:
    """One HAProxy 2.6 config, one thread, the shape every bench's HAProxy shares: `binds` are what
    follows `bind` (address and options), `*_lines` what a bench adds to each section."""
    def lines(items: Sequence[str]) -> str:
        return "".join(f"    {item}\n" for item in items)
    servers = "".join(f"    server s{i} {HOST}:{b}{server_options}\n" for i, b in enumerate(backends, 1))
    return (f"global\n    nbthread 1\n    maxconn {maxconn}\n{lines(global_lines)}\n"
            f"defaults\n    mode {mode}\n    maxconn {maxconn}\n    timeout connect 5s\n"
            f"    timeout client 300s\n    timeout server 300s\n{lines(defaults_lines)}\n"
            f"frontend fe\n{lines(f'bind {bind}' for bind in binds)}    default_backend be\n\n"
            f"backend be\n    balance roundrobin\n{lines(backend_lines)}{servers}")


def haproxy_conf(mode: str, port: int, backends: Sequence[int], maxconn: int) -> str:
    """HAProxy 2.6, one thread; http mode: backend keep-alive reused across clients, X-Forwarded-For."""
    assert mode in ("tcp", "http")
    http = mode == "http"
    return haproxy_text(mode, maxconn, [f"{HOST}:{port}"], backends,
                        defaults_lines=["timeout http-request 60s", "timeout http-keep-alive 300s"],
                        backend_lines=["option forwardfor", "http-reuse always", "option http-keep-alive"]
                        if http else ())


def haproxy_command(directory: str, name: str, config: str) -> tuple[list[str], None, str]:
    """HAProxy in the foreground on `config`, written to directory/name.cfg: (command, env, cwd)."""
    path = os.path.join(directory, f"{name}.cfg")
    with open(path, "w") as f:
        f.write(config)
    return [which("haproxy"), "-db", "-f", path], None, directory


def haproxy_maxconn() -> int:
    """As many connections as the open-files hard limit allows (each relayed connection takes 2 fds)."""
    return max(1000, min(9000, (nofile_hard_limit() - 200) // 2))


# --------------------------------------------------------------------------------------------------
# Targets: a proxy (or none) in front of the two backends
# --------------------------------------------------------------------------------------------------

# fastlb's modes; the targets fastlb-tcp and fastlb-http (proxy bench,
# memory bench) and its comparison with haproxy-http follow from this tuple.
FASTLB_MODES = ("tcp", "http")
FASTLB_CMD = ("{python} -m fastlb --mode {mode} --bind {bind} --backend {b1} --backend {b2} "
              "--algorithm roundrobin --workers 1 --log-level warning")


@dataclasses.dataclass
class TargetSpec:
    name: str
    kind: str          # direct | fastlb | haproxy | nginx | custom
    mode: str          # tcp | http  (which HAProxy mode it is compared with)
    command: str = ""  # custom / fastlb: a template with {python} {bind} {port} {b1} {b2} {mode}


def builtin_targets() -> dict[str, TargetSpec]:
    t = {"direct": TargetSpec("direct", "direct", "http")}
    for mode in FASTLB_MODES:
        t[f"fastlb-{mode}"] = TargetSpec(f"fastlb-{mode}", "fastlb", mode, FASTLB_CMD)
    t["haproxy-tcp"] = TargetSpec("haproxy-tcp", "haproxy", "tcp")
    t["haproxy-http"] = TargetSpec("haproxy-http", "haproxy", "http")
    t["nginx-http"] = TargetSpec("nginx-http", "nginx", "http")
    return t


ALIASES = {"nginx": "nginx-http", "haproxy": "haproxy-tcp", "fastlb": "fastlb-tcp"}


def parse_custom_target(text: str) -> TargetSpec:
    """'NAME:MODE=COMMAND' -> a custom target (e.g. a throwaway relay to validate the harness)."""
    m = re.fullmatch(r"([\w.-]+):(tcp|http)=(.+)", text.strip(), re.S)
    if not m:
        raise ValueError(f"--custom wants NAME:tcp|http=COMMAND, got {text!r}")
    return TargetSpec(m.group(1), "custom", m.group(2), m.group(3))


def resolve_targets(names: str, custom: Sequence[TargetSpec], allowed_kinds: Sequence[str] | None = None
                    ) -> list[TargetSpec]:
    known = builtin_targets()
    for c in custom:
        known[c.name] = c
    out = []
    for raw in [n.strip() for n in names.split(",") if n.strip()]:
        name = ALIASES.get(raw, raw)
        if name.startswith("fastlb-") and name not in known:
            raise SystemExit(f"target {raw}: fastlb mode {name[7:]!r} is not benchmarked yet "
                             f"(add it to FASTLB_MODES in benchmarks/harness.py)")
        if name not in known:
            raise SystemExit(f"unknown target {raw!r}; known: {', '.join(known)}")
        if allowed_kinds is not None and known[name].kind not in allowed_kinds:
            raise SystemExit(f"target {raw!r} is not usable here")
        if known[name] not in out:
            out.append(known[name])
    return out


class Target:
    """A running target. port is where wrk connects; pid is the proxy tree's root (None for direct)."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec
        self.name = spec.name
        self.port: int | None = None
        self.proc: Proc | None = None
        self.error: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


CGROUP_ROOT = "/sys/fs/cgroup"


def cpu_quota_group(name: str, fraction: float) -> str:
    """A cgroup allowed `fraction` of one CPU (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us); its path.

    With a quota every proxy is CPU-bound at the same budget, so req/s measures what each costs per
    request, not what the load generator's CPU can offer (near that ceiling every proxy ties)."""
    period = 100_000
    quota = max(1000, int(period * fraction))
    if os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers")):          # v2
        path = os.path.join(CGROUP_ROOT, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cpu.max"), "w") as f:
            f.write(f"{quota} {period}")
    else:                                                                           # v1
        path = os.path.join(CGROUP_ROOT, "cpu", name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
            f.write(str(period))
        with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(quota))
    return path


def in_cgroup(path: str, cmd: Sequence[str]) -> list[str]:
    """cmd started inside the cgroup from its first instruction (children it forks stay in it)."""
    return ["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$@"', "sh", *cmd]


class Bench:
    """Starts the backends and the targets for one run; everything is torn down by close()."""

    def __init__(self, *, load_cpu: str = "0", proxy_cpu: str = "1", fastlb_cmd: str | None = None,
                 fastlb_extra: str = "", backend_connections: int = 12000, keep_tmp: bool = False,
                 proxy_cpu_quota: float | None = None):
        self.tmp = tempfile.mkdtemp(prefix="fastlb-bench-")
        os.chmod(self.tmp, 0o755)
        self.procs = Procs()
        self.load_cpu = load_cpu
        self.proxy_cpu = proxy_cpu
        self.fastlb_cmd = fastlb_cmd
        self.fastlb_extra = fastlb_extra
        self.backend_connections = backend_connections
        self.keep_tmp = keep_tmp
        self.backend_ports: list[int] = []
        self.backends: Proc | None = None
        self.proxy_cpu_quota = proxy_cpu_quota
        self.cgroups: list[str] = []
        atexit.register(self.close)

    def close(self) -> None:
        self.procs.stop_all()
        for path in self.cgroups:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        self.cgroups.clear()
        if not self.keep_tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_backends(self) -> None:
        self.backend_ports = free_ports(2)
        conf = os.path.join(self.tmp, "backends.conf")
        with open(conf, "w") as f:
            f.write(backend_nginx_conf(self.tmp, self.backend_ports, self.backend_connections))
        self.backends = self.procs.start(
            "backends", [which("nginx"), "-p", self.tmp, "-e", os.path.join(self.tmp, "backends.error.log"),
                         "-c", conf, "-g", "daemon off;"],
            cpu=self.load_cpu, log_dir=self.tmp)
        for port in self.backend_ports:
            wait_listening(port, self.backends)
            status, _, body = http_get(port, SMALL_PATH)
            if status != 200 or body != SMALL_BODY:
                raise RuntimeError(f"backend {port} answered {status} {body[:100]!r}")

    def start_proxy(self, name: str, cmd: list[str], env, cwd) -> Proc:
        """A proxy under test on the proxy CPU, within its CPU quota when one is set."""
        if self.proxy_cpu_quota:
            group = cpu_quota_group(f"fastlb-bench-{os.getpid()}-{name}", self.proxy_cpu_quota)
            self.cgroups.append(group)
            cmd = in_cgroup(group, cmd)
        return self.procs.start(name, cmd, cpu=self.proxy_cpu, log_dir=self.tmp, env=env, cwd=cwd)

    def start_target(self, spec: TargetSpec, startup_timeout: float = 10.0) -> Target:
        """Start one target and probe it (one small and one 1 MiB GET). On failure target.error says why."""
        t = Target(spec)
        b1, b2 = self.backend_ports
        try:
            if spec.kind == "direct":
                t.port = b1
            else:
                t.port = free_port()
                cmd, env, cwd = self._command(spec, t.port, b1, b2)
                t.proc = self.start_proxy(spec.name, cmd, env, cwd)
                wait_listening(t.port, t.proc, startup_timeout)
            self.probe(t)
        except Exception as e:  # report and go on with the other targets
            t.error = str(e).strip()
            if t.proc and t.proc.log_tail() and t.proc.log_tail().strip() not in t.error:
                t.error += f"\n{t.name} output (last lines):\n{t.proc.log_tail()}"
            if t.proc:
                self.procs.stop(t.proc)
                t.proc = None
        return t

    def probe(self, t: Target) -> None:
        for i in range(2):  # both backends, in case of round robin
            status, _, body = http_get(t.port, SMALL_PATH)
            if status != 200 or body != SMALL_BODY:
                raise RuntimeError(f"{t.name}: GET {SMALL_PATH} -> {status} {body[:100]!r}")
        status, _, body = http_get(t.port, BULK_PATH, timeout=10)
        if status != 200 or len(body) != BULK_SIZE:
            raise RuntimeError(f"{t.name}: GET {BULK_PATH} -> {status}, {len(body)} bytes")

    def _command(self, spec: TargetSpec, port: int, b1: int, b2: int):
        bind = f"{HOST}:{port}"
        if spec.kind == "haproxy":
            return haproxy_command(self.tmp, spec.name,
                                   haproxy_conf(spec.mode, port, self.backend_ports, haproxy_maxconn()))
        if spec.kind == "nginx":
            conf = os.path.join(self.tmp, f"{spec.name}.conf")
            with open(conf, "w") as f:
                f.write(nginx_proxy_conf(self.tmp, port, self.backend_ports))
            return ([which("nginx"), "-p", self.tmp, "-e", os.path.join(self.tmp, f"{spec.name}.error.log"),
                     "-c", conf, "-g", "daemon off;"], None, self.tmp)
        template = spec.command
        env = None
        cwd = self.tmp
        if spec.kind == "fastlb":
            template = (self.fastlb_cmd or spec.command) + (" " + self.fastlb_extra if self.fastlb_extra else "")
            env = dict(os.environ)
            env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cwd = REPO_ROOT
        cmd = template.format(python=sys.executable, bind=bind, port=port, b1=f"{HOST}:{b1}",
                              b2=f"{HOST}:{b2}", mode=spec.mode)
        import shlex
        return shlex.split(cmd), env, cwd


def run_wrk(bench: Bench, port: int, path: str, connections: int, duration: int,
            timeout_s: int = 5, headers: Sequence[str] = (), scheme: str = "http",
            wrk_args: Sequence[str] = ()) -> dict:
    """wrk -t1 -cN -dD --latency on the load CPU, bounded by a subprocess timeout; parsed output + raw text.
    headers: extra request header lines (`Name: value`, wrk -H); scheme: http or https.

    wrk takes whole seconds only (-d1.5s is a usage error).
    """
    duration = max(1, int(round(duration)))
    script = os.path.join(bench.tmp, "done.lua")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(WRK_DONE_LUA)
    cmd = [which("taskset") or "taskset", "-c", bench.load_cpu, which("wrk"), "-t1", f"-c{connections}",
           f"-d{duration}s", "--latency", "--timeout", f"{timeout_s}s", "-s", script, *wrk_args,
           *(arg for line in headers for arg in ("-H", line)), f"{scheme}://{HOST}:{port}{path}"]
    p = bench.procs.start("wrk", cmd, stdout=subprocess.PIPE)
    try:
        out, _ = p.popen.communicate(timeout=duration + timeout_s + 30)
    except subprocess.TimeoutExpired:
        bench.procs.stop(p)
        raise RuntimeError(f"wrk did not finish within {duration + timeout_s + 30:.0f}s")
    bench.procs.stop(p)
    text = out.decode(errors="replace")
    wrk_pid = p.pid
    if p.popen.returncode != 0:
        raise RuntimeError(f"wrk exited with {p.popen.returncode}:\n{text[-2000:]}")
    res = parse_wrk_output(text)
    res["raw"] = text
    res["wrk_pid"] = wrk_pid
    return res


def measure(bench: Bench, target: Target, path: str, connections: int, duration: float,
            headers: Sequence[str] = (), scheme: str = "http", wrk_args: Sequence[str] = ()) -> dict:
    """One bounded wrk run against target, with the proxy tree's CPU time and the CPUs' busy/steal shares
    (headers, scheme, wrk_args: run_wrk's; wrk_args: more of wrk's options, e.g. ["-H", "X-Api-Key: k"])."""
    ours = {os.getpid(), *(process_tree(target.pid) if target.pid else ()),
            *(process_tree(bench.backends.pid) if bench.backends else ())}
    all0 = snapshot_all_cpu()
    back0 = tree_cpu(bench.backends.pid) if bench.backends else None
    cpu0 = tree_cpu(target.pid) if target.pid else None
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stat0 = read_cpu_times()
    t0 = time.monotonic()
    res = run_wrk(bench, target.port, path, connections, duration, headers=headers, scheme=scheme,
                  wrk_args=wrk_args)
    wall = time.monotonic() - t0
    stat1 = read_cpu_times()
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = tree_cpu(target.pid) if target.pid else None
    back1 = tree_cpu(bench.backends.pid) if bench.backends else None
    all1 = snapshot_all_cpu()
    out = {k: v for k, v in res.items() if k != "raw"}
    # wrk is reaped inside run_wrk: its CPU shows up in RUSAGE_CHILDREN.
    out["wrk_cpu_share"] = ((kids1.ru_utime - kids0.ru_utime) + (kids1.ru_stime - kids0.ru_stime)) / wall
    if back0 and back1:
        out["backends_cpu_share"] = cpu_delta(back0, back1)["cpu_share"]
    if cpu0 and cpu1:
        d = cpu_delta(cpu0, cpu1)
        n = max(res["requests"], 1)
        out.update(proxy_user_s=d["user_s"], proxy_sys_s=d["sys_s"], proxy_cpu_share=d["cpu_share"],
                   proxy_tree_changed=d["tree_changed"], proxy_pids=list(cpu1.pids),
                   cpu_us_per_req=(d["user_s"] + d["sys_s"]) * 1e6 / n,
                   user_us_per_req=d["user_s"] * 1e6 / n, sys_us_per_req=d["sys_s"] * 1e6 / n)
    for label, cpu in (("load_cpu", bench.load_cpu), ("proxy_cpu", bench.proxy_cpu)):
        if cpu.isdigit():
            out[label + "_usage"] = cpu_usage_between(stat0, stat1, "cpu" + cpu)
    out["mib_per_s"] = res["bytes"] / max(res["duration_s"], 1e-9) / (1 << 20)
    out["foreign"] = foreign_cpu(all0, all1, ours | {res.get("wrk_pid", -1)}, wall)
    # Short-lived processes (a test suite's) escape the per-process snapshots: also count the CPU time
    # of both CPUs that none of our processes (proxy, backends, wrk) account for.
    ours_share = out.get("proxy_cpu_share", 0.0) + out["wrk_cpu_share"] + out.get("backends_cpu_share", 0.0)
    tasks = sum(cpu_usage_between(stat0, stat1, "cpu" + c).get("tasks", 0.0)
                for c in {bench.load_cpu, bench.proxy_cpu} if c.isdigit())
    out["foreign"]["unaccounted"] = max(0.0, tasks - ours_share)
    out["foreign"]["by_process"] = out["foreign"]["share"]
    out["foreign"]["share"] = max(out["foreign"]["share"], out["foreign"]["unaccounted"])
    return out


def print_cpu_ratio_table(results: dict[str, list[dict]], baseline_of, baseline_label: str,
                          us: str = "us", user_us: str = "user_us") -> None:
    """The markdown table of a feature-cost benchmark: per target the medians of req/s, CPU and user µs per
    request, and the median of its per-round CPU ratios over its baseline's (baseline_of(name))."""
    print(f"\n| target | req/s (median) | proxy CPU us/request (median) | user us/request | "
          f"vs {baseline_label} (median of per-round ratios) |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        ratios = [r[us] / b[us] for r, b in zip(runs, results[baseline_of(name)])]
        print(f"| {name} | {median(r['rps'] for r in runs):.0f} | {median(r[us] for r in runs):.2f} | "
              f"{median(r[user_us] for r in runs):.2f} | {median(ratios):.3f} |")


def system_info() -> dict:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"nproc": os.cpu_count(), "loadavg": load, "tools": tool_versions(),
            "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE))}


def results_path(prefix: str, ext: str, stamp: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    return os.path.join(RESULTS_DIR, f"{prefix}-{stamp}.{ext}")
