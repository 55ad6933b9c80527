"""The schema: `Config`, whose fields are the one table of settings. Each field declares, in one place, its
type, its default, the parser that reads it (a flag's text or a TOML value, parsers.py), the flag's
metavar and help, and the section it belongs to. The flags (cli.py), the TOML loader (loader.py) and the
reference (docs.py -> docs/configuration.md) are all read from it.

The flag of a field is `--` + its name with dashes, the TOML key its name (`connect_timeout`,
`--connect-timeout`), unless the field says otherwise (`binds`: `--bind` and `[[bind]]`)."""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

from fastlb.config.admission import DEFAULT_TABLE_SIZE, parse_cidr, parse_rate_limit
from fastlb.config.parsers import (ACCESS_LOG_FORMATS, HEALTH_FIELDS, LOG_LEVELS, MODES, RELAYS, RETRY_DEFAULT,
                                   parse_address, parse_admin, parse_algorithm, parse_backend,
                                   parse_backend_list, parse_backend_verify, parse_bind, parse_bool,
                                   parse_choice, parse_consul_address, parse_consul_name, parse_dns_name,
                                   parse_duration, parse_file, parse_file_list, parse_float, parse_group,
                                   parse_hash_key, parse_header_condition, parse_header_line,
                                   parse_header_name, parse_hsts, parse_int, parse_methods, parse_path,
                                   parse_percent, parse_pool_name, parse_positive_duration, parse_redirect_port,
                                   parse_regex, parse_retry_on, parse_send_proxy, parse_server_name,
                                   parse_backend_proto,
                                   parse_size, parse_sni_route, parse_sticky, parse_store, parse_text,
                                   parse_verify, parse_via, parse_weight, parse_window_size, parse_workers)
from fastlb.config.specs import BackendSpec, BindSpec, HealthSettings, PoolSpec, RouteSpec, StickySpec

SETTING = "fastlb.setting"   # the key of a field's Setting in its dataclass metadata


@dataclass(frozen=True)
class Setting:
    """How one Config field is given: parsed by `parse` (one item, for a repeatable one), shown as
    `metavar` with `help` under `section`."""
    section: "Section"
    parse: Callable[[Any], Any] | None     # None: a shape of its own ([[pool]], [[route]]: loader.py)
    help: str
    metavar: str
    repeat: bool = False       # a flag given many times, an array in the file
    flag: str | None = None    # the flag's name (without --) when not the field's
    toml: str | None = None    # the TOML key when not the field's
    file_only: bool = False    # no flag ([[pool]], [[route]])
    toml_form: str = ""        # how the file writes it, when not `key = value` (the reference says so)
    pool: bool = False         # a [[pool]] may set it for itself (POOL_SETTING_FIELDS)

    def help_text(self) -> str:
        """The help as --help and the reference show it: `{algorithms}` names the core's algorithms."""
        from fastlb import ALGORITHMS      # the core (compiled, or its twin), loaded when first asked
        return self.help.format(algorithms=", ".join(ALGORITHMS))


@dataclass(frozen=True)
class Section:
    """A group of settings: a group in --help, a heading in the reference."""
    title: str
    description: str = ""
    heading: str = ""          # the reference's heading, when not the title

    def __call__(self, default: Any = MISSING, parse: Callable[[Any], Any] | None = None, help: str = "",
                 metavar: str = "", *, factory: Callable[[], Any] | None = None, **options: Any) -> Any:
        """A Config field: its default (or default factory) and its Setting."""
        setting = Setting(self, parse, help, metavar, **options)
        if factory is not None:
            return field(default_factory=factory, metadata={SETTING: setting})
        return field(default=default, metadata={SETTING: setting})


GENERAL = Section("general", heading="General")
HTTP = Section("http mode", heading="HTTP mode")
SESSIONS = Section("session persistence", "pin a client's session to one backend; shared between balancers "
                   "through --store redis:// or memcached://")
HEALTH = Section("health", "active checks, slow start and passive outlier detection; a backend may override "
                 "any check setting and slowstart in its own options, e.g. --backend 10.0.0.1:80,"
                 "check-port=8081,rise=3")
ADMISSION = Section("admission control", "rate limits, connections per source, allow/deny lists "
                    "(fastlb/admission.py); limits are shared between balancers through --store redis://")
OPERATIONS = Section("operations", "admin API, metrics, access log and service discovery; SIGHUP reloads "
                     "--config")
SECTIONS = (GENERAL, HTTP, SESSIONS, HEALTH, ADMISSION, OPERATIONS)


@dataclass
class Config:
    # ---- general ----
    mode: str = GENERAL("http", parse_choice("mode", MODES),
                        "http (default: HTTP/1.1 reverse proxy) or tcp (L4 relay)", "http|tcp")
    binds: list[BindSpec] = GENERAL(
        parse=parse_bind, repeat=True, flag="bind", toml="bind", factory=list,
        toml_form="`[[bind]]` tables (keys below), or an array of strings in the flag's syntax",
        metavar="HOST:PORT[,accept-proxy][,ssl,cert=FILE[,key=FILE]...[,ca=FILE[,verify=MODE]]][,sni-route]"
                "[,redirect-https[=PORT]]",
        help="listen address (repeatable); accept-proxy expects a PROXY v1/v2 header on each connection. "
             "ssl terminates TLS (1.2/1.3, ECDHE+AEAD only): the first cert= is the default, further ones "
             "are chosen by SNI, each key= goes with the cert= before it (omit it when the cert file holds "
             "the key); ca= asks for client certificates signed by it, verify=required (default) or "
             "optional. sni-route passes TLS through, choosing the backend group by the ClientHello's SNI "
             "(tcp mode). redirect-https (http mode): a plain bind answering every request with a redirect "
             "to https://HOST[:PORT]/target")
    backends: list[BackendSpec] = GENERAL(
        parse=parse_backend, repeat=True, flag="backend", toml="backend", factory=list,
        toml_form="`[[backend]]` tables (keys below), or an array of strings in the flag's syntax",
        metavar="HOST:PORT[,weight=N][,backup][,maxconn=N][,send-proxy|send-proxy-v2][,ssl[,verify=FILE|none]"
                "[,sni=NAME]][,group=NAME]",
        help="backend server (repeatable). weight 0-256 (default 1); backup: used only when no primary "
             "can take the connection; maxconn: per-backend limit; send-proxy[-v2]: PROXY header to it; "
             "ssl: TLS to it, verified against the system CAs, or verify=FILE, or verify=none (off); sni: "
             "the name sent and checked (default its host); group: the SNI route group it belongs to")
    # server name or *.parent -> backend group; in the file the table [sni_routes]
    sni_routes: dict[str, str] = GENERAL(
        parse=parse_sni_route, repeat=True, flag="sni_route", factory=dict, metavar="NAME=GROUP",
        toml_form='the table `[sni_routes]`: `"NAME" = "GROUP"` lines',
        help="on sni-route binds, send TLS connections for NAME (or *.parent) to the backends of GROUP "
             "(repeatable); others go to the backends without a group")
    algorithm: str = GENERAL("roundrobin", parse_algorithm,
                             "balancing algorithm: {algorithms} (default roundrobin)", "NAME")
    hash_key: str | None = GENERAL(None, parse_hash_key, "key for hash/ketama/maglev: source (the client IP); "
                                   "http mode also uri, path, header:NAME, cookie:NAME, query:NAME", "KEY")
    bounded_load: float = GENERAL(0.0, parse_float(0.0), "hash algorithms: cap a backend at this factor of "
                                  "the mean load (>= 1.0; 0 = off)", "F")
    seed: int | None = GENERAL(None, parse_int(0), "seed for the random algorithms (reproducible runs)", "N")
    workers: int = GENERAL(1, parse_workers, "worker processes sharing the port with SO_REUSEPORT, or auto "
                           "(one per CPU); default 1, at most 4 per CPU", "N|auto")
    # more than MAX_WORKERS_PER_CPU per CPU: only when asked for
    allow_many_workers: bool = GENERAL(False, parse_bool, "allow more than 4 workers per CPU (default false)",
                                       "true|false")
    maxconn: int | None = GENERAL(None, parse_int(1), "relayed connections per worker (default: what the "
                                  "open-files limit allows)", "N")
    queue_size: int = GENERAL(1024, parse_int(0), "connections that may wait for a free slot, per worker "
                              "(default 1024)", "N")
    queue_timeout: float = GENERAL(5.0, parse_positive_duration, "how long a connection may wait for a slot "
                                   "(default 5s)", "DURATION")
    connect_timeout: float = GENERAL(5.0, parse_positive_duration, "backend connect timeout, and the PROXY "
                                     "header timeout (default 5s)", "DURATION")
    idle_timeout: float = GENERAL(300.0, parse_duration, "close a relayed connection idle both ways this long; "
                                  "0 = never (default 5m)", "DURATION")
    relay: str = GENERAL("epoll", parse_choice("relay", RELAYS), "tcp mode's data path: epoll (default: a C "
                         "thread relays established connections without the GIL; TLS connections stay on "
                         "uvloop) or uvloop (protocols on the event loop)", "epoll|uvloop")
    retries: int = GENERAL(2, parse_int(0), "further backends tried after a failed connect (default 2)", "N")
    grace_period: float = GENERAL(10.0, parse_duration, "on SIGTERM, how long live connections may finish "
                                  "(default 10s)", "DURATION")
    backlog: int = GENERAL(1024, parse_int(1), "listen backlog (default 1024)", "N")
    log_level: str = GENERAL("info", parse_choice("log level", LOG_LEVELS),
                             "debug, info (default), warning or error", "LEVEL")

    # ---- http mode ----
    http_request_timeout: float = HTTP(10.0, parse_positive_duration, "a request head must arrive within "
                                       "this (slowloris; 408); default 10s", "DURATION")
    keepalive_timeout: float = HTTP(60.0, parse_positive_duration, "close a client connection idle between "
                                    "requests (default 60s)", "DURATION")
    response_timeout: float = HTTP(30.0, parse_positive_duration, "backend silent this long while a response "
                                   "is due: 504 (default 30s)", "DURATION")
    tunnel_timeout: float = HTTP(3600.0, parse_positive_duration, "close an upgraded (WebSocket) connection "
                                 "idle both ways (default 1h)", "DURATION")
    backend_idle_timeout: float = HTTP(10.0, parse_positive_duration, "close an idle keep-alive backend "
                                       "connection (default 10s)", "DURATION")
    backend_max_idle: int = HTTP(1000, parse_int(0), "idle keep-alive connections kept per backend, per "
                                 "worker (default 1000)", "N")
    max_header_size: int = HTTP(16384, parse_size, "request header bytes; more: 431 (default 16k)", "SIZE")
    max_response_header_size: int = HTTP(65536, parse_size, "a backend's response head bytes; more: 502 and "
                                         "the backend connection closed (default 64k)", "SIZE")
    max_headers: int = HTTP(100, parse_int(1), "request header fields; more: 431 (default 100)", "N")
    max_uri_length: int = HTTP(8192, parse_size, "request target bytes; more: 414 (default 8k)", "SIZE")
    max_body_size: int = HTTP(0, parse_size, "request body bytes; more: 413 (default 0 = no limit)", "SIZE")
    forwarded_for: bool = HTTP(True, parse_bool, "add X-Forwarded-For/-Proto/-Host (default true)",
                               "true|false")
    # HTTP/2 clients (fastlb/http2/, docs/http2.md): h2 by ALPN on TLS binds, h2c with prior knowledge.
    h2: bool = HTTP(True, parse_bool, "serve HTTP/2 clients: ALPN h2 on TLS binds, h2c with prior knowledge on "
                    "plain ones (default true; needs libnghttp2, docs/http2.md)", "true|false")
    h2_max_concurrent_streams: int = HTTP(100, parse_int(1), "HTTP/2 streams open at once per connection "
                                          "(default 100)", "N")
    h2_max_header_list_size: int = HTTP(65536, parse_size, "decoded bytes of an HTTP/2 request's header list; "
                                        "more: 431 (default 64k)", "SIZE")
    h2_initial_window_size: int = HTTP(65536, parse_window_size, "request body bytes an HTTP/2 stream may send "
                                       "ahead (default 64k)", "SIZE")
    h2_max_control_frames: int = HTTP(400, parse_int(1), "PING, SETTINGS, PRIORITY, RST_STREAM and empty frames "
                                      "an HTTP/2 connection may send at once (refilled at a tenth per second); "
                                      "more: GOAWAY (default 400)", "N")
    # Only ever re-sent: idempotent requests we still hold in full (parse_retry_on says when).
    retry_on: frozenset = HTTP(RETRY_DEFAULT, parse_retry_on, "also re-send an idempotent request to another "
                               "backend on: empty-response (default), junk-response, response-timeout, 500, "
                               "502, 503, 504, all-retryable-errors, none (comma-separated; a failed connect "
                               "is always retried)", "LIST")
    via: str = HTTP("", parse_via, "add 'Via: 1.1 NAME' both ways (default: no Via)", "NAME")
    default_pool: str | None = HTTP(None, parse_pool_name, "pool for requests no [[route]] matches (config "
                                    "file pools)", "NAME")
    hsts: int = HTTP(0, parse_hsts, "Strict-Transport-Security max-age added to responses on TLS binds "
                     "(seconds, or e.g. 365d; default 0: off; per pool in TOML)", "SECONDS")
    request_header_set: list[tuple[str, str]] = HTTP(parse=parse_header_line, repeat=True, factory=list,
                                                     help="set a request header (repeatable)",
                                                     metavar="'NAME: VALUE'")
    request_header_delete: list[str] = HTTP(parse=parse_header_name, repeat=True, factory=list,
                                            help="remove a request header (repeatable)", metavar="NAME")
    response_header_set: list[tuple[str, str]] = HTTP(parse=parse_header_line, repeat=True, factory=list,
                                                      help="set a response header (repeatable)",
                                                      metavar="'NAME: VALUE'")
    response_header_delete: list[str] = HTTP(parse=parse_header_name, repeat=True, factory=list,
                                             help="remove a response header (repeatable)", metavar="NAME")
    pools: list[PoolSpec] = HTTP(parse=None, toml="pool", file_only=True, factory=list, metavar="NAME",
                                 toml_form="`[[pool]]` tables (keys below)", help="named backend pools")
    routes: list[RouteSpec] = HTTP(parse=None, toml="route", file_only=True, factory=list, metavar="CONDITIONS",
                                   toml_form="`[[route]]` tables (keys below)",
                                   help="routing rules: the first whose conditions all match names the pool")

    # ---- session persistence ----
    sticky: StickySpec | None = SESSIONS(
        None, parse_sticky, "cookie:NAME (insert a signed cookie naming the backend; options ,indirect "
        ",nocache ,httponly ,secure ,samesite=lax|strict|none ,maxidle=DURATION ,maxlife=DURATION), "
        "prefix:NAME (prefix the application's cookie), learn:NAME or learn:header:NAME (learn the "
        "application's session id), source (client address; tcp mode too)", "KIND[:NAME][,OPTION...]")
    store: str = SESSIONS("memory", parse_store, "where learned and source mappings are shared: memory "
                          "(default: the workers of this balancer), redis://HOST:PORT/DB, memcached://HOST:PORT",
                          "memory|URL")
    cookie_secret_file: str | None = SESSIONS(None, parse_path, "HMAC-SHA256 secret for sticky cookies (>= 16 "
                                              "bytes; the same on every balancer that must honour the "
                                              "cookies)", "FILE")
    stick_ttl: float = SESSIONS(1800.0, parse_positive_duration, "learned and source mappings expire this long "
                                "after last use (default 30m)", "DURATION")
    stick_table_size: int = SESSIONS(100000, parse_int(1), "entries per pool in each worker's local table, "
                                     "least recently used out first (default 100000)", "N")

    # ---- health: active checks (defaults as HAProxy's inter 2s, rise 2, fall 3), each of which a backend
    # may set for itself (HEALTH_FIELDS) ...
    check: str = HEALTH("none", HEALTH_FIELDS["check"], "active check: none (default), tcp (connect), http "
                        "(a request) or grpc (grpc.health.v1.Health/Check over HTTP/2, TLS for an ssl backend; SERVING)", "none|tcp|http|grpc",
                        pool=True)
    check_interval: float = HEALTH(2.0, HEALTH_FIELDS["check_interval"], "time between two checks of a "
                                   "backend (default 2s)", "DURATION", pool=True)
    check_timeout: float = HEALTH(1.0, HEALTH_FIELDS["check_timeout"], "a check not done within this fails "
                                  "(default 1s)", "DURATION", pool=True)
    rise: int = HEALTH(2, HEALTH_FIELDS["rise"], "consecutive passed checks that bring a backend up "
                       "(default 2)", "N", pool=True)
    fall: int = HEALTH(3, HEALTH_FIELDS["fall"], "consecutive failed checks that take a backend down "
                       "(default 3)", "N", pool=True)
    check_jitter: float = HEALTH(0.1, HEALTH_FIELDS["check_jitter"], "each interval varies by up to this "
                                 "fraction (default 0.1)", "F", pool=True)
    check_port: int = HEALTH(0, HEALTH_FIELDS["check_port"], "check this port instead of the backend's "
                             "(default: its own)", "PORT", pool=True)
    check_method: str = HEALTH("GET", HEALTH_FIELDS["check_method"], "http checks: request method (default "
                               "GET)", "METHOD", pool=True)
    check_path: str = HEALTH("/", HEALTH_FIELDS["check_path"], "http checks: request path (default /)", "PATH",
                             pool=True)
    check_host: str | None = HEALTH(None, HEALTH_FIELDS["check_host"], "http checks: Host header; grpc checks: "
                                    ":authority (default: the backend's address)", "HOST", pool=True)
    check_expect: tuple[int, int] = HEALTH((200, 399), HEALTH_FIELDS["check_expect"], "http checks: passing "
                                           "status or range (default 200-399)", "STATUS[-STATUS]", pool=True)
    check_body: str | None = HEALTH(None, HEALTH_FIELDS["check_body"], "http checks: text the response body "
                                    "must contain", "TEXT", pool=True)
    check_service: str | None = HEALTH(None, HEALTH_FIELDS["check_service"], "grpc checks: the service "
                                       "asked about (default: none, the whole server)", "NAME", pool=True)
    slowstart: float = HEALTH(0.0, HEALTH_FIELDS["slowstart"], "a backend coming back ramps its weight from "
                              "low to full over this time (default 0: at once)", "DURATION", pool=True)
    # ... and passive outlier detection (Envoy's defaults, but 50 % ejectable, not 10 %: with 3 backends
    # 10 % would mean none).
    outlier_failures: int = HEALTH(5, parse_int(0), "consecutive connect failures seen by live traffic that "
                                   "eject a backend (default 5; 0: no passive ejection)", "N", pool=True)
    outlier_ejection_time: float = HEALTH(30.0, parse_positive_duration, "first ejection lasts this; the n-th "
                                          "n times as long (default 30s)", "DURATION", pool=True)
    outlier_max_ejection_time: float = HEALTH(300.0, parse_positive_duration, "longest ejection (default 5m)",
                                              "DURATION", pool=True)
    outlier_probe_interval: float = HEALTH(0.25, parse_duration, "an ejected backend is probed this often (a "
                                           "connect, or its http check) and returns once it answers (default "
                                           "250ms; 0: it waits out its ejection)", "DURATION", pool=True)
    max_ejection_percent: int = HEALTH(50, parse_percent, "at most this share of a pool ejected at once, and "
                                       "never its last available backend (default 50)", "PERCENT", pool=True)

    # ---- admission control ----
    rate_limit: list = ADMISSION(parse=parse_rate_limit, repeat=True, factory=list,   # admission.RateLimitSpec
                                 toml_form="`rate_limit` (an array of strings, or `[[rate_limit]]` tables of "
                                           "key, rate, burst, pool, missing)",
                                 metavar="KEY=RATE[,burst=N][,pool=P][,missing=source|shared|allow]",
                                 help="http: requests per KEY (source, route, header:NAME, cookie:NAME, "
                                      "query:NAME) at RATE (N/s, N/m, N/h); over it: 429 with Retry-After "
                                      "(repeatable)")
    max_conn_per_source: int = ADMISSION(0, parse_int(0), "open connections per client address, per worker; "
                                         "more: closed (tcp) or 429 and closed (http); default 0: no limit",
                                         "N")
    allow: list[str] = ADMISSION(parse=parse_cidr, repeat=True, factory=list, metavar="CIDR",
                                 help="only these client addresses on the traffic binds (repeatable)")
    deny: list[str] = ADMISSION(parse=parse_cidr, repeat=True, factory=list, metavar="CIDR",
                                help="never these client addresses (repeatable; wins over --allow)")
    access_file: str | None = ADMISSION(None, parse_path, "watched file of 'allow CIDR' / 'deny CIDR' lines",
                                        "FILE")
    admin_allow: list[str] = ADMISSION(parse=parse_cidr, repeat=True, factory=list, metavar="CIDR",
                                       help="only these addresses on the admin bind (repeatable)")
    rate_limit_table_size: int = ADMISSION(DEFAULT_TABLE_SIZE, parse_int(64), "keys each worker keeps (88 "
                                           "bytes each; default 65536)", "N")

    # ---- operations: admin bind, access log, service discovery ----
    admin: tuple[str, int] | None = OPERATIONS(None, parse_admin, "admin bind serving /api (token), /metrics, "
                                               "/stats, /healthz; a bare port means 127.0.0.1 (default: off)",
                                               "[HOST:]PORT")
    admin_token_file: str | None = OPERATIONS(None, parse_path, "file holding the bearer token every /api/ "
                                              "request must send", "FILE")
    access_log: str | None = OPERATIONS(None, parse_path, "one line per connection to FILE, or - for stdout "
                                        "(default: off)", "FILE|-")
    access_log_format: str = OPERATIONS("text", parse_choice("access log format", ACCESS_LOG_FORMATS),
                                        "text (default) or json", "text|json")
    backends_file: str | None = OPERATIONS(None, parse_path, "more backends from FILE, one per line in the "
                                           "--backend syntax; the file is watched and changes applied live",
                                           "FILE", pool=True)
    backends_dns: str | None = OPERATIONS(None, parse_dns_name, "more backends from DNS: _service._proto.NAME "
                                          "(SRV) or NAME:PORT (A/AAAA), re-resolved every --dns-interval",
                                          "NAME", pool=True)
    dns_interval: float = OPERATIONS(5.0, parse_positive_duration, "DNS re-resolution interval (default 5s)",
                                     "DURATION", pool=True)
    dns_server: tuple[str, int] | None = OPERATIONS(None, parse_address, "DNS server for --backends-dns "
                                                    "(default: /etc/resolv.conf's first)", "HOST:PORT",
                                                    pool=True)
    consul_service: str | None = OPERATIONS(None, parse_consul_name, "more backends from Consul: the passing "
                                            "instances of this service, watched with blocking queries (a "
                                            "[[pool]] may name its own)", "NAME", pool=True)
    consul: str = OPERATIONS("http://127.0.0.1:8500", parse_consul_address, "the Consul agent (default "
                             "http://127.0.0.1:8500; https:// for TLS)", "[SCHEME://]HOST:PORT", pool=True)
    consul_datacenter: str | None = OPERATIONS(None, parse_consul_name, "Consul datacenter to ask (default: "
                                               "the agent's)", "DC", pool=True)
    consul_tag: str | None = OPERATIONS(None, parse_consul_name, "only the instances carrying this tag", "TAG",
                                        pool=True)
    consul_token_file: str | None = OPERATIONS(None, parse_path, "file holding the Consul ACL token (sent as "
                                               "X-Consul-Token)", "FILE", pool=True)
    consul_ca: str | None = OPERATIONS(None, parse_file("CA"), "CA file verifying an https:// agent (default: "
                                       "the system CAs)", "FILE", pool=True)
    consul_wait: float = OPERATIONS(60.0, parse_positive_duration, "longest blocking query (default 60s)",
                                    "DURATION", pool=True)

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

    def health_for(self, spec: BackendSpec) -> HealthSettings:
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


# ---- tables derived from Config's fields ----------------------------------------------------------

SETTINGS: dict[str, Setting] = {f.name: f.metadata[SETTING] for f in dataclasses.fields(Config)}


def flag_name(field_name: str) -> str:
    """The flag of a field (`--connect-timeout`); a list field's flag is singular (`--bind`)."""
    setting = SETTINGS.get(field_name)
    return "--" + ((setting and setting.flag) or field_name).replace("_", "-")


def toml_key(field_name: str) -> str:
    return SETTINGS[field_name].toml or field_name


# Fields whose values are read by their parser as they are: config name -> parser. Flags and the file share
# them. FIELDS holds one value each, LIST_FIELDS one item of a repeatable one (flags append, the file gives
# an array). binds, backends, sni_routes, pools and routes have shapes of their own (loader.py).
SHAPED_FIELDS = ("binds", "backends", "sni_routes", "pools", "routes")
FIELDS: dict[str, Callable[[Any], Any]] = {
    name: s.parse for name, s in SETTINGS.items() if not s.repeat and name not in SHAPED_FIELDS}
LIST_FIELDS: dict[str, Callable[[Any], Any]] = {
    name: s.parse for name, s in SETTINGS.items() if s.repeat and name not in SHAPED_FIELDS}

# Discovery sources feed the pool they are set in; the settings after them say how to reach the source.
DISCOVERY_SOURCES = ("backends_file", "backends_dns", "consul_service")
POOL_SETTING_FIELDS = tuple(name for name, s in SETTINGS.items() if s.pool)


# ---- the keys of [[bind]], [[backend]], [[pool]] and [[route]] tables ---------------------------------

@dataclass(frozen=True)
class TableKey:
    parse: Callable[[Any], Any]
    help: str


BIND_KEYS: dict[str, TableKey] = {
    "address": TableKey(parse_address, "HOST:PORT, [IPv6]:PORT or :PORT (required)"),
    "accept_proxy": TableKey(parse_bool, "expect a PROXY v1/v2 header on each connection"),
    "ssl": TableKey(parse_bool, "terminate TLS (1.2/1.3, ECDHE+AEAD only)"),
    "cert": TableKey(parse_file_list("certificate"), "a PEM file, or an array of files: the first is the "
                     "default, the others are chosen by SNI"),
    "key": TableKey(parse_file_list("key"), "the same number of files, when keys are separate"),
    "ocsp": TableKey(parse_file_list("OCSP response"), "the same number of files: a DER OCSP response to "
                     "staple per certificate (binds the relay terminates)"),
    "ca": TableKey(parse_file("CA"), "ask for client certificates signed by this CA (mTLS)"),
    "verify": TableKey(parse_verify, "\"required\" (the default with ca) or \"optional\""),
    "sni_route": TableKey(parse_bool, "pass TLS through, routed by the ClientHello's server name "
                          "([sni_routes]; mode tcp)"),
    "redirect_https": TableKey(lambda value: parse_redirect_port(value) if value is not False else None,
                               "true or a port: a plain bind answering 301/308 to https://HOST[:PORT]/target "
                               "(mode http)"),
}
BACKEND_KEYS: dict[str, TableKey] = {
    "address": TableKey(parse_address, "HOST:PORT or [IPv6]:PORT (required)"),
    "weight": TableKey(parse_weight, "0-256 (1)"),
    "maxconn": TableKey(parse_int(0), "connections to it at once (0: no limit)"),
    "backup": TableKey(parse_bool, "used only when no primary can take the connection"),
    "send_proxy": TableKey(parse_send_proxy, "false, \"v1\" or \"v2\": a PROXY header to it"),
    "ssl": TableKey(parse_bool, "TLS to it, verified against the system CAs ..."),
    "verify": TableKey(parse_backend_verify, "... or this CA file, or \"none\" (off: explicit only)"),
    "sni": TableKey(parse_server_name, "the name sent and verified (default: the address's host)"),
    "group": TableKey(parse_group, "the backend group [sni_routes] names (mode tcp)"),
    "proto": TableKey(parse_backend_proto, "\"h1\" (HTTP/1.1, the default) or \"h2\": HTTP/2 to it, h2c "
                      "with prior knowledge or ALPN h2 with ssl (mode http; docs/http2.md)"),
    **{name: TableKey(parser, "its own value of the top-level setting (in the flag syntax too: "
                              "`10.0.0.1:80,check-port=8081,rise=3`)") for name, parser in HEALTH_FIELDS.items()},
}
POOL_KEYS: dict[str, TableKey] = {
    "name": TableKey(parse_pool_name, "the name routes use (required); the top-level backends are 'default'"),
    "backend": TableKey(parse_backend_list, "an array of backends in the flag syntax (required unless a "
                        "discovery source is given)"),
    "algorithm": TableKey(parse_algorithm, "its own algorithm"),
    "hash_key": TableKey(parse_hash_key, "its own hash key"),
    "max_body_size": TableKey(parse_size, "its own request body limit"),
    "hsts": TableKey(parse_hsts, "its own HSTS max-age"),
    "sticky": TableKey(parse_sticky, "its own session persistence"),
    **{name: TableKey(FIELDS[name], "its own discovery source (never inherited from the top level)"
                      if name in DISCOVERY_SOURCES else "its own value of the top-level setting")
       for name in POOL_SETTING_FIELDS},
}
ROUTE_KEYS: dict[str, TableKey] = {
    "pool": TableKey(parse_pool_name, "the pool a matching request goes to (required)"),
    "host": TableKey(parse_text, "the Host header equals this (case-insensitive, port ignored)"),
    "path_prefix": TableKey(parse_text, "the path starts with this"),
    "path_regex": TableKey(parse_regex, "this regular expression matches in the path (re.search)"),
    "method": TableKey(parse_methods, "a method or an array of methods"),
    "header": TableKey(parse_header_condition, "'Name' (present) or 'Name: value' (equal)"),
}
BIND_TABLE_FIELDS = {name: key.parse for name, key in BIND_KEYS.items()}
BACKEND_TABLE_FIELDS = {name: key.parse for name, key in BACKEND_KEYS.items()}
POOL_TABLE_FIELDS = {name: key.parse for name, key in POOL_KEYS.items()}
ROUTE_TABLE_FIELDS = {name: key.parse for name, key in ROUTE_KEYS.items()}
