"""Unit tests of the benchmark harness's pure parts: wrk output, units, /proc parsing, summaries.

Fast and offline: no process is started, no socket opened. Run: python -m pytest benchmarks/test_harness.py
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import proxy_bench  # noqa: E402

WRK_LATENCY = """\
Running 5s test @ http://127.0.0.1:18089/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  412.10us  28.70ms   91.40%
    Req/Sec    61.23k     2.01k   64.90k    80.00%
  Latency Distribution
     50%  812.00us
     75%    1.10ms
     90%    1.45ms
     99%    2.17ms
  304512 requests in 5.00s, 42.98MB read
Requests/sec:  60902.40
Transfer/sec:      8.60MB
"""

WRK_ERRORS = """\
Running 5s test @ http://127.0.0.1:18089/e
  1 threads and 256 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   145.32ms  476.94ms   1.26s    95.33%
    Req/Sec     1.95M     2.49k    2.31M    70.00%
  1257544 requests in 1.00m, 1.52GB read
  Socket errors: connect 3, read 12, write 1, timeout 7
  Non-2xx or 3xx responses: 57544
Requests/sec:  20959.07
Transfer/sec:     25.94MB"""


class TestUnits:
    @pytest.mark.parametrize("text,us", [
        ("812.00us", 812.0), ("1.10ms", 1100.0), ("2.00s", 2e6), ("1.50m", 90e6), ("1h", 3600e6),
        ("  7us ", 7.0), ("42", 42.0), ("1e3us", 1000.0),
    ])
    def test_duration(self, text, us):
        assert h.parse_duration_us(text) == pytest.approx(us)

    @pytest.mark.parametrize("text,n", [
        ("512B", 512), ("42.98MB", 42.98 * 2**20), ("1.52GB", 1.52 * 2**30), ("3KB", 3072),
        ("2.5MiB", 2.5 * 2**20), ("1TB", 2**40), ("100", 100),
    ])
    def test_size_is_base_1024(self, text, n):
        assert h.parse_size_bytes(text) == pytest.approx(n)

    @pytest.mark.parametrize("text,n", [
        ("61.23k", 61230), ("1.95M", 1.95e6), ("980", 980), ("2G", 2e9), ("60902.40", 60902.4),
    ])
    def test_count_is_base_1000(self, text, n):
        assert h.parse_count(text) == pytest.approx(n)

    @pytest.mark.parametrize("bad", ["", "ms", "1.2xs", "abc", "1..2ms"])
    def test_bad_duration(self, bad):
        with pytest.raises(ValueError):
            h.parse_duration_us(bad)

    def test_bad_units(self):
        with pytest.raises(ValueError):
            h.parse_size_bytes("3PB")
        with pytest.raises(ValueError):
            h.parse_count("3x")


class TestWrkOutput:
    def test_percentile_keys(self):
        r = h.parse_wrk_output(WRK_LATENCY.replace("     99%    2.17ms", "     99%    2.17ms\n   99.9%    4.00ms"))
        assert r["lat_p99_us"] == pytest.approx(2170.0)
        assert r["lat_p999_us"] == pytest.approx(4000.0)

    def test_latency_distribution(self):
        r = h.parse_wrk_output(WRK_LATENCY)
        assert r["requests"] == 304512
        assert r["duration_s"] == pytest.approx(5.0)
        assert r["bytes"] == pytest.approx(42.98 * 2**20)
        assert r["rps"] == pytest.approx(60902.40)
        assert r["transfer_bps"] == pytest.approx(8.60 * 2**20)
        assert r["lat_mean_us"] == pytest.approx(1020.0)
        assert r["lat_stdev_us"] == pytest.approx(412.10)
        assert r["lat_max_us"] == pytest.approx(28700.0)
        assert r["lat_p50_us"] == pytest.approx(812.0)
        assert r["lat_p75_us"] == pytest.approx(1100.0)
        assert r["lat_p90_us"] == pytest.approx(1450.0)
        assert r["lat_p99_us"] == pytest.approx(2170.0)
        assert r["errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}
        assert r["exact"] is False

    def test_errors_minutes_and_suffixes_without_latency(self):
        r = h.parse_wrk_output(WRK_ERRORS)
        assert r["requests"] == 1257544
        assert r["duration_s"] == pytest.approx(60.0)
        assert r["bytes"] == pytest.approx(1.52 * 2**30)
        assert r["lat_mean_us"] == pytest.approx(145320.0)
        assert r["lat_max_us"] == pytest.approx(1.26e6)
        assert "lat_p99_us" not in r
        assert r["errors"] == {"connect": 3, "read": 12, "write": 1, "timeout": 7, "status": 57544}
        assert r["non_2xx"] == 57544
        assert r["rps"] == pytest.approx(20959.07)

    def test_stderr_glued_to_last_line(self):
        # wrk's stderr merged into stdout may follow Transfer/sec without a newline.
        r = h.parse_wrk_output(WRK_LATENCY.rstrip("\n") + "unable to connect to 127.0.0.1:1 Connection refused\n")
        assert r["requests"] == 304512
        assert r["rps"] == pytest.approx(60902.40)
        assert r["transfer_bps"] == pytest.approx(42.98 * 2**20 / 5.0)  # from bytes / duration

    def test_no_summary_is_an_error(self):
        with pytest.raises(ValueError):
            h.parse_wrk_output("unable to connect to 127.0.0.1:18088 Connection refused\n")

    def test_done_json_line_overrides_rounded_text(self):
        exact = {"duration_us": 5001234, "requests": 304517, "bytes": 45067516, "connect_errors": 0,
                 "read_errors": 2, "write_errors": 0, "status_errors": 5, "timeouts": 1, "lat_p50_us": 811,
                 "lat_p90_us": 1449, "lat_p99_us": 2168, "lat_p999_us": 5012, "lat_max_us": 28701,
                 "lat_mean_us": 1019.5}
        text = WRK_LATENCY.replace("Requests/sec", h.WRK_JSON_MARK + json.dumps(exact) + "\nRequests/sec")
        r = h.parse_wrk_output(text)
        assert r["exact"] is True
        assert r["requests"] == 304517
        assert r["duration_s"] == pytest.approx(5.001234)
        assert r["rps"] == pytest.approx(304517 / 5.001234)
        assert r["bytes"] == 45067516
        assert r["lat_p99_us"] == 2168
        assert r["lat_p999_us"] == 5012
        assert r["lat_p75_us"] == pytest.approx(1100.0)  # only in the text: kept
        assert r["errors"] == {"connect": 0, "read": 2, "write": 0, "timeout": 1, "status": 5}

    def test_lua_script_prints_the_marker(self):
        assert h.WRK_JSON_MARK in h.WRK_DONE_LUA
        assert "%MARK%" not in h.WRK_DONE_LUA
        assert "done = function(summary, latency, requests)" in h.WRK_DONE_LUA


class TestProc:
    def test_stat_with_odd_comm(self):
        fields = ["S", "1", "2", "3", "0", "-1", "4194560", "100", "0", "0", "0", "1234", "567",
                  "0", "0", "20", "0", "1", "0", "98765", "1000", "250"] + ["0"] * 30
        text = "4242 (we (ird) name) " + " ".join(fields)
        st = h.parse_proc_stat(text)
        assert st["pid"] == 4242
        assert st["comm"] == "we (ird) name"
        assert st["state"] == "S"
        assert st["ppid"] == 1
        assert st["utime"] == 1234
        assert st["stime"] == 567
        assert st["starttime"] == 98765
        assert st["rss_pages"] == 250

    def test_real_proc_self(self):
        with open("/proc/self/stat") as f:
            st = h.parse_proc_stat(f.read())
        assert st["pid"] == os.getpid()
        assert st["ppid"] == os.getppid()

    def test_cpu_usage_between(self):
        before = h.parse_cpu_times("cpu  10 0 10 100 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n")
        after = h.parse_cpu_times("cpu  10 0 10 100 0 0 0 0\ncpu1 60 0 20 10 0 0 0 10 0 0\n")
        u = h.cpu_usage_between(before, after, "cpu1")
        assert u["busy"] == pytest.approx(0.8)
        assert u["idle"] == pytest.approx(0.1)
        assert u["steal"] == pytest.approx(0.1)
        assert h.cpu_usage_between(before, after, "cpu7") == {}

    def test_cpu_delta(self):
        a = h.CpuSample(utime=100, stime=50, t=10.0, pids=(1, 2))
        b = h.CpuSample(utime=100 + h.CLK_TCK, stime=50 + 2 * h.CLK_TCK, t=14.0, pids=(1, 2))
        d = h.cpu_delta(a, b)
        assert d["user_s"] == pytest.approx(1.0)
        assert d["sys_s"] == pytest.approx(2.0)
        assert d["cpu_share"] == pytest.approx(0.75)
        assert d["tree_changed"] is False
        assert h.cpu_delta(a, h.CpuSample(0, 0, 11.0, (1,)))["tree_changed"] is True

    def test_foreign_cpu_ignores_ours_and_recycled_pids(self):
        before = {1: (5, "init", 100), 2: (6, "ours", 0), 3: (7, "old", 1000)}
        after = {1: (5, "init", 100 + h.CLK_TCK), 2: (6, "ours", 5 * h.CLK_TCK),
                 3: (99, "new", h.CLK_TCK // 2), 4: (100, "hog", 2 * h.CLK_TCK)}
        f = h.foreign_cpu(before, after, ours={2}, wall=2.0)
        assert f["share"] == pytest.approx(0.5 + 0.25 + 1.0)
        assert [t["comm"] for t in f["top"]] == ["hog", "init", "new"]


class TestSummaries:
    def test_median_and_spread(self):
        assert h.median([3, 1, 2]) == 2
        assert h.median([None, 4, 2]) == 3
        assert h.median([]) is None
        assert h.spread([90, 100, 110]) == pytest.approx(0.2)
        assert h.spread([100]) is None

    def test_render_table(self):
        t = h.render_table(["a", "bb"], [["x", "1"], ["yyy", "22"]])
        lines = t.splitlines()
        assert lines[0] == "| a   | bb |"
        assert lines[1] == "|-----|---:|"
        assert lines[3] == "| yyy | 22 |"

    def test_fmt(self):
        assert h.fmt_us(812) == "812us"
        assert h.fmt_us(2170) == "2.17ms"
        assert h.fmt_us(1.5e6) == "1.50s"
        assert h.fmt_us(None) == "-"


class TestTargets:
    def test_custom_target(self):
        t = h.parse_custom_target("relay:tcp={python} /tmp/relay.py {bind} {b1} {b2}")
        assert (t.name, t.kind, t.mode) == ("relay", "custom", "tcp")
        assert t.command == "{python} /tmp/relay.py {bind} {b1} {b2}"
        with pytest.raises(ValueError):
            h.parse_custom_target("relay=cmd")

    def test_resolve_aliases_and_errors(self):
        specs = h.resolve_targets("direct,nginx,haproxy-http,nginx-http", [])
        assert [s.name for s in specs] == ["direct", "nginx-http", "haproxy-http"]
        with pytest.raises(SystemExit):
            h.resolve_targets("nope", [])
        with pytest.raises(SystemExit):
            h.resolve_targets("direct", [], allowed_kinds=("haproxy",))

    def test_fastlb_targets_follow_modes(self):
        names = set(h.builtin_targets())
        for mode in h.FASTLB_MODES:
            assert f"fastlb-{mode}" in names
            assert h.builtin_targets()[f"fastlb-{mode}"].mode == mode
        cmd = h.FASTLB_CMD.format(python="py", mode="tcp", bind="127.0.0.1:1", b1="127.0.0.1:2", b2="127.0.0.1:3")
        assert "--mode tcp --bind 127.0.0.1:1 --backend 127.0.0.1:2 --backend 127.0.0.1:3" in cmd
        assert "--workers 1" in cmd and "--algorithm roundrobin" in cmd

    def test_configs_only_use_loopback(self, tmp_path):
        for mode in ("tcp", "http"):
            conf = h.haproxy_conf(mode, 1000, [2000, 3000], 9000)
            assert "nbthread 1" in conf and f"mode {mode}" in conf
            assert ("http-reuse always" in conf) == (mode == "http")
            assert ("option forwardfor" in conf) == (mode == "http")
            assert "bind 127.0.0.1:1000" in conf and "server s2 127.0.0.1:3000" in conf
        ng = h.nginx_proxy_conf(str(tmp_path), 1000, [2000, 3000])
        assert "worker_processes 1;" in ng and "keepalive 1024;" in ng
        assert "X-Forwarded-For $proxy_add_x_forwarded_for" in ng and "listen 127.0.0.1:1000" in ng
        be = h.backend_nginx_conf(str(tmp_path), [2000, 3000])
        assert os.path.getsize(tmp_path / "www" / "1m") == h.BULK_SIZE
        assert "listen 127.0.0.1:2000" in be and "listen 127.0.0.1:3000" in be
        for text in (ng, be):
            for line in text.splitlines():
                if "listen" in line or "server 1" in line:
                    assert "127.0.0.1" in line


class TestRunSelection:
    @staticmethod
    def run(rnd, target, rps, noisy=False, workload="small-c64"):
        return {"round": rnd, "target": target, "workload": workload, "rps": rps, "noisy": noisy}

    def test_quiet_runs_only_when_at_least_two(self):
        runs = [self.run(1, "a", 10, noisy=True), self.run(2, "a", 20), self.run(3, "a", 30),
                self.run(1, "b", 10, noisy=True), self.run(2, "b", 20, noisy=True), self.run(3, "b", 30),
                {"round": 4, "target": "a", "workload": "small-c64", "error": "boom"}]
        sel = proxy_bench.select_runs(runs, keep_noisy=False)
        assert sorted((r["target"], r["round"]) for r in sel) == [("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)]
        assert len(proxy_bench.select_runs(runs, keep_noisy=True)) == 6

    def test_paired_ratios_match_rounds(self):
        rs = [self.run(1, "f", 110), self.run(2, "f", 120), self.run(4, "f", 1)]
        refs = [self.run(1, "h", 100), self.run(2, "h", 100), self.run(3, "h", 100)]
        assert proxy_bench.paired_ratios(rs, refs, "rps") == [pytest.approx(1.1), pytest.approx(1.2)]
