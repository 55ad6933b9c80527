"""The configuration reference, generated from the schema so that it cannot drift from the code:

    python -m fastlb.config.docs > docs/configuration.md        (or: make docs)

The prose is in reference.md.in beside this file; `{{settings}}` and `{{tables}}` in it are replaced by
the tables of Config's settings (schema.py) and of the keys of [[bind]], [[backend]], [[pool]] and
[[route]]. tests/test_config_docs.py fails when the committed docs/configuration.md differs from this."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from fastlb.config.parsers import parse_duration, parse_positive_duration, parse_size
from fastlb.config.schema import (BACKEND_KEYS, BIND_KEYS, POOL_KEYS, ROUTE_KEYS, SECTIONS, SETTINGS, Config,
                                  Setting, TableKey, flag_name, toml_key)

TEMPLATE = os.path.join(os.path.dirname(__file__), "reference.md.in")


DURATION_UNITS = ((3600, "h"), (60, "m"), (1, "s"))
SIZE_UNITS = ((1024 ** 3, "g"), (1024 ** 2, "m"), (1024, "k"))


def default_text(value: Any, setting: Setting) -> str:
    """A default as it would be written in the TOML file ('' when there is none)."""
    if value is None or value == [] or value == {}:
        return ""
    if setting.parse in (parse_duration, parse_positive_duration) and value:
        unit = next(((size, name) for size, name in DURATION_UNITS if value % size == 0), None)
        return f"{value // unit[0]:.0f}{unit[1]}" if unit else f"{value * 1000:.0f}ms"
    if setting.parse is parse_size and value:
        unit = next(((size, name) for size, name in SIZE_UNITS if value % size == 0), (1, ""))
        return f"{value // unit[0]}{unit[1]}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, frozenset):
        return ", ".join(sorted(value))
    if isinstance(value, tuple):
        return "-".join(str(part) for part in value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def settings_tables() -> str:
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(Config)}
    out = []
    for section in SECTIONS:
        out.append(f"### {section.heading or section.title.capitalize()}\n")
        if section.description:
            out.append(f"{section.description[0].upper()}{section.description[1:]}.\n")
        out.append("| flag | TOML key | value | default | meaning |\n|---|---|---|---|---|")
        for name, setting in SETTINGS.items():
            if setting.section is not section:
                continue
            flag = "" if setting.file_only else f"`{flag_name(name)}`"
            key = setting.toml_form or f"`{toml_key(name)}`" + (" (array)" if setting.repeat else "")
            meaning = setting.help_text()
            out.append(f"| {flag} | {key} | `{_cell(setting.metavar)}` | {_cell(default_text(defaults[name], setting))} "
                       f"| {_cell(meaning)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def keys_tables() -> str:
    out = []
    tables: tuple[tuple[str, dict[str, TableKey]], ...] = (
        ("[[bind]]", BIND_KEYS), ("[[backend]]", BACKEND_KEYS), ("[[pool]]", POOL_KEYS), ("[[route]]", ROUTE_KEYS))
    for title, keys in tables:
        out.append(f"#### `{title}`\n\n| key | meaning |\n|---|---|")
        rows: dict[str, list[str]] = {}       # keys with the same meaning share a row
        for name, key in keys.items():
            rows.setdefault(key.help, []).append(f"`{name}`")
        out.extend(f"| {', '.join(names)} | {_cell(meaning)} |" for meaning, names in rows.items())
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render() -> str:
    with open(TEMPLATE, encoding="utf-8") as f:
        template = f.read()
    return template.replace("{{settings}}\n", settings_tables()).replace("{{tables}}\n", keys_tables())


if __name__ == "__main__":
    print(render(), end="")
