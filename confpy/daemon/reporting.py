"""The status snapshot: what /status, /health and the page show, built from the daemon's parts."""

from __future__ import annotations

from confpy.config import Config
from confpy.daemon.cycle import Cycles
from confpy.daemon.snapshot import StatusSnapshot, TemplateStatus
from confpy.daemon.timeline import Timeline
from confpy.model import HealthView, ServiceInstance, memory_key
from confpy.pipeline import SyncEngine
from confpy.registry.base import ServiceHealth
from confpy.registry.view import RegistryView
from confpy.watch.watcher import RegistryHealth, WatchFailures


def kept_members(cycles: Cycles) -> dict[str, tuple[ServiceInstance, ...]]:
    """The remembered members `on_empty = "keep"` holds in nginx, by service label."""
    kept: dict[str, tuple[ServiceInstance, ...]] = {}
    for state in cycles.templates.values():
        memory = cycles.memories.get(state.config.destination)
        for dep in state.deps:
            if memory is not None and isinstance(dep, ServiceHealth) and dep.describe() in state.kept:
                members = memory.members.get(memory_key(dep.service, dep.tag, dep.dc, dep.passing))
                if members:
                    kept[dep.describe()] = members
    return kept


def build_snapshot(
    config: Config,
    registry: RegistryView,
    cycles: Cycles,
    engine: SyncEngine,
    health: RegistryHealth,
    timeline: Timeline,
    now: float,
    failures: WatchFailures | None = None,
) -> StatusSnapshot:
    services = {dep.describe(): value for dep, value in cycles.data.snapshot().items() if isinstance(value, HealthView)}
    retry = cycles.retry.state(now)
    sync_error = cycles.last_sync_error
    if retry is not None and not cycles.last_sync_ok:
        sync_error = f"{sync_error}; {retry.describe()}"
    return StatusSnapshot(
        registry_address=registry.address,
        registry_kind=registry.kind,
        registry_reachable=health.reachable,
        registry_error=health.last_error,
        waiting_for_first_answer=not health.answered_once,
        last_sync_ok=cycles.last_sync_ok,
        last_sync_error=sync_error,
        templates=tuple(
            TemplateStatus(
                source=str(t.config.source),
                destination=str(t.config.destination),
                checksum=t.checksum,
                last_render=t.last_render,
                last_reload=t.last_reload,
                last_error=t.last_error,
                dependencies=tuple(sorted(d.describe() for d in t.deps)),
                kept=t.kept,
                quarantined=t.quarantined,
            )
            for t in cycles.templates.values()
        ),
        services=services,
        mode=config.nginx.mode,
        live=engine.live_status(),
        pending=tuple(sorted(str(key) for key in cycles.quiescence.waiting())),
        cycles=cycles.cycles,
        not_reloaded=cycles.not_reloaded,
        state_save_error=cycles.saver.failing(now),
        timeline=timeline.events(),
        pid_file=str(config.nginx.pid_file),
        registry_down_since=health.down_since,
        kept_members=kept_members(cycles),
        sync_attempt=retry.attempt if retry is not None else 0,
        sync_retry_in=max(0.0, retry.retry_in) if retry is not None else None,
        budget=cycles.budget.view(),
        guard_held=cycles.guard.status(now, cycles.wall_clock()),
        failing_watches=failures.describe() if failures is not None else "",
    )
