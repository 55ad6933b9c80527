"""Configuration: the `Config` dataclasses, the TOML file, and validation.

Flags and the TOML file share one table of field parsers (`FIELDS`), so a value is checked the same way
wherever it comes from, and every error names where the value came from: the flag (`--workers`) or the
file position and field (`lb.toml:7: backend[2].weight`).

The file format (all keys optional; flags override the file; `bind`/`backend` given as flags replace the
file's lists):

    mode = "tcp"
    algorithm = "leastconn"
    workers = 2                      # or "auto"; at most 4 per CPU unless allow_many_workers = true
    connect_timeout = "2s"           # a number of seconds, or "500ms", "2s", "1m"
    idle_timeout = "5m"
    maxconn = 5000                   # per worker process

    [[bind]]
    address = "0.0.0.0:8080"
    accept_proxy = false

    [[backend]]
    address = "10.0.0.1:80"
    weight = 2
    maxconn = 100
    backup = false
    send_proxy = "v2"                # false, "v1" or "v2"
    check_port = 8081                # any health setting below may be overridden per backend

Health checks, passive outlier detection and slow start (see fastlb/health.py):

    check = "http"                   # "none" (default), "tcp" or "http"
    check_interval = "2s"
    check_timeout = "1s"
    rise = 2                         # consecutive passed checks before a down backend is up
    fall = 3                         # consecutive failed checks before an up backend is down
    check_jitter = 0.1               # each interval varies by +-10 % so checks do not fire in lockstep
    check_port = 0                   # 0: the backend's own port
    check_method = "GET"             # http checks only, like the three below
    check_path = "/health"
    check_host = "api.example"       # default: the backend's address
    check_expect = "200-399"         # a status or a status range
    check_body = "OK"                # a substring the body must contain
    slowstart = "10s"                # a returning backend ramps its weight up over this time
    outlier_failures = 5             # consecutive connect failures (or 5xx, HTTP mode) that eject; 0: off
    outlier_ejection_time = "30s"    # first ejection; the n-th lasts n times this ...
    outlier_max_ejection_time = "5m" # ... up to this
    max_ejection_percent = 50        # at most this share of a pool ejected at once (never all)
    outlier_probe_interval = "250ms" # an ejected backend is probed this often, back once it answers; 0: off

TLS (see fastlb/tls.py and fastlb/sni.py):

    [[bind]]
    address = "0.0.0.0:443"
    ssl = true
    cert = ["site.pem", "api.pem"]   # the first is the default; others are chosen by SNI
    key = ["site.key", "api.key"]    # optional: as many as cert, when keys are in their own files
    ca = "clients-ca.pem"            # client certificates (mTLS) ...
    verify = "required"              # ... "required" (the default with ca) or "optional"

    [[bind]]
    address = "0.0.0.0:80"
    redirect_https = true            # HTTP mode: answer 301/308 to https://HOST/target (or a port: 8443)

    hsts = "365d"                    # HTTP mode: Strict-Transport-Security on TLS binds (per [[pool]] too)

    [[bind]]                         # mode = "tcp" only:
    address = "0.0.0.0:8443"
    sni_route = true                 # TLS passthrough, routed by the ClientHello's server name

    [sni_routes]
    "api.example.com" = "api"        # server name (or "*.parent") -> backend group

    [[backend]]
    address = "10.0.0.5:443"
    ssl = true                       # TLS to the backend, verified against the system CAs ...
    verify = "backend-ca.pem"        # ... or this CA file, or "none" (off: explicit only)
    sni = "api.internal"             # name sent and verified (default: the address's host)
    group = "api"

Session persistence (see fastlb/sticky.py); a [[pool]] may have its own `sticky`:

    sticky = "cookie:SRVID,indirect,nocache,httponly,secure,samesite=lax,maxidle=30m,maxlife=8h"
                                     # or "prefix:JSESSIONID", "learn:JSESSIONID",
                                     # "learn:header:X-Session-Id", "source"
    store = "redis://127.0.0.1:6379/0"   # "memory" (default), or "memcached://127.0.0.1:11211"
    cookie_secret_file = "/etc/fastlb/cookie.key"   # HMAC secret (>= 16 bytes): needed by cookie:
    stick_ttl = "30m"                # learned and source mappings expire this long after last use
    stick_table_size = 100000        # entries per pool in each worker's local table (LRU)

Operations (see fastlb/admin.py, fastlb/observe.py, fastlb/discovery.py):

    admin = "127.0.0.1:9000"         # admin bind: /api (token), /metrics, /stats, /healthz; a bare port
                                     # means loopback; off unless given
    admin_token_file = "/etc/fastlb/token"   # bearer token for /api/...; without it /api/ answers 401
    access_log = "/var/log/fastlb/access.log"   # or "-" for stdout; off unless given
    access_log_format = "json"       # or "text" (default)
    backends_file = "/etc/fastlb/backends"   # one backend per line in the --backend syntax; watched
    backends_dns = "_api._tcp.example"       # SRV, or "NAME:PORT" for A/AAAA; re-resolved every ...
    dns_interval = "5s"
    dns_server = "127.0.0.1:53"      # default: the first nameserver of /etc/resolv.conf
    consul_service = "api"           # backends from Consul's passing instances of a service (fastlb/consul.py)
    consul = "http://127.0.0.1:8500" # the agent; https://... for TLS (consul_ca: its CA file)
    consul_datacenter = "dc1"        # and consul_tag, consul_token_file, consul_wait = "60s"

Every [[pool]] may set the health, passive detection and discovery settings above for itself (see
POOL_SETTING_FIELDS); what it does not set it takes from the top level, except a discovery source.

`bind` and `backend` may also be arrays of strings in the flag syntax:
`backend = ["10.0.0.1:80,weight=2", "10.0.0.2:80,backup,check-port=8081"]`.
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from fastlb.admission import DEFAULT_TABLE_SIZE, parse_cidr, parse_rate_limit, read_access_file
from fastlb.tls import CertificateSpec, check_readable

MODES = ("tcp", "http")
RELAYS = ("uvloop", "epoll")
HASHING_ALGORITHMS = ("hash", "ketama", "maglev")
HASH_KEYS = ("source", "uri", "path", "header:NAME", "cookie:NAME", "query:NAME")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("text", "json")

# Open files a worker needs besides relayed connections: listeners, the event loop's own fds, logging,
# stdio, a margin for connects in flight when the limit is reached.
RESERVED_FDS = 64


class ConfigError(Exception):
    """A bad flag or config value. str() is the whole message, naming the flag or file:line and field."""


@dataclass
class BindSpec:
    host: str
    port: int
    accept_proxy: bool = False
    # TLS termination (fastlb/tls.py): the first certificate is the default, the others are chosen by SNI.
    ssl: bool = False
    certificates: list["CertificateSpec"] = field(default_factory=list)
    ca: str | None = None            # client certificates (mTLS) signed by this CA ...
    verify: str = "none"             # ... "required" or "optional"; "required" when ca is given alone
    # TLS passthrough: read the SNI of the ClientHello and pick the backend group from Config.sni_routes.
    sni_route: bool = False
    # HTTP mode: a plain bind that answers every request with a redirect to https://HOST[:PORT]/target
    # (None: off; 443: no port in the Location; another port: that port).
    redirect_https: int | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass
class BackendSpec:
    host: str
    port: int
    weight: int = 1
    backup: bool = False
    maxconn: int = 0          # 0: no per-backend limit
    send_proxy: int = 0       # 0: off, 1: PROXY v1 (text), 2: PROXY v2 (binary)
    ssl: bool = False         # TLS to the backend ...
    verify: str | None = None  # ... verified against the system CA store (None), a CA file, or "none"
    sni: str | None = None    # server name sent and verified; default: the backend's host
    group: str = "default"    # the backend group SNI routes name (fastlb/sni.py)
    # Per-backend health settings (HEALTH_FIELDS names -> values) over the global ones, and where each
    # came from for messages; `Config.health_for(spec)` merges them.
    health: dict[str, Any] = field(default_factory=dict)
    health_sources: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass
class StickySpec:
    """`--sticky KIND[:NAME][,option...]`: how a pool pins sessions (fastlb/sticky.py)."""
    kind: str                  # cookie (insert), prefix, learn, source
    name: str = ""             # the cookie (or, learn:header:NAME, the header) name
    header: bool = False       # learn from a response header, look up the request header
    indirect: bool = False
    nocache: bool = False
    httponly: bool = False
    secure: bool = False
    samesite: str = ""         # "", "lax", "strict", "none"
    maxidle: float = 0.0       # seconds; 0: no limit
    maxlife: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass
class PoolSpec:
    """A named backend pool (HTTP mode): its backends, and optionally its own algorithm, key, limit."""
    name: str
    backends: list[BackendSpec] = field(default_factory=list)
    algorithm: str | None = None
    hash_key: str | None = None
    max_body_size: int | None = None
    hsts: int | None = None            # Strict-Transport-Security max-age on TLS binds (None: the global)
    sticky: StickySpec | None = None
    settings: dict[str, Any] = field(default_factory=dict)   # POOL_SETTING_FIELDS over the top level's


@dataclass
class RouteSpec:
    """A routing rule: every condition given must match; the first matching rule names the pool."""
    pool: str
    host: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: list[str] = field(default_factory=list)
    header_name: str | None = None
    header_value: str | None = None


@dataclass
class Config:
    mode: str = "http"
    binds: list[BindSpec] = field(default_factory=list)
    backends: list[BackendSpec] = field(default_factory=list)
    sni_routes: dict[str, str] = field(default_factory=dict)   # server name or *.parent -> backend group
    algorithm: str = "roundrobin"
    hash_key: str | None = None
    bounded_load: float = 0.0
    seed: int | None = None
    workers: int = 1
    allow_many_workers: bool = False  # more than MAX_WORKERS_PER_CPU per CPU: only when asked for
    maxconn: int | None = None       # per worker; None: as many as the open-files limit allows
    queue_size: int = 1024           # connections waiting for a free slot, per worker
    queue_timeout: float = 5.0
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0      # 0: never
    relay: str = "epoll"             # tcp mode's data path: the epoll C thread, or uvloop protocols
    retries: int = 2                 # further backends tried after a failed connect
    grace_period: float = 10.0
    backlog: int = 1024
    log_level: str = "info"
    # HTTP mode
    http_request_timeout: float = 10.0     # a whole request head must arrive within it (slowloris)
    keepalive_timeout: float = 60.0        # client connection idle between requests
    response_timeout: float = 30.0         # backend silent while a response is awaited or read
    tunnel_timeout: float = 3600.0         # upgraded (WebSocket) connection idle both ways
    backend_idle_timeout: float = 10.0     # idle keep-alive connection to a backend
    backend_max_idle: int = 1000           # idle keep-alive connections kept per backend, per worker
    max_header_size: int = 16384           # bytes of request header fields
    max_response_header_size: int = 65536  # bytes of a backend's response head; more: 502
    max_headers: int = 100
    max_uri_length: int = 8192
    max_body_size: int = 0                 # bytes; 0: no limit (per pool: [[pool]] max_body_size)
    hsts: int = 0                          # HSTS max-age seconds on TLS binds; 0: off (per pool: hsts)
    forwarded_for: bool = True             # X-Forwarded-For / -Proto / -Host
    # HTTP/2 clients (fastlb/http2/, docs/http2.md): h2 by ALPN on TLS binds, h2c with prior knowledge
    h2: bool = True
    h2_max_concurrent_streams: int = 100   # streams open at once per connection; more: refused
    h2_max_header_list_size: int = 65536   # decoded bytes of a request's header list; more: 431
    h2_initial_window_size: int = 65536    # request body bytes a stream may send ahead of fastlb
    h2_max_control_frames: int = 400       # PING/SETTINGS/PRIORITY/RST_STREAM/empty frames burst, per conn
    # What else re-sends a request to another backend (beyond a failed connect, always retried): see
    # parse_retry_on. Only ever for idempotent requests we still hold in full.
    retry_on: frozenset = frozenset({"empty-response"})
    via: str = ""                          # Via pseudonym; empty: no Via header
    request_header_set: list[tuple[str, str]] = field(default_factory=list)
    request_header_delete: list[str] = field(default_factory=list)
    response_header_set: list[tuple[str, str]] = field(default_factory=list)
    response_header_delete: list[str] = field(default_factory=list)
    pools: list[PoolSpec] = field(default_factory=list)
    routes: list[RouteSpec] = field(default_factory=list)
    default_pool: str | None = None
    # Session persistence
    sticky: StickySpec | None = None
    store: str = "memory"                  # memory | redis://HOST:PORT/DB | memcached://HOST:PORT
    cookie_secret_file: str | None = None
    stick_ttl: float = 1800.0
    stick_table_size: int = 100000
    # Health: active checks (defaults as HAProxy's inter 2s, rise 2, fall 3) ...
    check: str = "none"
    check_interval: float = 2.0
    check_timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    check_jitter: float = 0.1
    check_port: int = 0
    check_method: str = "GET"
    check_path: str = "/"
    check_host: str | None = None
    check_expect: tuple[int, int] = (200, 399)
    check_body: str | None = None
    # ... slow start, and passive outlier detection (Envoy's defaults, but 50 % ejectable, not 10 %:
    # with 3 backends 10 % would mean none).
    slowstart: float = 0.0
    outlier_failures: int = 5
    outlier_ejection_time: float = 30.0
    outlier_max_ejection_time: float = 300.0
    max_ejection_percent: int = 50
    outlier_probe_interval: float = 0.25   # an ejected backend is probed (fastlb/health.py); 0: not
    # Operations: admin bind, access log, service discovery
    admin: tuple[str, int] | None = None
    admin_token_file: str | None = None
    access_log: str | None = None
    access_log_format: str = "text"
    backends_file: str | None = None
    backends_dns: str | None = None
    dns_interval: float = 5.0
    dns_server: tuple[str, int] | None = None
    consul_service: str | None = None
    consul: str = "http://127.0.0.1:8500"
    consul_datacenter: str | None = None
    consul_tag: str | None = None
    consul_token_file: str | None = None
    consul_ca: str | None = None
    consul_wait: float = 60.0
    # Admission control (fastlb/admission.py): rate limits, connections per source, CIDR lists
    rate_limit: list = field(default_factory=list)          # admission.RateLimitSpec
    rate_limit_table_size: int = DEFAULT_TABLE_SIZE
    max_conn_per_source: int = 0                            # 0: no limit
    allow: list[str] = field(default_factory=list)          # traffic binds: only these (empty: all) ...
    deny: list[str] = field(default_factory=list)           # ... and never these
    access_file: str | None = None                          # watched `allow|deny CIDR` lines
    admin_allow: list[str] = field(default_factory=list)    # the admin bind: only these (empty: all)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def discovers_backends(self) -> bool:
        """A discovery source adds backends to the top-level pool at run time."""
        return any(getattr(self, name) for name in DISCOVERY_SOURCES)

    @property
    def has_default_pool(self) -> bool:
        """The top-level backends form a pool (in HTTP mode the one named "default"): configured ones,
        or a discovery source that will fill it."""
        return bool(self.backends) or self.discovers_backends

    def health_for(self, spec: BackendSpec) -> "HealthSettings":
        """The health settings of one backend: the global ones with its own overrides."""
        values = {name: getattr(self, name) for name in HEALTH_FIELDS}
        values.update(spec.health)
        return HealthSettings(**values)

    def pool_config(self, pool: PoolSpec) -> "Config":
        """A named pool's own Config: its backends, algorithm and key, its POOL_SETTING_FIELDS over the
        top level's, and none of the top level's discovery sources (those feed the top-level pool)."""
        return self.replace(backends=pool.backends, pools=[], routes=[], default_pool=None,
                            algorithm=pool.algorithm or self.algorithm,
                            hash_key=pool.hash_key if pool.hash_key is not None else self.hash_key,
                            **{**dict.fromkeys(DISCOVERY_SOURCES), **pool.settings})


@dataclass(frozen=True)
class HealthSettings:
    """One backend's active-check and slow-start settings (the fields of Config of the same names)."""
    check: str
    check_interval: float
    check_timeout: float
    rise: int
    fall: int
    check_jitter: float
    check_port: int
    check_method: str
    check_path: str
    check_host: str | None
    check_expect: tuple[int, int]
    check_body: str | None
    slowstart: float


# ---------------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw value (a flag's string, or a TOML value) and returns the typed value,
# or raises ValueError with a short description of what is expected.

def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port)."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'HOST:PORT' (got {text!r})")
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", text.strip())
    if not match:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:8080 (got {text!r})")
    host = match.group(1) if match.group(1) is not None else match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535 (got {port})")
    if match.group(1) is not None:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address {host!r}") from None
    if host in ("", "*"):
        host = "0.0.0.0"
    elif match.group(3) is not None and not _HOST_NAME.fullmatch(host):
        raise ValueError(f"bad host {host!r}: expected an IPv4 address, [IPv6] or a DNS name")
    return host, port


# A DNS name (RFC 1123 labels; '_' too, as container and service names use it), or dotted IPv4.
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


def toml_typed(kind: type | tuple, *words: str) -> Callable:
    """Marks a parser whose TOML value must have its type (`kind`), or be one of `words`: flags are text
    and parsed from text, but in a file `weight = "3"` or `backup = "yes"` is a mistake to name, not to
    guess about (`from_toml`)."""
    def mark(parser: Callable) -> Callable:
        parser.toml_kind = kind
        parser.toml_words = words
        return parser
    return mark


def from_toml(parser: Callable[[Any], Any], value: Any) -> Any:
    """A TOML value through its field's parser, after the type check `toml_typed` asks for."""
    parsed = parser(value)
    kind = getattr(parser, "toml_kind", None)
    if kind is not None and isinstance(value, str) and value.strip().lower() not in parser.toml_words:
        # A string the flag syntax would take ("3", "yes"): a quoted value, named as such.
        what = "true or false" if kind is bool else "an integer" if kind is int else "a number"
        raise ValueError(f"expected {what}, not the string {value!r} (write it without quotes)")
    return parsed


def parse_int(minimum: int) -> Callable[[Any], int]:
    @toml_typed(int)
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer >= {minimum} (got {value!r})")
        if isinstance(value, str):
            try:
                value = int(value.strip().replace("_", ""))
            except ValueError:
                raise ValueError(f"expected an integer >= {minimum} (got {value!r})") from None
        if not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum} (got {value!r})")
        return value
    return parse


MAX_WEIGHT = 256  # the core's limit


@toml_typed(int)
def parse_weight(value: Any) -> int:
    try:
        weight = parse_int(0)(value)
    except ValueError:
        weight = -1
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"expected an integer from 0 to {MAX_WEIGHT} (got {value!r})")
    return weight


def parse_float(minimum: float) -> Callable[[Any], float]:
    @toml_typed((int, float))
    def parse(value: Any) -> float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number >= {minimum} (got {value!r})") from None
        if number != number or number < minimum:
            raise ValueError(f"expected a number >= {minimum} (got {value!r})")
        return number
    return parse


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds as a number, or a string with a unit: '250ms', '5s', '2m', '1h'. Never negative."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", value)
        if not match:
            raise ValueError(f"expected a duration such as 5, 2.5s, 500ms, 1m (got {value!r})")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration such as 5, 2.5s, 500ms, 1m (got {value!r})")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"expected a duration >= 0 (got {value!r})")
    return seconds


def parse_positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than 0 (got {value!r})")
    return seconds


def parse_choice(name: str, choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
        return value.lower()
    return parse


def parse_algorithm(value: Any) -> str:
    from fastlb import ALGORITHMS
    return parse_choice("algorithm", tuple(ALGORITHMS))(value)


# Workers beyond this many per CPU only add memory and context switches (each is a full event loop);
# `allow_many_workers = true` (--allow-many-workers true) allows more, for an operator who means it.
MAX_WORKERS_PER_CPU = 4


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) or 1


@toml_typed(int, "auto")
def parse_workers(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return cpu_count()
    try:
        return parse_int(1)(value)
    except ValueError:
        raise ValueError(f"expected a number of processes >= 1, or 'auto' (got {value!r})") from None


RETRY_CONDITIONS = ("empty-response", "junk-response", "response-timeout", "500", "502", "503", "504")
RETRY_DEFAULT = frozenset({"empty-response"})


def parse_retry_on(value: Any) -> frozenset:
    """HAProxy's `retry-on` words, comma-separated (or a TOML array): when an idempotent request that
    has already been sent is re-sent to another backend, within `retries`.

    - empty-response: the connection closed before a byte of the response (the default; also a
      non-idempotent request nothing of which was written yet)
    - junk-response: an unparsable response; response-timeout: no response within response_timeout
    - 500, 502, 503, 504: that status (the backend's response is dropped, the client never sees it;
      the last attempt's answer is forwarded as it is)
    - all-retryable-errors: all of the above; none: only failed connects are retried.
    A failed connect is always retried (nothing was sent). Non-idempotent requests (POST, PATCH) are
    never re-sent once written, whatever this says."""
    words = value if isinstance(value, (list, tuple)) else str(value).split(",")
    conditions = set()
    for word in (str(w).strip().lower() for w in words):
        if word == "all-retryable-errors":
            conditions.update(RETRY_CONDITIONS)
        elif word in RETRY_CONDITIONS:
            conditions.add(word)
        elif word != "none":
            raise ValueError(f"unknown retry-on condition {word!r}; choose from: "
                             f"{', '.join(RETRY_CONDITIONS)}, all-retryable-errors, none")
    return frozenset(conditions)


@toml_typed(bool)
def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false (got {value!r})")


def parse_send_proxy(value: Any) -> int:
    if value is False or value in ("off", "none", "false"):
        return 0
    if value is True or value in ("v1", "1", 1):
        return 1
    if value in ("v2", "2", 2):
        return 2
    raise ValueError(f"expected false, \"v1\" or \"v2\" (got {value!r})")


GROUP_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SERVER_NAME = re.compile(r"(\*\.)?[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.?")


def parse_group(value: Any) -> str:
    if not isinstance(value, str) or not GROUP_NAME.fullmatch(value):
        raise ValueError(f"expected a group name of letters, digits, '_', '-', '.' (got {value!r})")
    return value


def parse_server_name(value: Any) -> str:
    """A DNS name, or '*.parent' (matches one label): as TLS SNI carries it, lower case."""
    if not isinstance(value, str) or not SERVER_NAME.fullmatch(value) or len(value) > 253:
        raise ValueError(f"expected a server name such as api.example.com or *.example.com (got {value!r})")
    return value.lower().rstrip(".")


def parse_backend_verify(value: Any) -> str:
    """'none' (no certificate verification: explicit), or a readable CA file."""
    if value == "none":
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a CA file or 'none' (got {value!r})")
    return check_readable(value, "CA")


def parse_sni_route(text: Any) -> tuple[str, str]:
    """'NAME=GROUP' (a flag) -> (server name, group)."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"expected SERVER_NAME=GROUP, e.g. api.example.com=api (got {text!r})")
    name, _, group = text.partition("=")
    return parse_server_name(name.strip()), parse_group(group.strip())


def parse_sni_routes(value: Any) -> dict[str, str]:
    """The TOML table `[sni_routes]`: server name -> group."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a table of \"server name\" = \"group\" (got {value!r})")
    return {parse_server_name(name): parse_group(group) for name, group in value.items()}


def parse_hash_key(value: Any) -> str:
    """source | uri | path | header:NAME | cookie:NAME | query:NAME."""
    if not isinstance(value, str):
        raise ValueError(f"expected one of {', '.join(HASH_KEYS)} (got {value!r})")
    kind, sep, name = value.strip().partition(":")
    kind = kind.lower()
    if kind in ("source", "uri", "path") and not sep:
        return kind
    if kind in ("header", "cookie", "query") and sep and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
        return f"{kind}:{name}"
    raise ValueError(f"unknown hash key {value!r}; choose one of: {', '.join(HASH_KEYS)}")


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_size(value: Any) -> int:
    """Bytes as an integer, or with a unit: '512k', '10m', '1g'."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", value)
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    raise ValueError(f"expected a size in bytes such as 65536, 512k, 10m (got {value!r})")


def parse_window_size(value: Any) -> int:
    """An HTTP/2 flow-control window: a size from 1 byte to 2^31-1 (RFC 9113 6.9.2)."""
    size = parse_size(value)
    if not 1 <= size <= 2 ** 31 - 1:
        raise ValueError(f"expected a window size from 1 to 2147483647 bytes (got {value!r})")
    return size


def parse_header_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value.strip()):
        raise ValueError(f"expected a header name (got {value!r})")
    return value.strip()


def parse_header_line(value: Any) -> tuple[str, str]:
    """'Name: value' -> (name, value); the value may not hold control characters."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected 'Name: value' (got {value!r})")
    name, _, text = value.partition(":")
    text = text.strip()
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 or ord(c) > 255 for c in text):
        raise ValueError(f"header value with control or non-latin-1 characters (got {value!r})")
    return parse_header_name(name), text


def parse_hsts(value: Any) -> int:
    """HSTS max-age: seconds, or a duration with a unit ('1h', '365d'); 0 is off."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*d\s*", value):
        return int(value.strip()[:-1].strip()) * 86400
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(f"expected an HSTS max-age in seconds, or with a unit such as '365d' "
                         f"(got {value!r})") from None
    if seconds != int(seconds):
        raise ValueError(f"expected whole seconds (got {value!r})")
    return int(seconds)


def parse_redirect_port(value: Any) -> int:
    """redirect-https[=PORT] (flag) or redirect_https = true | PORT (TOML): the HTTPS port."""
    if value is True or value == "":
        return 443
    port = parse_int(1)(value)
    if port > 65535:
        raise ValueError(f"expected a port 1-65535 (got {value!r})")
    return port


def parse_via(value: Any) -> str:
    if value is False or value == "":
        return ""
    if value is True:
        return "fastlb"
    if isinstance(value, str) and re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
        return value
    raise ValueError(f"expected a pseudonym token such as 'fastlb', or false (got {value!r})")


def parse_backend(text: Any) -> BackendSpec:
    """'HOST:PORT[,weight=N][,backup][,maxconn=N][,send-proxy|send-proxy-v2][,ssl[,verify=FILE|none]
    [,sni=NAME]][,group=NAME]'."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'HOST:PORT[,weight=N][,backup][,maxconn=N]' (got {text!r})")
    address, *options = text.split(",")
    host, port = parse_address(address)
    backend = BackendSpec(host, port)
    for option in options:
        name, _, value = option.strip().partition("=")
        name = name.strip().replace("_", "-")
        if name == "weight" and value:
            backend.weight = _option(parse_weight, name, value)
        elif name == "maxconn" and value:
            backend.maxconn = _option(parse_int(0), name, value)
        elif name == "backup" and not value:
            backend.backup = True
        elif name == "send-proxy" and not value:
            backend.send_proxy = 1
        elif name == "send-proxy-v2" and not value:
            backend.send_proxy = 2
        elif name == "ssl" and not value:
            backend.ssl = True
        elif name == "verify" and value:
            backend.verify = _option(parse_backend_verify, name, value)
        elif name == "sni" and value:
            backend.sni = _option(parse_server_name, name, value)
        elif name == "group" and value:
            backend.group = _option(parse_group, name, value)
        elif name.replace("-", "_") in HEALTH_FIELDS and value:
            backend.health[name.replace("-", "_")] = _option(HEALTH_FIELDS[name.replace("-", "_")],
                                                             name, value)
        else:
            raise ValueError(f"unknown backend option {option.strip()!r}; known: weight=N, maxconn=N, "
                             f"backup, send-proxy, send-proxy-v2, ssl, verify=FILE|none, sni=NAME, "
                             f"group=NAME, and health settings such as check=tcp, check-port=N, rise=N")
    check_backend_tls(backend)
    return backend


def check_backend_tls(backend: BackendSpec) -> None:
    if not backend.ssl and (backend.verify or backend.sni):
        raise ValueError("verify= and sni= apply to TLS backends: add the 'ssl' option")


def parse_check_expect(value: Any) -> tuple[int, int]:
    """'200', '200-399' (or a TOML integer) -> an inclusive status range."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    match = re.fullmatch(r"([1-5]\d\d)(?:\s*-\s*([1-5]\d\d))?", text)
    if not match:
        raise ValueError(f"expected an HTTP status or a range such as 200-399 (got {value!r})")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if high < low:
        raise ValueError(f"the range's end is below its start (got {value!r})")
    return low, high


def parse_http_token(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]{1,20}", value):
        raise ValueError(f"expected an HTTP method such as GET, HEAD or OPTIONS (got {value!r})")
    return value.upper()


def parse_check_path(value: Any) -> str:
    # The path goes into the request line as is: no spaces, controls or non-ASCII.
    if not isinstance(value, str) or not re.fullmatch(r"/[\x21-\x7e]*", value):
        raise ValueError(f"expected a path starting with '/', without spaces (got {value!r})")
    return value


def parse_header_text(value: Any) -> str:
    if not isinstance(value, str) or not value or not re.fullmatch(r"[\x20-\x7e]+", value):
        raise ValueError(f"expected non-empty printable ASCII text (got {value!r})")
    return value


@toml_typed(int)
def parse_percent(value: Any) -> int:
    try:
        percent = parse_int(0)(value)
    except ValueError:
        percent = -1
    if not 0 <= percent <= 100:
        raise ValueError(f"expected a percentage from 0 to 100 (got {value!r})")
    return percent


@toml_typed((int, float))
def parse_jitter(value: Any) -> float:
    jitter = parse_float(0.0)(value)
    if jitter > 0.5:
        raise ValueError(f"expected a fraction of the interval from 0 to 0.5 (got {value!r})")
    return jitter


@toml_typed(int)
def parse_port_or_zero(value: Any) -> int:
    port = parse_int(0)(value)
    if port > 65535:
        raise ValueError(f"expected a port 1-65535, or 0 for the backend's own (got {value!r})")
    return port


def parse_verify(value: Any) -> str:
    return parse_choice("verify mode", ("required", "optional"))(value)


def parse_admin(value: Any) -> tuple[str, int]:
    """'HOST:PORT', or a bare PORT meaning loopback: the admin API should not face the network by accident."""
    if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.strip().isdigit():
        value = f"127.0.0.1:{int(value)}"
    return parse_address(value)


def parse_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path (got {value!r})")
    return value.strip()


def parse_consul_address(value: Any) -> str:
    """'HOST:PORT', 'http://HOST:PORT' or 'https://HOST:PORT' -> 'SCHEME://HOST:PORT'."""
    text = value.strip() if isinstance(value, str) else ""
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "http", text
    if scheme not in ("http", "https") or not rest:
        raise ValueError(f"expected HOST:PORT, http://HOST:PORT or https://HOST:PORT (got {value!r})")
    return f"{scheme}://{format_address(*parse_address(rest.rstrip('/')))}"


def parse_consul_name(value: Any) -> str:
    """A Consul service name, datacenter or tag: letters, digits, '-', '_', '.'."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"expected letters, digits, '-', '_', '.' (got {value!r})")
    return value


def parse_dns_name(value: Any) -> str:
    """'_service._proto.name' (SRV) or 'name:PORT' (A and AAAA)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected '_service._proto.NAME' (SRV) or 'NAME:PORT' (A/AAAA) (got {value!r})")
    value = value.strip()
    if value.startswith("_"):
        return value
    name, _, port = value.rpartition(":")
    if not name or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected '_service._proto.NAME' (SRV) or 'NAME:PORT' (A/AAAA) (got {value!r})")
    return value


def parse_bind(text: Any) -> BindSpec:
    """'HOST:PORT[,accept-proxy][,ssl,cert=FILE[,key=FILE][,cert=FILE...][,ca=FILE[,verify=required|
    optional]]][,sni-route]'. Each key= belongs to the cert= before it."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'HOST:PORT[,accept-proxy][,ssl,cert=FILE]' (got {text!r})")
    address, *options = text.split(",")
    host, port = parse_address(address)
    bind = BindSpec(host, port)
    verify = None
    for option in options:
        name, _, value = option.strip().partition("=")
        name = name.strip().replace("_", "-")
        if name == "accept-proxy" and not value:
            bind.accept_proxy = True
        elif name == "ssl" and not value:
            bind.ssl = True
        elif name == "cert" and value:
            bind.certificates.append(CertificateSpec(_option(parse_file("certificate"), name, value)))
        elif name == "key" and value:
            if not bind.certificates or bind.certificates[-1].key is not None:
                raise ValueError("key= must follow the cert= it belongs to")
            bind.certificates[-1].key = _option(parse_file("key"), name, value)
        elif name == "ocsp" and value:
            if not bind.certificates or bind.certificates[-1].ocsp is not None:
                raise ValueError("ocsp= must follow the cert= it belongs to")
            bind.certificates[-1].ocsp = _option(parse_file("OCSP response"), name, value)
        elif name == "ca" and value:
            bind.ca = _option(parse_file("CA"), name, value)
        elif name == "verify" and value:
            verify = _option(parse_verify, name, value)
        elif name == "sni-route" and not value:
            bind.sni_route = True
        elif name == "redirect-https":
            bind.redirect_https = _option(parse_redirect_port, name, value)
        else:
            raise ValueError(f"unknown bind option {option.strip()!r}; known: accept-proxy, ssl, cert=FILE, "
                             f"key=FILE, ocsp=FILE, ca=FILE, verify=required|optional, sni-route, "
                             f"redirect-https[=PORT]")
    if verify is not None:
        bind.verify = verify
    check_bind_tls(bind)
    return bind


def parse_file(what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a {what} file name (got {value!r})")
        return check_readable(value, what)
    return parse


def check_bind_tls(bind: BindSpec) -> None:
    """The TLS options of one bind, together; sets verify=required when a CA is given alone."""
    if bind.ssl and not bind.certificates:
        raise ValueError("ssl needs a certificate: add cert=FILE (and key=FILE unless the file holds it)")
    if not bind.ssl and (bind.certificates or bind.ca):
        raise ValueError("cert=, key= and ca= apply to TLS binds: add the 'ssl' option")
    if bind.verify != "none" and not bind.ca:
        raise ValueError(f"verify={bind.verify} needs the CA that signs client certificates: add ca=FILE")
    if bind.ca and bind.verify == "none":
        bind.verify = "required"     # a CA alone means client certificates are wanted: the safe reading
    if bind.ssl and bind.accept_proxy:
        raise ValueError("accept-proxy together with ssl is not supported yet")
    if bind.ssl and bind.sni_route:
        raise ValueError("sni-route passes TLS through without terminating it: it excludes ssl")
    if bind.redirect_https is not None and (bind.ssl or bind.sni_route or bind.accept_proxy):
        raise ValueError("redirect-https makes a plain HTTP bind that only redirects: it excludes ssl, "
                         "sni-route and accept-proxy")


_COOKIE_NAME = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"


def parse_sticky(value: Any) -> StickySpec:
    """cookie:NAME | prefix:NAME | learn:NAME | learn:header:NAME | source, then ,options (cookie:)."""
    usage = ("expected cookie:NAME, prefix:NAME, learn:NAME, learn:header:NAME or source, with options "
             "indirect, nocache, httponly, secure, samesite=lax|strict|none, maxidle=DURATION, "
             "maxlife=DURATION")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{usage} (got {value!r})")
    head, *options = [part.strip() for part in value.split(",")]
    kind, _, name = head.partition(":")
    kind = kind.lower()
    spec = StickySpec(kind)
    if kind == "source":
        if name:
            raise ValueError(f"source takes no name (got {value!r})")
    elif kind in ("cookie", "prefix", "learn"):
        if kind == "learn" and name.lower().startswith("header:"):
            spec.header = True
            name = name[len("header:"):]
        if not re.fullmatch(_COOKIE_NAME, name):
            raise ValueError(f"{usage} (got {value!r})")
        spec.name = name
    else:
        raise ValueError(f"{usage} (got {value!r})")
    for option in options:
        key, sep, text = option.partition("=")
        key = key.strip().lower()
        if kind != "cookie" and key not in ("",):
            raise ValueError(f"option {option!r} applies to cookie: only")
        if key in ("indirect", "nocache", "httponly", "secure") and not sep:
            setattr(spec, key, True)
        elif key == "samesite" and text.lower() in ("lax", "strict", "none"):
            spec.samesite = text.lower()
        elif key in ("maxidle", "maxlife") and sep:
            setattr(spec, key, _option(parse_duration, key, text))
        else:
            raise ValueError(f"unknown sticky option {option!r}; {usage}")
    return spec


def parse_store(value: Any) -> str:
    """memory | redis://HOST:PORT[/DB] | memcached://HOST:PORT."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "memory":
            return "memory"
        match = re.fullmatch(r"redis://([^/:]+|\[[0-9a-fA-F:]+\]):(\d+)(?:/(\d+))?", text)
        if match and 1 <= int(match.group(2)) <= 65535:
            return f"redis://{match.group(1)}:{match.group(2)}/{match.group(3) or 0}"
        match = re.fullmatch(r"memcached://([^/:]+):(\d+)/?", text)
        if match and 1 <= int(match.group(2)) <= 65535:
            return f"memcached://{match.group(1)}:{match.group(2)}"
    raise ValueError(f"expected memory, redis://HOST:PORT/DB or memcached://HOST:PORT (got {value!r})")


def _option(parser: Callable[[Any], Any], name: str, value: str) -> Any:
    try:
        return parser(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


# Scalar fields shared by flags and the file: config name -> parser. The flag is `--` + name with dashes.
FIELDS: dict[str, Callable[[Any], Any]] = {
    "mode": parse_choice("mode", MODES),
    "algorithm": parse_algorithm,
    "hash_key": parse_hash_key,
    "bounded_load": parse_float(0.0),
    "seed": parse_int(0),
    "workers": parse_workers,
    "allow_many_workers": parse_bool,
    "maxconn": parse_int(1),
    "queue_size": parse_int(0),
    "queue_timeout": parse_positive_duration,
    "connect_timeout": parse_positive_duration,
    "idle_timeout": parse_duration,
    "relay": parse_choice("relay", RELAYS),
    "retries": parse_int(0),
    "grace_period": parse_duration,
    "backlog": parse_int(1),
    "log_level": parse_choice("log level", LOG_LEVELS),
    "outlier_failures": parse_int(0),
    "outlier_ejection_time": parse_positive_duration,
    "outlier_max_ejection_time": parse_positive_duration,
    "max_ejection_percent": parse_percent,
    "admin": parse_admin,
    "admin_token_file": parse_path,
    "access_log": parse_path,
    "access_log_format": parse_choice("access log format", ACCESS_LOG_FORMATS),
    "backends_file": parse_path,
    "backends_dns": parse_dns_name,
    "dns_interval": parse_positive_duration,
    "dns_server": parse_address,
    "consul_service": parse_consul_name,
    "consul": parse_consul_address,
    "consul_datacenter": parse_consul_name,
    "consul_tag": parse_consul_name,
    "consul_token_file": parse_path,
    "consul_ca": parse_file("CA"),
    "consul_wait": parse_positive_duration,
    "outlier_probe_interval": parse_duration,
    "http_request_timeout": parse_positive_duration,
    "keepalive_timeout": parse_positive_duration,
    "response_timeout": parse_positive_duration,
    "tunnel_timeout": parse_positive_duration,
    "backend_idle_timeout": parse_positive_duration,
    "backend_max_idle": parse_int(0),
    "max_header_size": parse_size,
    "max_response_header_size": parse_size,
    "max_headers": parse_int(1),
    "max_uri_length": parse_size,
    "max_body_size": parse_size,
    "forwarded_for": parse_bool,
    "h2": parse_bool,
    "h2_max_concurrent_streams": parse_int(1),
    "h2_max_header_list_size": parse_size,
    "h2_initial_window_size": parse_window_size,
    "h2_max_control_frames": parse_int(1),
    "retry_on": parse_retry_on,
    "via": parse_via,
    "hsts": parse_hsts,
    "default_pool": lambda value: _pool_name(value),
    "sticky": parse_sticky,
    "store": parse_store,
    "cookie_secret_file": parse_path,
    "stick_ttl": parse_positive_duration,
    "stick_table_size": parse_int(1),
    "rate_limit_table_size": parse_int(64),
    "max_conn_per_source": parse_int(0),
    "access_file": parse_path,
}

# Repeatable HTTP header rules: config name -> parser of one item (flags append, the file gives arrays).
LIST_FIELDS: dict[str, Callable[[Any], Any]] = {
    "request_header_set": parse_header_line,
    "request_header_delete": parse_header_name,
    "response_header_set": parse_header_line,
    "response_header_delete": parse_header_name,
    "rate_limit": parse_rate_limit,        # flags, an array of strings, or [[rate_limit]] tables
    "allow": parse_cidr,
    "deny": parse_cidr,
    "admin_allow": parse_cidr,
}


def _pool_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"expected a pool name of letters, digits, '_', '.', '-' (got {value!r})")
    return value


def _methods(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(m, str) and re.fullmatch(r"[A-Za-z]+", m) for m in items):
        raise ValueError(f"expected a method or an array of methods, e.g. [\"GET\", \"HEAD\"] (got {value!r})")
    return [m.upper() for m in items]


def _regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string (got {value!r})")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression {value!r}: {exc}") from None
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string (got {value!r})")
    return value


def _header_condition(value: Any) -> tuple[str, str | None]:
    """'Name' (present) or 'Name: value' (equal)."""
    if isinstance(value, str) and ":" in value:
        return parse_header_line(value)
    return parse_header_name(value), None


def _backend_list(value: Any) -> list[BackendSpec]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an array of backends in the flag syntax (got {value!r})")
    return [parse_backend(item) for item in items]


POOL_TABLE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "name": _pool_name,
    "backend": _backend_list,
    "algorithm": parse_algorithm,
    "hash_key": parse_hash_key,
    "max_body_size": parse_size,
    "hsts": parse_hsts,
    "sticky": parse_sticky,
}
ROUTE_TABLE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "pool": _pool_name,
    "host": _string,
    "path_prefix": _string,
    "path_regex": _regex,
    "method": _methods,
    "header": _header_condition,
}

# Health settings: global fields that a backend may also set for itself.
CHECK_KINDS = ("none", "tcp", "http")
HEALTH_FIELDS: dict[str, Callable[[Any], Any]] = {
    "check": parse_choice("check", CHECK_KINDS),
    "check_interval": parse_positive_duration,
    "check_timeout": parse_positive_duration,
    "rise": parse_int(1),
    "fall": parse_int(1),
    "check_jitter": parse_jitter,
    "check_port": parse_port_or_zero,
    "check_method": parse_http_token,
    "check_path": parse_check_path,
    "check_host": parse_header_text,
    "check_expect": parse_check_expect,
    "check_body": parse_header_text,
    "slowstart": parse_duration,
}
HTTP_CHECK_FIELDS = ("check_method", "check_path", "check_host", "check_expect", "check_body")
FIELDS.update(HEALTH_FIELDS)
# Discovery sources feed the pool they are set in; the settings after them say how to reach the source.
DISCOVERY_SOURCES = ("backends_file", "backends_dns", "consul_service")
POOL_SETTING_FIELDS = (*HEALTH_FIELDS, "outlier_failures", "outlier_ejection_time", "outlier_max_ejection_time",
                       "max_ejection_percent", "outlier_probe_interval", *DISCOVERY_SOURCES, "dns_interval",
                       "dns_server", "consul", "consul_datacenter", "consul_tag", "consul_token_file",
                       "consul_ca", "consul_wait")
POOL_TABLE_FIELDS.update((name, FIELDS[name]) for name in POOL_SETTING_FIELDS)

def parse_file_list(what: str) -> Callable[[Any], list[str]]:
    def parse(value: Any) -> list[str]:
        files = value if isinstance(value, list) else [value]
        return [parse_file(what)(item) for item in files]
    return parse


BIND_TABLE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "address": parse_address,
    "accept_proxy": parse_bool,
    "ssl": parse_bool,
    "cert": parse_file_list("certificate"),    # a file, or an array of files (the first is the default)
    "key": parse_file_list("key"),             # the same number of files, when keys are separate
    "ocsp": parse_file_list("OCSP response"),  # the same number of files: a staple per certificate
    "ca": parse_file("CA"),
    "verify": parse_verify,
    "sni_route": parse_bool,
    "redirect_https": lambda value: parse_redirect_port(value) if value is not False else None,
}
BACKEND_TABLE_FIELDS: dict[str, Callable[[Any], Any]] = {
    "address": parse_address,
    "weight": parse_weight,
    "maxconn": parse_int(0),
    "backup": parse_bool,
    "send_proxy": parse_send_proxy,
    "ssl": parse_bool,
    "verify": parse_backend_verify,
    "sni": parse_server_name,
    "group": parse_group,
    **HEALTH_FIELDS,
}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


# ---------------------------------------------------------------------------------------------------
# TOML file

class _Locator:
    """Finds the line of a key in TOML text. tomllib gives values without positions, so errors about a
    value find its line here: top-level keys, keys inside `[[bind]]` / `[[backend]]` tables (by their
    index), and string items of `backend = [...]` arrays."""

    _HEADER = re.compile(r"\s*\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]|\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
    _KEY = re.compile(r"\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.keys: dict[tuple[str, int, str], int] = {}
        self.headers: dict[tuple[str, int], int] = {}
        counts: dict[str, int] = {}
        table, index = "", 0
        for number, line in enumerate(self.lines, 1):
            header = self._HEADER.match(line)
            if header:
                table = header.group(1) or header.group(2)
                index = counts.get(table, 0)
                counts[table] = index + 1 if header.group(1) else index
                self.headers[(table, index)] = number
                continue
            key = self._KEY.match(line)
            if key:
                self.keys.setdefault((table, index, key.group(1).strip('"')), number)

    def line_of(self, key: str, table: str = "", index: int = 0) -> int:
        return self.keys.get((table, index, key)) or self.headers.get((table, index)) or 1

    def line_of_item(self, key: str, item: str) -> int:
        """Line of a string item inside a (possibly multi-line) array assigned to a top-level key."""
        start = self.line_of(key)
        quoted = (f'"{item}"', f"'{item}'")
        for number in range(start, min(start + 1000, len(self.lines) + 1)):
            if any(q in self.lines[number - 1] for q in quoted):
                return number
        return start


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return f"unknown key{hint}"


def load_file(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Parses and checks a TOML config file.

    Returns (values, sources): values maps Config field names to typed values (binds/backends as lists of
    specs), sources maps each field to 'FILE:LINE' for messages about it. Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            raw_bytes = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        text = raw_bytes.decode("utf-8")
        document = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if match:
            message = message[:match.start()].strip()
            raise ConfigError(f"{path}:{match.group(1)}: TOML syntax error: {message} "
                              f"(column {match.group(2)})") from None
        raise ConfigError(f"{path}: TOML syntax error: {message}") from None

    locator = _Locator(text)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def fail(line: int, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{path}:{line}: {where}: {problem}")

    for key, value in document.items():
        name = key.replace("-", "_")
        line = locator.line_of(key)
        if name in ("bind", "backend"):
            values[name + "s"] = _load_list(path, locator, key, value, fail)
            sources[name + "s"] = f"{path}:{line}"
            continue
        if name == "sni_routes":
            try:
                values[name] = parse_sni_routes(value)
            except ValueError as exc:
                raise fail(line, key, str(exc)) from None
            sources[name] = f"{path}:{line} ({key})"
            continue
        if name in ("pool", "route"):
            values[name + "s"] = _load_tables(locator, key, value, fail)
            sources[name + "s"] = f"{path}:{line} ({key})"
            continue
        if name in LIST_FIELDS:
            items = value if isinstance(value, list) else [value]
            try:
                values[name] = [from_toml(LIST_FIELDS[name], item) for item in items]
            except ValueError as exc:
                raise fail(line, key, str(exc)) from None
            sources[name] = f"{path}:{line} ({key})"
            continue
        if name not in FIELDS:
            raise fail(line, key, _unknown_key_message(key, [*FIELDS, *LIST_FIELDS, "bind", "backend",
                                                              "pool", "route", "sni_routes"]))
        try:
            values[name] = from_toml(FIELDS[name], value)
        except ValueError as exc:
            raise fail(line, key, str(exc)) from None
        sources[name] = f"{path}:{line} ({key})"
    return values, sources


def _load_tables(locator: _Locator, key: str, value: Any, fail: Callable) -> list:
    """[[pool]] and [[route]] tables -> PoolSpec / RouteSpec, each error at its file line."""
    name = key.replace("-", "_")
    table_fields = POOL_TABLE_FIELDS if name == "pool" else ROUTE_TABLE_FIELDS
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise fail(locator.line_of(key), key, f"expected [[{key}]] tables")
    specs = []
    for index, item in enumerate(value):
        where = f"{key}[{index + 1}]"
        required = "name" if name == "pool" else "pool"
        if required not in item:
            raise fail(locator.line_of(key, key, index), where, f"missing required key {required!r}")
        parsed: dict[str, Any] = {}
        for item_key, item_value in item.items():
            field_name = item_key.replace("-", "_")
            line = locator.line_of(item_key, key, index)
            if field_name not in table_fields:
                raise fail(line, f"{where}.{item_key}", _unknown_key_message(item_key, list(table_fields)))
            try:
                parsed[field_name] = from_toml(table_fields[field_name], item_value)
            except ValueError as exc:
                raise fail(line, f"{where}.{item_key}", str(exc)) from None
        if name == "pool":
            settings = {k: parsed.pop(k) for k in list(parsed) if k in POOL_SETTING_FIELDS}
            if "backend" not in parsed and not any(k in settings for k in DISCOVERY_SOURCES):
                raise fail(locator.line_of(key, key, index), where, "missing required key 'backend' (or a "
                           f"discovery source: {', '.join(DISCOVERY_SOURCES)})")
            parsed["backends"] = parsed.pop("backend", [])
            specs.append(PoolSpec(**parsed, settings=settings))
        else:
            if len(parsed) == 1:
                raise fail(locator.line_of(key, key, index), where,
                           "a route needs a condition: host, path_prefix, path_regex, method or header")
            if "method" in parsed:
                parsed["methods"] = parsed.pop("method")
            if "header" in parsed:
                parsed["header_name"], parsed["header_value"] = parsed.pop("header")
            specs.append(RouteSpec(**parsed))
    return specs


def _load_list(path: str, locator: _Locator, key: str, value: Any, fail: Callable) -> list:
    name = key.replace("-", "_")
    string_parser = parse_bind if name == "bind" else parse_backend
    table_fields = BIND_TABLE_FIELDS if name == "bind" else BACKEND_TABLE_FIELDS
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise fail(locator.line_of(key), key,
                   f"expected a string, an array of strings or [[{key}]] tables (got {value!r})")
    specs = []
    for index, item in enumerate(value):
        where = f"{key}[{index + 1}]"
        if isinstance(item, str):
            try:
                specs.append(string_parser(item))
            except ValueError as exc:
                raise fail(locator.line_of_item(key, item), where, str(exc)) from None
            continue
        if not isinstance(item, dict):
            raise fail(locator.line_of(key), where, f"expected a string or a table (got {item!r})")
        if "address" not in item:
            raise fail(locator.line_of(key, key, index), where, "missing required key 'address'")
        parsed: dict[str, Any] = {}
        health: dict[str, Any] = {}
        health_sources: dict[str, str] = {}
        for item_key, item_value in item.items():
            field_name = item_key.replace("-", "_")
            line = locator.line_of(item_key, key, index)
            if field_name not in table_fields:
                raise fail(line, f"{where}.{item_key}", _unknown_key_message(item_key, list(table_fields)))
            try:
                value = from_toml(table_fields[field_name], item_value)
            except ValueError as exc:
                raise fail(line, f"{where}.{item_key}", str(exc)) from None
            if name == "backend" and field_name in HEALTH_FIELDS:
                health[field_name] = value
                health_sources[field_name] = f"{path}:{line}: {where}.{item_key}"
            else:
                parsed[field_name] = value
        host, port = parsed.pop("address")
        try:
            if name == "bind":
                specs.append(_bind_from_table(host, port, parsed))
            else:
                spec = BackendSpec(host, port, **parsed, health=health, health_sources=health_sources)
                check_backend_tls(spec)
                specs.append(spec)
        except ValueError as exc:
            raise fail(locator.line_of(key, key, index), where, str(exc)) from None
    return specs


def _bind_from_table(host: str, port: int, parsed: dict[str, Any]) -> BindSpec:
    certs = parsed.pop("cert", [])
    keys = parsed.pop("key", None)
    staples = parsed.pop("ocsp", None)
    for what, files in (("key", keys), ("ocsp", staples)):
        if files is not None and len(files) != len(certs):
            raise ValueError(f"{what} lists {len(files)} file(s) for {len(certs)} certificate(s)")
    bind = BindSpec(host, port, **parsed)
    bind.certificates = [CertificateSpec(cert, keys[i] if keys else None, staples[i] if staples else None)
                         for i, cert in enumerate(certs)]
    check_bind_tls(bind)
    return bind


# ---------------------------------------------------------------------------------------------------
# Whole-config checks: the relations between fields, after flags and file are merged.

def build(values: dict[str, Any], sources: dict[str, str]) -> Config:
    """Makes a Config from merged values and checks the relations between fields.

    sources maps a field to where its value came from ('--algorithm' or 'lb.toml:3 (algorithm)'), so
    a complaint about a combination names the place to change."""
    config = Config(**values)

    def where(name: str) -> str:
        return sources.get(name, flag_name(name))

    if not config.binds:
        raise ConfigError("no listening address: give --bind HOST:PORT (or [[bind]] in the config file)")
    if not config.backends and not config.pools and not config.discovers_backends:
        raise ConfigError("no backend: give --backend HOST:PORT (or [[backend]] in the config file), "
                          "or a discovery source (--backends-file, --backends-dns, --consul-service)")
    worker_limit = MAX_WORKERS_PER_CPU * cpu_count()
    if config.workers > worker_limit and not config.allow_many_workers:
        raise ConfigError(f"{where('workers')}: {config.workers} workers is more than {MAX_WORKERS_PER_CPU} per "
                          f"CPU ({worker_limit} on the {cpu_count()} CPU(s) fastlb may use); each is a process "
                          f"with its own memory. Use --workers auto, or say you mean it with "
                          f"--allow-many-workers true (allow_many_workers = true)")
    if config.access_log and config.access_log != "-":
        problem = unwritable_file(config.access_log)
        if problem:
            raise ConfigError(f"{where('access_log')}: cannot write the access log {config.access_log}: "
                              f"{problem}")
    for name in ("admin_token_file", "consul_token_file"):
        try:
            if getattr(config, name):
                read_token(getattr(config, name))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where(name)}: {exc}") from None
    stapled = [b for b in config.binds if any(c.ocsp for c in b.certificates)]
    if stapled and (config.mode != "tcp" or config.relay != "epoll" or any(b.ca for b in stapled)):
        raise ConfigError(f"{where('binds')}: ocsp= staples on TLS binds the relay terminates (mode tcp, "
                          f"relay epoll, no ca=): Python's ssl module, which terminates the others, "
                          f"cannot staple")
    if config.mode == "tcp":
        for name in ("pools", "routes"):
            if getattr(config, name):
                raise ConfigError(f"{where(name)}: [[{name[:-1]}]] needs mode 'http'")
        if config.hash_key not in (None, "source"):
            raise ConfigError(f"{where('hash_key')}: hash key {config.hash_key!r} needs mode 'http'; "
                              f"tcp mode hashes on source only")
        if any(b.redirect_https is not None for b in config.binds):
            raise ConfigError(f"{where('binds')}: redirect-https answers HTTP requests: it needs mode 'http'")
        if config.hsts or any(p.hsts for p in config.pools):
            raise ConfigError(f"{where('hsts')}: HSTS is an HTTP response header: it needs mode 'http'")
    else:
        # SNI passthrough relays TLS bytes without reading HTTP: it is an L4 feature.
        if any(b.sni_route for b in config.binds):
            raise ConfigError(f"{where('binds')}: sni-route binds pass TLS through untouched: they need "
                              f"--mode tcp (HTTP mode terminates TLS with ssl,cert=FILE instead)")
        if config.sni_routes:
            raise ConfigError(f"{where('sni_routes')}: SNI routes need mode 'tcp'; HTTP mode routes "
                              f"requests to [[pool]]s by [[route]] rules")
        grouped = [b for pool in config.pools for b in pool.backends] + config.backends
        if any(b.group != "default" for b in grouped):
            raise ConfigError(f"{where('backends')}: backend groups (group=) are for SNI routing in mode "
                              f"'tcp'; HTTP mode uses [[pool]]s")
    _check_pools(config, where)
    _check_sticky(config, where)
    _check_admission(config, where)
    if config.has_default_pool and config.hash_key and config.algorithm not in HASHING_ALGORITHMS:
        raise ConfigError(f"{where('hash_key')}: hash key {config.hash_key!r} needs a hashing algorithm "
                          f"({', '.join(HASHING_ALGORITHMS)}); the algorithm is {config.algorithm!r}")
    if config.bounded_load and config.bounded_load < 1.0:
        raise ConfigError(f"{where('bounded_load')}: bounded load must be 0 (off) or >= 1.0 "
                          f"(got {config.bounded_load})")
    if config.bounded_load and config.algorithm not in HASHING_ALGORITHMS:
        raise ConfigError(f"{where('bounded_load')}: bounded load applies to the hashing algorithms "
                          f"({', '.join(HASHING_ALGORITHMS)}); the algorithm is {config.algorithm!r}")
    _check_groups(config, where)
    _check_health(config, where, explicit=set(values))
    _check_duplicates(config.backends, where("backends"))
    for pool in config.pools:
        _check_duplicates(pool.backends, f"{where('pools')}: pool {pool.name!r}")
    for pool in config.pools:
        place = f"{where('pools')}: pool {pool.name!r}"
        _check_health(config.pool_config(pool), lambda name, place=place: f"{place}: {name}",
                      explicit=set(pool.settings))
        if "consul_token_file" in pool.settings:
            try:
                read_token(pool.settings["consul_token_file"])
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{place}: consul_token_file: {exc}") from None
    seen = set()
    for spec in config.binds:
        if (spec.host, spec.port) in seen:
            raise ConfigError(f"{where('binds')}: address {spec.address} is bound twice")
        seen.add((spec.host, spec.port))
    return config


def unwritable_file(path: str) -> str:
    """Why fastlb could not append to the file at path ("" when it could): checked at --check-config and
    at start, so a typo is one line of error, not a traceback from the first worker."""
    if os.path.isdir(path):
        return "it is a directory"
    if os.path.exists(path):
        return "" if os.access(path, os.W_OK) else "permission denied"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"no directory {parent}"
    return "" if os.access(parent, os.W_OK | os.X_OK) else f"permission denied in {parent}"


def _check_duplicates(backends: list[BackendSpec], where: str) -> None:
    """A backend listed twice would get two slots (twice the traffic) under one address, which health
    verdicts and admin changes name: one of the two would silently not follow them."""
    first: dict[str, int] = {}
    for number, spec in enumerate(backends, 1):
        if spec.address in first:
            raise ConfigError(f"{where}: backend[{number}] {spec.address} is listed twice "
                              f"(also backend[{first[spec.address]}]); give it a weight instead")
        first[spec.address] = number


def _check_admission(config: Config, where: Callable[[str], str]) -> None:
    if config.rate_limit and config.mode != "http":
        raise ConfigError(f"{where('rate_limit')}: rate limits count HTTP requests: they need mode 'http' "
                          f"(tcp mode limits connections: --max-conn-per-source)")
    pools = {p.name for p in config.pools} | ({"default"} if config.has_default_pool else set())
    for spec in config.rate_limit:
        if spec.pool is not None and spec.pool not in pools:
            raise ConfigError(f"{where('rate_limit')}: rate limit {spec.text!r}: no pool {spec.pool!r} "
                              f"(pools: {', '.join(sorted(pools))})")
    if config.access_file:
        try:
            read_access_file(config.access_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where('access_file')}: {exc}") from None


def _check_groups(config: Config, where: Callable[[str], str]) -> None:
    """Backend groups (SNI routing) and the binds that use them: each group used has a primary."""
    groups: dict[str, list[BackendSpec]] = {}
    for spec in config.backends:
        groups.setdefault(spec.group, []).append(spec)
    routed = set(config.sni_routes.values())
    for name, specs in groups.items():
        if not any(not b.backup for b in specs):
            what = "every backend" if len(groups) == 1 else f"every backend of group {name!r}"
            raise ConfigError(f"{where('backends')}: {what} is a backup; at least one must be a primary")
        if name != "default" and name not in routed:
            raise ConfigError(f"{where('backends')}: backend group {name!r} is named by no SNI route; "
                              f"add --sni-route NAME={name} (or [sni_routes] in the config file)")
    for server_name, group in config.sni_routes.items():
        if group not in groups:
            raise ConfigError(f"{where('sni_routes')}: SNI route {server_name} names group {group!r}, "
                              f"which has no backend (give one with group={group})")
    if config.sni_routes and not any(b.sni_route for b in config.binds):
        raise ConfigError(f"{where('sni_routes')}: SNI routes apply to binds with the sni-route option; "
                          f"no bind has it")
    if config.backends and "default" not in groups and any(not b.sni_route for b in config.binds):
        raise ConfigError(f"{where('backends')}: every backend is in a named group, but a bind without "
                          f"sni-route needs backends in the default group")


def _check_pools(config: Config, where: Callable[[str], str]) -> None:
    names = [pool.name for pool in config.pools]
    if config.has_default_pool:
        names.append("default")
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"{where('pools')}: pool {name!r} is defined twice"
                              + (" (the top-level backends form the pool 'default')" if name == "default" else ""))
    for pool in config.pools:
        algorithm = pool.algorithm or config.algorithm
        key = pool.hash_key if pool.hash_key is not None else config.hash_key
        if key and algorithm not in HASHING_ALGORITHMS:
            raise ConfigError(f"{where('pools')}: pool {pool.name!r}: hash key {key!r} needs a hashing "
                              f"algorithm ({', '.join(HASHING_ALGORITHMS)}); the algorithm is {algorithm!r}")
        if (pool.backends or not config.pool_config(pool).discovers_backends) and all(
                b.backup for b in pool.backends):
            raise ConfigError(f"{where('pools')}: pool {pool.name!r}: every backend is a backup")
    for index, route in enumerate(config.routes, 1):
        if route.pool not in names:
            raise ConfigError(f"{where('routes')}: route[{index}]: unknown pool {route.pool!r}; "
                              f"pools: {', '.join(names)}")
    if config.default_pool is not None and config.default_pool not in names:
        raise ConfigError(f"{where('default_pool')}: unknown pool {config.default_pool!r}; "
                          f"pools: {', '.join(names)}")


def _check_sticky(config: Config, where: Callable[[str], str]) -> None:
    specs = [(config.sticky, where("sticky"))] + [
        (pool.sticky, f"{where('pools')}: pool {pool.name!r}") for pool in config.pools]
    for spec, place in specs:
        if spec is None:
            continue
        if config.mode == "tcp" and spec.kind != "source":
            raise ConfigError(f"{place}: sticky {spec} needs mode 'http'; tcp mode sticks on source only")
        if spec.kind == "cookie" and not config.cookie_secret_file:
            raise ConfigError(f"{place}: sticky {spec} signs its cookie: give --cookie-secret-file FILE "
                              f"(at least 16 random bytes)")
    if config.cookie_secret_file:
        try:
            with open(config.cookie_secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{where('cookie_secret_file')}: cannot read {config.cookie_secret_file}: "
                              f"{exc.strerror}") from None
        if len(secret) < 16:
            raise ConfigError(f"{where('cookie_secret_file')}: the secret must be at least 16 bytes "
                              f"(got {len(secret)})")


DYNAMIC_WEIGHT_ALGORITHMS = ("roundrobin", "random", "leastconn", "leasttime", "p2c")


def _check_health(config: Config, where: Callable[[str], str], explicit: set[str]) -> None:
    """Health settings that only make sense together, globally and per backend."""
    if config.outlier_max_ejection_time < config.outlier_ejection_time:
        raise ConfigError(f"{where('outlier_max_ejection_time')}: must be >= outlier-ejection-time "
                          f"({config.outlier_max_ejection_time:g}s < {config.outlier_ejection_time:g}s)")
    for spec in config.backends:
        settings = config.health_for(spec)

        def source(name: str) -> str:
            return spec.health_sources.get(name) or (
                f"--backend {spec.address}" if name in spec.health else where(name))

        if settings.check != "http":
            for name in HTTP_CHECK_FIELDS:
                if name in spec.health or (name in explicit and "check" not in spec.health):
                    raise ConfigError(f"{source(name)}: applies to HTTP checks only; the check of "
                                      f"{spec.address} is {settings.check!r}")
        if settings.slowstart and config.algorithm not in DYNAMIC_WEIGHT_ALGORITHMS:
            raise ConfigError(f"{source('slowstart')}: slow start ramps weights, which the "
                              f"{config.algorithm!r} algorithm does not follow gradually; use one of "
                              f"{', '.join(DYNAMIC_WEIGHT_ALGORITHMS)}, or slowstart 0")


def read_token(path: str) -> str:
    """The admin bearer token: the file's content without surrounding whitespace; at least 16 characters."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise OSError(f"cannot read token file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"token file {path} must hold a token of at least 16 characters")
    return token


def open_files_limit() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE, after raising soft to hard: a relay needs every fd it may have."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


# The wait queue's share of the open files a worker has for connections: a queued client holds 1, a
# relayed connection 2, so a queue sized alone (its 1024 default under a limit of 1024) would leave no
# room for the connections it waits for.
QUEUE_FD_SHARE = 5                 # the queue takes at most 1/5 of the budget
# A default maxconn below this is worth a WARNING: the open-files limit, not the machine, is the bound.
SMALL_MAXCONN = 1000


def connection_limits(fd_limit: int, maxconn: int | None, queue_size: int) -> tuple[int, int, int]:
    """(maxconn, queue size, capacity) one worker can hold under fd_limit open files: each relayed
    connection takes 2 fds (client + backend), each queued client 1, RESERVED_FDS stay for listeners and
    the loop. The queue is sized first, capped at 1/QUEUE_FD_SHARE of the budget; the connections get the
    rest (`capacity`): maxconn is that when not given, else the smaller of the two."""
    budget = max(0, fd_limit - RESERVED_FDS)
    queue = min(queue_size, budget // QUEUE_FD_SHARE)
    capacity = max(1, (budget - queue) // 2)
    return (capacity if maxconn is None else min(maxconn, capacity)), queue, capacity
