"""Session persistence: sticky cookies, learned sessions, source-IP stick tables, and the stores behind them.

Four ways to pin a client to a backend (one per pool, `--sticky`):
- `cookie:NAME` (HAProxy `cookie NAME insert`): fastlb sets cookie NAME naming the backend by an opaque id
  (HMAC of the pool and address under the secret: never the address), with the time the session started
  and was last seen, signed with HMAC-SHA256. A cookie whose signature, backend or age does not check out
  is ignored: the request is balanced normally. It needs no store: the cookie is the state, so any number
  of balancers with the same secret and backends honour each other's cookies.
- `prefix:NAME` (`cookie NAME prefix`): the application's own cookie NAME is sent to the client as
  `ID~value`; fastlb strips `ID~` before forwarding. ID is the opaque backend id.
- `learn:NAME` / `learn:header:NAME` (`stick store-response` on a cookie or header): the session id a
  backend sets (Set-Cookie NAME, or response header NAME) is mapped to that backend; a later request
  carrying it (cookie NAME, or request header NAME) goes there.
- `source`: the client address is mapped to the backend it was first sent to (tcp and http modes).

Learned and source mappings live in a `StickTable` per pool (an LRU of key -> backend id with expiry,
bounded in size): the hot path reads only that dict. The worker's `SessionStore` shares the tables:
- memory: with one worker the table is the store. With several, the master relays (see fastlb/server/master.py): each
  worker sends the mappings it makes to the master, which sends them to every other worker, so every
  worker's table holds every mapping and a lookup never leaves the process. The master is the relay, not
  a place that must be asked, so a slow master never delays a request.
- redis / memcached: mappings are written behind the request (queued, written in one batch per loop turn,
  never awaited by a request) with the stick TTL; a local miss asks the store once (bounded by
  `STORE_LOOKUP_TIMEOUT`) and caches the answer. A store that fails is marked down, logged once, and not
  asked again until a probe (every `STORE_PROBE_INTERVAL`) finds it back: meanwhile requests are served
  from the local table and writes wait (bounded) to be flushed when it returns.

A pinned backend that is down, draining or fails its connect is not used: the request is balanced
normally and the new backend replaces the old one in the table and the store (cookie: a new cookie).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from fastlb.constants import (STICKY_COOKIE_INSERT, STICKY_COOKIE_PREFIX, STICKY_LEARN_COOKIE,
                              STICKY_LEARN_HEADER, STICKY_SOURCE)

if TYPE_CHECKING:
    from fastlb.config import Config, StickySpec
    from fastlb.pool import Backend, BackendPool

log = logging.getLogger("fastlb")

STORE_LOOKUP_TIMEOUT = 0.05    # a local miss waits at most this for the shared store (then: balanced)
STORE_PROBE_INTERVAL = 1.0     # how often an unreachable store is tried again
STORE_OP_TIMEOUT = 0.5         # one batch of writes, or a probe
MAX_PENDING_WRITES = 10000     # writes kept while the store is down (the newest per key)
SESSION_CACHE_SIZE = 10000     # Cookie headers already parsed and checked, kept to skip parse and HMAC
SIGNATURE_BYTES = 16           # HMAC-SHA256 truncated to 128 bits (RFC 2104 allows truncation)
PREFIX_SEPARATOR = b"~"        # prefix mode: ID~application-value (HAProxy's separator)
NO_SESSION = ()                # Sticky.sessions: a Cookie header without a valid insert cookie


def backend_id(secret: bytes, pool_name: str, address: str) -> bytes:
    """The opaque id naming a backend in cookies and stores: the same on every balancer with the same
    secret, pool and address, and telling nothing about the address."""
    digest = hmac.new(secret, f"backend-id\0{pool_name}\0{address}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:9])           # 12 characters, no padding


def cookie_value(header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header, or None."""
    if not header:
        return None
    start = header.find(name + b"=")
    while start >= 0:
        # A real start: at the beginning, or after "; " (not the end of another cookie's name).
        if start == 0 or header[start - 1] in b" ;":
            end = header.find(b";", start)
            value = header[start + len(name) + 1:] if end < 0 else header[start + len(name) + 1:end]
            return value.strip().strip(b'"')
        start = header.find(name + b"=", start + 1)
    return None


def without_cookie(header: bytes, name: bytes) -> bytes:
    """The Cookie header minus cookie `name` (insert + indirect: the backend never sees ours)."""
    return b"; ".join(p for p in (part.strip() for part in header.split(b";"))
                      if p and not p.startswith(name + b"="))


def remember(cache: dict, header: bytes, answer):
    """Caches what a raw request header means (Sticky's per-header caches); returns the answer."""
    if len(cache) >= SESSION_CACHE_SIZE:
        cache.clear()                   # cheap bound: a header costs one parse (and HMAC) again
    cache[header] = answer
    return answer


class StickTable:
    """key (bytes) -> backend id with an expiry; least recently used out first past `size` entries.

    get/put are O(1) (an OrderedDict); `touch_due` says when a hit should refresh the shared store's TTL
    (once per quarter TTL, not per request)."""

    __slots__ = ("entries", "size", "ttl")

    def __init__(self, size: int, ttl: float) -> None:
        self.entries: collections.OrderedDict[bytes, list] = collections.OrderedDict()
        self.size = size
        self.ttl = ttl

    def get(self, key: bytes, now: float) -> list | None:
        """The entry [backend id, expires at] or None (absent or expired)."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[1] <= now:
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, ident: bytes, now: float, ttl: float | None = None) -> None:
        entries = self.entries
        entries[key] = [ident, now + (self.ttl if ttl is None else ttl)]
        entries.move_to_end(key)
        if len(entries) > self.size:
            entries.popitem(last=False)

    def touch_due(self, entry: list, now: float) -> bool:
        return entry[1] - now < self.ttl * 0.75

    def __len__(self) -> int:
        return len(self.entries)


# ---- stores ---------------------------------------------------------------------------------------

class SessionStore:
    """What every sticky pool of one worker shares: the tables and the way to the shared store.

    `write` never waits (queued; flushed on the next loop turn in one batch), `fetch` is for a local miss
    only and gives up after STORE_LOOKUP_TIMEOUT. Subclasses implement `_get`, `_set_many`, `_probe`."""

    kind = "memory"
    shared = False          # a remote store: a local miss asks it

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float, table_size: int) -> None:
        self.loop = loop
        self.ttl = ttl
        self.table_size = table_size
        self.tables: dict[bytes, StickTable] = {}      # namespace -> table
        self.pending: dict[bytes, bytes] = {}          # store key -> backend id, to write
        self.flush_scheduled = False
        self.up = True
        self.probe_task: asyncio.Task | None = None
        self.flush_task: asyncio.Task | None = None
        self.relay: Callable[[bytes, bytes, bytes], None] | None = None   # memory + workers: to the master
        self.closed = False

    def table(self, namespace: bytes) -> StickTable:
        table = self.tables.get(namespace)
        if table is None:
            table = self.tables[namespace] = StickTable(self.table_size, self.ttl)
        return table

    @staticmethod
    def store_key(namespace: bytes, key: bytes) -> bytes:
        # Keys come from clients (cookies, headers): hashed, so any value is a valid memcached key.
        return b"fastlb:" + namespace + b":" + hashlib.blake2b(key, digest_size=16).hexdigest().encode()

    def write(self, namespace: bytes, key: bytes, ident: bytes) -> None:
        """Shares a mapping the local table already holds. Never waits."""
        if self.relay is not None:
            self.relay(namespace, key, ident)
        if not self.shared:
            return
        pending = self.pending
        pending[self.store_key(namespace, key)] = ident
        if len(pending) > MAX_PENDING_WRITES:
            pending.pop(next(iter(pending)))            # the oldest write goes first
        if self.up and not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._start_flush)

    def learn_relayed(self, namespace: bytes, key: bytes, ident: bytes) -> None:
        """A mapping another worker made (memory store, from the master)."""
        self.table(namespace).put(key, ident, self.loop.time())

    def _start_flush(self) -> None:
        self.flush_scheduled = False
        if self.closed or not self.pending or not self.up or self.flush_task is not None:
            return
        self.flush_task = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        batch, self.pending = self.pending, {}
        try:
            async with asyncio.timeout(STORE_OP_TIMEOUT):
                await self._set_many(batch, self.ttl)
        except Exception as exc:           # any client error: the store is unreachable or broken
            for key, ident in batch.items():
                self.pending.setdefault(key, ident)
            self._went_down(exc)
        finally:
            self.flush_task = None
        if self.pending and self.up:
            self._start_flush()

    async def fetch(self, namespace: bytes, key: bytes) -> bytes | None:
        """A local miss: the shared store's backend id for key, or None (absent, slow or down)."""
        if not self.shared or not self.up:
            return None
        try:
            async with asyncio.timeout(STORE_LOOKUP_TIMEOUT):
                ident = await self._get(self.store_key(namespace, key))
        except TimeoutError:
            return None                      # slow: not down, but the request will not wait longer
        except Exception as exc:
            self._went_down(exc)
            return None
        if ident is not None:
            self.table(namespace).put(key, ident, self.loop.time())
        return ident

    def _went_down(self, exc: BaseException) -> None:
        if not self.up or self.closed:
            return
        self.up = False
        log.warning("session store %s unreachable (%s: %s); serving from the local tables until it "
                    "returns", self.kind, exc.__class__.__name__, exc)
        self.probe_task = self.loop.create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while not self.closed:
            await asyncio.sleep(STORE_PROBE_INTERVAL)
            try:
                async with asyncio.timeout(STORE_OP_TIMEOUT):
                    await self._probe()
            except Exception:
                continue
            self.up = True
            log.warning("session store %s reachable again; sharing resumes (%d pending write(s))",
                        self.kind, len(self.pending))
            self.probe_task = None
            self._start_flush()
            return

    async def start(self) -> None:
        """Connects (a store down at start is handled like one that goes down later)."""

    async def close(self) -> None:
        self.closed = True
        for task in (self.probe_task, self.flush_task):
            if task is not None:
                task.cancel()

    async def _get(self, key: bytes) -> bytes | None:
        return None

    async def _set_many(self, items: dict[bytes, bytes], ttl: float) -> None:
        pass

    async def _probe(self) -> None:
        pass


class RedisStore(SessionStore):
    """redis-py's asyncio client (it uses hiredis to parse replies when hiredis is installed)."""

    kind = "redis"
    shared = True

    def __init__(self, url: str, loop, ttl: float, table_size: int) -> None:
        super().__init__(loop, ttl, table_size)
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        self.url = url
        # No retries inside the client: a failure is handled once here (mark down, probe), and a write
        # batch must not sit in a retry loop while more writes queue behind it.
        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=STORE_OP_TIMEOUT, socket_connect_timeout=STORE_OP_TIMEOUT,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)

    async def start(self) -> None:
        try:
            async with asyncio.timeout(STORE_OP_TIMEOUT):
                await self.client.ping()
        except Exception as exc:
            self._went_down(exc)

    async def _get(self, key: bytes) -> bytes | None:
        return await self.client.get(key)

    async def _set_many(self, items: dict[bytes, bytes], ttl: float) -> None:
        seconds = max(1, int(ttl))
        async with self.client.pipeline(transaction=False) as pipe:
            for key, ident in items.items():
                pipe.set(key, ident, ex=seconds)
            await pipe.execute()

    async def _probe(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await super().close()
        try:
            await self.client.aclose()
        except Exception:
            pass


class MemcachedStore(SessionStore):
    """emcache (Pinterest's asyncio memcached client): maintained, asyncio-native with its own connection
    pool, and it reports a dead node as an error per call rather than hanging."""

    kind = "memcached"
    shared = True

    def __init__(self, host: str, port: int, loop, ttl: float, table_size: int) -> None:
        super().__init__(loop, ttl, table_size)
        self.host = host
        self.port = port
        self.client = None

    async def _connect(self):
        import emcache
        if self.client is None:
            self.client = await emcache.create_client(
                [emcache.MemcachedHostAddress(self.host, self.port)], timeout=STORE_OP_TIMEOUT,
                connection_timeout=STORE_OP_TIMEOUT, max_connections=4, min_connections=0)
        return self.client

    async def start(self) -> None:
        try:
            async with asyncio.timeout(STORE_OP_TIMEOUT):
                await self._probe()
        except Exception as exc:
            self._went_down(exc)

    async def _get(self, key: bytes) -> bytes | None:
        client = await self._connect()
        item = await client.get(key)
        return None if item is None else item.value

    async def _set_many(self, items: dict[bytes, bytes], ttl: float) -> None:
        client = await self._connect()
        # memcached reads an exptime over 30 days as a Unix time; stick TTLs are far below that.
        seconds = max(1, int(ttl))
        for key, ident in items.items():
            await client.set(key, ident, exptime=seconds, noreply=True)

    async def _probe(self) -> None:
        client = await self._connect()
        await client.get(b"fastlb:probe")

    async def close(self) -> None:
        await super().close()
        if self.client is not None:
            try:
                await self.client.close()
            except Exception:
                pass


def make_store(config: "Config", loop: asyncio.AbstractEventLoop) -> SessionStore:
    url = config.store
    if url.startswith("redis://"):
        return RedisStore(url, loop, config.stick_ttl, config.stick_table_size)
    if url.startswith("memcached://"):
        host, _, port = url[len("memcached://"):].rstrip("/").rpartition(":")
        return MemcachedStore(host, int(port), loop, config.stick_ttl, config.stick_table_size)
    return SessionStore(loop, config.stick_ttl, config.stick_table_size)


# ---- per pool ---------------------------------------------------------------------------------------

class Sticky:
    """One pool's persistence rule. The protocols call:
    - `pin(client_ip, cookie_header, header_value)` per request -> (backend or None, key to fetch/record);
    - `forward_cookie(header)` for the Cookie header sent on (prefix / insert+indirect rewrite it);
    - `on_set_cookie(value, backend)` per backend Set-Cookie; `response_block(...)` per response head;
    - `record(key, backend)` when a request went to another backend than its pin (or had none)."""

    def __init__(self, spec: "StickySpec", pool_name: str, pool: "BackendPool", store: SessionStore,
                 secret: bytes, clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.kind = {"cookie": STICKY_COOKIE_INSERT, "prefix": STICKY_COOKIE_PREFIX,
                     "source": STICKY_SOURCE}.get(spec.kind)
        if spec.kind == "learn":
            self.kind = STICKY_LEARN_HEADER if spec.header else STICKY_LEARN_COOKIE
        self.name = spec.name.encode("latin-1") if spec.name else b""
        self.lname = self.name.lower()
        self.store = store
        self.secret = secret
        self.clock = clock
        self.namespace = f"{pool_name}:{spec.kind}:{spec.name or ''}".encode()
        learns = self.kind in (STICKY_LEARN_COOKIE, STICKY_LEARN_HEADER, STICKY_SOURCE)
        self.table = store.table(self.namespace) if learns else None
        self.by_id: dict[bytes, "Backend"] = {}
        self.id_of: dict["Backend", bytes] = {}
        for backend in pool.backends:
            ident = backend_id(secret, pool_name, backend.address)
            self.by_id[ident] = backend
            self.id_of[backend] = ident
        # Cookie attributes, preformatted once.
        attributes = [b"Path=/"]
        if spec.httponly:
            attributes.append(b"HttpOnly")
        if spec.secure:
            attributes.append(b"Secure")
        if spec.samesite:
            attributes.append(b"SameSite=" + spec.samesite.capitalize().encode())
        self.attributes = b"; " + b"; ".join(attributes)
        self.nocache_line = b"Cache-Control: private\r\n" if spec.nocache else b""
        self.maxidle = spec.maxidle
        self.maxlife = spec.maxlife
        # Refresh the last-seen stamp when it is this old (a quarter of maxidle): not on every request.
        self.refresh_after = max(1.0, spec.maxidle / 4) if spec.maxidle else 0.0
        # Raw Cookie header -> (backend, first seen, last seen, the Set-Cookie line re-sending it) when it
        # carries a correctly signed cookie, NO_SESSION when not: a keep-alive client sends the same
        # header on every request, so the parse and the HMAC happen once per header, not per request.
        # The signature never changes its answer; maxidle/maxlife are checked on every request.
        self.sessions: dict[bytes, tuple] = {}
        # Raw Cookie header -> the Cookie header sent on (prefix, insert+indirect), and -> the learned
        # session id (learn:NAME; b"" without one): per header once, like `sessions`.
        self.forwarded: dict[bytes, bytes] = {}
        self.learned_keys: dict[bytes, bytes] = {}
        self.fresh_cookies: dict["Backend", tuple] = {}  # backend -> (second, Set-Cookie line of a new session)
        self.rewrites_cookie = self.kind == STICKY_COOKIE_PREFIX or (
            self.kind == STICKY_COOKIE_INSERT and spec.indirect)
        self.watches_set_cookie = self.kind in (STICKY_COOKIE_PREFIX, STICKY_LEARN_COOKIE) or (
            self.kind == STICKY_COOKIE_INSERT and spec.indirect)

    # ---- requests ----------------------------------------------------------------------------

    def pin(self, client_ip: bytes, captured: dict | None):
        """(backend to prefer or None, key to look up or record or None, the client's valid cookie or None).

        captured: the request headers the router kept (cookie, the learned header). The backend is
        returned whatever its state; the pool uses it only while it is up."""
        cookies = captured.get(b"cookie") if captured is not None else None
        kind = self.kind
        if kind == STICKY_COOKIE_INSERT:
            if cookies is None:
                return None, None, None
            session = self.sessions.get(cookies)
            if session is None:
                session = self._session_of(cookies)
            if not session or self._expired(session):
                return None, None, None
            return session[0], None, session
        if kind == STICKY_COOKIE_PREFIX:
            value = cookie_value(cookies, self.name)
            if value is None:
                return None, None, None
            ident, sep, _ = value.partition(PREFIX_SEPARATOR)
            return (self.by_id.get(ident) if sep else None), None, None
        if kind == STICKY_SOURCE:
            key = client_ip
        elif kind == STICKY_LEARN_COOKIE:
            if cookies is None:
                return None, None, None
            key = self.learned_keys.get(cookies)
            if key is None:
                key = remember(self.learned_keys, cookies, cookie_value(cookies, self.name) or b"")
        else:
            key = captured.get(self.lname) if captured is not None else None
        if not key:
            return None, None, None
        return self.pinned_by_key(key), key, None

    def pinned_by_key(self, key: bytes):
        """A learned or source key's backend in the local table (None: not there, or not a backend of
        the pool); a hit refreshes the shared store's TTL when it is due."""
        entry = self.table.get(key, self.store.loop.time())
        if entry is None:
            return None
        backend = self.by_id.get(entry[0])
        if backend is not None and self.table.touch_due(entry, self.store.loop.time()):
            self.table.put(key, entry[0], self.store.loop.time())
            self.store.write(self.namespace, key, entry[0])      # keeps the shared TTL alive
        return backend

    def sticks(self, pinned, backend) -> bool:
        """Whether a request whose key pinned `pinned` and that went to `backend` records key -> backend:
        a new source address, or a session whose backend could not serve it. (An unknown learned id is
        not recorded: the backend that set it may be known to another balancer, whose mapping is on its
        way to the store.)"""
        return backend is not pinned and (pinned is not None or self.kind == STICKY_SOURCE)

    def cookie_facts(self, cookies: bytes) -> tuple:
        """What one raw Cookie header means to this rule, for the HTTP engine's cache of them
        (fastlb/http/_fast.pyx): (insert session as pin() returns it or None, the backend a prefix
        cookie names or None, the Cookie header to forward or None when not rewritten, the learned
        session id or b""). The same answers as pin() and forward_cookie(), from the same caches."""
        kind = self.kind
        session = prefixed = None
        learned = b""
        if kind == STICKY_COOKIE_INSERT:
            session = self.sessions.get(cookies)
            if session is None:
                session = self._session_of(cookies)
            session = session or None
        elif kind == STICKY_COOKIE_PREFIX:
            value = cookie_value(cookies, self.name)
            if value is not None:
                ident, sep, _ = value.partition(PREFIX_SEPARATOR)
                prefixed = self.by_id.get(ident) if sep else None
        elif kind == STICKY_LEARN_COOKIE:
            learned = self.learned_keys.get(cookies)
            if learned is None:
                learned = remember(self.learned_keys, cookies, cookie_value(cookies, self.name) or b"")
        return session, prefixed, self.forward_cookie(cookies) if self.rewrites_cookie else None, learned

    def lookup_local(self, key: bytes):
        entry = self.table.get(key, self.store.loop.time())
        return None if entry is None else self.by_id.get(entry[0])

    async def fetch(self, key: bytes):
        """A local miss: ask the shared store (bounded); the backend or None."""
        ident = await self.store.fetch(self.namespace, key)
        return None if ident is None else self.by_id.get(ident)

    def record(self, key: bytes, backend: "Backend") -> None:
        """key now goes to backend (first time, or redispatched): local table, then the store, behind."""
        ident = self.id_of.get(backend)
        if ident is None:
            return
        self.table.put(key, ident, self.store.loop.time())
        self.store.write(self.namespace, key, ident)

    def verify(self, value: bytes):
        """The backend a signed insert cookie names, or None when forged, tampered, stale or unknown."""
        session = self._check(value)
        return None if session is None or self._expired(session) else session[0]

    def _check(self, value: bytes) -> tuple | None:
        """(backend, first seen, last seen, Set-Cookie line re-sending value) when value is signed by us and
        names a backend of the pool, else None. Its age is not looked at."""
        parts = value.split(b".")
        if len(parts) != 4:
            return None
        ident, first, last, signature = parts
        try:
            if not hmac.compare_digest(self._sign(ident + b"." + first + b"." + last), signature):
                return None
            first_seen, last_seen = int(first, 16), int(last, 16)
        except ValueError:
            return None
        backend = self.by_id.get(ident)
        if backend is None:
            return None
        # Not indirect: HAProxy sets the cookie on every response; the same value costs no HMAC.
        line = b"" if self.spec.indirect else self._set_cookie_line(value)
        return backend, first_seen, last_seen, line

    def _session_of(self, cookies: bytes) -> tuple:
        """A Cookie header seen for the first time: parsed and checked once, then cached."""
        value = cookie_value(cookies, self.name)
        return remember(self.sessions, cookies, (self._check(value) if value is not None else None) or NO_SESSION)

    def _expired(self, session: tuple) -> bool:
        if not (self.maxlife or self.maxidle):
            return False
        now = self.clock()
        return bool(self.maxlife and now - session[1] > self.maxlife
                    or self.maxidle and now - session[2] > self.maxidle)

    def _set_cookie_line(self, value: bytes) -> bytes:
        return b"Set-Cookie: " + self.name + b"=" + value + self.attributes + b"\r\n" + self.nocache_line

    def _sign(self, payload: bytes) -> bytes:
        digest = hmac.new(self.secret, self.name + b"=" + payload, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:SIGNATURE_BYTES]).rstrip(b"=")

    def make_cookie(self, backend: "Backend", first: int | None = None) -> bytes:
        now = int(self.clock())
        payload = b"%s.%x.%x" % (self.id_of[backend], now if first is None else first, now)
        return payload + b"." + self._sign(payload)

    def forward_cookie(self, header: bytes) -> bytes:
        """The Cookie header for the backend: prefix mode strips `ID~`, insert+indirect drops ours."""
        forwarded = self.forwarded.get(header)
        if forwarded is None:
            forwarded = remember(self.forwarded, header, self._rewrite_cookie(header))
        return forwarded

    def _rewrite_cookie(self, header: bytes) -> bytes:
        name = self.name
        if self.kind == STICKY_COOKIE_INSERT:
            return without_cookie(header, name)
        out = []
        for part in header.split(b";"):
            part = part.strip()
            if part.startswith(name + b"="):
                _, sep, rest = part[len(name) + 1:].partition(PREFIX_SEPARATOR)
                if sep:
                    part = name + b"=" + rest
            if part:
                out.append(part)
        return b"; ".join(out)

    # ---- responses ---------------------------------------------------------------------------

    def on_set_cookie(self, value: bytes, backend: "Backend") -> bytes | None:
        """A backend's Set-Cookie value: what to forward (None: drop it)."""
        name = self.name
        if not value.startswith(name + b"="):
            return value
        kind = self.kind
        if kind == STICKY_COOKIE_PREFIX:
            ident = self.id_of.get(backend)
            return value if ident is None else name + b"=" + ident + PREFIX_SEPARATOR + value[len(name) + 1:]
        if kind == STICKY_LEARN_COOKIE:
            session = value[len(name) + 1:].partition(b";")[0].strip().strip(b'"')
            if session:
                self.record(session, backend)
            return value
        return None          # insert + indirect: the backend's own cookie of our name is removed

    def on_response_header(self, value: bytes, backend: "Backend") -> None:
        """learn:header:NAME: the backend named the session in a response header."""
        session = value.strip()
        if session:
            self.record(session, backend)

    def response_block(self, session: tuple | None, backend: "Backend") -> bytes:
        """Header lines for the response head (insert mode): the cookie for the backend that answered.
        session: what pin() returned for the request's cookie (None: no valid cookie)."""
        if self.kind != STICKY_COOKIE_INSERT:
            return b""
        if session is not None and session[0] is backend:
            if not self.refresh_after or self.clock() - session[2] < self.refresh_after:
                return session[3]
            return self._set_cookie_line(self.make_cookie(backend, session[1]))
        # A new session: its cookie depends only on the backend and the second, so it is signed once
        # per backend per second however many new clients arrive.
        second = int(self.clock())
        fresh = self.fresh_cookies.get(backend)
        if fresh is None or fresh[0] != second:
            fresh = self.fresh_cookies[backend] = (second, self._set_cookie_line(self.make_cookie(backend)))
        return fresh[1]


# Without --cookie-secret-file (source and learned persistence need no secrecy) backend ids still have to
# agree between balancers: a fixed key does that.
UNSECRET_KEY = b"fastlb backend ids without a configured secret"


def default_secret(config: "Config") -> bytes:
    if not config.cookie_secret_file:
        return UNSECRET_KEY
    with open(config.cookie_secret_file, "rb") as f:
        return f.read().strip()


def any_sticky(config: "Config") -> bool:
    return config.sticky is not None or any(pool.sticky is not None for pool in config.pools)


__all__ = ["Sticky", "StickTable", "SessionStore", "RedisStore", "MemcachedStore", "make_store",
           "backend_id", "cookie_value", "default_secret", "any_sticky"]
