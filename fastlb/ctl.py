"""`fastlb ctl`: a small client for the admin API.

    fastlb ctl --admin 127.0.0.1:9000 --token-file TOKEN backends
    fastlb ctl ... set-weight ADDR N | drain ADDR | enable ADDR | disable ADDR
    fastlb ctl ... add ADDR [--weight N] [--backup] | remove ADDR | reload | certificates

ADDR is HOST:PORT in the top-level pool, or POOL/HOST:PORT in a [[pool]] (e.g. `drain api/10.0.0.1:80`).

Exit status: 0 done, 1 the API refused (its message on stderr), 2 usage or connection error.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse

from fastlb.config import parse_admin, read_token


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlb ctl", description="Talk to a running fastlb's admin API.")
    parser.add_argument("--admin", default="127.0.0.1:9000", help="admin address (default 127.0.0.1:9000)")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("backends", help="list pools and backends")
    weight = commands.add_parser("set-weight", help="set a backend's weight")
    weight.add_argument("address")
    weight.add_argument("weight", type=int)
    for name, help in (("drain", "no new connections; live ones finish"), ("enable", "back in service"),
                       ("disable", "maintenance: down whatever the checks say"),
                       ("remove", "remove a backend")):
        commands.add_parser(name, help=help).add_argument("address")
    add = commands.add_parser("add", help="add a backend")
    add.add_argument("address", help="[POOL/]HOST:PORT, options as in --backend")
    add.add_argument("--weight", type=int)
    add.add_argument("--backup", action="store_true")
    commands.add_parser("reload", help="re-read the config file and reload the TLS certificates (as SIGHUP)")
    commands.add_parser("certificates", help="the TLS certificates served and their days left")
    return parser


def request(admin: str, token: str | None, method: str, path: str, body: dict | None = None
            ) -> tuple[int, dict]:
    host, port = parse_admin(admin)
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def _table(view: dict) -> str:
    lines = []
    for pool in view["pools"]:
        lines.append(f"pool {pool['name']} ({pool['algorithm']}): {pool['active']} active, "
                     f"{pool['queued']} queued, {pool['refused']} refused; {view['workers']} worker(s)")
        lines.append(f"  {'backend':24} {'state':10} {'operator':8} {'weight':>6} {'inflight':>8} "
                     f"{'conns':>8} {'errors':>6} {'p99 ms':>8}")
        for b in pool["backends"]:
            p99 = b["connect_time"]["p99"]
            lines.append(f"  {b['address']:24} {b['state']:10} {b['admin_state']:8} {b['weight']:>6} "
                         f"{b['inflight']:>8} {b['connections']:>8} {b['connect_errors']:>6} "
                         f"{'-' if p99 is None else f'{p99 * 1000:.2f}':>8}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    try:
        token = read_token(args.token_file) if args.token_file else None
    except (OSError, ValueError) as exc:
        print(f"fastlb ctl: {exc}", file=sys.stderr)
        return 2
    quote = lambda address: urllib.parse.quote(address, safe="")   # noqa: E731  [v6]:port in a path
    calls = {
        "backends": ("GET", "/api/backends", None),
        "reload": ("POST", "/api/reload", None),
        "certificates": ("GET", "/api/certificates", None),
        "remove": ("DELETE", f"/api/backends/{quote(getattr(args, 'address', ''))}", None),
        "set-weight": ("POST", f"/api/backends/{quote(getattr(args, 'address', ''))}/weight",
                       {"weight": getattr(args, "weight", None)}),
        "add": ("POST", "/api/backends", {"address": getattr(args, "address", None),
                                          "weight": getattr(args, "weight", None),
                                          "backup": getattr(args, "backup", False)}),
    }
    for state in ("drain", "enable", "disable"):
        calls[state] = ("POST", f"/api/backends/{quote(getattr(args, 'address', ''))}/state", {"state": state})
    method, path, body = calls[args.command]
    try:
        status, data = request(args.admin, token, method, path, body)
    except (OSError, ValueError) as exc:
        print(f"fastlb ctl: cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
        return 2
    if status >= 300:
        print(f"fastlb ctl: HTTP {status}: {data.get('error', data)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=1))
    elif args.command == "backends":
        print(_table(data))
    elif args.command == "certificates":
        for c in data["certificates"]:
            print(f"{c['bind']:24} {c['days_left']:>9.1f} days  {c['file']}")
    else:
        print(data.get("result", "ok"))
    return 0
