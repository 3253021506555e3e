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
from confpy.config import Config, GuardConfig, TemplateConfig
from confpy.daemon.budget import RERUN_REASON, Verdict, budget_for
from confpy.daemon.metrics import Metrics
from confpy.daemon.quiescence import Quiescence
from confpy.daemon.timeline import Timeline
from confpy.daemon.timers import RELOAD_RECHECK_INTERVAL, Readiness, StateSaveTimer, SyncRetry
from confpy.errors import CheckError, ConfpyError, RenderError
from confpy.guard import ShrinkGuard, release_dependency, strictest
from confpy.model import Memory
from confpy.pipeline import SyncEngine
from confpy.registry.base import Dependency, ServiceHealth
from confpy.render.datasource import DataSource
from confpy.render.quarantine import Quarantined
from confpy.render.renderer import SKIPPED, RenderResult
from confpy.retry import RetryPolicy
from confpy.watch.watchset import WatchSet

log = logging.getLogger(__name__)

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
    kept: tuple[str, ...] = ()
    # The installed bytes, hashed only when /status asks (not on every change's path).
    content: bytes | None = field(default=None, repr=False)
    _checksum: tuple[bytes | None, str] | None = field(default=None, repr=False)
    quarantined: tuple[Quarantined, ...] = ()
    skipped: int = 0  # services the last render left out for their name (see upstream_mappable)

    @property
    def checksum(self) -> str:
        if self._checksum is None or self._checksum[0] is not self.content:
            digest = "" if self.content is None else "sha256:" + hashlib.sha256(self.content).hexdigest()
            self._checksum = (self.content, digest)
        return self._checksum[1]


def freeze_what_startup_built() -> None:
    """What start-up built (the modules, the watches, a thousand services' data) stays for the
    daemon's life: out of the collector's sight, a full collection no longer walks it, which
    otherwise lands in the middle of a later change's render. Only the young generations are
    collected first: a full collection here would itself hold the loop (15 ms at 300 services,
    more in debug mode), and what the older one holds has survived collections already."""
    gc.collect(1)
    gc.freeze()


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
        self.templates = {t.destination: TemplateState(t, content=read_bytes(t.destination)) for t in config.templates}
        self.cycles = 0
        self.last_sync_ok = False
        self.last_sync_error = "no sync yet"
        self.not_reloaded = ""  # why installed files are not live in nginx yet (empty: they are)
        self.frozen = False  # gc.freeze() after the first complete sync
        self._deps_changed = True  # a template's dependencies changed since the watches were synced
        self.saver = StateSaveTimer(lambda: self.engine.save_pending(self.memories), clock)
        self.retry = SyncRetry(
            self.resync,
            self.recheck_reload,
            RetryPolicy(SYNC_RETRY_INITIAL, config.sync.max_backoff),
            RetryPolicy(SYNC_RETRY_INITIAL, RELOAD_RECHECK_INTERVAL),
        )
        # A deferral is not a failure: the budget, not `retry`, runs what waits.
        self.budget = budget_for(config.nginx, metrics, clock, wall_clock)
        self.budget.rerun = self.run_deferred
        # `confpy upstream release`'s key (guard.py), watched only while a drop is held: no cost and
        # no KV permission needed otherwise.
        self.release_dep = release_dependency(config)
        # How an answer reaches the data and the due templates (`intake.Intake` sets it): the
        # guard stores a held drop through it when its hold ends.
        self.store: Callable[[Dependency, object, str], None] = lambda dep, value, why: None
        self.guard = ShrinkGuard(
            self._guard_for,
            lambda dep, value, why: self.store(dep, value, why),
            clock,
            metrics.guard_hooks(),
        )

    # --- the shrink guard ------------------------------------------------------------------

    def _guard_for(self, dep: ServiceHealth) -> GuardConfig:
        """The shrink guard of a service: the strictest of the templates using it (guard.py)."""
        return strictest(self.config.guard_for(s.config) for s in self.templates.values() if dep in s.deps) or (
            self.config.guard
        )

    def watch_release(self) -> None:
        """A drop is held: watch the release key from now on."""
        self._deps_changed = True
        self._watch_what_templates_use()

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

    async def run_deferred(self) -> None:
        """The reload the budget held may happen now: render what waits from the current data."""
        await self.cycle([], RERUN_REASON, {})

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
        if result.dependencies != state.deps:  # compared at C speed: the set is the same after a member change
            state.deps = result.dependencies
            self._deps_changed = True
        state.missing = set(result.missing)
        if not result.complete:
            return None
        state.complete_once = True
        state.last_render = self.wall_clock()
        self.metrics.renders.labels(template=str(state.config.destination)).inc()
        return result

    def _watch_what_templates_use(self) -> None:
        watching_release = self.release_dep in self.watches
        if not self._deps_changed and watching_release == bool(self.guard.held):
            return  # nothing to start or stop (the release key is watched exactly while a drop is held)
        self._deps_changed = False
        wanted: set[Dependency] = set().union(*(t.deps for t in self.templates.values()))
        if self.guard.held:
            if self.release_dep not in self.watches:
                self.guard.releases = None  # its first answer is what was written before: no release
            wanted.add(self.release_dep)
        diff = self.watches.sync(wanted)
        for dep in diff.removed:
            self.data.forget(dep)
            if isinstance(dep, ServiceHealth):
                self.guard.forget(dep)
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
        states, reason, first_change = self._with_deferred(states, reason, first_change)
        results = [r for r in (self._render(s) for s in states) if r is not None]
        self._watch_what_templates_use()
        if not results:
            self.budget.settled()
            return
        verdict = self._budget_verdict(results)
        if verdict is not None and verdict.action == "defer":
            await self._defer(results, verdict.why, reason, first_change)
            return
        if check_stale is None:
            check_stale = any(not self.templates[r.template.destination].installed_once for r in results)
        try:
            report = await self.engine.install(
                results, reason, check_stale=check_stale, rerender=lambda t: self._render(self.templates[t.destination])
            )
        except CheckError as exc:
            self.metrics.check_failures.inc()
            self._sync_failed(results, exc, "check_failed", "nginx -t failed, the previous files were restored")
            self.budget.settled()
            return
        except ConfpyError as exc:
            self.metrics.install_failures.inc()
            self._sync_failed(results, exc, "rollback", "install failed, the previous files stay")
            self.budget.settled()
            return
        results = report.results
        for held in report.quarantined:
            self.timeline.record("quarantine", f"left out {held.describe()}")
        now = self.wall_clock()
        reloaded = report.apply is not None and report.apply.reload.reloaded
        for result in results:
            state = self.templates[result.template.destination]
            state.installed_once = True
            state.last_error = ""
            state.kept = result.kept
            state.quarantined = result.quarantined
            state.skipped = sum(1 for warning in result.warnings if warning.startswith(SKIPPED))
            if result.content is not None:
                state.content = result.content
            if reloaded and result.template.destination in report.changed:
                state.last_reload = now
        self.metrics.quarantined_upstreams.set(sum(len(t.quarantined) for t in self.templates.values()))
        self.metrics.skipped_services.set(sum(t.skipped for t in self.templates.values()))
        self._note_reload(report.not_reloaded, reloaded)
        if reloaded:
            self.budget.reloaded(verdict)
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
        else:
            self.budget.settled()
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

    def _with_deferred(
        self, states: list[TemplateState], reason: str, first_change: Mapping[Path, float]
    ) -> tuple[list[TemplateState], str, Mapping[Path, float]]:
        """This cycle's templates, with those of a reload the budget held (rendered anew: the newest data lands)."""
        waiting = self.budget.take()
        if waiting is None:
            return states, reason, first_change
        chosen = {s.config.destination: s for s in states}
        chosen.update((d, self.templates[d]) for d in waiting.destinations if d in self.templates)
        reasons = sorted(waiting.reasons | {r for r in reason.split("; ") if r and r != RERUN_REASON})
        merged = {**waiting.first_change}
        for path, at in first_change.items():
            merged[path] = min(at, merged.get(path, at))
        return list(chosen.values()), "; ".join(reasons or [RERUN_REASON])[:300], merged

    def _budget_verdict(self, results: list[RenderResult]) -> Verdict | None:
        """The budget's verdict when these renders would reload nginx (None: they would not)."""
        changes, _ = self.engine.changes(results)
        return self.budget.verdict() if changes else None

    async def _defer(
        self, results: list[RenderResult], why: str, reason: str, first_change: Mapping[Path, float]
    ) -> None:
        """Hold the whole install (files on disk keep matching nginx); live members are still pushed."""
        self.budget.defer(why, [r.template.destination for r in results], reason, first_change)
        self.timeline.record("deferred", f"reload deferred: {why}")
        pushed = await self.engine.push_members(results)
        if pushed:
            self.timeline.record("push", f"pushed members of {', '.join(sorted(pushed))} to nginx (no reload)")
        if not self.readiness.sent:
            self.readiness.ready(f"reload deferred: {why}")

    def _synced(self, now: float, changed: bool) -> None:
        self.last_sync_ok = True
        recovered = self.retry.synced(self.clock())
        if recovered:
            self.timeline.record("recovered", recovered)
        self.metrics.last_sync.set(now)
        in_sync = "in sync; last change installed " + time.strftime("%H:%M:%S") if changed else "in sync"
        if all(t.installed_once for t in self.templates.values()):
            if not self.frozen:
                self.frozen = True
                freeze_what_startup_built()
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

    def _sync_failed(self, results: list[RenderResult], exc: ConfpyError, kind: str, what: str) -> None:
        self.last_sync_ok = False
        self.last_sync_error = str(exc)
        for result in results:
            self.templates[result.template.destination].last_error = str(exc)
        # nginx names the file and line it refuses: one confpy installed means the rendered content
        # itself is at fault (still retried: the data or the templates may change).
        content_at_fault = isinstance(exc, CheckError) and any(str(r.template.destination) in str(exc) for r in results)
        now = self.clock()
        if self.retry.sync_failed(now, str(exc), content_at_fault):  # said once, then once per cap
            retry = self.retry.state(now)
            self.timeline.record(kind, f"{what}: {exc}" + (f"; {retry.describe()}" if retry else ""))
        if all(t.complete_once for t in self.templates.values()):
            self.readiness.ready(f"sync failed: {exc}")
