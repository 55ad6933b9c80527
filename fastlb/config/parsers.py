"""Value parsers: each takes a raw value (a flag's text, or a TOML value) and returns the typed value, or
raises ValueError with a short description of what is expected. The loader and the flags add where the
value came from (`--workers`, `lb.toml:7: backend[2].weight`). Which parser reads which setting is in
the field table (schema.py)."""
from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from fastlb.config.files import check_readable
from fastlb.config.limits import cpu_count
from fastlb.config.specs import BackendSpec, BindSpec, CertificateSpec, StickySpec, format_address

MODES = ("tcp", "http")
RELAYS = ("uvloop", "epoll")
HASH_KEYS = ("source", "uri", "path", "header:NAME", "cookie:NAME", "query:NAME")
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_FORMATS = ("text", "json")
CHECK_KINDS = ("none", "tcp", "http", "grpc")


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
    [,sni=NAME]][,group=NAME][,proto=h1|h2]'."""
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
        elif name == "proto" and value:
            backend.proto = _option(parse_backend_proto, name, value)
        elif name.replace("-", "_") in HEALTH_FIELDS and value:
            backend.health[name.replace("-", "_")] = _option(HEALTH_FIELDS[name.replace("-", "_")],
                                                             name, value)
        else:
            raise ValueError(f"unknown backend option {option.strip()!r}; known: weight=N, maxconn=N, "
                             f"backup, send-proxy, send-proxy-v2, ssl, verify=FILE|none, sni=NAME, "
                             f"group=NAME, proto=h1|h2, and health settings such as check=tcp, check-port=N, rise=N")
    check_backend_tls(backend)
    return backend


BACKEND_PROTOCOLS = ("h1", "h2")


def parse_backend_proto(value: Any) -> str:
    """A backend's protocol: h1 (HTTP/1.1, the default) or h2 (HTTP/2: cleartext with prior knowledge, or
    ALPN h2 with the ssl option)."""
    if value not in BACKEND_PROTOCOLS:
        raise ValueError(f"expected h1 or h2 (got {value!r})")
    return value


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


def parse_pool_name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"expected a pool name of letters, digits, '_', '.', '-' (got {value!r})")
    return value


def parse_methods(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(m, str) and re.fullmatch(r"[A-Za-z]+", m) for m in items):
        raise ValueError(f"expected a method or an array of methods, e.g. [\"GET\", \"HEAD\"] (got {value!r})")
    return [m.upper() for m in items]


def parse_regex(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string (got {value!r})")
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression {value!r}: {exc}") from None
    return value


def parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string (got {value!r})")
    return value


def parse_header_condition(value: Any) -> tuple[str, str | None]:
    """'Name' (present) or 'Name: value' (equal)."""
    if isinstance(value, str) and ":" in value:
        return parse_header_line(value)
    return parse_header_name(value), None


def parse_backend_list(value: Any) -> list[BackendSpec]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an array of backends in the flag syntax (got {value!r})")
    return [parse_backend(item) for item in items]


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
    "check_service": parse_header_text,
    "slowstart": parse_duration,
}
# The check settings that only some kinds of check read, and those kinds.
CHECK_KIND_FIELDS = {"check_method": ("http",), "check_path": ("http",), "check_host": ("http", "grpc"),
                     "check_expect": ("http",), "check_body": ("http",), "check_service": ("grpc",)}


def parse_file_list(what: str) -> Callable[[Any], list[str]]:
    def parse(value: Any) -> list[str]:
        files = value if isinstance(value, list) else [value]
        return [parse_file(what)(item) for item in files]
    return parse
