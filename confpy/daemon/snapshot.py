"""What the status endpoint shows, as one immutable value: the daemon builds a `StatusSnapshot`,
/status serialises it, /health and the status page read it (status.py, page.py)."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confpy.apply.live import LiveStatus
from confpy.daemon.budget import BudgetView
from confpy.daemon.timeline import TimelineEvent
from confpy.model import HealthView, ServiceInstance
from confpy.registry.view import REGISTRY_NAMES, RegistryKind
from confpy.render.quarantine import Quarantined


def _timestamp(value: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value)) if value else None


def quarantine_json(held: Quarantined) -> dict[str, Any]:
    return {"service": held.service, "upstream": held.upstream, "reason": held.reason, "since": _timestamp(held.since)}


@dataclass(frozen=True)
class TemplateStatus:
    """One template, as /status shows it."""

    source: str
    destination: str
    checksum: str
    last_render: float | None
    last_reload: float | None
    last_error: str
    dependencies: tuple[str, ...]
    kept: tuple[str, ...] = ()
    quarantined: tuple[Quarantined, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kept": list(self.kept),
            "quarantined": [quarantine_json(q) for q in self.quarantined],
            "source": self.source,
            "destination": self.destination,
            "checksum": self.checksum,
            "last_render": _timestamp(self.last_render),
            "last_reload": _timestamp(self.last_reload),
            "last_error": self.last_error,
            "dependencies": list(self.dependencies),
        }


@dataclass(frozen=True)
class StatusSnapshot:
    """What the daemon knows at one moment; the values it refers to are immutable."""

    registry_address: str
    registry_reachable: bool
    registry_error: str
    waiting_for_first_answer: bool
    last_sync_ok: bool
    last_sync_error: str
    templates: tuple[TemplateStatus, ...] = ()
    services: Mapping[str, HealthView] = field(default_factory=dict)
    mode: str = "reload"
    live: LiveStatus | None = None
    pending: tuple[str, ...] = ()
    cycles: int = 0
    not_reloaded: str = ""
    timeline: tuple[TimelineEvent, ...] = ()
    pid_file: str = ""
    registry_down_since: float | None = None
    kept_members: Mapping[str, tuple[ServiceInstance, ...]] = field(default_factory=dict)
    # While a failed sync is retried: the attempt that comes next, and in how many seconds.
    sync_attempt: int = 0
    sync_retry_in: float | None = None
    registry_kind: RegistryKind = "consul"
    budget: BudgetView | None = None
    # The shrink guard's held drops (guard.py `HeldDrop.to_json`): service, members it would lose, when it applies.
    guard_held: tuple[Mapping[str, Any], ...] = ()
    failing_watches: str = ""  # the watches that failed unexpectedly and wait to restart
    state_save_error: str = ""  # confpy's state files cannot be written (retried; nginx is not affected)

    @property
    def registry_name(self) -> str:
        """`Consul` or `etcd`, as the page and /health write it."""
        return REGISTRY_NAMES[self.registry_kind]

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short digest of everything /status shows: computed once per snapshot, however many
        status pages ask (each event stream compares it on every tick)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def state(self) -> tuple[str, str]:
        """The page's header: ("ok" | "degraded" | "failing", why). Failing: nginx refused the last
        sync's files (or it failed otherwise); degraded: nginx still serves good files but something
        needs attention (the registry unreachable, a reload skipped, live pushes failing, still starting,
        the state files unwritable)."""
        ok, reason = self.health()
        if ok:
            return "ok", f"all is well: nginx serves what {self.registry_name} says"
        if not self.last_sync_ok and self.registry_reachable and not self.waiting_for_first_answer:
            return "failing", reason
        return "degraded", reason

    def health(self) -> tuple[bool, str]:
        """/health: OK when the last sync succeeded, the registry is reachable and the state files are saved."""
        if not self.registry_reachable:
            return False, f"{self.registry_name} unreachable: {self.registry_error}"
        if self.failing_watches:
            return False, f"watch failing: {self.failing_watches}"
        if self.waiting_for_first_answer:
            return False, f"starting: waiting for {self.registry_name}'s first answer"
        if not self.last_sync_ok:
            return False, f"last sync failed: {self.last_sync_error}"
        if self.not_reloaded:
            return False, f"files installed but nginx not reloaded: {self.not_reloaded}"
        if self.live is not None and self.live.last_error:
            return False, f"live push failing: {self.live.last_error}"
        if self.state_save_error:
            return False, self.state_save_error
        return True, "ok"

    def to_json(self) -> dict[str, Any]:
        registry = {
            "kind": self.registry_kind,
            "address": self.registry_address,
            "reachable": self.registry_reachable,
            "error": self.registry_error,
            "down_since": _timestamp(self.registry_down_since),
        }
        # "consul": the same, under its 0.x name and keys; deprecated (docs/operations.md), Consul mode only.
        consul = {
            "consul": {
                "address": self.registry_address,
                "reachable": self.registry_reachable,
                "last_error": self.registry_error,
                "down_since": registry["down_since"],
            }
        }
        return {
            "registry": registry,
            **(consul if self.registry_kind == "consul" else {}),
            "failing_watches": self.failing_watches,
            "last_sync_ok": self.last_sync_ok,
            "last_sync_error": "" if self.last_sync_ok else self.last_sync_error,
            "sync_retry": None
            if self.sync_retry_in is None
            else {"attempt": self.sync_attempt, "retry_in_s": round(self.sync_retry_in, 1)},
            "pending": list(self.pending),
            "not_reloaded": self.not_reloaded,
            "state_save_error": self.state_save_error,
            "cycles": self.cycles,
            "reload_budget": self.budget.to_json() if self.budget is not None else None,
            "templates": [t.to_json() for t in self.templates],
            # Services left out because nginx refused their upstream (one bad registration does not block the rest).
            "quarantined": [quarantine_json(q) for t in self.templates for q in t.quarantined],
            "timeline": [event.to_json() for event in self.timeline],
            "services": {
                label: {
                    "instances": [
                        {"id": i.id, "address": i.address, "port": i.port, "weight": i.weight} for i in view.instances
                    ],
                    "rejected": [str(r) for r in view.rejected],
                    "not_passing": [m.to_json() for m in view.unhealthy],
                }
                for label, view in sorted(self.services.items())
            },
            "guard": {"held": [dict(held, applies_at=_timestamp(held["applies_at"])) for held in self.guard_held]},
            "live": {
                "mode": self.mode,
                "last_error": self.live.last_error if self.live else "",
                "upstreams": {name: up.status_json() for name, up in self.live.upstreams.items()} if self.live else {},
                "unavailable": {name: dict(members) for name, members in self.live.unavailable.items()}
                if self.live
                else {},
                "drift": {name: _timestamp(when) for name, when in self.live.drift.items()} if self.live else {},
            },
        }
