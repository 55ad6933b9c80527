"""The `fastlb` command: flags -> Config, then run (or check, or the demo)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from fastlb import __version__
from fastlb.config import SECTIONS, SETTINGS, ConfigError, build, flag_name, load_file, merge

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
    """The flags: --config, --check-config, --version, then one per setting of the schema's table
    (fastlb/config/schema.py), in its order and sections."""
    parser = Parser(
        prog="fastlb", description="fastlb: a fast HTTP/TCP load balancer on uvloop with a compiled core.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastlb {__version__}")
    parser.add_argument("--config", metavar="FILE",
                        help="TOML config file; flags given as well override its values")
    parser.add_argument("--check-config", metavar="FILE", help="validate FILE (with any other flags) and exit")
    groups = {SECTIONS[0]: parser, **{section: parser.add_argument_group(section.title, section.description or None)
                                      for section in SECTIONS[1:]}}
    for name, setting in SETTINGS.items():
        if setting.file_only:
            continue
        groups[setting.section].add_argument(
            flag_name(name), dest=name, action="append" if setting.repeat else "store", default=None,
            type=_flag_type(setting.flag or name, setting.parse), metavar=setting.metavar,
            help=setting.help_text())
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
    merge(values, sources, vars(args))
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
