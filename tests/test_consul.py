"""Consul discovery (fastlb/consul.py) against tests/consul_double.py, a test agent answering in the
shape HashiCorp's API double renders, with blocking queries: the watch in-process, then a whole fastlb
with two workers whose [[pool]] follows a Consul service under load."""
import asyncio
import logging
import os
import ssl
import time

import pytest

from consul_double import ConsulDouble
from http_client import KeepAliveLoad
from pki import CA
from procs import free_port, port_open, wait_until
from test_ops import TOKEN, api

from fastlb.config import Config, ConfigError
from fastlb.consul import ConsulWatch, instances_to_specs

# How long the agent stays away in the outage test. The issue's scenario is 10 s; the default is shorter
# because it proves the same: longer than a blocking wait (2 s here) and than several back-off rounds,
# so fastlb has failed queries again and again and must keep its backends and log the outage once.
OUTAGE_SECONDS = float(os.environ.get("FASTLB_TEST_CONSUL_OUTAGE", "4"))


@pytest.fixture
def double():
    server = ConsulDouble().start()
    try:
        yield server
    finally:
        server.close()


def watch_config(double, **settings) -> Config:
    return Config(consul_service="web", consul=double.address, consul_wait=2.0, **settings)


class Watched:
    """Runs a ConsulWatch in its own loop thread: `seen` holds each set of backends it reported."""

    def __init__(self, config: Config) -> None:
        self.seen: list[dict[str, tuple[int, bool]]] = []
        self.loop = asyncio.new_event_loop()
        self.watch = ConsulWatch(config, self._on_change)
        import threading
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_change(self, specs) -> None:
        self.seen.append({s.address: (s.weight, s.backup) for s in specs})

    def _run(self) -> None:
        self.task = self.loop.create_task(self.watch.run())
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass

    def latest(self):
        return self.seen[-1] if self.seen else None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(5)


# ---- instances -> backends ----------------------------------------------------------------------------

def test_instances_become_backends_with_their_weight_and_backup_flag(double):
    double.register("web", "a", "127.0.0.2", 81, weights={"Passing": 7, "Warning": 1})
    double.register("web", "b", "127.0.0.3", 82, meta={"fastlb_weight": "3", "fastlb_backup": "true"})
    double.register("web", "c", "127.0.0.4", 83, tags=["backup", "v2"], meta={"fastlb_weight": "9999"})
    double.register("web", "d", "", 84)                          # no service address: the node's
    double.register("web", "dup", "127.0.0.2", 81)                # a second instance on one address
    double.register("web", "e", "127.0.0.5", 0)                   # no port: not a backend
    entries = [double._entry(i) for i in double.instances.values()]
    specs = {s.address: (s.weight, s.backup) for s in instances_to_specs(entries)}
    assert specs == {"127.0.0.2:81": (7, False), "127.0.0.3:82": (3, True), "127.0.0.4:83": (256, True),
                     "166.19.129.110:84": (1, False)}


# ---- the watch ------------------------------------------------------------------------------------------

def test_the_watch_follows_changes_with_blocking_queries(double, tmp_path):
    token = tmp_path / "consul-token"
    token.write_text("0e6a1d3e-6f0c-4a2b-9d7e-acl-token\n")
    double.token = "0e6a1d3e-6f0c-4a2b-9d7e-acl-token"
    double.register("web", "a", "127.0.0.2", 81, tags=["blue"])
    double.register("web", "other", "127.0.0.9", 99, tags=["green"])
    watched = Watched(watch_config(double, consul_datacenter="dc1", consul_tag="blue",
                                   consul_token_file=str(token)))
    try:
        wait_until(lambda: watched.latest() == {"127.0.0.2:81": (1, False)}, what="the first answer")
        first = double.queries()[0]
        assert first["query"] == {"passing": "1", "dc": "dc1", "tag": "blue"}
        assert first["headers"]["x-consul-token"] == double.token
        # Added, turned critical, removed: each answer of a blocking query is applied.
        double.register("web", "b", "127.0.0.3", 82, tags=["blue"])
        wait_until(lambda: watched.latest() == {"127.0.0.2:81": (1, False), "127.0.0.3:82": (1, False)},
                   what="b added")
        double.set_status("a", "critical")
        wait_until(lambda: watched.latest() == {"127.0.0.3:82": (1, False)}, what="a critical")
        blocking = [q for q in double.queries() if "index" in q["query"]]
        assert blocking and all(q["query"]["wait"] == "2s" for q in blocking)
        # A jump forward is followed; a jump backwards (a restored snapshot) starts over from 0, and the
        # watch still sees the next change.
        double.jump_index(5000)
        wait_until(lambda: any(q["query"].get("index") == "5000" for q in double.queries()), what="index 5000")
        double.jump_index(3)
        wait_until(lambda: any(q["query"].get("index") in ("1", "3") for q in double.queries()
                               if q["time"] > blocking[-1]["time"]), what="the index started over")
        double.deregister("b")
        wait_until(lambda: watched.latest() == {}, what="b removed")
        answers = len(watched.seen)
        # A query whose wait ended without a change (same index) changes nothing.
        since = time.monotonic()
        wait_until(lambda: len(double.queries(since)) >= 2, timeout=10, what="a wait ending")
        assert len(watched.seen) == answers
    finally:
        watched.stop()


def test_failed_queries_back_off_and_keep_the_last_backends(double, caplog):
    double.register("web", "a", "127.0.0.2", 81)
    with caplog.at_level(logging.INFO, logger="fastlb"):
        watched = Watched(watch_config(double))
        try:
            wait_until(lambda: watched.latest() == {"127.0.0.2:81": (1, False)}, what="the first answer")
            answers = len(watched.seen)
            double.fail_with(500)
            since = time.monotonic()
            double.register("web", "b", "127.0.0.3", 82)          # wakes the blocking query: it fails
            wait_until(lambda: len(double.queries(since)) >= 5, what="five failed queries")
            failed = [q["time"] for q in double.queries(since)]
            gaps = [b - a for a, b in zip(failed, failed[1:])]
            assert gaps[0] >= 0.15 and gaps[-1] > gaps[0] * 2, gaps     # backs off, does not hammer
            assert len(watched.seen) == answers                          # nothing dropped meanwhile
            double.fail_with(None)
            wait_until(lambda: watched.latest() == {"127.0.0.2:81": (1, False), "127.0.0.3:82": (1, False)},
                       what="the answer after the outage")
        finally:
            watched.stop()
    warnings = [r.getMessage() for r in caplog.records if "keeping its last backends" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0], warnings
    assert sum("answers again" in r.getMessage() for r in caplog.records) == 1


def test_an_https_agent_is_verified_against_consul_ca(tmp_path):
    ca = CA(tmp_path, "consul-ca")
    server_pem = ca.issue("consul", "consul.test", ("consul.test",))      # and 127.0.0.1
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_pem)
    double = ConsulDouble(ssl_context=context).start()
    try:
        double.register("web", "a", "127.0.0.2", 81)
        watched = Watched(watch_config(double, consul_ca=str(ca.path)))
        try:
            wait_until(lambda: watched.latest() == {"127.0.0.2:81": (1, False)}, what="an answer over TLS")
        finally:
            watched.stop()
        # Without the CA the agent's certificate does not verify: no answer, no backends.
        unverified = Watched(watch_config(double))
        try:
            wait_until(lambda: unverified.watch.failing, what="the failed handshake")
            assert unverified.seen == []
        finally:
            unverified.stop()
    finally:
        double.close()


def test_consul_settings_are_checked_with_file_line_and_field(tmp_path):
    from fastlb.cli import config_from_args
    path = tmp_path / "lb.toml"
    path.write_text('bind = "127.0.0.1:8080"\nbackend = "127.0.0.1:81"\n[[pool]]\nname = "api"\n'
                    'consul_service = "web"\nconsul = "ftp://x:1"\n')
    with pytest.raises(ConfigError, match=r"lb.toml:6: pool\[1\].consul: expected HOST:PORT"):
        config_from_args(["--config", str(path)])
    path.write_text('bind = "127.0.0.1:8080"\nbackend = "127.0.0.1:81"\n[[pool]]\nname = "api"\n'
                    'consul_service = "web"\nconsul_token_file = "/nonexistent/token"\n')
    with pytest.raises(ConfigError, match=r"pool 'api': consul_token_file: cannot read token file"):
        config_from_args(["--config", str(path)])
    path.write_text('bind = "127.0.0.1:8080"\nbackend = "127.0.0.1:81"\n[[pool]]\nname = "api"\n')
    with pytest.raises(ConfigError, match=r"lb.toml:3: pool\[1\]: missing required key 'backend' \(or a "
                                          r"discovery source"):
        config_from_args(["--config", str(path)])


# ---- a whole balancer --------------------------------------------------------------------------------------

def pool_view(admin, name):
    return {b["address"]: b for p in api(admin, "GET", "/api/backends")["pools"] if p["name"] == name
            for b in p["backends"]}


def in_every_worker(admin, name, addresses, workers=2):
    """The pool lists exactly these backends, each present in every worker."""
    view = pool_view(admin, name)
    return set(view) == set(addresses) and all(b["workers"] == workers for b in view.values())


def test_consul_changes_reach_every_worker_without_a_failed_request(procs, double, tmp_path):
    backends, ports = procs.http_backends("d", "b1", "b2", "b3", "b4")
    address = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port, admin = free_port(), free_port()
    config = tmp_path / "lb.toml"
    config.write_text(f'''
mode = "http"
workers = 2
bind = "127.0.0.1:{port}"
backend = "{address['d']}"
admin = "127.0.0.1:{admin}"
admin_token_file = "{token}"
consul_service = "top"                   # the top-level pool follows a service of its own
consul = "{double.address}"
consul_wait = "2s"

[[pool]]
name = "api"
consul_service = "web"
consul = "{double.address}"
consul_wait = "2s"

[[route]]
pool = "api"
path_prefix = "/api"
''')
    double.register("web", "b1", "127.0.0.1", ports["b1"])
    double.register("top", "top-b1", "127.0.0.1", ports["b1"])
    fastlb = procs.fastlb("--config", str(config), wait_port=port)
    wait_until(lambda: port_open(admin), what="the admin bind")
    wait_until(lambda: in_every_worker(admin, "api", [address["b1"]]), what="b1 in every worker")
    wait_until(lambda: in_every_worker(admin, "default", [address["d"], address["b1"]]), what="top-level b1")
    assert pool_view(admin, "default")[address["b1"]]["source"] == "consul"
    loads = [KeepAliveLoad(port, "/api/x", max_seconds=120).start() for _ in range(4)]

    def answered_by(name, since):
        return sum(1 for load in loads for t, n in load.answers[:] if n == name and t >= since)

    marks = []
    try:
        wait_until(lambda: answered_by("b1", 0), what="traffic to b1")
        # Added: in every worker, then serving.
        since = time.monotonic()
        double.register("web", "b2", "127.0.0.1", ports["b2"], weights={"Passing": 2, "Warning": 1})
        wait_until(lambda: in_every_worker(admin, "api", [address["b1"], address["b2"]]), what="b2 added")
        marks.append(("b2 added", time.monotonic()))
        assert pool_view(admin, "api")[address["b2"]]["weight"] == 2
        wait_until(lambda: answered_by("b2", since), what="traffic to b2")
        # Turned critical: out of every worker (the view answers once every worker applied it), and then
        # at most the requests in flight at that moment (one per client) still end on it.
        double.set_status("b1", "critical")
        wait_until(lambda: in_every_worker(admin, "api", [address["b2"]]), what="b1 out")
        marks.append(("b1 out", time.monotonic()))
        gone = time.monotonic()
        wait_until(lambda: answered_by("b2", gone) >= 100, what="traffic after b1 went")
        assert answered_by("b1", gone) <= len(loads)
        # The index jumps forward with a new instance; then goes backwards (a restored snapshot): the
        # watch starts over and still follows.
        double.jump_index(double.index + 1000)
        double.register("web", "b3", "127.0.0.1", ports["b3"])
        wait_until(lambda: in_every_worker(admin, "api", [address["b2"], address["b3"]]), what="b3 added")
        marks.append(("b3 added", time.monotonic()))
        double.jump_index(2)
        double.deregister("b2")
        wait_until(lambda: in_every_worker(admin, "api", [address["b3"]]), what="b2 removed")
        marks.append(("b2 removed", time.monotonic()))
        since = time.monotonic()
        wait_until(lambda: answered_by("b3", since) >= 100, what="traffic to b3")
        # The agent goes away: the pools keep their backends and serve on; the outage is logged once.
        double.go_away()
        gone = time.monotonic()
        double.register("web", "b4", "127.0.0.1", ports["b4"])     # while fastlb cannot see it
        wait_until(lambda: fastlb.output.count("keeping its last backends") == 2, what="the outage logged")
        marks.append(("the outage logged", time.monotonic()))
        wait_until(lambda: time.monotonic() - gone >= OUTAGE_SECONDS, timeout=OUTAGE_SECONDS + 5,
                   what="the outage", interval=0.1)
        assert in_every_worker(admin, "api", [address["b3"]])
        assert answered_by("b3", gone) > 0
        double.come_back()
        wait_until(lambda: in_every_worker(admin, "api", [address["b3"], address["b4"]]), timeout=15,
                   what="b4 added once the agent is back")
        since = time.monotonic()
        wait_until(lambda: answered_by("b4", since), what="traffic to b4")
    finally:
        for load in loads:
            load.stop()
    assert [f for load in loads for f in load.failures] == [], (marks, [f for load in loads for f in load.failures])
    # Said once per watch (the top level's and the pool's), however many queries failed.
    assert fastlb.output.count("keeping its last backends") == 2
    wait_until(lambda: fastlb.output.count("answers again") == 2, what="both watches answered again")
    assert "pool api" in fastlb.wait_for_line(r"discovery \(consul, pool api\): add").group(0)
