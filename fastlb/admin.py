"""The admin bind: runtime API, Prometheus metrics, the stats page.

    GET  /healthz                       200 "ok" (no token)
    GET  /metrics                       Prometheus text format (no token)
    GET  /stats                         HTML stats page, refreshing itself from /stats.json (no token)
    GET  /stats.json                    read-only view: pools, backends, state, counters (no token)
    GET  /api/backends                  the same view                          } every /api/ path needs
    POST /api/backends                  {"address": "H:P", "weight": N, "backup": false} -> add
    DELETE /api/backends/ADDR           remove                                 } `Authorization:
    POST /api/backends/ADDR/weight      {"weight": N}                          }  Bearer TOKEN`, checked
    POST /api/backends/ADDR/state       {"state": "enable|drain|disable"}     }  before any routing
    GET  /api/certificates              the TLS binds' certificates: bind, file, days left
    POST /api/reload                    re-read the config file and reload the certificates (as SIGHUP)
    GET  /api/admission                 admission control: rules, limited counts, top talkers, blocks
                                        (/stats.json shows it too, header/cookie/query keys fingerprinted)
    POST /api/admission/block           {"cidr": C} or {"key": K[, "rule": N][, "seconds": S]}
    POST /api/admission/unblock         the same without seconds

`--admin-allow CIDR` (repeatable): only those peers reach the admin bind at all (others are closed
before a byte is read), whatever the path.

Why the stats page needs no token: it shows only what /metrics already shows to anyone who can reach
the admin bind (addresses, states, weights, counters), never the token or the configuration, and it
changes nothing. So, like /metrics, it is protected by where the bind listens (loopback by default),
and everything that changes state sits under /api/ with the token. An operator who wants the page
private keeps the bind on loopback or behind a proxy with its own auth (as HAProxy's `stats auth`).

The server is a deliberately small HTTP/1.1 implementation on asyncio streams (one request per
connection, bodies up to MAX_BODY): the admin bind sees a scrape every few seconds and a few operator
calls, and must not need the HTTP mode's machinery.

Metrics come from the controller's aggregated view (every worker's counters, see fastlb/control.py),
built at scrape time, so nothing of it runs on the traffic path: the per-backend families are written
directly (`exposition_text`, tens of thousands of lines with thousands of backends), the pool-level ones
through a prometheus-client custom collector, in a thread so the master's event loop keeps running.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import urllib.parse
from pathlib import Path
from typing import Any

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

from fastlb.admission import address_allowed, public_view
from fastlb.config import Config, ConfigError, read_token
from fastlb.control import ChangeError, parse_spec, spec_to_dict, split_pool, with_pool
from fastlb.observe import LATENCY_BUCKETS, STATUS_CLASSES

log = logging.getLogger("fastlb")

MAX_HEAD = 16384
MAX_BODY = 65536
MAX_JSON_DEPTH = 4          # the bodies are flat objects: deeper nesting is refused before parsing
# The fields each changing endpoint takes (its last path part): any other is refused, naming it.
API_FIELDS = {"backends": ("address", "weight", "backup", "pool"), "weight": ("weight",), "state": ("state",),
              "reload": ()}
REQUEST_TIMEOUT = 10.0
STATE_VALUES = {"up": 1, "drain": 0.5}      # fastlb_backend_up: 1 up, 0.5 draining, 0 down
STATS_PAGE = Path(__file__).with_name("stats.html")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error"}


class AdminServer:
    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, controller: Any) -> None:
        self.loop = loop
        self.host, self.port = config.admin
        self.token = read_token(config.admin_token_file).encode() if config.admin_token_file else None
        if self.token is None:
            log.warning("admin bind without --admin-token-file: /api/ answers 401 to every request")
        self.controller = controller
        self.allow = list(config.admin_allow)       # empty: every peer (the bind's address protects it)
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True,
                                                 limit=MAX_HEAD)
        log.info("admin API on http://%s:%d/ (/api, /metrics, /stats)", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.allow and not address_allowed(self.allow, peer[0] if peer else ""):
            writer.transport.abort()
            return
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):        # the client's time to send its request
                method, path, body = await self._read_request(reader)
            status, content_type, body = await self._route(method, path, body)
        except HttpError as exc:
            status, content_type, body = exc.status, "application/json", _json({"error": str(exc)})
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        except Exception as exc:                  # a bug must not take the admin bind down
            log.exception("admin request failed")
            status, content_type, body = 500, "application/json", _json({"error": str(exc)})
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n")
        if status == 401:
            head += 'WWW-Authenticate: Bearer realm="fastlb"\r\n'
        writer.write(head.encode() + b"\r\n" + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        """(method, path, body) of the request, its token checked for /api/ paths."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _ = request_line.split(" ", 2)
        except ValueError:
            raise HttpError(400, "bad request line") from None
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        path = urllib.parse.urlsplit(target).path
        if path == "/api" or path.startswith("/api/"):
            # The token first: an unauthenticated client learns nothing about the routes.
            self._authorize(headers.get("authorization", ""))
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            raise HttpError(413 if length.isdigit() else 400, "bad or too large body")
        body = await reader.readexactly(int(length)) if int(length) else b""
        return method, path, body

    def _authorize(self, authorization: str) -> None:
        scheme, _, presented = authorization.partition(" ")
        # compare_digest takes time independent of where the strings differ.
        if self.token is None or scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), self.token):
            raise HttpError(401, "a valid bearer token is required")

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/metrics":
            view = await self.controller.snapshot()
            # Tens of MB with thousands of backends: formatted in a thread, so the event loop (health
            # checks, changes, the workers' channels) keeps its turns meanwhile.
            return 200, CONTENT_TYPE_LATEST, await self.loop.run_in_executor(None, exposition, view)
        if path == "/stats":
            return 200, "text/html; charset=utf-8", STATS_PAGE.read_bytes()
        if path in ("/stats.json", "/api/backends") and method == "GET":
            view = await self.controller.snapshot()
            if "admission" in view:
                view["admission"] = public_view(view["admission"])     # no API key without the token
            return 200, "application/json", _json(view)
        if not path.startswith("/api/"):
            raise HttpError(404, f"no such path {path}")
        try:
            data = _parse_body(body)
            _check_fields(path, data)
            answer = await self._api(method, path, data)
        except ChangeError as exc:
            raise HttpError(exc.status, str(exc)) from None
        # Answer once every worker has applied the change: a client acting on the answer (sending
        # traffic, reading /metrics) sees it everywhere.
        await self.controller.sync()
        return answer

    async def _api(self, method: str, path: str, data: dict[str, Any]) -> tuple[int, str, bytes]:
        parts = [urllib.parse.unquote(p) for p in path.split("/")[2:]]
        if parts == ["reload"]:
            _require(method, "POST")
            try:
                message = await self.controller.reload()
            except ConfigError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                raise HttpError(400, f"reload failed, running configuration kept: {exc}") from None
            return 200, "application/json", _json({"result": message})
        if parts == ["certificates"]:
            _require(method, "GET")
            view = await self.controller.snapshot()
            return 200, "application/json", _json({"certificates": view.get("certificates", [])})
        if parts[:1] == ["admission"]:
            if len(parts) == 1:
                _require(method, "GET")
                view = await self.controller.snapshot()
                return 200, "application/json", _json(view.get("admission") or {})
            if len(parts) == 2 and parts[1] in ("block", "unblock"):
                _require(method, "POST")
                change = self.controller.admission_change({**data, "op": parts[1]})
                return 200, "application/json", _json({"result": parts[1] + "ed", "change": change})
        if parts == ["backends"]:
            _require(method, "POST")
            if "address" not in data:
                raise HttpError(400, "missing 'address'")
            if not isinstance(data["address"], str):
                raise HttpError(400, "address: expected a string such as \"10.0.0.1:80\"")
            if not isinstance(data.get("backup", False), bool):
                raise HttpError(400, "backup: expected true or false")
            # The pool: "pool" in the body, or POOL/ADDR; none: the top-level pool.
            pool, address = split_pool(data["address"])
            spec = parse_spec(address, data.get("weight"), data.get("backup", False))
            change = self.controller.apply(with_pool({"op": "add", "spec": spec_to_dict(spec), "source": "api"},
                                                     str(data["pool"]) if "pool" in data else pool))
            return 201, "application/json", _json({"result": "added", "change": change})
        # /api/backends/ADDR or POOL/ADDR (the '/' encoded or not), then /weight or /state
        op = parts[-1] if len(parts) >= 3 and parts[-1] in ("weight", "state") else None
        if len(parts) >= 2 and parts[0] == "backends" and len(parts) - (op is not None) <= 3:
            pool, address = split_pool("/".join(parts[1:-1] if op else parts[1:]))
            if op is None:
                _require(method, "DELETE")
                change = self.controller.apply(with_pool({"op": "remove", "address": address}, pool))
                return 200, "application/json", _json({"result": "removed", "change": change})
            _require(method, "POST")
            change = self.controller.apply(with_pool({"op": op, "address": address, op: data.get(op)}, pool))
            return 200, "application/json", _json({"result": "applied", "change": change})
        raise HttpError(404, f"no such path {path}")


def _require(method: str, expected: str) -> None:
    if method != expected:
        raise HttpError(405, f"use {expected}")


def _parse_body(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    depth = _json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise HttpError(400, f"body nested {depth} levels deep; at most {MAX_JSON_DEPTH}")
    try:
        data = json.loads(body)
    except ValueError:
        raise HttpError(400, "body is not JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "body must be a JSON object")
    return data


def _json_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings do not count), so a
    deeply nested body is refused before the parser recurses into it."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:                      # backslash
                escaped = True
            elif byte == 0x22:                      # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):                  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):                  # ] }
            depth -= 1
    return deepest


def _check_fields(path: str, data: dict[str, Any]) -> None:
    """400 naming the first field the endpoint does not take (a typo must not pass silently)."""
    known = API_FIELDS.get(path.rstrip("/").rsplit("/", 1)[-1])
    if known is None:
        return                                      # no body expected (DELETE, GET) or no such path: 404
    for name in data:
        if name not in known:
            raise HttpError(400, f"unknown field {name!r}; this endpoint takes: "
                                 f"{', '.join(known) or 'no fields'}")


def _json(data: Any) -> bytes:
    return json.dumps(data, indent=1).encode() + b"\n"


# ---- Prometheus ---------------------------------------------------------------------------------------

# Per-backend families: (view key, metric name, help). Thousands of backends make tens of thousands of
# lines, so these are written directly (exposition_text); prometheus-client renders the rest.
BACKEND_COUNTERS = (
    ("connections", "fastlb_backend_connections", "Relayed connections that reached the backend (ended)"),
    ("requests", "fastlb_backend_requests", "HTTP requests sent to the backend"),
    ("responses", "fastlb_backend_responses", "HTTP responses by status class"),
    ("bytes_in", "fastlb_backend_bytes_in", "Bytes from clients to the backend"),
    ("bytes_out", "fastlb_backend_bytes_out", "Bytes from the backend to clients"),
    ("connect_errors", "fastlb_backend_connect_errors", "Failed connect attempts"),
    ("retries", "fastlb_backend_retries", "Attempts that were a retry after another backend failed"),
)
BACKEND_GAUGES = (
    ("up", "fastlb_backend_up", "1 up, 0.5 draining, 0 down (in every worker)"),
    ("weight", "fastlb_backend_weight", "Configured weight"),
    ("inflight", "fastlb_backend_inflight", "Connections in flight"),
)
BACKEND_HISTOGRAMS = (
    ("connect_time", "fastlb_backend_connect_seconds", "Time to connect to the backend"),
    ("response_time", "fastlb_backend_response_seconds", "HTTP: request sent to response head"),
)
BUCKET_LABELS = [str(bound) for bound in LATENCY_BUCKETS] + ["+Inf"]


def exposition(view: dict[str, Any]) -> bytes:
    """The Prometheus text of an aggregated view: what prometheus-client's generate_latest makes of it
    (same families, order and formatting), the per-backend families written directly (about 5x faster)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(view))
    return exposition_text(view["pools"]).encode() + generate_latest(registry)


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def exposition_text(pools: list[dict[str, Any]]) -> str:
    rows = [(f'{{backend="{_label(b["address"])}",', f'pool="{_label(pool["name"])}"}} ', b)
            for pool in pools for b in pool["backends"]]
    out: list[str] = []
    for key, name, help in (*BACKEND_COUNTERS, *BACKEND_GAUGES):
        kind = "counter" if (key, name, help) in BACKEND_COUNTERS else "gauge"
        sample = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {sample} {help}\n# TYPE {sample} {kind}\n")
        if key == "responses":
            for backend, pool, b in rows:
                out += [f'{sample}{backend}code="{code}",{pool}{floatToGoString(count)}\n'
                        for code, count in b["responses"].items()]
        elif key == "up":
            out += [f"{sample}{backend}{pool}{floatToGoString(STATE_VALUES.get(b['state'], 0))}\n"
                    for backend, pool, b in rows]
        else:
            out += [f"{sample}{backend}{pool}{floatToGoString(b[key])}\n" for backend, pool, b in rows]
    for key, name, help in BACKEND_HISTOGRAMS:
        out.append(f"# HELP {name} {help}\n# TYPE {name} histogram\n")
        for backend, pool, b in rows:
            data = b[key]
            total = 0
            for label, count in zip(BUCKET_LABELS, data["buckets"]):
                total += count
                out.append(f'{name}_bucket{backend}le="{label}",{pool}{floatToGoString(total)}\n')
            out.append(f"{name}_count{backend}{pool}{floatToGoString(total)}\n"
                       f"{name}_sum{backend}{pool}{floatToGoString(data['sum'])}\n")
    return "".join(out)


class MetricsCollector:
    """The pool-level families of an aggregated view (the per-backend ones: exposition_text)."""

    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view

    def collect(self):
        pool_connections = CounterMetricFamily("fastlb_pool_connections", "Relayed connections (ended), all backends", labels=["pool"])
        pool_refused = CounterMetricFamily("fastlb_pool_refused", "Client connections no backend took", labels=["pool"])
        pool_bytes_in = CounterMetricFamily("fastlb_pool_bytes_in", "Bytes from clients", labels=["pool"])
        pool_bytes_out = CounterMetricFamily("fastlb_pool_bytes_out", "Bytes to clients", labels=["pool"])
        pool_requests = CounterMetricFamily("fastlb_pool_requests", "HTTP requests", labels=["pool"])
        pool_errors = CounterMetricFamily("fastlb_pool_connect_errors", "Failed connect attempts", labels=["pool"])
        pool_retries = CounterMetricFamily("fastlb_pool_retries", "Retried connect attempts", labels=["pool"])
        pool_responses = CounterMetricFamily("fastlb_pool_responses", "HTTP responses by status class", labels=["pool", "code"])
        pool_active = GaugeMetricFamily("fastlb_pool_active", "Connections holding a backend", labels=["pool"])
        pool_queued = GaugeMetricFamily("fastlb_pool_queued", "Connections waiting for a slot", labels=["pool"])
        pool_up = GaugeMetricFamily("fastlb_pool_backends_up", "Backends up", labels=["pool"])
        workers = GaugeMetricFamily("fastlb_workers", "Worker processes reporting")
        workers.add_metric([], self.view["workers"])
        clients = self.view.get("clients", {})
        yield GaugeMetricFamily("fastlb_client_connections", "Client connections open",
                                value=clients.get("open", 0))
        if "accepted" in clients:
            yield CounterMetricFamily("fastlb_client_connections_accepted",
                                      "HTTP client connections accepted (by the workers reporting)",
                                      value=clients["accepted"])
        expiry = GaugeMetricFamily("fastlb_certificate_expiry_days",
                                   "Days until a served TLS certificate expires (negative: expired)",
                                   labels=["bind", "file"])
        for certificate in self.view.get("certificates", []):
            expiry.add_metric([certificate["bind"], certificate["file"]], certificate["days_left"])
        yield from admission_metrics(self.view.get("admission"))
        yield from engine_metrics(self.view.get("engine"))
        for pool in self.view["pools"]:
            name = pool["name"]
            backends = pool["backends"]
            totals = {key: sum(b[key] for b in backends) for key in
                      ("connections", "bytes_in", "bytes_out", "requests", "connect_errors", "retries")}
            responses = {code: sum(b["responses"][code] for b in backends) for code in STATUS_CLASSES}
            up = sum(STATE_VALUES.get(b["state"], 0) == 1 for b in backends)
            pool_connections.add_metric([name], totals["connections"])
            pool_bytes_in.add_metric([name], totals["bytes_in"])
            pool_bytes_out.add_metric([name], totals["bytes_out"])
            pool_requests.add_metric([name], totals["requests"])
            pool_errors.add_metric([name], totals["connect_errors"])
            pool_retries.add_metric([name], totals["retries"])
            for code, count in responses.items():
                pool_responses.add_metric([name, code], count)
            pool_refused.add_metric([name], pool["refused"])
            pool_active.add_metric([name], pool["active"])
            pool_queued.add_metric([name], pool["queued"])
            pool_up.add_metric([name], up)
        yield from (pool_connections, pool_refused, pool_bytes_in,
                    pool_bytes_out, pool_requests, pool_errors, pool_retries, pool_responses, pool_active,
                    pool_queued, pool_up, workers, expiry)


def engine_metrics(view: dict | None):
    """The HTTP engine's families (fastlb/http/fast.py FastPath.counts, by the workers reporting): what it
    served in C, what it handed to the Python path and why, its failed TLS handshakes."""
    if not view:
        return
    yield CounterMetricFamily("fastlb_http_engine_requests", "HTTP requests the C engine served itself",
                              value=view["requests"])
    handed = CounterMetricFamily("fastlb_http_engine_handed_over", "Client connections (and HTTP/2 streams) "
                                 "the C engine handed to the Python path", labels=["reason"])
    for reason, count in view["handed_over"].items():
        handed.add_metric([reason], count)
    yield handed
    yield CounterMetricFamily("fastlb_http_engine_tls_handshake_failures",
                              "TLS handshakes the C engine closed (failed or timed out)",
                              value=view["tls_handshake_failures"])
    yield CounterMetricFamily("fastlb_http_engine_h2_connections", "HTTP/2 client connections the C engine "
                              "served (their streams count as requests, or as handed over)",
                              value=view.get("h2_connections", 0))
    yield CounterMetricFamily("fastlb_http_engine_h2_backend_streams", "HTTP/2 client streams the C engine "
                              "sent to proto=h2 backends itself (fastlb/http/_eh2b.pxi)",
                              value=view.get("h2_backend_streams", 0))


def admission_metrics(view: dict | None):
    """Admission control's families: per rule, and for the top-k limited keys only (bounded labels)."""
    if not view:
        return
    limited = CounterMetricFamily("fastlb_ratelimit_limited", "Requests answered 429 by a rate limit rule",
                                  labels=["rule"])
    for rule in view["rules"]:
        limited.add_metric([rule["rule"]], rule["limited"])
    top = GaugeMetricFamily("fastlb_ratelimit_top_limited", "Requests limited per key, for the current "
                            "top-k limited keys only (fastlb/admission.py TOP_K; header, cookie and query keys as a "
                            "fingerprint)", labels=["rule", "key"])
    for row in view["top_limited"]:
        top.add_metric([row["rule"], row["label"]], row["limited"])
    refused = CounterMetricFamily("fastlb_admission_refused_connections", "Client connections refused",
                                  labels=["reason"])
    refused.add_metric(["deny_list"], view["denied"])
    refused.add_metric(["max_conn_per_source"], view["too_many_connections"])
    evictions = CounterMetricFamily("fastlb_ratelimit_table_evictions", "Keys evicted from the full table")
    evictions.add_metric([], view["table"]["evictions"])
    yield from (limited, top, refused, evictions)
