"""Service discovery: backends from a watched file and from DNS, applied live through the controller.

Each source produces the full set of backends it currently knows; `Discovery` compares it with what the
source produced last time and applies the difference as add / remove / weight changes (the same changes
as the admin API, so every worker gets them). A source owns only the backends it added: the config
file's and the API's are never removed by it. A failed lookup or an unreadable file changes nothing
(the last good set stays), so a DNS outage does not empty the pool.

- File (`backends_file`): one backend per line in the `--backend` syntax, `#` comments. Checked every
  FILE_POLL_INTERVAL seconds (its mtime, size and inode: an editor's rename-over counts), read on change.
- DNS (`backends_dns`): `_service._proto.NAME` asks SRV records (target, port, weight; the lowest
  priority are primaries, others backups) then the targets' A/AAAA; `NAME:PORT` asks A and AAAA.
  Re-resolved every `dns_interval`. A small stub resolver over UDP (RFC 1035), so the server and port
  can be any (`dns_server`, default /etc/resolv.conf's first nameserver).
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
from fastlb.control import ChangeError, spec_to_dict

log = logging.getLogger("fastlb")

FILE_POLL_INTERVAL = 1.0
DNS_TIMEOUT = 2.0
TYPE_A, TYPE_AAAA, TYPE_SRV = 1, 28, 33


class Discovery:
    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, controller: Any) -> None:
        self.loop = loop
        self.config = config
        self.controller = controller
        self.known: dict[str, dict[str, BackendSpec]] = {}     # source -> address -> spec
        self.tasks: list[asyncio.Task] = []

    @classmethod
    def from_config(cls, loop, config: Config, controller) -> "Discovery | None":
        if not (config.backends_file or config.backends_dns):
            return None
        return cls(loop, config, controller)

    def start(self) -> None:
        if self.config.backends_file:
            self.tasks.append(self.loop.create_task(self._watch_file(self.config.backends_file)))
        if self.config.backends_dns:
            self.tasks.append(self.loop.create_task(self._watch_dns(self.config.backends_dns)))

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()

    def update(self, source: str, specs: list[BackendSpec]) -> None:
        """Applies the difference between what `source` reported last time and now."""
        before = self.known.get(source, {})
        after = {s.address: s for s in specs}
        table = self.controller.table
        for address in before.keys() - after.keys():
            if table.sources.get(address) == source:
                self._apply({"op": "remove", "address": address}, source)
        for address, spec in after.items():
            if address not in before:
                if address in table.specs:
                    continue                  # the config or the API has it: theirs
                self._apply({"op": "add", "spec": spec_to_dict(spec), "source": source}, source)
            elif before[address].weight != spec.weight and table.sources.get(address) == source:
                self._apply({"op": "weight", "address": address, "weight": spec.weight}, source)
        self.known[source] = after

    def _apply(self, change: dict, source: str) -> None:
        try:
            self.controller.apply(change)
            log.info("discovery (%s): %s %s", source, change["op"],
                     change.get("address") or f"{change['spec']['host']}:{change['spec']['port']}")
        except ChangeError as exc:
            log.warning("discovery (%s): %s not applied: %s", source, change["op"], exc)

    # ---- file ------------------------------------------------------------------------------------

    async def _watch_file(self, path: str) -> None:
        await watch_file(path, lambda: self.update("file", read_backends_file(path)), "discovery", "backends")

    # ---- DNS -------------------------------------------------------------------------------------

    async def _watch_dns(self, name: str) -> None:
        server = self.config.dns_server or system_nameserver()
        while True:
            try:
                specs = await resolve_backends(self.loop, name, server)
            except (OSError, TimeoutError, ValueError) as exc:
                log.warning("discovery: DNS lookup of %s via %s failed: %s (keeping its last backends)",
                            name, format_address(*server), exc)
            else:
                self.update("dns", specs)
            await asyncio.sleep(self.config.dns_interval)


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
