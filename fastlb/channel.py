"""The master <-> worker channel: one socketpair per worker, JSON lines both ways.

Master -> worker: backend changes (fastlb/control.py: health verdicts, weights, states, add/remove) and
`{"op": "report", "id": N}` asking for a snapshot. Worker -> master: `{"op": "snapshot", "id": N,
"data": ...}`, as the answer to a report and by itself every SNAPSHOT_INTERVAL seconds (so the master
still has a worker's recent counters after it dies), and once more when it drains.

One channel carries everything so a change and a health flip reach a worker in the order the master
decided them. Messages are small and rare (changes, about one snapshot a second): JSON is plenty.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

log = logging.getLogger("fastlb")

SNAPSHOT_INTERVAL = 1.0
MAX_LINE = 16 * 1024 * 1024       # a snapshot of thousands of backends fits; a runaway peer does not


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineChannel(asyncio.Protocol):
    """Reads JSON lines and hands each message to on_message; `send` writes one."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[], None] | None = None) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.pieces: list[bytes] = []     # a line's start, in the reads it came in (joined once, at its end)
        self.held = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(message))

    def data_received(self, data: bytes) -> None:
        if b"\n" not in data:
            # A long line (a snapshot of thousands of backends) comes in many reads: kept as pieces, so
            # it costs one copy, not one per read.
            self.pieces.append(data)
            self.held += len(data)
            if self.held > MAX_LINE:
                log.error("channel message over %d bytes: closing the channel", MAX_LINE)
                self.transport.close()
            return
        if self.pieces:
            self.pieces.append(data)
            data = b"".join(self.pieces)
            self.pieces = []
            self.held = 0
        *lines, rest = data.split(b"\n")
        if rest:
            self.pieces.append(rest)
            self.held = len(rest)
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                log.error("bad channel message: %.80r", line)
                continue
            try:
                self.on_message(message)
            except Exception:
                log.exception("channel message %.80r failed", line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.on_lost is not None:
            self.on_lost()
