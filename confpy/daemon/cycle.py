"""The daemon's cycles: which templates are due, rendering them, installing them, and what it left.

`Cycles` turns the data's changes into due templates (quiescence), renders the due ones,
watches what they use, hands the complete renders to the engine as one transaction, and
records the outcome: metrics, the timeline, readiness, the state files to save later, and the
retry owed when a sync failed or nginx was not reloaded (`timers.SyncRetry`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from confpy.apply.files import read_bytes
from confpy.apply.nginx import ReloadOutcome
from confpy.config import Config, TemplateConfig
from confpy.daemon.events import ValueEvent
from confpy.daemon.metrics import Metrics
from confpy.daemon.quiescence import Quiescence
from confpy.daemon.timeline import Timeline
from confpy.daemon.timers import RELOAD_RECHECK_INTERVAL, Readiness, StateSaveTimer, SyncRetry
from confpy.errors import CheckError, ConfpyError, RenderError
from confpy.model import Memory, describe_change
from confpy.pipeline import SyncEngine
from confpy.registry.base import Dependency
from confpy.render.datasource import DataSource
from confpy.render.renderer import RenderResult
from confpy.retry import RetryPolicy
from confpy.watch.watchset import WatchSet

log = logging.getLogger(__name__)

TEMPLATE_SUFFIXES = (".j2", ".jinja", ".tmpl")
NGINX_START_SETTLE = 1.0  # seconds: see SyncEngine.recheck_reload
SYNC_RETRY_INITIAL = 1.0


@dataclass
class TemplateState:
    """What the daemon knows of one template."""

    config: TemplateConfig
    deps: frozenset[Dependency] = frozenset()
    missing: set[Dependency] = field(default_factory=set)
    complete_once: bool = False
    installed_once: bool = False
    last_render: float | None = None
    last_reload: float | None = None
    last_error: str = ""
    checksum: str = ""
    kept: tuple[str, ...] = ()


def installed_checksum(path: Path) -> str:
    data = read_bytes(path)
    return "" if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


class Cycles:
    """Due templates -> render -> one install transaction -> the outcome recorded."""

    def __init__(
        self,
        config: Config,
        engine: SyncEngine,
        data: DataSource,
        watches: WatchSet,
        metrics: Metrics,
        timeline: Timeline,
        readiness: Readiness,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.engine = engine
        self.data = data
        self.watches = watches
        self.metrics = metrics
        self.timeline = timeline
        self.readiness = readiness
        self.clock = clock
        self.wall_clock = wall_clock
        self.quiescence = Quiescence()
        self.memories: dict[Path, Memory] = {}  # read once the locks are held (and 0.1's files moved)
        self.templates = {
            t.destination: TemplateState(t, checksum=installed_checksum(t.destination)) for t in config.templates
        }
        self.cycles = 0
        self.last_sync_ok = False
        self.last_sync_error = "no sync yet"
        self.not_reloaded = ""  # why installed files are not live in nginx yet (empty: they are)
        self.frozen = False  # gc.freeze() after the first complete sync
        self.saver = StateSaveTimer(lambda: self.engine.save_pending(self.memories), clock)
        self.retry = SyncRetry(
            self.resync,
            self.recheck_reload,
            RetryPolicy(SYNC_RETRY_INITIAL, config.sync.max_backoff),
            RetryPolicy(SYNC_RETRY_INITIAL, RELOAD_RECHECK_INTERVAL),
        )

    # --- what becomes due ------------------------------------------------------------------

    def on_value(self, event: ValueEvent) -> None:
        """A watched dependency's new value: store it; every template that uses it becomes due."""
        dep = event.dep
        found, old = self.data.get(dep)
        if not self.data.set(dep, event.value):
            return
        if found:
            change = describe_change(old, event.value)
            log.info("%s changed: %s (index %d)", dep.describe(), change, event.index)
            self.timeline.record("change", change, dep.describe())
        for state in self.templates.values():
            if dep not in state.deps:
                continue
            if not state.complete_once:
                # Waiting for a first complete render: render again as soon as the data it lacked
                # has arrived (it may then ask for more, e.g. one service per catalog entry).
                state.missing.discard(dep)
                if not state.missing:
                    self._due(state, event.seen, "first data", immediate=True)
            else:
                self._due(state, event.seen, f"{dep.describe()} changed")
                self.retry.poke(event.seen)

    def on_file(self, path: Path) -> None:
        """A file in a template folder changed: the templates it may be part of are due at once."""
        for state in self.templates.values():
            source = state.config.source
            if path == source or (path.parent == source.parent and path.suffix in TEMPLATE_SUFFIXES):
                log.info("template file %s changed; re-rendering %s", path, state.config.destination)
                self._due(state, self.clock(), f"template {path.name} edited", immediate=True)

    def _due(self, state: TemplateState, now: float, reason: str, immediate: bool = False) -> None:
        wait = self.config.wait_for(state.config)
        self.quiescence.change(state.config.destination, now, wait, reason, immediate=immediate)

    async def run_due(self) -> None:
        """Run one cycle for every template whose quiescence has passed."""
        due = self.quiescence.due(self.clock())
        if not due:
            return
        states = [self.templates[key] for key in due if isinstance(key, Path) and key in self.templates]
        reasons = sorted(set().union(*(p.reasons for p in due.values())))
        first_change = {key: p.first_change for key, p in due.items() if isinstance(key, Path)}
        await self.cycle(states, "; ".join(reasons)[:300], first_change)

    async def resync(self, reason: str) -> None:
        """The retry of a failed sync: every template, rendered from the current data."""
        self.metrics.sync_retries.inc()
        await self.cycle(list(self.templates.values()), reason, {}, check_stale=True)
        if self.retry.failing and self.retry.next_deadline() is None:
            # Nothing was installed this time (a render failed or lacked data): keep retrying.
            self.retry.sync_failed(self.clock(), self.last_sync_error)

    # --- one cycle -------------------------------------------------------------------------

    def _render(self, state: TemplateState) -> RenderResult | None:
        try:
            result = self.engine.render(state.config, self.data, self.memories[state.config.destination])
        except RenderError as exc:
            state.last_error = str(exc)
            self.metrics.render_errors.labels(template=str(state.config.destination)).inc()
            log.error("%s: render failed, keeping the last good output: %s", state.config.destination, exc)
            if not self.readiness.sent:
                self.readiness.ready(f"render failed: {exc}")  # systemd must not restart confpy for a template error
            return None
        state.deps = result.dependencies
        state.missing = set(result.missing)
        if not result.complete:
            return None
        state.complete_once = True
        state.last_render = self.wall_clock()
        self.metrics.renders.labels(template=str(state.config.destination)).inc()
        return result

    def _watch_what_templates_use(self) -> None:
        wanted: set[Dependency] = set().union(*(t.deps for t in self.templates.values()))
        diff = self.watches.sync(wanted)
        for dep in diff.removed:
            self.data.forget(dep)
            self.metrics.forget_service(dep.describe())
            log.info("stopped watching %s (no template uses it any more)", dep.describe())

    async def cycle(
        self,
        states: list[TemplateState],
        reason: str,
        first_change: Mapping[Path, float],
        check_stale: bool | None = None,
    ) -> None:
        """Render `states`, watch what they use, install the complete renders as one transaction."""
        self.cycles += 1
        results = [r for r in (self._render(s) for s in states) if r is not None]
        self._watch_what_templates_use()
        if not results:
            return
        if check_stale is None:
            check_stale = any(not self.templates[r.template.destination].installed_once for r in results)
        try:
            report = await self.engine.install(results, reason, check_stale=check_stale)
        except CheckError as exc:
            self.metrics.check_failures.inc()
            self.timeline.record("check_failed", f"nginx -t failed, the previous files were restored: {exc}")
            self._sync_failed(results, exc)
            return
        except ConfpyError as exc:
            self.metrics.install_failures.inc()
            self.timeline.record("rollback", f"install failed, the previous files stay: {exc}")
            self._sync_failed(results, exc)
            return
        now = self.wall_clock()
        reloaded = report.apply is not None and report.apply.reload.reloaded
        for result in results:
            state = self.templates[result.template.destination]
            state.installed_once = True
            state.last_error = ""
            state.kept = result.kept
            if result.content is not None:
                state.checksum = "sha256:" + hashlib.sha256(result.content).hexdigest()
            if reloaded and result.template.destination in report.changed:
                state.last_reload = now
        self._note_reload(report.not_reloaded, reloaded)
        if reloaded:
            self.metrics.reloads.inc()
            done = self.clock()
            latencies = [done - first_change[path] for path in report.changed if path in first_change]
            for latency in latencies:
                self.metrics.change_to_reload.observe(latency)
            self.timeline.record(
                "reload",
                f"reloaded nginx for {', '.join(p.name for p in report.changed)} ({reason})",
                latency=max(latencies) if latencies else None,
            )
        pushed = await self.engine.push()
        if pushed:
            self.timeline.record("push", f"pushed members of {', '.join(sorted(pushed))} to nginx (no reload)")
        if self.engine.stage(results, self.memories):
            # Written (and replaced backups removed) later, not now: nginx is starting its new
            # workers (or serving the pushed members), more changes may follow, and only a restart
            # reads these files.
            self.saver.synced(self.clock())
        if self.not_reloaded and report.not_reloaded is None:
            await self.recheck_reload()
        self._synced(now, bool(report.changed))

    def _synced(self, now: float, changed: bool) -> None:
        self.last_sync_ok = True
        self.retry.synced(self.clock())
        self.metrics.last_sync.set(now)
        in_sync = "in sync; last change installed " + time.strftime("%H:%M:%S") if changed else "in sync"
        if all(t.installed_once for t in self.templates.values()):
            if not self.frozen:
                self.frozen = True
                # What start-up built (the modules, the watches, a thousand services' data) stays
                # for the daemon's life: out of the collector's sight, a full collection no longer
                # walks it, which otherwise lands in the middle of a later change's render.
                gc.collect()
                gc.freeze()
            self.readiness.ready(in_sync)

    def _note_reload(self, skipped: ReloadOutcome | None, reloaded: bool) -> None:
        """Keep /health honest: files nginx does not serve yet are a degraded state until a reload."""
        if skipped is not None:
            self.metrics.reloads_skipped.labels(reason=skipped.reason).inc()
            self.not_reloaded = skipped.detail
            self.retry.reload_owed(self.clock())
        elif reloaded and self.not_reloaded:
            log.info("nginx reloaded: it serves the installed files again")
            self.not_reloaded = ""
            self.retry.reload_done()

    async def recheck_reload(self) -> None:
        """While installed files are not live, look for a usable nginx master and reload it."""
        if not self.not_reloaded:
            return
        destinations = [t.config.destination for t in self.templates.values()]
        found = await self.engine.recheck_reload(destinations, NGINX_START_SETTLE)
        if found.serves:
            self.not_reloaded = ""
            self.retry.reload_done()
            return
        self.not_reloaded = found.detail
        self.retry.reload_owed(self.clock())

    def _sync_failed(self, results: list[RenderResult], exc: ConfpyError) -> None:
        self.last_sync_ok = False
        self.last_sync_error = str(exc)
        for result in results:
            self.templates[result.template.destination].last_error = str(exc)
        # nginx names the file and line it refuses: one confpy installed means the rendered content
        # itself is at fault (still retried: the data or the templates may change).
        content_at_fault = isinstance(exc, CheckError) and any(str(r.template.destination) in str(exc) for r in results)
        self.retry.sync_failed(self.clock(), str(exc), content_at_fault)
        if all(t.complete_once for t in self.templates.values()):
            self.readiness.ready(f"sync failed: {exc}")
