"""A Consul test server: GET /v1/health/service/NAME with blocking queries, in a thread of the test.

No Consul server can be installed on the test machines, so this stands in for the agent's health
endpoint. Its answers have the shape HashiCorp's own API double renders (tests/consul_api_double/
health_service.json, made by render.sh from npm @hashicorp/consul-api-double): each instance is a copy of
the double's first entry with the node, service (ID, address, port, tags, meta, weights) and check
states filled in. What the double does not do, this does as the real agent does:

- `?passing` (any value but false) leaves out instances with a check not passing; `tag=T` keeps those
  carrying T; `dc=D` other than the agent's datacenter answers 500 "No path to datacenter";
- every answer carries `X-Consul-Index`, the index of the last change; a query with `index=N` at or
  past the current index waits (up to `wait`, default 5m) for the next change, then answers;
- with a token set, a request without that `X-Consul-Token` answers 403 "ACL not found".

The test changes the catalogue (`register`, `set_status`, `deregister`, `jump_index`), can make every
query fail (`fail_with`), and can take the server away (`go_away`: the port closes, blocked queries are
cut) and bring it back (`come_back`, same port). Every request is recorded in `requests`.
"""
from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

SHAPE = json.loads((Path(__file__).parent / "consul_api_double" / "health_service.json").read_text())[0]
MAX_WAIT = 600.0


def parse_wait(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text)
    if not match:
        raise ValueError(text)
    value = float(match.group(1))
    return min(MAX_WAIT, value / 1000 if match.group(2) == "ms" else value * 60 if match.group(2) == "m" else value)


class ConsulDouble:
    def __init__(self, datacenter: str = "dc1", token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.datacenter = datacenter
        self.token = token
        self.ssl_context = ssl_context
        self.instances: dict[str, dict] = {}      # service ID -> instance
        self.index = 10
        self.failure: int | None = None           # answer every query with this status
        self.requests: list[dict] = []            # {"time", "path", "query", "headers", "status"}
        self.changed: asyncio.Event | None = None
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    # ---- life cycle (called from the test's thread) ---------------------------------------------

    def start(self) -> "ConsulDouble":
        self.thread.start()
        self._call(self._init)
        self.come_back()
        return self

    def go_away(self) -> None:
        """The agent is gone: the port refuses connections, queries in flight are cut."""
        self._call(self._stop_listening)

    def come_back(self) -> None:
        self._call(self._listen)

    def close(self) -> None:
        self.go_away()
        self._call(self._cancel_all)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    # ---- the catalogue --------------------------------------------------------------------------

    def register(self, service: str, service_id: str, address: str, port: int, tags=(), meta=None,
                 weights=None, status: str = "passing") -> None:
        self._change(lambda: self.instances.__setitem__(service_id, {
            "service": service, "id": service_id, "address": address, "port": port, "tags": list(tags),
            "meta": dict(meta or {}), "weights": weights, "status": status}))

    def set_status(self, service_id: str, status: str) -> None:
        self._change(lambda: self.instances[service_id].__setitem__("status", status))

    def deregister(self, service_id: str) -> None:
        self._change(lambda: self.instances.pop(service_id))

    def jump_index(self, index: int) -> None:
        """The index moves to `index` (a snapshot restore, a new leader: it may even go backwards)
        without a change to the instances."""
        def jump():
            self.index = index - 1          # _change adds one
        self._change(jump)

    def fail_with(self, status: int | None) -> None:
        self.failure = status

    def queries(self, since: float = 0.0) -> list[dict]:
        return [r for r in list(self.requests) if r["time"] >= since]

    # ---- inside the loop ------------------------------------------------------------------------

    def _call(self, function):
        """Runs function (a coroutine function or not) in the server's loop; returns its result."""
        async def run():
            result = function()
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    async def _cancel_all(self) -> None:
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _init(self) -> None:
        self.changed = asyncio.Event()

    def _change(self, mutate) -> None:
        def change():
            mutate()
            self.index += 1
            self.changed.set()
            self.changed = asyncio.Event()
        self._call(change)

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True,
                                                 ssl=self.ssl_context)

    def _stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            _, target, _ = request_line.split(" ", 2)
            headers = {}
            for line in lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            status, body = await self._answer(target, headers)
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                         f"Content-Type: application/json\r\nX-Consul-Index: {self.index}\r\n"
                         f"X-Consul-Knownleader: true\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _answer(self, target: str, headers: dict) -> tuple[int, bytes]:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        record = {"time": time.monotonic(), "path": url.path, "query": query, "headers": headers}
        self.requests.append(record)
        record["status"] = status = self._refusal(url.path, query, headers)
        if status:
            return status, {400: b"bad request", 403: b"ACL not found", 404: b"not found",
                            500: b"No path to datacenter" if "dc" in query else b"rpc error"}.get(status, b"error")
        if "index" in query and int(query["index"]) >= self.index:
            changed = self.changed
            try:
                await asyncio.wait_for(changed.wait(), parse_wait(query.get("wait", "5m")))
            except TimeoutError:
                pass
            if self.failure:                  # failed while the query waited
                return self.failure, b"rpc error"
        service = unquote(url.path.rsplit("/", 1)[1])
        passing = "passing" in query and query["passing"].lower() != "false"
        entries = [self._entry(i) for i in self.instances.values() if i["service"] == service
                   and (not passing or i["status"] == "passing")
                   and ("tag" not in query or query["tag"] in i["tags"])]
        return 200, json.dumps(entries).encode()

    def _refusal(self, path: str, query: dict, headers: dict) -> int:
        if not path.startswith("/v1/health/service/"):
            return 404
        if self.token is not None and headers.get("x-consul-token") != self.token:
            return 403
        if query.get("dc", self.datacenter) != self.datacenter or self.failure == 500:
            return 500
        if "index" in query and not query["index"].isdigit():
            return 400
        return self.failure or 0

    def _entry(self, instance: dict) -> dict:
        entry = copy.deepcopy(SHAPE)
        node = entry["Node"]
        node["Node"] = f"node-{instance['id']}"
        node["Datacenter"] = self.datacenter
        service = entry["Service"]
        service.update({"ID": instance["id"], "Service": instance["service"], "Address": instance["address"],
                        "Port": instance["port"], "Tags": instance["tags"], "Meta": instance["meta"]})
        if instance["weights"] is not None:
            service["Weights"] = instance["weights"]
        for check in entry["Checks"]:
            check.update({"Node": node["Node"], "Status": instance["status"], "ServiceID": instance["id"],
                          "ServiceName": instance["service"]})
        return entry
