"""The values inside a Config: binds, backends, certificates, sticky sessions, pools, routes, and the
error every bad value becomes. Plain dataclasses, importing nothing of fastlb (tls.py imports
`CertificateSpec` from here, so configuration and TLS depend on this module, not on each other)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A bad flag or config value. str() is the whole message, naming the flag or file:line and field."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class CertificateSpec:
    cert: str                 # PEM: the certificate chain (and the key, when `key` is None)
    key: str | None = None
    ocsp: str | None = None   # a DER OCSP response to staple (re-read on reload); relay-terminated binds only


@dataclass
class BindSpec:
    host: str
    port: int
    accept_proxy: bool = False
    # TLS termination (fastlb/tls.py): the first certificate is the default, the others are chosen by SNI.
    ssl: bool = False
    certificates: list[CertificateSpec] = field(default_factory=list)
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
    proto: str = "h1"         # h1: HTTP/1.1 keep-alive pools; h2: HTTP/2, streams multiplexed (fastlb/http2/backend.py)
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
    check_service: str | None
    slowstart: float
