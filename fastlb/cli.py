"""The `fastlb` command: flags -> Config, then run (or check, or the demo)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from fastlb import __version__
from fastlb.config import (FIELDS, LIST_FIELDS, ConfigError, build, flag_name, load_file, parse_backend,
                           parse_bind, parse_sni_route)

EXAMPLES = """\
examples:
  fastlb --bind 0.0.0.0:8080 --backend 10.0.0.1:80 --backend 10.0.0.2:80          (HTTP, the default)
  fastlb --bind :8080 --backend a:80 --backend b:80 --algorithm ketama --hash-key cookie:session
  fastlb --bind :8080 --backend a:80 --request-header-set 'X-Env: prod' --via fastlb --max-body-size 10m
  fastlb --mode tcp --bind :5432 --backend db1:5432,weight=3 --backend db2:5432,backup --algorithm leastconn
  fastlb --bind :8080,accept-proxy --backend 10.0.0.1:80,send-proxy-v2,maxconn=500 --workers auto
  fastlb --bind :6379 --backend r1:6379 --backend r2:6379 --algorithm ketama --hash-key source
  fastlb --bind :443,ssl,cert=site.pem,key=site.key,cert=api.pem --backend 10.0.0.1:80
  fastlb --bind :443,ssl,cert=site.pem,ca=clients-ca.pem,verify=required --backend 10.0.0.1:443,ssl
  fastlb --bind :443,ssl,cert=site.pem --bind :80,redirect-https --hsts 365d --backend 10.0.0.1:80
  fastlb --mode tcp --bind :443,sni-route --sni-route api.example.com=api --backend 10.0.0.1:443
         --backend 10.0.0.2:443,group=api                 (TLS passthrough, routed by SNI)
  fastlb --bind :8080 --backend a:80 --backend b:80 --sticky cookie:SRV,indirect,httponly --cookie-secret-file /etc/fastlb/key
  fastlb --bind :8080 --backend a:80 --backend b:80 --sticky learn:JSESSIONID --store redis://10.0.0.9:6379/0
  fastlb --config /etc/fastlb.toml --workers 4          (flags override the file)
  fastlb --check-config /etc/fastlb.toml                (validate and exit)
  fastlb demo                                           (a balancer in front of 3 demo backends)
  fastlb --config lb.toml --admin 9000 --admin-token-file /etc/fastlb/token --access-log -
  fastlb ctl --admin 127.0.0.1:9000 --token-file /etc/fastlb/token backends   (see `fastlb ctl -h`)

durations accept seconds or a unit: 5, 2.5s, 500ms, 1m. maxconn and queue limits are per worker.
"""


def _flag_type(field_name: str, parser: Callable[[Any], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = field_name      # argparse names the type in some messages
    return parse


SHORT_USAGE = "usage: fastlb --bind HOST:PORT --backend HOST:PORT [OPTION...]  (fastlb --help for all)"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one usage line and the error: the full usage is 36 lines, which
    push the error itself out of sight."""

    def error(self, message: str):
        self.exit(2, f"{SHORT_USAGE}\n{self.prog}: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    from fastlb import ALGORITHMS

    parser = Parser(
        prog="fastlb", description="fastlb: a fast HTTP/TCP load balancer on uvloop with a compiled core.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument

    def field(name: str, help: str, metavar: str | None = None) -> None:
        add(flag_name(name), dest=name, type=_flag_type(name, FIELDS[name]), default=None,
            metavar=metavar, help=help)

    add("--version", action="version", version=f"fastlb {__version__}")
    add("--config", metavar="FILE", help="TOML config file; flags given as well override its values")
    add("--check-config", metavar="FILE", help="validate FILE (with any other flags) and exit")
    field("mode", "http (default: HTTP/1.1 reverse proxy) or tcp (L4 relay)", "http|tcp")
    add("--bind", dest="binds", action="append", type=_flag_type("bind", parse_bind),
        metavar="HOST:PORT[,accept-proxy][,ssl,cert=FILE[,key=FILE]...[,ca=FILE[,verify=MODE]]][,sni-route]"
                "[,redirect-https[=PORT]]",
        help="listen address (repeatable); accept-proxy expects a PROXY v1/v2 header on each connection. "
             "ssl terminates TLS (1.2/1.3, ECDHE+AEAD only): the first cert= is the default, further ones "
             "are chosen by SNI, each key= goes with the cert= before it (omit it when the cert file holds "
             "the key); ca= asks for client certificates signed by it, verify=required (default) or "
             "optional. sni-route passes TLS through, choosing the backend group by the ClientHello's SNI "
             "(tcp mode). redirect-https (http mode): a plain bind answering every request with a redirect "
             "to https://HOST[:PORT]/target")
    add("--backend", dest="backends", action="append", type=_flag_type("backend", parse_backend),
        metavar="HOST:PORT[,weight=N][,backup][,maxconn=N][,send-proxy|send-proxy-v2][,ssl[,verify=FILE|none]"
                "[,sni=NAME]][,group=NAME]",
        help="backend server (repeatable). weight 0-256 (default 1); backup: used only when no primary "
             "can take the connection; maxconn: per-backend limit; send-proxy[-v2]: PROXY header to it; "
             "ssl: TLS to it, verified against the system CAs, or verify=FILE, or verify=none (off); sni: "
             "the name sent and checked (default its host); group: the SNI route group it belongs to")
    add("--sni-route", dest="sni_routes", action="append", type=_flag_type("sni-route", parse_sni_route),
        metavar="NAME=GROUP", help="on sni-route binds, send TLS connections for NAME (or *.parent) to the "
        "backends of GROUP (repeatable); others go to the backends without a group")
    field("algorithm", f"balancing algorithm: {', '.join(ALGORITHMS)} (default roundrobin)", "NAME")
    field("hash_key", "key for hash/ketama/maglev: source (the client IP); http mode also uri, path, "
          "header:NAME, cookie:NAME, query:NAME", "KEY")
    field("bounded_load", "hash algorithms: cap a backend at this factor of the mean load (>= 1.0; "
          "0 = off)", "F")
    field("seed", "seed for the random algorithms (reproducible runs)", "N")
    field("workers", "worker processes sharing the port with SO_REUSEPORT, or auto (one per CPU); "
          "default 1, at most 4 per CPU", "N|auto")
    field("allow_many_workers", "allow more than 4 workers per CPU (default false)", "true|false")
    field("maxconn", "relayed connections per worker (default: what the open-files limit allows)", "N")
    field("queue_size", "connections that may wait for a free slot, per worker (default 1024)", "N")
    field("queue_timeout", "how long a connection may wait for a slot (default 5s)", "DURATION")
    field("connect_timeout", "backend connect timeout, and the PROXY header timeout (default 5s)",
          "DURATION")
    field("idle_timeout", "close a relayed connection idle both ways this long; 0 = never (default 5m)",
          "DURATION")
    field("relay", "tcp mode's data path: epoll (default: a C thread relays established connections "
          "without the GIL; TLS connections stay on uvloop) or uvloop (protocols on the event loop)",
          "epoll|uvloop")
    field("retries", "further backends tried after a failed connect (default 2)", "N")
    field("grace_period", "on SIGTERM, how long live connections may finish (default 10s)", "DURATION")
    field("backlog", "listen backlog (default 1024)", "N")
    field("log_level", "debug, info (default), warning or error", "LEVEL")
    http = parser.add_argument_group("http mode")

    def http_field(name: str, help: str, metavar: str) -> None:
        http.add_argument(flag_name(name), dest=name, type=_flag_type(name, FIELDS[name]), default=None,
                          metavar=metavar, help=help)

    http_field("http_request_timeout", "a request head must arrive within this (slowloris; 408); "
               "default 10s", "DURATION")
    http_field("keepalive_timeout", "close a client connection idle between requests (default 60s)",
               "DURATION")
    http_field("response_timeout", "backend silent this long while a response is due: 504 "
               "(default 30s)", "DURATION")
    http_field("tunnel_timeout", "close an upgraded (WebSocket) connection idle both ways (default 1h)",
               "DURATION")
    http_field("backend_idle_timeout", "close an idle keep-alive backend connection (default 10s)",
               "DURATION")
    http_field("backend_max_idle", "idle keep-alive connections kept per backend, per worker "
               "(default 1000)", "N")
    http_field("max_header_size", "request header bytes; more: 431 (default 16k)", "SIZE")
    http_field("max_response_header_size", "a backend's response head bytes; more: 502 and the backend "
               "connection closed (default 64k)", "SIZE")
    http_field("max_headers", "request header fields; more: 431 (default 100)", "N")
    http_field("max_uri_length", "request target bytes; more: 414 (default 8k)", "SIZE")
    http_field("max_body_size", "request body bytes; more: 413 (default 0 = no limit)", "SIZE")
    http_field("forwarded_for", "add X-Forwarded-For/-Proto/-Host (default true)", "true|false")
    http_field("h2", "serve HTTP/2 clients: ALPN h2 on TLS binds, h2c with prior knowledge on plain ones "
               "(default true; needs libnghttp2, docs/http2.md)", "true|false")
    http_field("h2_max_concurrent_streams", "HTTP/2 streams open at once per connection (default 100)", "N")
    http_field("h2_max_header_list_size", "decoded bytes of an HTTP/2 request's header list; more: 431 "
               "(default 64k)", "SIZE")
    http_field("h2_initial_window_size", "request body bytes an HTTP/2 stream may send ahead "
               "(default 64k)", "SIZE")
    http_field("h2_max_control_frames", "PING, SETTINGS, PRIORITY, RST_STREAM and empty frames an HTTP/2 "
               "connection may send at once (refilled at a tenth per second); more: GOAWAY "
               "(default 400)", "N")
    http_field("retry_on", "also re-send an idempotent request to another backend on: empty-response "
               "(default), junk-response, response-timeout, 500, 502, 503, 504, all-retryable-errors, "
               "none (comma-separated; a failed connect is always retried)", "LIST")
    http_field("via", "add 'Via: 1.1 NAME' both ways (default: no Via)", "NAME")
    http_field("default_pool", "pool for requests no [[route]] matches (config file pools)", "NAME")
    http_field("hsts", "Strict-Transport-Security max-age added to responses on TLS binds (seconds, "
               "or e.g. 365d; default 0: off; per pool in TOML)", "SECONDS")
    for name, metavar, help in (
            ("request_header_set", "'NAME: VALUE'", "set a request header (repeatable)"),
            ("request_header_delete", "NAME", "remove a request header (repeatable)"),
            ("response_header_set", "'NAME: VALUE'", "set a response header (repeatable)"),
            ("response_header_delete", "NAME", "remove a response header (repeatable)")):
        http.add_argument(flag_name(name), dest=name, action="append", default=None, metavar=metavar,
                          type=_flag_type(name, LIST_FIELDS[name]), help=help)

    sessions = parser.add_argument_group(
        "session persistence", "pin a client's session to one backend; shared between balancers through "
        "--store redis:// or memcached://")

    def sessions_field(name: str, help: str, metavar: str) -> None:
        sessions.add_argument(flag_name(name), dest=name, type=_flag_type(name, FIELDS[name]),
                              default=None, metavar=metavar, help=help)

    sessions_field("sticky", "cookie:NAME (insert a signed cookie naming the backend; options ,indirect "
                   ",nocache ,httponly ,secure ,samesite=lax|strict|none ,maxidle=DURATION "
                   ",maxlife=DURATION), prefix:NAME (prefix the application's cookie), learn:NAME or "
                   "learn:header:NAME (learn the application's session id), source (client address; "
                   "tcp mode too)", "KIND[:NAME][,OPTION...]")
    sessions_field("store", "where learned and source mappings are shared: memory (default: the "
                   "workers of this balancer), redis://HOST:PORT/DB, memcached://HOST:PORT",
                   "memory|URL")
    sessions_field("cookie_secret_file", "HMAC-SHA256 secret for sticky cookies (>= 16 bytes; the same "
                   "on every balancer that must honour the cookies)", "FILE")
    sessions_field("stick_ttl", "learned and source mappings expire this long after last use "
                   "(default 30m)", "DURATION")
    sessions_field("stick_table_size", "entries per pool in each worker's local table, least recently "
                   "used out first (default 100000)", "N")

    health = parser.add_argument_group(
        "health", "active checks, slow start and passive outlier detection; a backend may override any "
        "check setting and slowstart in its own options, e.g. --backend 10.0.0.1:80,check-port=8081,rise=3")

    def health_field(name: str, help: str, metavar: str) -> None:
        health.add_argument(flag_name(name), dest=name, type=_flag_type(name, FIELDS[name]), default=None,
                            metavar=metavar, help=help)

    health_field("check", "active check: none (default), tcp (connect) or http (a request)", "none|tcp|http")
    health_field("check_interval", "time between two checks of a backend (default 2s)", "DURATION")
    health_field("check_timeout", "a check not done within this fails (default 1s)", "DURATION")
    health_field("rise", "consecutive passed checks that bring a backend up (default 2)", "N")
    health_field("fall", "consecutive failed checks that take a backend down (default 3)", "N")
    health_field("check_jitter", "each interval varies by up to this fraction (default 0.1)", "F")
    health_field("check_port", "check this port instead of the backend's (default: its own)", "PORT")
    health_field("check_method", "http checks: request method (default GET)", "METHOD")
    health_field("check_path", "http checks: request path (default /)", "PATH")
    health_field("check_host", "http checks: Host header (default: the backend's address)", "HOST")
    health_field("check_expect", "http checks: passing status or range (default 200-399)", "STATUS[-STATUS]")
    health_field("check_body", "http checks: text the response body must contain", "TEXT")
    health_field("slowstart", "a backend coming back ramps its weight from low to full over this time "
                 "(default 0: at once)", "DURATION")
    health_field("outlier_failures", "consecutive connect failures seen by live traffic that eject a "
                 "backend (default 5; 0: no passive ejection)", "N")
    health_field("outlier_ejection_time", "first ejection lasts this; the n-th n times as long "
                 "(default 30s)", "DURATION")
    health_field("outlier_max_ejection_time", "longest ejection (default 5m)", "DURATION")
    health_field("outlier_probe_interval", "an ejected backend is probed this often (a connect, or its "
                 "http check) and returns once it answers (default 250ms; 0: it waits out its ejection)",
                 "DURATION")
    health_field("max_ejection_percent", "at most this share of a pool ejected at once, and never its "
                 "last available backend (default 50)", "PERCENT")

    admission = parser.add_argument_group(
        "admission control", "rate limits, connections per source, allow/deny lists (fastlb/admission.py); "
        "limits are shared between balancers through --store redis://")
    for name, metavar, help, repeat in (
            ("rate_limit", "KEY=RATE[,burst=N][,pool=P][,missing=source|shared|allow]",
             "http: requests per KEY (source, route, header:NAME, cookie:NAME, query:NAME) at RATE "
             "(N/s, N/m, N/h); over it: 429 with Retry-After (repeatable)", True),
            ("max_conn_per_source", "N", "open connections per client address, per worker; more: closed (tcp) or "
             "429 and closed (http); default 0: no limit", False),
            ("allow", "CIDR", "only these client addresses on the traffic binds (repeatable)", True),
            ("deny", "CIDR", "never these client addresses (repeatable; wins over --allow)", True),
            ("access_file", "FILE", "watched file of 'allow CIDR' / 'deny CIDR' lines", False),
            ("admin_allow", "CIDR", "only these addresses on the admin bind (repeatable)", True),
            ("rate_limit_table_size", "N", "keys each worker keeps (88 bytes each; default 65536)", False)):
        admission.add_argument(flag_name(name), dest=name, action="append" if repeat else "store",
                               default=None, metavar=metavar,
                               type=_flag_type(name, (LIST_FIELDS if repeat else FIELDS)[name]), help=help)

    ops = parser.add_argument_group(
        "operations", "admin API, metrics, access log and service discovery; SIGHUP reloads --config")

    def ops_field(name: str, help: str, metavar: str) -> None:
        ops.add_argument(flag_name(name), dest=name, type=_flag_type(name, FIELDS[name]), default=None,
                         metavar=metavar, help=help)

    ops_field("admin", "admin bind serving /api (token), /metrics, /stats, /healthz; a bare port means "
              "127.0.0.1 (default: off)", "[HOST:]PORT")
    ops_field("admin_token_file", "file holding the bearer token every /api/ request must send", "FILE")
    ops_field("access_log", "one line per connection to FILE, or - for stdout (default: off)", "FILE|-")
    ops_field("access_log_format", "text (default) or json", "text|json")
    ops_field("backends_file", "more backends from FILE, one per line in the --backend syntax; the file "
              "is watched and changes applied live", "FILE")
    ops_field("backends_dns", "more backends from DNS: _service._proto.NAME (SRV) or NAME:PORT (A/AAAA), "
              "re-resolved every --dns-interval", "NAME")
    ops_field("dns_interval", "DNS re-resolution interval (default 5s)", "DURATION")
    ops_field("dns_server", "DNS server for --backends-dns (default: /etc/resolv.conf's first)", "HOST:PORT")
    ops_field("consul_service", "more backends from Consul: the passing instances of this service, "
              "watched with blocking queries (a [[pool]] may name its own)", "NAME")
    ops_field("consul", "the Consul agent (default http://127.0.0.1:8500; https:// for TLS)", "[SCHEME://]HOST:PORT")
    ops_field("consul_datacenter", "Consul datacenter to ask (default: the agent's)", "DC")
    ops_field("consul_tag", "only the instances carrying this tag", "TAG")
    ops_field("consul_token_file", "file holding the Consul ACL token (sent as X-Consul-Token)", "FILE")
    ops_field("consul_ca", "CA file verifying an https:// agent (default: the system CAs)", "FILE")
    ops_field("consul_wait", "longest blocking query (default 60s)", "DURATION")
    return parser


def config_from_args(argv: list[str]):
    """Parses flags and the config file into a Config. Exits 2 with argparse's message on a bad flag;
    raises ConfigError (naming flag or file:line and field) on a bad value."""
    parser = make_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_path = args.check_config or args.config
    if args.check_config and args.config and args.check_config != args.config:
        parser.error("--config and --check-config name different files")
    if config_path:
        values, sources = load_file(config_path)
    if args.sni_routes is not None:
        args.sni_routes = dict(args.sni_routes)
    for name in (*FIELDS, *LIST_FIELDS, "binds", "backends", "sni_routes"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
            sources[name] = (flag_name(name).rstrip("s") if name in ("binds", "backends", "sni_routes")
                             else flag_name(name))
    return args, build(values, sources)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from fastlb import demo
        return demo.main(argv[1:])
    if argv[:1] == ["ctl"]:
        from fastlb import ctl
        return ctl.main(argv[1:])
    try:
        args, config = config_from_args(argv)
    except ConfigError as exc:
        print(f"fastlb: error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        primaries = sum(not b.backup for b in config.backends)
        pools = f", {len(config.pools)} pool(s), {len(config.routes)} route(s)" if config.pools else ""
        print(f"{args.check_config}: OK ({len(config.binds)} bind(s), {primaries} backend(s), "
              f"{len(config.backends) - primaries} backup(s), algorithm {config.algorithm}{pools})")
        return 0
    from fastlb import server
    # A reload (SIGHUP, `fastlb ctl reload`) re-reads the config file with the same flags over it.
    return server.run(config, lambda: config_from_args(argv)[1])


if __name__ == "__main__":
    sys.exit(main())
