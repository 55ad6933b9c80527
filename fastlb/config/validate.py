"""Whole-config checks: the relations between fields, after flags and file are merged (`build`). Each
complaint names the flag or file:line to change."""
from __future__ import annotations

from typing import Any, Callable

from fastlb.config.admission import read_access_file
from fastlb.config.files import read_token, unwritable_file
from fastlb.config.limits import MAX_WORKERS_PER_CPU, cpu_count
from fastlb.config.parsers import CHECK_KIND_FIELDS
from fastlb.config.schema import Config, flag_name
from fastlb.config.specs import BackendSpec, ConfigError
from fastlb.core_shared import HASHING_ALGORITHMS

DYNAMIC_WEIGHT_ALGORITHMS = ("roundrobin", "random", "leastconn", "leasttime", "p2c")


def build(values: dict[str, Any], sources: dict[str, str]) -> Config:
    """Makes a Config from merged values and checks the relations between fields.

    sources maps a field to where its value came from ('--algorithm' or 'lb.toml:3 (algorithm)'), so
    a complaint about a combination names the place to change."""
    config = Config(**values)

    def where(name: str) -> str:
        return sources.get(name, flag_name(name))

    if not config.binds:
        raise ConfigError("no listening address: give --bind HOST:PORT (or [[bind]] in the config file)")
    if not config.backends and not config.pools and not config.discovers_backends:
        raise ConfigError("no backend: give --backend HOST:PORT (or [[backend]] in the config file), "
                          "or a discovery source (--backends-file, --backends-dns, --consul-service)")
    worker_limit = MAX_WORKERS_PER_CPU * cpu_count()
    if config.workers > worker_limit and not config.allow_many_workers:
        raise ConfigError(f"{where('workers')}: {config.workers} workers is more than {MAX_WORKERS_PER_CPU} per "
                          f"CPU ({worker_limit} on the {cpu_count()} CPU(s) fastlb may use); each is a process "
                          f"with its own memory. Use --workers auto, or say you mean it with "
                          f"--allow-many-workers true (allow_many_workers = true)")
    if config.access_log and config.access_log != "-":
        problem = unwritable_file(config.access_log)
        if problem:
            raise ConfigError(f"{where('access_log')}: cannot write the access log {config.access_log}: "
                              f"{problem}")
    for name in ("admin_token_file", "consul_token_file"):
        try:
            if getattr(config, name):
                read_token(getattr(config, name))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where(name)}: {exc}") from None
    stapled = [b for b in config.binds if any(c.ocsp for c in b.certificates)]
    if stapled and (config.mode != "tcp" or config.relay != "epoll" or any(b.ca for b in stapled)):
        raise ConfigError(f"{where('binds')}: ocsp= staples on TLS binds the relay terminates (mode tcp, "
                          f"relay epoll, no ca=): Python's ssl module, which terminates the others, "
                          f"cannot staple")
    if config.mode == "tcp":
        for name in ("pools", "routes"):
            if getattr(config, name):
                raise ConfigError(f"{where(name)}: [[{name[:-1]}]] needs mode 'http'")
        if config.hash_key not in (None, "source"):
            raise ConfigError(f"{where('hash_key')}: hash key {config.hash_key!r} needs mode 'http'; "
                              f"tcp mode hashes on source only")
        if any(b.redirect_https is not None for b in config.binds):
            raise ConfigError(f"{where('binds')}: redirect-https answers HTTP requests: it needs mode 'http'")
        if config.hsts or any(p.hsts for p in config.pools):
            raise ConfigError(f"{where('hsts')}: HSTS is an HTTP response header: it needs mode 'http'")
        if any(b.proto == "h2" for b in config.backends):
            raise ConfigError(f"{where('backends')}: proto=h2 speaks HTTP/2 to a backend: it needs mode 'http'")
    else:
        # SNI passthrough relays TLS bytes without reading HTTP: it is an L4 feature.
        if any(b.sni_route for b in config.binds):
            raise ConfigError(f"{where('binds')}: sni-route binds pass TLS through untouched: they need "
                              f"--mode tcp (HTTP mode terminates TLS with ssl,cert=FILE instead)")
        if config.sni_routes:
            raise ConfigError(f"{where('sni_routes')}: SNI routes need mode 'tcp'; HTTP mode routes "
                              f"requests to [[pool]]s by [[route]] rules")
        grouped = [b for pool in config.pools for b in pool.backends] + config.backends
        h2_backends = [b for b in grouped if b.proto == "h2"]
        if any(b.send_proxy for b in h2_backends):
            raise ConfigError(f"{where('backends')}: proto=h2 backends do not take send-proxy (their "
                              f"connections carry many clients' streams)")
        if h2_backends:
            from fastlb import http2
            if not http2.available():
                raise ConfigError(f"{where('backends')}: proto=h2 needs fastlb built with libnghttp2 "
                                  f"(libnghttp2-dev)")
        if any(b.group != "default" for b in grouped):
            raise ConfigError(f"{where('backends')}: backend groups (group=) are for SNI routing in mode "
                              f"'tcp'; HTTP mode uses [[pool]]s")
    _check_pools(config, where)
    _check_sticky(config, where)
    _check_admission(config, where)
    if config.has_default_pool and config.hash_key and config.algorithm not in HASHING_ALGORITHMS:
        raise ConfigError(f"{where('hash_key')}: hash key {config.hash_key!r} needs a hashing algorithm "
                          f"({', '.join(HASHING_ALGORITHMS)}); the algorithm is {config.algorithm!r}")
    if config.bounded_load and config.bounded_load < 1.0:
        raise ConfigError(f"{where('bounded_load')}: bounded load must be 0 (off) or >= 1.0 "
                          f"(got {config.bounded_load})")
    if config.bounded_load and config.algorithm not in HASHING_ALGORITHMS:
        raise ConfigError(f"{where('bounded_load')}: bounded load applies to the hashing algorithms "
                          f"({', '.join(HASHING_ALGORITHMS)}); the algorithm is {config.algorithm!r}")
    _check_groups(config, where)
    _check_health(config, where, explicit=set(values))
    _check_duplicates(config.backends, where("backends"))
    for pool in config.pools:
        _check_duplicates(pool.backends, f"{where('pools')}: pool {pool.name!r}")
    for pool in config.pools:
        place = f"{where('pools')}: pool {pool.name!r}"
        _check_health(config.pool_config(pool), lambda name, place=place: f"{place}: {name}",
                      explicit=set(pool.settings))
        if "consul_token_file" in pool.settings:
            try:
                read_token(pool.settings["consul_token_file"])
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{place}: consul_token_file: {exc}") from None
    seen = set()
    for spec in config.binds:
        if (spec.host, spec.port) in seen:
            raise ConfigError(f"{where('binds')}: address {spec.address} is bound twice")
        seen.add((spec.host, spec.port))
    return config


def _check_duplicates(backends: list[BackendSpec], where: str) -> None:
    """A backend listed twice would get two slots (twice the traffic) under one address, which health
    verdicts and admin changes name: one of the two would silently not follow them."""
    first: dict[str, int] = {}
    for number, spec in enumerate(backends, 1):
        if spec.address in first:
            raise ConfigError(f"{where}: backend[{number}] {spec.address} is listed twice "
                              f"(also backend[{first[spec.address]}]); give it a weight instead")
        first[spec.address] = number


def _check_admission(config: Config, where: Callable[[str], str]) -> None:
    if config.rate_limit and config.mode != "http":
        raise ConfigError(f"{where('rate_limit')}: rate limits count HTTP requests: they need mode 'http' "
                          f"(tcp mode limits connections: --max-conn-per-source)")
    pools = {p.name for p in config.pools} | ({"default"} if config.has_default_pool else set())
    for spec in config.rate_limit:
        if spec.pool is not None and spec.pool not in pools:
            raise ConfigError(f"{where('rate_limit')}: rate limit {spec.text!r}: no pool {spec.pool!r} "
                              f"(pools: {', '.join(sorted(pools))})")
    if config.access_file:
        try:
            read_access_file(config.access_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where('access_file')}: {exc}") from None


def _check_groups(config: Config, where: Callable[[str], str]) -> None:
    """Backend groups (SNI routing) and the binds that use them: each group used has a primary."""
    groups: dict[str, list[BackendSpec]] = {}
    for spec in config.backends:
        groups.setdefault(spec.group, []).append(spec)
    routed = set(config.sni_routes.values())
    for name, specs in groups.items():
        if not any(not b.backup for b in specs):
            what = "every backend" if len(groups) == 1 else f"every backend of group {name!r}"
            raise ConfigError(f"{where('backends')}: {what} is a backup; at least one must be a primary")
        if name != "default" and name not in routed:
            raise ConfigError(f"{where('backends')}: backend group {name!r} is named by no SNI route; "
                              f"add --sni-route NAME={name} (or [sni_routes] in the config file)")
    for server_name, group in config.sni_routes.items():
        if group not in groups:
            raise ConfigError(f"{where('sni_routes')}: SNI route {server_name} names group {group!r}, "
                              f"which has no backend (give one with group={group})")
    if config.sni_routes and not any(b.sni_route for b in config.binds):
        raise ConfigError(f"{where('sni_routes')}: SNI routes apply to binds with the sni-route option; "
                          f"no bind has it")
    if config.backends and "default" not in groups and any(not b.sni_route for b in config.binds):
        raise ConfigError(f"{where('backends')}: every backend is in a named group, but a bind without "
                          f"sni-route needs backends in the default group")


def _check_pools(config: Config, where: Callable[[str], str]) -> None:
    names = [pool.name for pool in config.pools]
    if config.has_default_pool:
        names.append("default")
    for name in set(names):
        if names.count(name) > 1:
            raise ConfigError(f"{where('pools')}: pool {name!r} is defined twice"
                              + (" (the top-level backends form the pool 'default')" if name == "default" else ""))
    for pool in config.pools:
        algorithm = pool.algorithm or config.algorithm
        key = pool.hash_key if pool.hash_key is not None else config.hash_key
        if key and algorithm not in HASHING_ALGORITHMS:
            raise ConfigError(f"{where('pools')}: pool {pool.name!r}: hash key {key!r} needs a hashing "
                              f"algorithm ({', '.join(HASHING_ALGORITHMS)}); the algorithm is {algorithm!r}")
        if (pool.backends or not config.pool_config(pool).discovers_backends) and all(
                b.backup for b in pool.backends):
            raise ConfigError(f"{where('pools')}: pool {pool.name!r}: every backend is a backup")
    for index, route in enumerate(config.routes, 1):
        if route.pool not in names:
            raise ConfigError(f"{where('routes')}: route[{index}]: unknown pool {route.pool!r}; "
                              f"pools: {', '.join(names)}")
    if config.default_pool is not None and config.default_pool not in names:
        raise ConfigError(f"{where('default_pool')}: unknown pool {config.default_pool!r}; "
                          f"pools: {', '.join(names)}")


def _check_sticky(config: Config, where: Callable[[str], str]) -> None:
    specs = [(config.sticky, where("sticky"))] + [
        (pool.sticky, f"{where('pools')}: pool {pool.name!r}") for pool in config.pools]
    for spec, place in specs:
        if spec is None:
            continue
        if config.mode == "tcp" and spec.kind != "source":
            raise ConfigError(f"{place}: sticky {spec} needs mode 'http'; tcp mode sticks on source only")
        if spec.kind == "cookie" and not config.cookie_secret_file:
            raise ConfigError(f"{place}: sticky {spec} signs its cookie: give --cookie-secret-file FILE "
                              f"(at least 16 random bytes)")
    if config.cookie_secret_file:
        try:
            with open(config.cookie_secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"{where('cookie_secret_file')}: cannot read {config.cookie_secret_file}: "
                              f"{exc.strerror}") from None
        if len(secret) < 16:
            raise ConfigError(f"{where('cookie_secret_file')}: the secret must be at least 16 bytes "
                              f"(got {len(secret)})")


def _check_health(config: Config, where: Callable[[str], str], explicit: set[str]) -> None:
    """Health settings that only make sense together, globally and per backend."""
    if config.outlier_max_ejection_time < config.outlier_ejection_time:
        raise ConfigError(f"{where('outlier_max_ejection_time')}: must be >= outlier-ejection-time "
                          f"({config.outlier_max_ejection_time:g}s < {config.outlier_ejection_time:g}s)")
    for spec in config.backends:
        settings = config.health_for(spec)

        def source(name: str) -> str:
            return spec.health_sources.get(name) or (
                f"--backend {spec.address}" if name in spec.health else where(name))

        for name, kinds in CHECK_KIND_FIELDS.items():
            if settings.check not in kinds and (
                    name in spec.health or (name in explicit and "check" not in spec.health)):
                kinds_text = " and ".join(kind.upper() if kind == "http" else kind for kind in kinds)
                raise ConfigError(f"{source(name)}: applies to {kinds_text} checks only; the check of "
                                  f"{spec.address} is {settings.check!r}")
        if settings.slowstart and config.algorithm not in DYNAMIC_WEIGHT_ALGORITHMS:
            raise ConfigError(f"{source('slowstart')}: slow start ramps weights, which the "
                              f"{config.algorithm!r} algorithm does not follow gradually; use one of "
                              f"{', '.join(DYNAMIC_WEIGHT_ALGORITHMS)}, or slowstart 0")
