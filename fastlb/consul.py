"""Consul as a discovery source: the passing instances of one service, watched with blocking queries.

`ConsulWatch.run` asks `GET /v1/health/service/NAME?passing=1` (with `dc`, `tag` when set), then again
with `index=<X-Consul-Index of the last answer>&wait=<consul_wait>`: the agent holds that request until
the service's instances or their checks change, or the wait ends. Each new answer is the whole set of
passing instances, handed to `on_change` (fastlb/discovery.py turns it into add / remove / weight
changes). As Consul's documentation asks of a blocking client:

- an index that goes backwards (a restarted or different server) starts again from 0, and one below 1
  is taken as 1;
- an answer whose index did not move (the wait ended) changes nothing;
- errors (refused, timed out, a non-200 answer, bad JSON) back off exponentially, from BACKOFF_FIRST to
  BACKOFF_MAX seconds with jitter, and never drop the backends of the last good answer: an outage of
  the agent says so once in the log, and once more when it answers again.

Instance -> backend: `Service.Address` (else the node's `Address`) and `Service.Port`. The weight is
the `fastlb_weight` meta value if set, else `Weights.Passing` (Consul's own, 1 unless registered
otherwise), clamped to 1..MAX_WEIGHT; the instance is a backup when its meta says `fastlb_backup =
"true"` or it carries the tag `backup`.

The HTTP API is called directly with asyncio streams (one HTTP/1.0 request per query, so the agent
closes the connection and there is no chunked framing to parse): the maintained Python clients are
synchronous (py-consul, on requests) or need aiohttp, which fastlb does not depend on, and a blocking
query is one GET.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import urllib.parse
from typing import Any, Callable

from fastlb.config import MAX_WEIGHT, BackendSpec, Config, parse_address, read_token
from fastlb.health import describe_error

log = logging.getLogger("fastlb")

BACKOFF_FIRST = 0.2          # seconds before the first retry after a failed query; doubled per failure ...
BACKOFF_MAX = 5.0            # ... up to this
RESPONSE_LIMIT = 16 << 20    # a larger answer is an error (16 MiB: tens of thousands of instances)
CONNECT_TIMEOUT = 5.0
WAIT_MARGIN = 5.0            # Consul adds up to wait/16 to a blocking query; a read waits that plus this


class ConsulError(Exception):
    pass


def instance_spec(entry: dict[str, Any]) -> BackendSpec | None:
    """One /v1/health/service entry as a backend (None when it has no usable address or port)."""
    service = entry.get("Service") or {}
    host = service.get("Address") or (entry.get("Node") or {}).get("Address")
    port = service.get("Port")
    if not host or not isinstance(port, int) or not 0 < port < 65536:
        return None
    meta = service.get("Meta") or {}
    weight = (service.get("Weights") or {}).get("Passing", 1)
    if "fastlb_weight" in meta:
        weight = meta["fastlb_weight"]
    try:
        weight = max(1, min(MAX_WEIGHT, int(weight)))
    except (TypeError, ValueError):
        weight = 1
    backup = str(meta.get("fastlb_backup", "")).lower() == "true" or "backup" in (service.get("Tags") or [])
    return BackendSpec(host.strip("[]"), port, weight=weight, backup=backup)


def instances_to_specs(entries: Any) -> list[BackendSpec]:
    if not isinstance(entries, list):
        raise ConsulError("the answer is not a JSON array")
    specs = {}
    for entry in entries:
        spec = instance_spec(entry) if isinstance(entry, dict) else None
        if spec is not None:
            specs.setdefault(spec.address, spec)      # one backend per address, the first instance's
    return list(specs.values())


class ConsulWatch:
    """Watches config.consul_service at config.consul; `on_change(specs)` after each answer that moved
    the index. `describe` names the pool in log lines."""

    def __init__(self, config: Config, on_change: Callable[[list[BackendSpec]], None], describe: str = "") -> None:
        scheme, _, address = config.consul.partition("://")
        self.host, self.port = parse_address(address)
        self.ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self.ssl = ssl.create_default_context(cafile=config.consul_ca)
        self.config = config
        self.service = config.consul_service
        self.on_change = on_change
        self.what = f"Consul service {self.service} at {config.consul}{describe}"
        self.index = 0
        self.failing = False          # the last query failed (said once, until one works again)

    def query_path(self) -> str:
        params = [("passing", "1")]
        if self.config.consul_datacenter:
            params.append(("dc", self.config.consul_datacenter))
        if self.config.consul_tag:
            params.append(("tag", self.config.consul_tag))
        if self.index:
            params += [("index", str(self.index)), ("wait", f"{self.config.consul_wait:g}s")]
        return f"/v1/health/service/{urllib.parse.quote(self.service)}?{urllib.parse.urlencode(params)}"

    async def run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                index, entries = await self.query()
                specs = instances_to_specs(entries)
            except (OSError, TimeoutError, ConsulError, ValueError) as exc:
                if not self.failing:
                    self.failing = True
                    log.warning("discovery: %s: %s (keeping its last backends; retrying)", self.what,
                                exc if isinstance(exc, ConsulError) else describe_error(exc, CONNECT_TIMEOUT))
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            backoff = BACKOFF_FIRST
            if self.failing:
                self.failing = False
                log.info("discovery: %s answers again", self.what)
            if index < self.index:
                index = 0             # went backwards: start over (the answer itself is current)
            moved = index != self.index or index == 0
            self.index = max(index, 1)
            if moved:
                self.on_change(specs)

    async def query(self) -> tuple[int, Any]:
        """One (blocking) query: (X-Consul-Index, decoded body). Raises OSError, TimeoutError, ConsulError."""
        headers = [f"Host: {self.host}:{self.port}", "Accept: application/json", "User-Agent: fastlb"]
        if self.config.consul_token_file:
            headers.append(f"X-Consul-Token: {read_token(self.config.consul_token_file)}")
        request = f"GET {self.query_path()} HTTP/1.0\r\n" + "\r\n".join(headers) + "\r\n\r\n"
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl,
                                                           limit=RESPONSE_LIMIT)
        try:
            writer.write(request.encode())
            read_timeout = (self.config.consul_wait * 17 / 16 if self.index else 0) + WAIT_MARGIN
            async with asyncio.timeout(read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                status, fields = parse_head(head)
                length = fields.get("content-length")
                body = await (reader.readexactly(int(length)) if length and length.isdigit()
                              else reader.read(RESPONSE_LIMIT))
        except asyncio.IncompleteReadError:
            raise ConsulError("connection closed before a complete answer") from None
        except asyncio.LimitOverrunError:
            raise ConsulError("answer head too large") from None
        finally:
            writer.close()
        if status != 200:
            raise ConsulError(f"HTTP {status}: {body[:200].decode('utf-8', 'replace').strip()}")
        index = fields.get("x-consul-index", "0")
        if not index.isdigit():
            raise ConsulError(f"bad X-Consul-Index {index!r}")
        try:
            return int(index), json.loads(body)
        except ValueError:
            raise ConsulError("the answer is not JSON") from None


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ConsulError(f"not an HTTP answer ({status_line[:40]!r})")
    fields = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return int(parts[1]), fields

