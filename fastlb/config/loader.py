"""The TOML file, and flags over it: `load_file` reads and checks a file into values and where each came
from ('lb.toml:7 (workers)'); `merge` lays the flags' values over them; validate.build makes the Config.
Every error names the file, line and field: `lb.toml:22: backend[1].weight: expected ...`."""
from __future__ import annotations

import difflib
import re
import tomllib
from typing import Any, Callable

from fastlb.config.parsers import check_backend_tls, check_bind_tls, parse_backend, parse_bind, parse_sni_routes
from fastlb.config.schema import (BACKEND_TABLE_FIELDS, BIND_TABLE_FIELDS, DISCOVERY_SOURCES, FIELDS,
                                  HEALTH_FIELDS, LIST_FIELDS, POOL_SETTING_FIELDS, POOL_TABLE_FIELDS,
                                  ROUTE_TABLE_FIELDS, SETTINGS, flag_name)
from fastlb.config.specs import BackendSpec, BindSpec, CertificateSpec, ConfigError, PoolSpec, RouteSpec


def from_toml(parser: Callable[[Any], Any], value: Any) -> Any:
    """A TOML value through its field's parser, after the type check `toml_typed` asks for."""
    parsed = parser(value)
    kind = getattr(parser, "toml_kind", None)
    if kind is not None and isinstance(value, str) and value.strip().lower() not in parser.toml_words:
        # A string the flag syntax would take ("3", "yes"): a quoted value, named as such.
        what = "true or false" if kind is bool else "an integer" if kind is int else "a number"
        raise ValueError(f"expected {what}, not the string {value!r} (write it without quotes)")
    return parsed


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


def _parse_table(locator: _Locator, key: str, index: int, item: dict[str, Any],
                 table_fields: dict[str, Callable[[Any], Any]], fail: Callable) -> list[tuple[str, str, int, Any]]:
    """The values of the index-th [[key]] table through their parsers: (field name, key as written, line,
    value) each; an unknown key or a bad value fails at its line, named `key[N].item_key`."""
    where = f"{key}[{index + 1}]"
    values = []
    for item_key, item_value in item.items():
        field_name = item_key.replace("-", "_")
        line = locator.line_of(item_key, key, index)
        if field_name not in table_fields:
            raise fail(line, f"{where}.{item_key}", _unknown_key_message(item_key, list(table_fields)))
        try:
            values.append((field_name, item_key, line, from_toml(table_fields[field_name], item_value)))
        except ValueError as exc:
            raise fail(line, f"{where}.{item_key}", str(exc)) from None
    return values


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
        parsed = {field_name: value for field_name, _, _, value in
                  _parse_table(locator, key, index, item, table_fields, fail)}
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
        for field_name, item_key, line, value in _parse_table(locator, key, index, item, table_fields, fail):
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


def merge(values: dict[str, Any], sources: dict[str, str], flags: dict[str, Any]) -> None:
    """Lays the flags given (field name -> value; None: not given) over the file's values, and records
    each as coming from its flag. A repeatable flag replaces the file's list, it does not extend it."""
    for name in SETTINGS:
        value = flags.get(name)
        if value is not None:
            values[name] = value
            sources[name] = flag_name(name)
