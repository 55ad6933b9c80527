"""`fastlb ctl`: a small client for the admin API.

    fastlb ctl --admin 127.0.0.1:9000 --token-file TOKEN backends
    fastlb ctl ... set-weight ADDR N | drain ADDR | enable ADDR | disable ADDR
    fastlb ctl ... add ADDR [--weight N] [--backup] | remove ADDR | reload | certificates
    fastlb ctl ... admission | block CIDR|KEY [--rule N] [--seconds S] | unblock CIDR|KEY [--rule N]

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
    commands.add_parser("admission", help="rate limit rules, limited counts, top talkers, blocks")
    for name, help in (("block", "refuse a client network (CIDR) or answer a rate limit key 429"),
                       ("unblock", "lift a block")):
        command = commands.add_parser(name, help=help)
        command.add_argument("target", help="an address or CIDR network, or (with --key) a rate limit key")
        command.add_argument("--key", action="store_true", help="TARGET is a key (header value, cookie...)")
        command.add_argument("--rule", type=int, help="only under this rule (its index; default: all)")
        if name == "block":
            command.add_argument("--seconds", type=float, help="for this long (default: until unblocked)")
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


def admission_table(view: dict) -> str:
    if not view:
        return "admission control is off"
    lines = [f"{r['limited']:>10} limited  {r['rule']}" for r in view["rules"]]
    lines.append(f"connections refused: {view['denied']} by the lists, {view['too_many_connections']} over "
                 f"the per-source limit; store: {view['store'] or 'none'}")
    lines.append(f"  {'key':40} {'allowed':>9} {'limited':>9}  rule")
    for row in view["talkers"]:
        blocked = "  (blocked)" if row["blocked"] else ""
        lines.append(f"  {row['key'][:40]:40} {row['allowed']:>9} {row['limited']:>9}  {row['rule']}{blocked}")
    if view["blocked_networks"]:
        lines.append("blocked networks: " + ", ".join(view["blocked_networks"]))
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
    calls["admission"] = ("GET", "/api/admission", None)
    if args.command in ("block", "unblock"):
        body = {"key": args.target} if args.key else {"cidr": args.target}
        if args.key and args.rule is not None:
            body["rule"] = args.rule
        if getattr(args, "seconds", None):
            body["seconds"] = args.seconds
        calls[args.command] = ("POST", f"/api/admission/{args.command}", body)
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
    elif args.command == "admission":
        print(admission_table(data))
    elif args.command == "certificates":
        for c in data["certificates"]:
            print(f"{c['bind']:24} {c['days_left']:>9.1f} days  {c['file']}")
    else:
        print(data.get("result", "ok"))
    return 0
