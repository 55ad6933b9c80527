"""Configuration: flags and the TOML file -> a checked `Config`.

    specs.py     the values inside a Config (BindSpec, BackendSpec, CertificateSpec, ...) and ConfigError
    parsers.py   one parser per kind of value: flag text or TOML value -> typed value, or ValueError
    schema.py    Config: every setting's type, default, parser and help, in one table
    loader.py    the TOML file (errors name file:line: field), and flags laid over it
    validate.py  the relations between settings (`build`)
    admission.py rate-limit rules and CIDR lists (fastlb/admission.py enforces them)
    limits.py    workers per CPU; connections and queue per worker under the open-files limit
    files.py     files the configuration names: readable, writable, tokens
    docs.py      the reference, docs/configuration.md, generated from schema.py

The names below are what the rest of fastlb imports.
"""
from fastlb.config.files import check_readable, read_token, unwritable_file
from fastlb.config.limits import (MAX_WORKERS_PER_CPU, QUEUE_FD_SHARE, RESERVED_FDS, SMALL_MAXCONN,
                                  connection_limits, cpu_count, open_files_limit)
from fastlb.config.loader import load_file, merge
from fastlb.config.parsers import (HEALTH_FIELDS, MAX_WEIGHT, RETRY_CONDITIONS, parse_address, parse_admin,
                                   parse_backend, parse_bind, parse_duration, parse_retry_on, parse_sni_route,
                                   parse_sticky, parse_weight)
from fastlb.config.schema import (DISCOVERY_SOURCES, FIELDS, LIST_FIELDS, POOL_SETTING_FIELDS, SECTIONS,
                                  SETTINGS, Config, flag_name)
from fastlb.config.specs import (BackendSpec, BindSpec, CertificateSpec, ConfigError, HealthSettings, PoolSpec,
                                 RouteSpec, StickySpec, format_address)
from fastlb.config.validate import build

__all__ = [
    "BackendSpec", "BindSpec", "CertificateSpec", "Config", "ConfigError", "DISCOVERY_SOURCES", "FIELDS",
    "HEALTH_FIELDS", "HealthSettings", "LIST_FIELDS", "MAX_WEIGHT", "MAX_WORKERS_PER_CPU", "POOL_SETTING_FIELDS",
    "PoolSpec", "QUEUE_FD_SHARE", "RESERVED_FDS", "RETRY_CONDITIONS", "RouteSpec", "SECTIONS", "SETTINGS",
    "SMALL_MAXCONN", "StickySpec", "build", "check_readable", "connection_limits", "cpu_count", "flag_name",
    "format_address", "load_file", "merge", "open_files_limit", "parse_address", "parse_admin",
    "parse_backend", "parse_bind", "parse_duration", "parse_retry_on", "parse_sni_route", "parse_sticky",
    "parse_weight", "read_token", "unwritable_file",
]
