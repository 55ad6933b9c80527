"""Admission control: request rate limits per key, connection limits per source, CIDR allow/deny lists,
runtime blocks; shared between balancers through `--store redis://`.

    --rate-limit KEY=RATE[,burst=N][,pool=P][,missing=source|shared|allow]     (repeatable)
    --max-conn-per-source N      --allow CIDR  --deny CIDR  --access-file FILE  --admin-allow CIDR

KEY is `source` (the client address; the PROXY header's on accept-proxy binds), `header:NAME`,
`cookie:NAME`, `query:NAME`, or `route` (one bucket per pool: the pool's total). RATE is N/s, N/m, N/h
or N/DURATION; burst defaults to the rate's N. A request whose key is absent falls under `missing`:
its source address (the default: a client cannot escape a limit by leaving the header out), one shared
bucket for all such requests, or no limit. Over a limit: 429 with Retry-After; nothing reaches a
backend. Every rule that applies is checked, in order; the first one over its limit answers.

Where it runs: the table is C (fastlb/_admission.pyx: GCRA per key, a fixed-size set-associative table,
binary search over CIDR ranges). The HTTP engine (fastlb/http/_fast.pyx) checks connections and
`source`, `route`, `header:` and `cookie:` rules by a C call into it, without Python (it records the key
headers' values, Cookie included, as it parses the head); a `query:` rule is checked in Python, so the
engine stays off for a balancer with one, and for a `header:` or `cookie:` rule with routing rules
(said at start).
The Python paths (HTTP fallback, tcp mode) call the same table.

Sharing (`--store redis://`): nodes never wait for Redis. Each keeps its own bucket per key and decides
locally; every SHARE_INTERVAL it sends what it allowed per key (one Lua script call for up to
SHARE_BATCH keys) and Redis adds it to the key's global arrival time and answers where that time now
stands; the node takes that as its own (plus what it allowed meanwhile). So N nodes together allow about
rate x time + burst, overshooting by at most what the others allowed in one interval. Keys expire in
Redis once their bucket is full again. Redis down: one log line, local limits go on, one probe a second,
one log line when it returns.
"""
from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math

from fastlb.config.admission import KINDS, MISSING, RateLimitSpec, parse_cidr, read_access_file
from fastlb.constants import ADMIT, MISSING_ALLOW, MISSING_SOURCE, TOO_MANY
from fastlb.http.routing import cookie_value, query_value

log = logging.getLogger("fastlb")

ENGINE_KINDS = ("source", "route", "header", "cookie")  # what the HTTP engine checks in C
SECRET_KINDS = ("header", "cookie", "query")  # keys that may be credentials: fingerprinted without a token
SHARE_INTERVAL = 0.05                         # how often counts go to the shared store
SHARE_BATCH = 2000                            # keys per exchange (more wait for the next)
STORE_PROBE_INTERVAL = 1.0
STORE_OP_TIMEOUT = 0.5
TOP_K = 10                                    # keys in the views and in /metrics (bounded labels)
TALKER_WINDOW = 60.0                          # "current" top talkers: seen within this many seconds
MAX_RETRY_AFTER = 3600                        # Retry-After of a block without an end
NO_KEY = b"-"                                 # the shared bucket of requests without the key (as the C side)

# GCRA in Redis for a batch of keys: KEYS the keys, ARGV their costs (microseconds). Each key's arrival
# time moves by its cost (from now, if it was in the past); the answer is how far past now each stands.
SHARE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[i])
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1000)
  out[i] = tat - now
end
return out
"""


def ranges(networks) -> list[tuple[int, int]]:
    """Networks -> sorted, merged [start, end] ranges of 128-bit ints (IPv4 mapped to ::ffff:0:0/96)."""
    spans = []
    for text in networks:
        network = ipaddress.ip_network(text)
        start, end = int(network.network_address), int(network.broadcast_address)
        if network.version == 4:
            start, end = start | 0xffff00000000, end | 0xffff00000000
        spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def address_allowed(networks, host: str) -> bool:
    """The admin bind's allow list (empty: everyone). IPv4-mapped IPv6 peers count as IPv4."""
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(n) for n in networks)


def key_label(key: bytes, secret: bool) -> str:
    """How a key appears in /metrics (no token): addresses and pool names as they are; header, cookie
    and query values (API keys, session ids) only as a fingerprint, which the admin API lists too."""
    if not secret:
        return key.decode("latin-1")
    return "#" + hashlib.blake2b(key, digest_size=6).hexdigest()


def too_many_requests(retry_after: int, close: bool) -> bytes:
    body = b"429 Too Many Requests\n"
    return (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Retry-After: %d\r\nCache-Control: no-store\r\n%s\r\n%s"
            % (len(body), retry_after, b"Connection: close\r\n" if close else b"", body))


# ---- one worker's admission ---------------------------------------------------------------------------

def configured(config) -> bool:
    """Whether anything of admission control is on (otherwise no table exists and no path checks)."""
    return bool(config.rate_limit or config.max_conn_per_source or config.allow or config.deny
                or config.access_file)


class Admission:
    """A worker's limiter (the C table) and what feeds it: lists (flags, file, runtime blocks), the
    shared store's exchange, the views for the admin API and /metrics."""

    def __init__(self, config, loop: asyncio.AbstractEventLoop, pool_names: list[str]) -> None:
        from fastlb._admission import Limiter
        self.loop = loop
        self.tcp = config.mode == "tcp"
        self.specs: list[RateLimitSpec] = list(config.rate_limit)
        self.pool_ids = {name: index for index, name in enumerate(pool_names)}
        # The headers `header:` and `cookie:` rules key on: the HTTP engine records their values as it
        # parses (Cookie for cookie rules, whose cookie the table finds in it).
        key_headers = [s.name.lower().encode() if s.kind == "header" else b"cookie" for s in self.specs
                       if s.kind in ("header", "cookie")]
        self.engine_headers = list(dict.fromkeys(key_headers))
        rules = []
        for spec in self.specs:
            interval = 1.0 / spec.rate
            rules.append((interval, spec.burst * interval, KINDS[spec.kind], MISSING[spec.missing],
                          self.pool_ids.get(spec.pool, -2) if spec.pool is not None else -1,
                          self.engine_headers.index(spec.name.lower().encode()) if spec.kind == "header"
                          else self.engine_headers.index(b"cookie") if spec.kind == "cookie" else -1,
                          spec.name.encode() if spec.kind == "cookie" else b""))
        self.limiter = Limiter(config.rate_limit_table_size, rules, [n.encode() for n in pool_names],
                               config.max_conn_per_source)
        # What the Python path reads per rule: (index, kind, lower-cased header name / cookie or query
        # name, missing, pool id).
        self.python_rules = [(i, s.kind, s.name.lower().encode() if s.kind == "header" else s.name.encode(),
                              MISSING[s.missing], rules[i][4]) for i, s in enumerate(self.specs)]
        self.capture = frozenset(b"cookie" if s.kind == "cookie" else s.name.lower().encode()
                                 for s in self.specs if s.kind in ("header", "cookie"))
        self.python_keys = [s.key for s in self.specs if s.kind not in ENGINE_KINDS]
        self.config_deny = list(config.deny)
        self.config_allow = list(config.allow)
        self.file_deny: list[str] = []
        self.file_allow: list[str] = []
        self.blocked_networks: set[str] = set()
        self.access_file = config.access_file
        if self.access_file:
            self.file_deny, self.file_allow = read_access_file(self.access_file)   # checked at config time
        self.refresh_lists()
        self.responses: dict[tuple[int, bool], bytes] = {}
        self.store_url = config.store if config.store.startswith("redis://") else None
        self.store_up = True
        self.client = None
        self.tasks: list[asyncio.Task] = []
        # A rule's keys in the store: nodes share a rule written the same way (its text makes the prefix).
        self.tags = [hashlib.blake2b(s.text.encode(), digest_size=4).hexdigest() for s in self.specs]

    def describe(self) -> str:
        """The start log's line: what is on, and where it is checked."""
        parts = [f"rate limit {s.text}" for s in self.specs]
        if self.limiter.max_conn_per_source:
            parts.append(f"max {self.limiter.max_conn_per_source} connection(s) per source")
        lists = len(self.config_deny) + len(self.config_allow) + len(self.file_deny) + len(self.file_allow)
        if lists or self.access_file:
            parts.append(f"{lists} CIDR list entr{'y' if lists == 1 else 'ies'}"
                         + (f" (+ watched {self.access_file})" if self.access_file else ""))
        where = ("checked at accept (after a PROXY header; after the handshake on TLS binds)" if self.tcp else
                 f"rules keyed by {', '.join(self.python_keys)} are checked on the HTTP Python path (the C "
                 f"engine serves no bind then)" if self.python_keys else
                 "the HTTP engine checks everything in C (unless it says otherwise below)")
        shared = f"shared through {self.store_url}" if self.store_url and self.specs else "per worker"
        return f"{'; '.join(parts)}; {where}; limits {shared}; table {self.limiter.capacity} keys"

    # ---- lists ---------------------------------------------------------------------------------------

    def refresh_lists(self) -> None:
        deny = [*self.config_deny, *self.file_deny, *self.blocked_networks]
        allow = [*self.config_allow, *self.file_allow]
        self.limiter.set_lists(ranges(deny), ranges(allow), bool(allow))

    # ---- per connection (the Python paths; the HTTP engine calls the table itself) -------------------

    def admit_http(self, client) -> bool:
        """A new ClientConnection: False when refused (denied: closed at once; over the connections per
        source: 429, then closed). Admitted, it is counted until connection_lost."""
        verdict = self.limiter.admit(client.client_ip)
        if verdict == ADMIT:
            client.admitted = True
            return True
        if verdict == TOO_MANY:
            client.transport.write(self.limited_response(1.0, True))
            client.transport.close()
        else:
            client.transport.abort()
        return False

    def admit_source(self, host: str) -> bool:
        """A tcp client (its PROXY-header source on accept-proxy binds): True when admitted and counted
        (the caller calls leave() when it ends)."""
        return self.limiter.admit(host.encode()) == ADMIT

    def leave(self, host: str) -> None:
        self.limiter.leave_ip(host.encode())

    # ---- per request (the Python path) -------------------------------------------------------------

    def check_request(self, client_ip: bytes, url: bytes, captured: dict | None, pool_name: str) -> float:
        """0.0: allowed; else seconds until the first rule over its limit would allow it."""
        pool = self.pool_ids.get(pool_name, -3)
        check = self.limiter.check_key
        for index, kind, name, missing, rule_pool in self.python_rules:
            if rule_pool != -1 and rule_pool != pool:
                continue
            if kind == "source":
                key = client_ip
            elif kind == "route":
                key = pool_name.encode()
            elif kind == "header":
                key = captured.get(name) if captured else None
            elif kind == "cookie":
                key = cookie_value(captured.get(b"cookie") if captured else None, name)
            else:
                key = query_value(url, name)
            if key is None:
                if missing == MISSING_ALLOW:
                    continue
                key = client_ip if missing == MISSING_SOURCE else NO_KEY
            wait = check(index, key)
            if wait > 0.0:
                return wait
        return 0.0

    def limited_response(self, wait: float, close: bool) -> bytes:
        """The 429 for a request `wait` seconds early (cached per Retry-After value)."""
        seconds = MAX_RETRY_AFTER if wait >= MAX_RETRY_AFTER else max(1, math.ceil(wait))   # a block: inf
        data = self.responses.get((seconds, close))
        if data is None:
            data = self.responses[(seconds, close)] = too_many_requests(seconds, close)
        return data

    # ---- background: the access file, the shared store ---------------------------------------------

    def start(self) -> None:
        if self.access_file:
            from fastlb.discovery import watch_file
            self.tasks.append(self.loop.create_task(watch_file(self.access_file, self._reload_file,
                                                               "admission", "lists")))
        if self.store_url and self.specs:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            self.client = redis.asyncio.Redis.from_url(
                self.store_url, socket_timeout=STORE_OP_TIMEOUT, socket_connect_timeout=STORE_OP_TIMEOUT,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
            self.tasks.append(self.loop.create_task(self._share()))

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.client is not None:
            try:
                await self.client.aclose()
            except Exception:
                pass

    def _reload_file(self) -> None:
        self.file_deny, self.file_allow = read_access_file(self.access_file)
        self.refresh_lists()
        log.info("admission: %s: %d deny, %d allow", self.access_file, len(self.file_deny), len(self.file_allow))

    async def _share(self) -> None:
        """Every SHARE_INTERVAL: this worker's counts to Redis, the global state back. Never awaited by a
        request; a failure marks the store down (one line) until a probe finds it back (one line)."""
        script = self.client.register_script(SHARE_SCRIPT)
        limiter = self.limiter
        while True:
            await asyncio.sleep(SHARE_INTERVAL)
            if not self.store_up:
                limiter.take_pending(limiter.capacity)      # local decisions stand; nothing to send
                await asyncio.sleep(STORE_PROBE_INTERVAL)
                try:
                    async with asyncio.timeout(STORE_OP_TIMEOUT):
                        await self.client.ping()
                except Exception:
                    continue
                self.store_up = True
                log.warning("admission: store %s reachable again; limits are shared again", self.store_url)
                continue
            items = limiter.take_pending(SHARE_BATCH)
            if not items:
                continue
            keys = [f"fastlb:rl:{self.tags[rule]}:{ident:016x}" for ident, rule, _ in items]
            costs = [round(count * limiter.interval_of(rule) * 1e6) for _, rule, count in items]
            sent_at = limiter.now()
            try:
                async with asyncio.timeout(STORE_OP_TIMEOUT):
                    answers = await script(keys=keys, args=costs)
            except Exception as exc:
                self.store_up = False
                log.warning("admission: store %s unreachable (%s: %s); limits are per node until it returns",
                            self.store_url, exc.__class__.__name__, exc)
                continue
            for (ident, _, _), ahead in zip(items, answers):
                limiter.apply_shared(ident, int(ahead) / 1e6, sent_at)

    # ---- runtime changes (admin API) -----------------------------------------------------------------

    def apply(self, change: dict) -> dict:
        """{"op": "block"|"unblock", "cidr": C} or {"op": ..., "key": K[, "rule": N][, "seconds": S]}."""
        op = change["op"]
        if "cidr" in change:
            network = change["cidr"]
            if op == "block":
                self.blocked_networks.add(network)
            else:
                self.blocked_networks.discard(network)
            self.refresh_lists()
            return change
        key = change["key"].encode()
        for index in change["rules"]:
            if index >= len(self.specs):
                continue                  # a block replayed to workers of a reloaded config with fewer rules
            if op == "block":
                self.limiter.block(index, key, change.get("seconds") or math.inf)
            else:
                self.limiter.unblock(index, key)
        return change

    # ---- views ---------------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        limiter = self.limiter
        entries = limiter.entries(TALKER_WINDOW)
        texts = [s.text for s in self.specs]
        secret = [s.kind in SECRET_KINDS for s in self.specs]
        as_row = lambda e: {"rule": texts[e[0]], "key": e[1].decode("latin-1"), "allowed": e[2],  # noqa: E731
                            "limited": e[3], "blocked": e[4], "label": key_label(e[1], secret[e[0]])}
        return {
            "rules": [{"rule": text, "limited": count} for text, count in zip(texts, limiter.rule_limited())],
            "talkers": [as_row(e) for e in sorted(entries, key=lambda e: e[2] + e[3], reverse=True)[:TOP_K]],
            "top_limited": [as_row(e) for e in sorted(entries, key=lambda e: e[3], reverse=True)[:TOP_K]
                            if e[3]],
            "blocked_keys": [as_row(e) for e in entries if e[4]],
            "blocked_networks": sorted(self.blocked_networks),
            "denied": limiter.denied, "too_many_connections": limiter.too_many,
            "table": {"capacity": limiter.capacity, "evictions": limiter.evictions},
            "store": None if self.client is None else ("up" if self.store_up else "down"),
        }


def validate_change(change: dict, specs: list) -> dict:
    """Checks an API change; raises ValueError. Key blocks apply to the rules named (default: all)."""
    op = change.get("op")
    if op not in ("block", "unblock"):
        raise ValueError(f"unknown admission change {op!r}")
    if ("cidr" in change) == ("key" in change):
        raise ValueError("give either 'cidr' or 'key'")
    if "cidr" in change:
        return {"op": op, "cidr": parse_cidr(change["cidr"])}
    if not specs:
        raise ValueError("no --rate-limit rule: a key can only be blocked under one (block a cidr instead)")
    key = change["key"]
    if not isinstance(key, str) or not key or len(key) > 4096:
        raise ValueError("'key' must be a non-empty string")
    rules = change.get("rule")
    indexes = list(range(len(specs))) if rules is None else [rules] if isinstance(rules, int) else None
    if indexes is None or any(not 0 <= i < len(specs) for i in indexes):
        raise ValueError(f"'rule' must be an index from 0 to {len(specs) - 1}")
    seconds = change.get("seconds")
    if seconds is not None and (not isinstance(seconds, (int, float)) or seconds <= 0):
        raise ValueError("'seconds' must be a positive number")
    return {"op": op, "key": key, "rules": indexes, "seconds": seconds}


def public_view(view: dict | None) -> dict | None:
    """The view for pages without a token (/stats.json): keys as their labels (API keys fingerprinted)."""
    if not view:
        return view
    rows = ("talkers", "top_limited", "blocked_keys")
    return {**view, **{name: [{**row, "key": row["label"]} for row in view[name]] for name in rows}}


def merge_views(views: list[dict]) -> dict | None:
    """The workers' admission views as one: counters summed, top lists merged per (rule, key)."""
    views = [v for v in views if v]
    if not views:
        return None
    merged = {"rules": [dict(r) for r in views[0]["rules"]], "denied": 0, "too_many_connections": 0,
              "blocked_networks": views[0]["blocked_networks"], "store": views[0]["store"],
              "table": {"capacity": 0, "evictions": 0}}
    rows: dict[tuple[str, str], dict] = {}
    for view in views:
        for total, rule in zip(merged["rules"], view["rules"]) if view is not views[0] else ():
            total["limited"] += rule["limited"]
        merged["denied"] += view["denied"]
        merged["too_many_connections"] += view["too_many_connections"]
        merged["table"]["capacity"] += view["table"]["capacity"]
        merged["table"]["evictions"] += view["table"]["evictions"]
        for row in (*view["talkers"], *view["top_limited"], *view["blocked_keys"]):
            seen = rows.setdefault((row["rule"], row["key"]), {**row, "allowed": 0, "limited": 0, "_from": set()})
            if id(view) not in seen["_from"]:        # one worker's row once, though in several lists
                seen["_from"].add(id(view))
                seen["allowed"] += row["allowed"]
                seen["limited"] += row["limited"]
                seen["blocked"] = seen["blocked"] or row["blocked"]
    for row in rows.values():
        row.pop("_from")
    merged["talkers"] = sorted(rows.values(), key=lambda r: r["allowed"] + r["limited"], reverse=True)[:TOP_K]
    merged["top_limited"] = [r for r in sorted(rows.values(), key=lambda r: r["limited"], reverse=True)[:TOP_K]
                             if r["limited"]]
    merged["blocked_keys"] = [r for r in rows.values() if r["blocked"]]
    return merged
