"""Admission control's settings: rate-limit rules (`--rate-limit`, `[[rate_limit]]`) and CIDR lists
(`--allow`, `--deny`, `--access-file`). fastlb/admission.py enforces them; the configuration reads them
from here, so reading a config does not import the enforcement (nor, through it, discovery)."""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any

from fastlb.constants import (MISSING_ALLOW, MISSING_SHARED, MISSING_SOURCE, RATE_KEY_COOKIE, RATE_KEY_HEADER,
                              RATE_KEY_QUERY, RATE_KEY_ROUTE, RATE_KEY_SOURCE)

KINDS = {"source": RATE_KEY_SOURCE, "route": RATE_KEY_ROUTE, "header": RATE_KEY_HEADER, "cookie": RATE_KEY_COOKIE,
         "query": RATE_KEY_QUERY}
MISSING = {"source": MISSING_SOURCE, "shared": MISSING_SHARED, "allow": MISSING_ALLOW}
DEFAULT_TABLE_SIZE = 65536                    # keys per worker (88 bytes each: 5.5 MiB)


@dataclass
class RateLimitSpec:
    kind: str                  # source, route, header, cookie, query
    name: str = ""             # header / cookie / query parameter name
    rate: float = 0.0          # requests per second
    burst: int = 0
    pool: str | None = None    # applies to requests routed to this pool only (None: all)
    missing: str = "source"
    text: str = ""             # as written (messages, metrics labels, the store's key prefix)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


_RATE = re.compile(r"(\d+(?:\.\d+)?)/(\d*(?:\.\d+)?)(ms|s|m|h|d)?")
_PER = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_rate(text: str) -> tuple[float, int]:
    """'50/s', '100/m', '5/2s' -> (requests per second, the count N)."""
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"rate must be N/s, N/m, N/h or N/DURATION, e.g. 50/s (got {text!r})")
    count = float(match.group(1))
    period = (float(match.group(2)) if match.group(2) else 1.0) * _PER[match.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"rate must be above zero (got {text!r})")
    return count / period, max(1, math.ceil(count))


def parse_rate_limit(value: Any) -> RateLimitSpec:
    """'KEY=RATE[,burst=N][,pool=P][,missing=...]' or a TOML table {key, rate, burst, pool, missing}."""
    if isinstance(value, dict):
        unknown = set(value) - {"key", "rate", "burst", "pool", "missing"}
        if unknown or "key" not in value or "rate" not in value:
            raise ValueError("a [[rate_limit]] table has key and rate, optionally burst, pool, missing"
                             + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))
        text = f"{value['key']}={value['rate']}" + "".join(
            f",{name}={value[name]}" for name in ("burst", "pool", "missing") if name in value)
    elif isinstance(value, str):
        text = value
    else:
        raise ValueError(f"expected 'KEY=RATE[,burst=N][,pool=P]' (got {value!r})")
    usage = "expected KEY=RATE[,burst=N][,pool=P][,missing=source|shared|allow], e.g. header:X-Api-Key=50/s"
    key, sep, rest = text.partition("=")
    if not sep:
        raise ValueError(f"{usage} (got {text!r})")
    rate_text, *options = rest.split(",")
    kind, _, name = key.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"rate limit key must be source, route, header:NAME, cookie:NAME or query:NAME "
                         f"(got {key!r})")
    if (kind in ("header", "cookie", "query")) != bool(name) or (name and not _NAME.fullmatch(name)):
        raise ValueError(f"rate limit key {key!r}: header, cookie and query take a name, source and "
                         f"route none")
    rate, burst = parse_rate(rate_text)
    spec = RateLimitSpec(kind, name, rate, burst, text=text)
    for option in options:
        option_name, _, option_value = option.strip().partition("=")
        if option_name == "burst" and option_value.isdigit() and int(option_value) >= 1:
            spec.burst = int(option_value)
        elif option_name == "pool" and re.fullmatch(r"[A-Za-z0-9_.-]+", option_value):
            spec.pool = option_value
        elif option_name == "missing" and option_value in MISSING:
            spec.missing = option_value
        else:
            raise ValueError(f"bad rate limit option {option.strip()!r}: burst=N (>= 1), pool=NAME, "
                             f"missing=source|shared|allow")
    return spec


def parse_cidr(value: Any) -> str:
    """An IPv4 or IPv6 address or network (host bits set are refused: likely a typo)."""
    try:
        return str(ipaddress.ip_network(str(value).strip(), strict=True))
    except ValueError as exc:
        raise ValueError(f"expected an address or CIDR network such as 10.0.0.0/8 or 2001:db8::/32 ({exc})"
                         ) from None


def read_access_file(path: str) -> tuple[list[str], list[str]]:
    """`deny CIDR` / `allow CIDR` lines, # comments -> (deny, allow); ValueError names file:line."""
    deny: list[str] = []
    allow: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].split()
            if not text:
                continue
            if len(text) != 2 or text[0] not in ("deny", "allow"):
                raise ValueError(f"{path}:{number}: expected 'deny CIDR' or 'allow CIDR' (got {line.strip()!r})")
            try:
                (deny if text[0] == "deny" else allow).append(parse_cidr(text[1]))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return deny, allow
