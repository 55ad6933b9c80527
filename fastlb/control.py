"""Run-time changes to the backends, and the view over every worker's counters.

A change is a small JSON-ready dict, the same whether it comes from the admin API, a reload or a
discovery source, and whether it is applied in-process (`--workers 1`) or sent by the master to each
worker over its channel (fastlb/channel.py):

    {"op": "weight", "address": "10.0.0.1:80", "weight": 3}
    {"op": "state",  "address": "10.0.0.1:80", "state": "up" | "drain" | "maint"}
    {"op": "add",    "spec": {...}}           (a BackendSpec as a dict, see spec_to_dict)
    {"op": "remove", "address": "10.0.0.1:80"}
    {"op": "health", "address": "10.0.0.1:80", "up": true, "reason": "..."}   (master's checks)

Any change may name a pool: `"pool": "api"` (the API's and `fastlb ctl`'s POOL/ADDR). Without one, or
naming the top-level pool ("default", or in tcp mode an SNI group), it acts on the top-level backends.

`BackendTable` is the authoritative list the controller keeps (the master's, or the single worker's):
it validates a change before anyone applies it, so every worker gets only changes that apply cleanly.
The top-level backends are HTTP mode's pool "default" (in tcp mode every backend group SNI routes name,
each its own pool in a worker: a change names a backend by address, an added one goes to its spec's
group); each HTTP [[pool]] has a table of its own (`BackendTable.named`), changed the same ways.
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

from fastlb.config import BackendSpec, Config, parse_backend, parse_weight
from fastlb.observe import LATENCY_BUCKETS, STATUS_CLASSES, sum_counts

if TYPE_CHECKING:
    from fastlb.pool import BackendPool

OPERATOR_STATES = {"enable": "up", "up": "up", "drain": "drain", "disable": "maint", "maint": "maint"}


class ChangeError(ValueError):
    """A change that cannot apply: bad value (status 400) or unknown backend (404) or conflict (409)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def spec_to_dict(spec: BackendSpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data.pop("health_sources")
    return data


def spec_from_dict(data: dict[str, Any]) -> BackendSpec:
    data = dict(data)
    health = data.pop("health", {}) or {}
    if "check_expect" in health:
        health["check_expect"] = tuple(health["check_expect"])
    return BackendSpec(**data, health=health)


def parse_spec(address: str, weight: Any = None, backup: bool = False) -> BackendSpec:
    """A backend for the API's add: address in the --backend syntax (options allowed), weight/backup."""
    try:
        spec = parse_backend(address)
        if weight is not None:
            spec.weight = parse_weight(weight)
    except ValueError as exc:
        raise ChangeError(str(exc)) from None
    spec.backup = spec.backup or bool(backup)
    return spec


def split_pool(text: str) -> tuple[str | None, str]:
    """'POOL/ADDR[,options]' -> (POOL, 'ADDR[,options]'); a plain address -> (None, it). An address always
    has a ':' before any '/' (a check-path=/x option), a pool name never has one."""
    head, sep, rest = text.partition("/")
    if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", head):
        return head, rest
    return None, text


def with_pool(change: dict[str, Any], pool: str | None) -> dict[str, Any]:
    return {**change, "pool": pool} if pool is not None else change


class BackendTable:
    """The current backends, their weights and operator states, as the controller knows them: the
    top-level pool's, and in `named` a table for each HTTP [[pool]] (`pool`: its name)."""

    def __init__(self, config: Config, pool: str | None = None) -> None:
        self.pool = pool
        self._config = config
        self.specs: dict[str, BackendSpec] = {s.address: dataclasses.replace(s) for s in config.backends}
        self.admin_states: dict[str, str] = {}          # address -> state, when not "up"
        self.sources: dict[str, str] = {a: "config" for a in self.specs}   # who added it
        self.named: dict[str, BackendTable] = {}
        if pool is None:
            self.named = {p.name: BackendTable(config.pool_config(p), p.name) for p in config.pools}

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A new generation's config: a named pool the file left as it was keeps its table (run-time
        changes, discovered backends); a changed one starts from the file plus what was added at run
        time."""
        old_pools = {p.name: p for p in self._config.pools}
        self._config = config
        named = {}
        for pool in config.pools:
            table = self.named.get(pool.name)
            if table is None or old_pools.get(pool.name) != pool:
                table = BackendTable(config.pool_config(pool), pool.name).keeping_added(table)
            table._config = config.pool_config(pool)
            named[pool.name] = table
        self.named = named

    def keeping_added(self, old: "BackendTable | None") -> "BackendTable":
        """This table plus the backends the API and discovery had added to `old` (a pool's table before
        its config changed): the file's own list is new, what was added at run time stays."""
        for address, source in (old.sources.items() if old is not None else ()):
            if source != "config" and address not in self.specs:
                self.specs[address], self.sources[address] = old.specs[address], source
                if address in old.admin_states:
                    self.admin_states[address] = old.admin_states[address]
        return self

    def of(self, pool: str | None) -> "BackendTable":
        """The table of a pool by name (None, "default" or an SNI group: the top level's)."""
        if pool is None or pool not in self.named:
            if pool is not None and pool not in self.groups():
                raise ChangeError(f"no pool {pool!r}; pools: {', '.join(sorted(self.groups() | set(self.named)))}",
                                  404)
            return self
        return self.named[pool]

    def validate(self, change: dict[str, Any]) -> dict[str, Any]:
        """Checks and normalises a change; raises ChangeError."""
        if self.pool is None and change.get("pool") is not None:
            pool = change["pool"]
            table = self.of(pool)
            change = table.validate({k: v for k, v in change.items() if k != "pool"})
            if table is not self:
                change["pool"] = pool
            return change
        op = change.get("op")
        if op == "add":
            if not self.config.has_default_pool:
                raise ChangeError("no top-level pool to add to: the named [[pool]]s change by reload", 409)
            spec = change["spec"]
            if isinstance(spec, BackendSpec):
                spec = spec_to_dict(spec)
            parsed = spec_from_dict(spec)
            address = parsed.address
            if address in self.specs:
                raise ChangeError(f"backend {address} exists", 409)
            if parsed.group not in self.groups():
                raise ChangeError(f"no backend group {parsed.group!r}: a new group comes with a reload", 409)
            return {"op": "add", "spec": spec, "source": change.get("source", "api")}
        address = change.get("address")
        if address not in self.specs:
            raise ChangeError(f"no backend {address}", 404)
        if op == "weight":
            try:
                weight = parse_weight(change.get("weight"))
            except ValueError as exc:
                raise ChangeError(f"weight: {exc}") from None
            return {"op": "weight", "address": address, "weight": weight}
        if op == "state":
            state = OPERATOR_STATES.get(str(change.get("state")))
            if state is None:
                raise ChangeError(f"state must be one of {', '.join(OPERATOR_STATES)}")
            return {"op": "state", "address": address, "state": state}
        if op == "remove":
            if len(self.specs) == 1 and not self.config.discovers_backends:
                raise ChangeError(f"{address} is the last backend", 409)
            return {"op": "remove", "address": address}
        raise ChangeError(f"unknown change {op!r}")

    def groups(self) -> set[str]:
        """The backend groups a worker has a pool for (fixed by the configuration it started with)."""
        groups = {s.group for s in self.config.backends}
        if self.config.has_default_pool:
            groups.add("default")
        return groups

    def commit(self, change: dict[str, Any]) -> None:
        """Records a validated change (after it was applied or sent)."""
        if change.get("pool") in self.named:
            self.named[change["pool"]].commit(change)
            return
        op = change["op"]
        if op == "add":
            spec = spec_from_dict(change["spec"])
            self.specs[spec.address] = spec
            self.sources[spec.address] = change.get("source", "api")
        elif op == "remove":
            self.specs.pop(change["address"], None)
            self.admin_states.pop(change["address"], None)
            self.sources.pop(change["address"], None)
        elif op == "weight":
            self.specs[change["address"]].weight = change["weight"]
        elif op == "state":
            if change["state"] == "up":
                self.admin_states.pop(change["address"], None)
            else:
                self.admin_states[change["address"]] = change["state"]

    def current_config(self) -> Config:
        """The configuration a newly started worker gets: the current backends, in every pool."""
        pools = [dataclasses.replace(p, backends=[dataclasses.replace(s) for s in self.named[p.name].specs.values()])
                 for p in self.config.pools]
        return self.config.replace(backends=[dataclasses.replace(s) for s in self.specs.values()], pools=pools)

    def runtime_admin(self) -> dict[str, str]:
        """Operator states not "up", keyed ADDR (top level) or POOL/ADDR: for a newly started worker."""
        states = dict(self.admin_states)
        for name, table in self.named.items():
            states.update((f"{name}/{address}", state) for address, state in table.admin_states.items())
        return states


def apply_runtime(pools: dict[str, "BackendPool"], named: dict[str, "BackendPool"], runtime: dict) -> None:
    """A new worker's start: the checks' verdicts and the operator states the controller has now
    (`runtime`: "verdicts" and "admin", keyed ADDR or POOL/ADDR)."""
    for kind in ("verdicts", "admin"):
        for key, value in runtime.get(kind, {}).items():
            name, _, address = key.rpartition("/")
            for pool in ([named[name]] if name in named else [] if name else pools.values()):
                backend = pool.by_address.get(address)
                if backend is None:
                    continue
                if kind == "admin":
                    pool.set_admin_state(address, value)
                elif not value:
                    pool.health.set_checked(backend.health, False, "down at start")


def apply_to_pools(pools: dict[str, "BackendPool"], change: dict[str, Any],
                   named: dict[str, "BackendPool"] | None = None) -> None:
    """Applies a validated change to one worker's pools: one naming a [[pool]] to that pool (`named`);
    otherwise to the top-level pools (one per backend group): an added backend joins its group's pool;
    any other change goes to the pool that holds the address (a health verdict names backends by
    address, across groups)."""
    if change.get("pool") is not None:
        if named and change["pool"] in named:
            apply_to_pool(named[change["pool"]], change)
        return
    if change["op"] == "add":
        apply_to_pool(pools.get(spec_from_dict(change["spec"]).group), change)
        return
    address = change["address"]
    for pool in pools.values():
        if address in pool.by_address:
            apply_to_pool(pool, change)
            return


def apply_to_pool(pool: "BackendPool | None", change: dict[str, Any]) -> None:
    """Applies a validated change to one worker's top-level pool (None: HTTP mode with named pools only,
    where the table refuses every change)."""
    if pool is None:
        return
    op = change["op"]
    if op == "add":
        pool.add_backend(spec_from_dict(change["spec"]))
    elif op == "remove":
        pool.remove_backend(change["address"])
    elif op == "weight":
        pool.set_weight(change["address"], change["weight"])
    elif op == "state":
        pool.set_admin_state(change["address"], change["state"])
    elif op == "health":
        backend = pool.by_address.get(change["address"])
        if backend is not None:
            pool.health.set_checked(backend.health, change["up"], change["reason"])


def reload_changes(table: BackendTable, new: Config) -> tuple[list[dict[str, Any]], list[str]]:
    """What a reload changes: (backend changes to apply in place, names of other fields that changed).

    Backends are compared by address: new ones are added, missing ones removed (those a discovery source
    added stay: the source owns them), a changed weight is set; a backend whose other settings changed
    (backup, maxconn, send_proxy, health overrides) is removed and added again."""
    changes: list[dict[str, Any]] = []
    groups = table.groups()
    new_group = False                 # a backend of a group the workers have no pool for: new workers
    old_specs = {a: s for a, s in table.specs.items() if table.sources.get(a) == "config"}
    new_specs = {s.address: s for s in new.backends}
    for address, spec in old_specs.items():
        if address not in new_specs:
            changes.append({"op": "remove", "address": address})
    for address, spec in new_specs.items():
        old = old_specs.get(address)
        if old is None:
            if address in table.specs:          # discovered before, now in the file: the file owns it
                table.sources[address] = "config"
                if table.specs[address].weight != spec.weight:
                    changes.append({"op": "weight", "address": address, "weight": spec.weight})
                continue
            if spec.group not in groups:
                new_group = True
                continue
            changes.append({"op": "add", "spec": spec_to_dict(spec), "source": "config"})
            continue
        same_but_weight = dataclasses.replace(old, weight=spec.weight, health_sources={})
        if same_but_weight != dataclasses.replace(spec, health_sources={}):
            changes.append({"op": "remove", "address": address})
            if spec.group not in groups:
                new_group = True
            else:
                changes.append({"op": "add", "spec": spec_to_dict(spec), "source": "config"})
        elif old.weight != spec.weight:
            changes.append({"op": "weight", "address": address, "weight": spec.weight})
    ignored = {"backends", "log_level", "admin_token_file"}
    other = [f.name for f in dataclasses.fields(Config)
             if f.name not in ignored and getattr(table.config, f.name) != getattr(new, f.name)]
    if new_group:
        other.append("backend groups")
    return changes, other


# ---- the view over every worker ---------------------------------------------------------------------

def _add_traffic(total: dict[str, Any], traffic: dict[str, Any]) -> None:
    for key, value in traffic.items():
        if key in ("connect_time", "response_time"):
            counts, seconds = total[key]
            total[key] = [[a + b for a, b in zip(counts, value[0])], seconds + value[1]]
        elif isinstance(value, list):
            total[key] = [a + b for a, b in zip(total[key], value)]
        else:
            total[key] += value


def empty_traffic() -> dict[str, Any]:
    buckets = [0] * (len(LATENCY_BUCKETS) + 1)
    return {"connections": 0, "requests": 0, "responses": [0] * 5, "bytes_in": 0, "bytes_out": 0,
            "connect_errors": 0, "retries": 0, "connect_time": [list(buckets), 0.0],
            "response_time": [list(buckets), 0.0]}


def percentile(counts: list[int], q: float) -> float | None:
    """The q-quantile of a histogram (non-cumulative counts), interpolated inside its bucket."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if seen + count >= rank and count:
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            high = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return LATENCY_BUCKETS[-1]


def _latency(histogram: list) -> dict[str, Any]:
    counts, seconds = histogram
    return {"count": sum(counts), "sum": seconds, "buckets": counts,
            "p50": percentile(counts, 0.5), "p90": percentile(counts, 0.9), "p99": percentile(counts, 0.99)}


def aggregate(table: BackendTable, snapshots: list[dict[str, Any]],
              retired: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sums the workers' snapshots (and the counters of workers that exited) per pool and backend.

    Pools: the top-level one ("default"), then HTTP mode's named pools ([[pool]]) in config order; the
    API, reload and discovery change any of them.
    State: each worker's own (passive ejection is per worker); `state` is the common one, or the
    distinct ones joined by '/'. EWMA: the mean over workers that measured one."""
    config = table.config
    pools = []
    if config.has_default_pool:
        pools.append(("default", table.specs, table.admin_states, table.sources, config.algorithm))
    for name, named in table.named.items():
        pools.append((name, named.specs, named.admin_states, named.sources, named.config.algorithm))
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for snap in snapshots:
        for view in snap["pools"]:
            by_pool.setdefault(view["pool"], []).append(view)
    return {"pools": [_aggregate_pool(name, specs, admin_states, sources, algorithm, by_pool.get(name, []),
                                      retired.get(name, {}))
                      for name, specs, admin_states, sources, algorithm in pools],
            "workers": len(snapshots), "clients": _aggregate_clients(snapshots),
            **_aggregate_engine(snapshots)}


def _aggregate_engine(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The HTTP engine's counters summed over the workers reporting (fastlb/http/fast.py FastPath.counts),
    as {"engine": ...}; {} where no worker's engine serves."""
    engines = [snap["engine"] for snap in snapshots if "engine" in snap]
    return {"engine": sum_counts(engines)} if engines else {}


def _aggregate_clients(snapshots: list[dict[str, Any]]) -> dict[str, int]:
    """Client connections open now and (HTTP mode) accepted, summed over the workers reporting."""
    total: dict[str, int] = {"open": 0}
    for snap in snapshots:
        for key, value in snap.get("clients", {}).items():
            total[key] = total.get(key, 0) + value
    return total


def _aggregate_pool(name: str, specs: dict[str, BackendSpec], admin_states: dict[str, str],
                    sources: dict[str, str], algorithm: str, views: list[dict[str, Any]],
                    retired: dict[str, Any]) -> dict[str, Any]:
    pool = {"name": name, "active": 0, "queued": 0, "refused": retired.get("refused", 0),
            "algorithm": algorithm}
    for view in views:
        pool["active"] += view["active"]
        pool["queued"] += view["queued"]
        pool["refused"] += view["refused"]
    by_worker = [view["backends"] for view in views]         # (merge_snapshot's: by address)
    retired_backends = retired.get("backends", {})
    backends = []
    for address, spec in specs.items():
        traffic = empty_traffic()
        if address in retired_backends:
            _add_traffic(traffic, retired_backends[address])
        backend_views = [w[address] for w in by_worker if address in w]
        for view in backend_views:
            _add_traffic(traffic, view["traffic"])
        states = sorted({v["state"] for v in backend_views}) or ["unknown"]
        ewmas = [v["ewma"] for v in backend_views if v["ewma"]]
        backends.append({
            "address": address, "group": spec.group, "backup": spec.backup, "weight": spec.weight,
            "admin_state": admin_states.get(address, "up"), "state": "/".join(states),
            "source": sources.get(address, "config"),
            "workers": len(backend_views),        # workers that have it (a change reached each)
            "inflight": sum(v["inflight"] for v in backend_views),
            "picks": sum(v["picks"] for v in backend_views),
            "failures": sum(v["failures"] for v in backend_views),
            "ewma": sum(ewmas) / len(ewmas) if ewmas else 0.0,
            "connections": traffic["connections"], "requests": traffic["requests"],
            "responses": dict(zip(STATUS_CLASSES, traffic["responses"])),
            "bytes_in": traffic["bytes_in"], "bytes_out": traffic["bytes_out"],
            "connect_errors": traffic["connect_errors"], "retries": traffic["retries"],
            "connect_time": _latency(traffic["connect_time"]),
            "response_time": _latency(traffic["response_time"]),
        })
    pool["backends"] = backends
    return pool


def merge_snapshot(held: dict[str, Any] | None, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Folds a worker's snapshot into what the master holds of it: pools by name, each with its backends
    by address. A worker lists only the backends that changed since its last snapshot (`pool_snapshot`)
    and the addresses removed since (`removed`), so the rest is kept from before."""
    held = held if held is not None else {"pools": []}
    pools = {view["pool"]: view for view in held["pools"]}
    for address in snapshot.get("removed", ()):        # first: an address removed and added again is listed
        for view in pools.values():
            view["backends"].pop(address, None)
    for view in snapshot["pools"]:
        old = pools.get(view["pool"])
        backends = old["backends"] if old is not None else {}
        for backend in view["backends"]:
            backends[backend["address"]] = backend
        pools[view["pool"]] = {**view, "backends": backends}
    held["pools"] = list(pools.values())
    for key, value in snapshot.items():        # the rest (client counts, admission) is whole in every one
        if key not in ("pools", "removed"):
            held[key] = value
    return held


def retire(retired: dict[str, dict[str, Any]], snapshot: dict[str, Any]) -> None:
    """Folds the last snapshot of a worker that exited (merge_snapshot's form) into `retired` (pool name
    -> refused and per-backend counters), so totals never go backwards."""
    for view in snapshot["pools"]:
        pool = retired.setdefault(view["pool"], {"refused": 0, "backends": {}})
        pool["refused"] += view["refused"]
        for backend in view["backends"].values():
            total = pool["backends"].setdefault(backend["address"], empty_traffic())
            _add_traffic(total, backend["traffic"])
