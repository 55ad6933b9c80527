"""Who decides what the workers do: one `Controller` shape for the admin API (fastlb/admin.py) and
discovery (fastlb/discovery.py), and its two forms.

`--workers 1`: the worker is its own controller (`LocalController`, fastlb/server/worker.py): it runs the
health checks, applies changes to its pools at once, serves the admin bind and runs discovery. `--workers N`: the master
(fastlb/server/master.py) is, and sends every change to every worker over its channel. Both keep the
backend table (fastlb/control.py) and take a change the same way (`ControllerBase.apply`): validated
against the table, delivered, committed, and the active checks follow it.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from fastlb.admin import AdminServer
from fastlb.admission import validate_change
from fastlb.config import Config, ConfigError
from fastlb.control import BackendTable, ChangeError, reload_changes, spec_from_dict
from fastlb.discovery import Discovery
from fastlb.health import HealthChecker, check_target, check_targets
from fastlb.tls import ServerTLS, certificate_expiry

log = logging.getLogger("fastlb")


class Controller(Protocol):
    """What the admin API and discovery drive (LocalController and Master are both one)."""
    table: BackendTable

    def apply(self, change: dict) -> dict:
        """A backend change (add, remove, weight, state, health), validated and applied everywhere;
        returns it as applied. Raises ChangeError."""

    def admission_change(self, change: dict) -> dict:
        """A block / unblock of admission control, validated and applied everywhere. Raises ChangeError."""

    async def snapshot(self) -> dict:
        """Every worker's counters, summed: the admin API's and /metrics' view."""

    async def sync(self) -> None:
        """Returns once every worker has applied the changes made so far."""

    async def reload(self) -> str:
        """Reloads the TLS certificates and the config; says what it did. Raises ConfigError."""


class ControllerBase:
    """What both controllers share: the backend table, the active health checks, the admin bind and
    discovery, and the way a change or a health verdict is taken. A subclass says where changes go
    (`deliver`, `deliver_admission`) and what admission control allows (`admission_specs`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, config: Config, reload_source=None) -> None:
        self.loop = loop
        self.config = config
        self.table = BackendTable(config)
        self.reload_source = reload_source
        self.checker: HealthChecker | None = None
        self.next_check_index = len(config.backends)
        self.admin: AdminServer | None = None
        self.discovery: Discovery | None = None

    # ---- where changes go (the subclass) ---------------------------------------------------------

    def deliver(self, change: dict) -> None:
        raise NotImplementedError

    def admission_specs(self):
        """The rate limits a block / unblock is checked against; None: admission control is off."""
        raise NotImplementedError

    def deliver_admission(self, change: dict) -> dict:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------

    def make_checker(self, config: Config) -> int:
        """A health checker for config's targets (None without any); returns how many it checks."""
        targets = check_targets(config)
        self.checker = HealthChecker(self.loop, targets, self._on_verdict) if targets else None
        return len(targets)

    def _on_verdict(self, index: int, up: bool, reason: str) -> None:
        """A health flip (the checker has logged it): applied wherever changes go."""
        self.deliver(self.checker.checks[index].target.change(up, reason))

    def apply(self, change: dict) -> dict:
        change = self.table.validate(change)
        self.deliver(change)
        self.table.commit(change)
        self.next_check_index = follow_checks(self.checker, self.table, change, self.next_check_index)
        return change

    def admission_change(self, change: dict) -> dict:
        """A block / unblock (admin API): validated, then delivered."""
        specs = self.admission_specs()
        if specs is None:
            raise ChangeError("admission control is off: start fastlb with a limit or a list", 409)
        try:
            change = validate_change(change, specs)
        except ValueError as exc:
            raise ChangeError(str(exc)) from None
        return self.deliver_admission(change)

    def reread_and_apply(self) -> tuple[Config, list[dict], list[str]]:
        """Re-reads the config and applies its backend changes in place (`apply`): (new config, changes
        applied, names of the other settings that changed). Raises ConfigError."""
        new = self.reload_source()
        changes, other = reload_changes(self.table, new)
        for change in changes:
            self.apply(change)
        return new, changes, other

    async def start_services(self) -> None:
        """The health checks (made already), the admin bind and discovery start."""
        if self.checker is not None:
            self.checker.start()
        if self.config.admin:
            self.admin = AdminServer(self.loop, self.config, self)
            await self.admin.start()
        self.discovery = Discovery.from_config(self.loop, self.config, self)
        if self.discovery is not None:
            self.discovery.start()

    async def close_services(self) -> None:
        if self.discovery is not None:
            self.discovery.close()
        if self.admin is not None:
            await self.admin.close()
        if self.checker is not None:
            self.checker.close()


EXPIRY_WARNING_DAYS = 14


def warn_expiring(server_tls: dict[int, ServerTLS]) -> None:
    for address, path, days in certificate_expiry(server_tls):
        if days < EXPIRY_WARNING_DAYS:
            log.warning("certificate %s of %s %s", path, address,
                        f"expired {-days:.1f} days ago" if days < 0 else f"expires in {days:.1f} days")


def certificate_view(expiry: list[tuple[str, str, float]]) -> list[dict]:
    """The certificates served, JSON-ready, for the admin API and /metrics."""
    return [{"bind": address, "file": path, "days_left": round(days, 3)} for address, path, days in expiry]


def describe_certificate_reload(server_tls: dict[int, ServerTLS], errors: list[str]) -> str:
    """The reload answer's words about certificates ("" without TLS binds)."""
    if not server_tls:
        return ""
    if errors:
        return f"TLS certificates: {len(errors)} error(s), current ones kept: {'; '.join(errors)}"
    # (Not the words each worker logs, "certificates reloaded": those count the workers that did.)
    return f"TLS certificates: reloaded for {len(server_tls)} bind(s)"


def follow_checks(checker: HealthChecker | None, table: BackendTable, change: dict, next_index: int) -> int:
    """Starts or stops the active checks of a backend added or removed at run time (in any pool)."""
    if checker is None:
        return next_index
    pool = change.get("pool")
    if change["op"] == "remove":
        checker.remove_target(change["address"], pool)
    elif change["op"] == "add":
        next_index = max(next_index, max(checker.checks, default=-1) + 1)
        target = check_target(table.of(pool).config, spec_from_dict(change["spec"]), next_index, pool)
        if target is not None:
            checker.add_target(target, up=False)
            return next_index + 1
    return next_index


async def reload_logged(controller: Controller) -> None:
    """A reload asked by SIGHUP: its failure is logged (the running configuration stays)."""
    try:
        await controller.reload()
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
