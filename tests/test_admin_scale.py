"""Thousands of backends through the admin API (issue 20, item 13): 2,000 backends added one by one to a
fastlb with two workers are all listed, and every one of them serves requests. (How fast is for
benchmarks/admin_scale.py: no timing here.)"""
import sys

from http_client import Client, requests_seen
from procs import HTTP_BACKEND, free_port, port_open, wait_until
from test_ops import api, token_file  # noqa: F401  (token_file: fixture)

ADDED = 2000


def test_two_thousand_backends_added_through_the_api_are_listed_and_served(procs, token_file):  # noqa: F811
    names = [f"b{i}" for i in range(ADDED + 1)]
    # Port 0: the backend process binds 2,001 ports the kernel picks (ports chosen here and bound later
    # can be taken meanwhile by another process's connections).
    backend = procs.start([sys.executable, HTTP_BACKEND, *(f"{n}:0" for n in names)], "http-backends")
    backend.wait_for_line(r"^ready$", timeout=60)
    ports = {line.split()[1]: int(line.split()[2]) for line in backend.lines if line.startswith("port ")}
    assert sorted(ports) == sorted(names)
    port, admin = free_port(), free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['b0']}", "--workers", "2",
                 "--admin", str(admin), "--admin-token-file", token_file, "--log-level", "warning",
                 wait_port=0)
    wait_until(lambda: port_open(admin) and port_open(port), what="fastlb and its admin bind")
    wait_until(lambda: api(admin, "GET", "/api/backends")["workers"] == 2, what="both workers reporting")
    for name in names[1:]:
        api(admin, "POST", "/api/backends", {"address": f"127.0.0.1:{ports[name]}"}, expect=201)

    listed = api(admin, "GET", "/api/backends")["pools"][0]["backends"]
    assert sorted(b["address"] for b in listed) == sorted(f"127.0.0.1:{p}" for p in ports.values())
    assert all(b["state"] == "up" for b in listed)

    # One keep-alive client lands on one worker, whose round robin goes through every backend in turn.
    start = len(backend.lines)
    with Client(port, timeout=10) as client:
        for i in range(ADDED + 1):
            response = client.request("GET", f"/n{i}")
            assert response.status == 200, (i, response.status, response.body)
    served = {r["backend"] for r in requests_seen(backend, start, at_least=ADDED + 1)}
    assert served == set(names)
    # The counters of every backend reached the master (each worker sends what changed).
    counted = wait_until(lambda: sum(b["requests"] for b in api(admin, "GET", "/api/backends")["pools"][0]
                                     ["backends"]) >= ADDED + 1 or None, what="requests counted")
    assert counted


def test_backend_metrics_text_is_what_prometheus_client_writes():
    """exposition_text writes the per-backend families itself (for speed): the same bytes as
    prometheus-client's own rendering of those families, label escaping included."""
    from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)
    from prometheus_client.exposition import generate_latest

    from fastlb import admin
    from fastlb.control import _latency, empty_traffic
    from fastlb.observe import LATENCY_BUCKETS, STATUS_CLASSES

    pools = []
    for name in ("default", 'odd"pool\\name'):
        backends = []
        for i in range(30):
            traffic = empty_traffic()
            backends.append({
                "address": f"10.0.0.{i}:80", "state": ("up", "drain", "down", "up/down")[i % 4],
                "weight": i % 7, "inflight": i % 3, "connections": i, "requests": 2 * i, "bytes_in": 3 * i,
                "bytes_out": 10 ** 12 + i, "connect_errors": i % 5, "retries": 1,
                "responses": dict(zip(STATUS_CLASSES, (0, i, 2, 3, 4))),
                "connect_time": _latency([[j * i for j in range(len(LATENCY_BUCKETS) + 1)], 0.5 * i]),
                "response_time": _latency([[1] * (len(LATENCY_BUCKETS) + 1), 1e-7 * i]),
                "traffic": traffic})
        pools.append({"name": name, "backends": backends})

    class Reference:
        def collect(self):
            labels = ["pool", "backend"]
            for key, metric, help in admin.BACKEND_COUNTERS:
                family = CounterMetricFamily(metric, help, labels=labels + (["code"] if key == "responses" else []))
                for pool in pools:
                    for b in pool["backends"]:
                        if key == "responses":
                            for code, count in b["responses"].items():
                                family.add_metric([pool["name"], b["address"], code], count)
                        else:
                            family.add_metric([pool["name"], b["address"]], b[key])
                yield family
            for key, metric, help in admin.BACKEND_GAUGES:
                family = GaugeMetricFamily(metric, help, labels=labels)
                for pool in pools:
                    for b in pool["backends"]:
                        value = admin.STATE_VALUES.get(b["state"], 0) if key == "up" else b[key]
                        family.add_metric([pool["name"], b["address"]], value)
                yield family
            for key, metric, help in admin.BACKEND_HISTOGRAMS:
                family = HistogramMetricFamily(metric, help, labels=labels)
                for pool in pools:
                    for b in pool["backends"]:
                        counts, total, buckets = b[key]["buckets"], 0, []
                        for bound, count in zip(admin.BUCKET_LABELS, counts):
                            total += count
                            buckets.append((bound, total))
                        family.add_metric([pool["name"], b["address"]], buckets, b[key]["sum"])
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference())
    assert admin.exposition_text(pools).encode() == generate_latest(registry)
