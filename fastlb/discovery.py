"""Service discovery: backends from a watched file, DNS and Consul, applied live through the controller.

Every pool may have sources of its own: the top level's feed the top-level pool, a [[pool]]'s feed that
pool (its changes name it: `"pool": NAME`).

Each source produces the full set of backends it currently knows; `Discovery` compares it with what the
source produced last time and applies the difference as add / remove / weight changes (the same changes
as the admin API, so every worker gets them). A source owns only the backends it added: the config
file's and the API's are never removed by it. A failed lookup or an unreadable file changes nothing
(the last good set stays), so a DNS outage does not empty the pool; a source that stops answering says
so once in the log (and once when it answers again).

- File (`backends_file`): one backend per line in the `--backend` syntax, `#` comments. Checked every
  FILE_POLL_INTERVAL seconds (its mtime, size and inode: an editor's rename-over counts), read on change.
- DNS (`backends_dns`): `_service._proto.NAME` asks SRV records (target, port, weight; the lowest
  priority are primaries, others backups) then the targets' A/AAAA; `NAME:PORT` asks A and AAAA.
  Re-resolved every `dns_interval`. A small stub resolver over UDP (RFC 1035), so the server and port
  can be any (`dns_server`, default /etc/resolv.conf's first nameserver).
- Consul (`consul_service`): the service's passing instances, watched with blocking queries
  (fastlb/consul.py).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import struct
from typing import Any

from fastlb.config import BackendSpec, Config, format_address, parse_backend
from fastlb.consul import ConsulWatch
from fastlb.control import ChangeError, spec_to_dict, with_pool

log = logging.getLogger("fastlb")

# A source's label in the controller's table (who added a backend) -> the setting that configures it.
SOURCE_SETTINGS = {"file": "backends_file", "dns": "backends_dns", "consul": "consul_service"}
FILE_POLL_INTERVAL = 1.0
DNS_TIMEOUT = 2.0
TYPE_A, TYPE_AAAA, TYPE_SRV = 1, 28, 33


class Discovery:
    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, controller: Any) -> None:
        self.loop = loop
        self.config = config
        self.controller = controller
        self.known: dict[tuple[str | None, str], dict[str, BackendSpec]] = {}   # (pool, source) -> address -> spec
        self.tasks: list[asyncio.Task] = []
        self._adopt()

    def _adopt(self) -> None:
        """After a reload: the backends sources added before are theirs again (so what a source no
        longer lists goes), and a source the config no longer has keeps its backends, said once."""
        table = self.controller.table
        for pool, pool_table in [(None, table), *table.named.items()]:
            for address, source in pool_table.sources.items():
                if source in SOURCE_SETTINGS:
                    self.known.setdefault((pool, source), {})[address] = pool_table.specs[address]
        configured = {(pool, source) for pool, config in self.pool_configs(self.config)
                      for source, setting in SOURCE_SETTINGS.items() if getattr(config, setting)}
        for (pool, source), specs in self.known.items():
            if (pool, source) not in configured:
                log.warning("discovery: the %s source%s is no longer configured: its %d backend(s) stay "
                            "(remove them through the API)", source, f" of pool {pool}" if pool else "",
                            len(specs))

    @classmethod
    def restart(cls, old: "Discovery | None", loop, config: Config, controller) -> "Discovery":
        """A new generation's sources (a reload): the old ones stop, the new ones start from what the
        old ones added."""
        if old is not None:
            old.close()
        discovery = cls(loop, config, controller)
        discovery.start()
        return discovery

    @staticmethod
    def pool_configs(config: Config) -> list[tuple[str | None, Config]]:
        """(pool name, its Config) of every pool: None for the top level, then the [[pool]]s."""
        return [(None, config), *((p.name, config.pool_config(p)) for p in config.pools)]

    @classmethod
    def from_config(cls, loop, config: Config, controller) -> "Discovery | None":
        if not any(c.discovers_backends for _, c in cls.pool_configs(config)):
            return None
        return cls(loop, config, controller)

    def start(self) -> None:
        for pool, config in self.pool_configs(self.config):
            jobs = []
            if config.backends_file:
                jobs.append(self._watch_file(config.backends_file, pool))
            if config.backends_dns:
                jobs.append(self._watch_dns(config, pool))
            if config.consul_service:
                watch = ConsulWatch(config, lambda specs, pool=pool: self.update("consul", specs, pool),
                                    f" (pool {pool})" if pool else "")
                jobs.append(watch.run())
            self.tasks += [self.loop.create_task(job) for job in jobs]

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()

    def update(self, source: str, specs: list[BackendSpec], pool: str | None = None) -> None:
        """Applies the difference between what `source` of `pool` reported last time and now."""
        before = self.known.get((pool, source), {})
        after = {s.address: s for s in specs}
        table = self.controller.table.of(pool)
        for address in before.keys() - after.keys():
            if table.sources.get(address) == source:
                self._apply({"op": "remove", "address": address}, source, pool)
        for address, spec in after.items():
            if address not in before:
                if address in table.specs:
                    continue                  # the config or the API has it: theirs
                self._apply({"op": "add", "spec": spec_to_dict(spec), "source": source}, source, pool)
            elif before[address].weight != spec.weight and table.sources.get(address) == source:
                self._apply({"op": "weight", "address": address, "weight": spec.weight}, source, pool)
        self.known[(pool, source)] = after

    def _apply(self, change: dict, source: str, pool: str | None) -> None:
        where = f"{source}, pool {pool}" if pool else source
        try:
            self.controller.apply(with_pool(change, pool))
            log.info("discovery (%s): %s %s", where, change["op"],
                     change.get("address") or f"{change['spec']['host']}:{change['spec']['port']}")
        except ChangeError as exc:
            log.warning("discovery (%s): %s not applied: %s", where, change["op"], exc)

    # ---- file ------------------------------------------------------------------------------------

    async def _watch_file(self, path: str, pool: str | None) -> None:
        await watch_file(path, lambda: self.update("file", read_backends_file(path), pool), "discovery",
                         "backends")

    # ---- DNS -------------------------------------------------------------------------------------

    async def _watch_dns(self, config: Config, pool: str | None) -> None:
        name = config.backends_dns
        server = config.dns_server or system_nameserver()
        failing = False
        while True:
            try:
                specs = await resolve_backends(self.loop, name, server)
            except (OSError, TimeoutError, ValueError) as exc:
                if not failing:           # said once per outage, not every interval
                    log.warning("discovery: DNS lookup of %s via %s failed: %s (keeping its last backends)",
                                name, format_address(*server), exc)
                failing = True
            else:
                if failing:
                    log.info("discovery: DNS lookup of %s via %s works again", name, format_address(*server))
                failing = False
                self.update("dns", specs, pool)
            await asyncio.sleep(config.dns_interval)


async def watch_file(path: str, on_change, what: str, kept: str) -> None:
    """Calls on_change() now and whenever the file changes (its mtime, size and inode, checked every
    FILE_POLL_INTERVAL: an editor's rename-over counts). A missing file is logged once, a failed
    on_change (OSError, ValueError) each time; either way what it gave last stays. what / kept: the log
    lines' prefix and what is kept (discovery's backends, admission control's lists)."""
    seen = None
    while True:
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            if seen != "missing":
                log.warning("%s: cannot read %s: %s (keeping its last %s)", what, path, exc.strerror, kept)
            seen = "missing"
            stamp = None
        if stamp is not None and stamp != seen:
            seen = stamp
            try:
                on_change()
            except (OSError, ValueError) as exc:
                log.error("%s: %s (keeping its last %s)", what, exc, kept)
        await asyncio.sleep(FILE_POLL_INTERVAL)


def read_backends_file(path: str) -> list[BackendSpec]:
    """Backends of a discovery file; raises ValueError naming file:line on a bad line."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                specs.append(parse_backend(text))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return specs


def system_nameserver() -> tuple[str, int]:
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1], 53
    except OSError:
        pass
    return "127.0.0.1", 53


async def resolve_backends(loop, name: str, server: tuple[str, int]) -> list[BackendSpec]:
    if name.startswith("_"):
        records = await query(loop, server, name, TYPE_SRV)
        srv = [r for r in records if r[0] == TYPE_SRV]
        if not srv:
            return []
        best = min(priority for _, (priority, _, _, _) in srv)
        specs = []
        for _, (priority, weight, port, target) in srv:
            for address in await resolve_host(loop, server, target):
                specs.append(BackendSpec(address, port, weight=max(1, min(256, weight or 1)),
                                         backup=priority != best))
        return specs
    host, _, port = name.rpartition(":")
    return [BackendSpec(address, int(port)) for address in await resolve_host(loop, server, host)]


async def resolve_host(loop, server: tuple[str, int], host: str) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    addresses, errors = [], []
    for qtype in (TYPE_A, TYPE_AAAA):
        try:
            addresses += [data for rtype, data in await query(loop, server, host, qtype) if rtype == qtype]
        except (OSError, TimeoutError, ValueError) as exc:
            errors.append(exc)
    if errors and not addresses:
        raise errors[0]         # only when both failed: a name with IPv4 only may see AAAA refused
    return sorted(set(addresses))


# ---- a stub resolver (RFC 1035 over UDP) -----------------------------------------------------------

def encode_query(query_id: int, name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("idna") for p in name.rstrip(".").split(".") if p)
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    labels, end, jumps = [], None, 0
    while True:
        length = message[offset]
        if length & 0xC0 == 0xC0:                     # compression pointer
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | message[offset + 1]
            jumps += 1
            if jumps > 32:
                raise ValueError("DNS name pointer loop")
            continue
        if length == 0:
            return ".".join(labels), end if end is not None else offset + 1
        labels.append(message[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length


def decode_answer(message: bytes, query_id: int) -> list[tuple[int, Any]]:
    """(type, data) of each answer record: A/AAAA -> address text, SRV -> (prio, weight, port, target)."""
    qid, flags, qdcount, ancount, _, _ = struct.unpack_from("!HHHHHH", message)
    if qid != query_id:
        raise ValueError("DNS answer for another query")
    rcode = flags & 0xF
    if rcode == 3:                  # NXDOMAIN: the name has no backends (now)
        return []
    if rcode:
        raise ValueError(f"DNS error rcode {rcode}")
    offset = 12
    for _ in range(qdcount):
        _, offset = _read_name(message, offset)
        offset += 4
    records = []
    for _ in range(ancount):
        _, offset = _read_name(message, offset)
        rtype, _, _, length = struct.unpack_from("!HHIH", message, offset)
        offset += 10
        data = message[offset:offset + length]
        if rtype == TYPE_A and length == 4:
            records.append((rtype, str(ipaddress.IPv4Address(data))))
        elif rtype == TYPE_AAAA and length == 16:
            records.append((rtype, str(ipaddress.IPv6Address(data))))
        elif rtype == TYPE_SRV:
            priority, weight, port = struct.unpack_from("!HHH", data)
            target, _ = _read_name(message, offset + 6)
            records.append((rtype, (priority, weight, port, target)))
        offset += length
    return records


class _Answer(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future) -> None:
        self.future = future

    def datagram_received(self, data: bytes, addr) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


async def query(loop, server: tuple[str, int], name: str, qtype: int) -> list[tuple[int, Any]]:
    query_id = random.getrandbits(16)
    future = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Answer(future), remote_addr=server)
    try:
        transport.sendto(encode_query(query_id, name, qtype))
        async with asyncio.timeout(DNS_TIMEOUT):
            message = await future
        return decode_answer(message, query_id)
    finally:
        transport.close()
