"""The daemon: one asyncio event loop that follows the registry and keeps nginx in step.

Everything happens on one loop: a task per watched dependency (`watch/`), the status endpoint,
signal handlers that only queue, the template-file observer posting into the loop. The main task
turns events into cycles: a template is re-rendered after its quiescence (`quiescence.py`), or at
once while it still waits for its first complete render, and every template due in a cycle is
installed as one transaction (one `nginx -t`, one reload). Nothing polls: the main task sleeps on
its queue until an event or the next deadline.

Stopping is cancelling the main task: whatever it awaits (a lock, a Consul answer, `nginx -t`)
ends at once, an interrupted install rolls back, and the clean-up closes every connection.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import random
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from confpy.apply.files import read_bytes
from confpy.apply.nginx import ReloadOutcome
from confpy.config import Config, TemplateConfig, load_config
from confpy.daemon.metrics import Metrics
from confpy.daemon.quiescence import Quiescence
from confpy.daemon.status import StatusServer, StatusSnapshot, TemplateStatus
from confpy.daemon.systemd import SystemdNotifier
from confpy.daemon.timeline import Timeline
from confpy.errors import CheckError, ConfigError, ConfpyError, RegistryError, RenderError
from confpy.model import HealthView, Memory, ServiceInstance, describe_change, memory_key
from confpy.pipeline import SyncEngine
from confpy.registry.base import Dependency, Registry, ServiceHealth
from confpy.registry.factory import open_registry
from confpy.render.environment import DataSource, RenderResult
from confpy.watch.watcher import FirstFetches, RegistryHealth, Sleep, Watcher, WatchSettings
from confpy.watch.watchset import WatchSet

log = logging.getLogger(__name__)

TEMPLATE_SUFFIXES = (".j2", ".jinja", ".tmpl")
# While installed files are not live in nginx: how often to look for a master to reload.
RELOAD_RECHECK_INTERVAL = 5.0
# Non-blocking first queries in flight at once (blocking ones are not limited: they wait).
FIRST_FETCH_CONCURRENCY = 32
NGINX_START_SETTLE = 1.0  # seconds: see _recheck_reload
# confpy's state files (remembered members, live members) are read at a restart only, and a stop
# writes them at once: they are written once changes pause for STATE_SAVE_QUIET seconds, at the
# latest STATE_SAVE_MAX_DELAY after the first change they lack. Under churn, not after every
# change: that write's CPU and journal commit would land in the middle of the next change.
STATE_SAVE_QUIET = 1.0
STATE_SAVE_MAX_DELAY = 5.0


@dataclass(frozen=True)
class ValueEvent:
    """A watched dependency has a new value."""

    dep: Dependency
    value: object
    index: int
    seen: float


@dataclass(frozen=True)
class FileEvent:
    """Something changed in a template folder."""

    path: Path


@dataclass(frozen=True)
class ReconfigureEvent:
    """SIGHUP: re-read the configuration."""


@dataclass(frozen=True)
class RegistryEvent:
    """The registry answered for the first time, went down, or came back."""


Event = ValueEvent | FileEvent | ReconfigureEvent | RegistryEvent


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


class _SourceHandler(FileSystemEventHandler):
    """watchdog's thread: hands file events to the loop, nothing else."""

    def __init__(self, post: Callable[[Path], None]) -> None:
        self.post = post

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, event.dest_path):
            if raw:
                self.post(Path(str(raw)))


def installed_checksum(path: Path) -> str:
    data = read_bytes(path)
    return "" if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


class Daemon:
    """`confpy -c FILE`: follows the registry and the template files, keeps nginx in step."""

    def __init__(
        self,
        config: Config,
        config_path: Path,
        environ: Mapping[str, str],
        *,
        registry_factory: Callable[[Config], Registry] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.config_path = config_path
        self.environ = environ
        self.registry_factory = registry_factory or open_registry
        self.clock = clock
        self.wall_clock = wall_clock
        self.sleep = sleep
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.metrics = Metrics()
        self.notifier = SystemdNotifier(environ)
        self.quiescence = Quiescence()
        self.status_server: StatusServer | None = None
        self.observer: BaseObserver | None = None
        self._locks = AsyncExitStack()
        self.rejected_series: set[str] = set()
        self.unavailable_series: set[tuple[str, str]] = set()
        self.ready_sent = False
        self.stopping = False
        self.cycles = 0
        self._configure(config)

    # --- set-up and tear-down --------------------------------------------------------------

    def _configure(self, config: Config) -> None:
        self.config = config
        self.engine = SyncEngine(config)
        if self.engine.live is not None:
            self.engine.live.on_pushed = self.metrics.live_pushes.inc
            self.engine.live.on_failure = self.metrics.live_push_failures.inc
            self.engine.live.on_unavailable = self._count_unavailable
            self.engine.live.on_drift = lambda name: self.metrics.live_drift.labels(upstream=name).inc()
        self.registry = self.registry_factory(config)
        self.timeline = Timeline(self.wall_clock)
        self.consul_was_down = False
        self.health = RegistryHealth(
            self.wall_clock,
            on_change=self._registry_changed,
            on_request=self.metrics.consul_requests.inc,
            on_error=self._registry_error,
            name=config.registry_name,
        )
        self.settings = WatchSettings(wait=config.registry_wait, max_backoff=config.registry_max_backoff)
        self.data = DataSource()
        self.first_fetches = FirstFetches(FIRST_FETCH_CONCURRENCY)
        self.jitter = random.Random()
        self.watches = WatchSet(self._new_watcher)
        self.probe: asyncio.Task[None] | None = None
        self.memories: dict[Path, Memory] = {}  # read once the locks are held (and 0.1's files moved)
        self.templates = {
            t.destination: TemplateState(t, checksum=installed_checksum(t.destination)) for t in config.templates
        }
        self.last_sync_ok = False
        self.last_sync_error = "no sync yet"
        self.not_reloaded = ""  # why installed files are not live in nginx yet (empty: they are)
        self.recheck_at: float | None = None
        self.quiescence.clear()
        self._snapshot: StatusSnapshot | None = None
        self.frozen = False  # gc.freeze() after the first complete sync
        self.unsaved: set[Path] = set()  # destinations whose remembered members are not on disk yet
        self.unsaved_results: dict[Path, RenderResult] = {}  # live mode: renders whose state file waits
        self.save_at: float | None = None
        self.unsaved_since: float | None = None  # when the oldest change not on disk was synced

    def _new_watcher(self, dep: Dependency) -> Watcher:
        return Watcher(
            dep,
            self.registry,
            self.settings,
            self.health,
            self._on_value,
            clock=self.clock,
            sleep=self.sleep,
            first_fetches=self.first_fetches,
            jitter=self.jitter,
        )

    def _on_value(self, dep: Dependency, value: object, index: int) -> None:
        self.events.put_nowait(ValueEvent(dep, value, index, self.clock()))

    def _registry_error(self, exc: RegistryError) -> None:
        self.metrics.consul_errors.inc()
        self.metrics.consul_up.set(0)

    def _start_observer(self) -> None:
        loop = asyncio.get_running_loop()
        self.observer = Observer()

        def post(path: Path) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, FileEvent(path))

        handler = _SourceHandler(post)
        for folder in sorted({t.source.parent for t in self.config.templates}):
            if folder.is_dir():
                self.observer.schedule(handler, str(folder), recursive=False)
            else:
                log.warning("template folder %s does not exist; edits there will not be noticed", folder)
        self.observer.start()

    async def _start(self) -> None:
        """Locks, the file observer, then a first render that tells what to watch."""
        self.notifier.notify("STATUS=starting: taking the destination locks")
        await self._locks.enter_async_context(self.engine.locked(t.destination for t in self.config.templates))
        self.memories = self.engine.load_memories()
        self._start_observer()
        self.notifier.notify("STATUS=waiting for Consul's first answer")
        await self._cycle(list(self.templates.values()), "start-up", {})

    def _save_state(self, now: bool = False) -> None:
        """Write the state files the last syncs left for later (see STATE_SAVE_QUIET)."""
        if self.save_at is None or (not now and self.clock() < self.save_at):
            return
        unsaved, self.unsaved, self.save_at, self.unsaved_since = self.unsaved, set(), None, None
        results, self.unsaved_results = self.unsaved_results, {}
        try:
            self.engine.save(list(results.values()), sorted(unsaved), self.memories)
        except ConfpyError as exc:
            log.error("could not save confpy's state files (read at the next restart): %s", exc)

    async def _stop(self) -> None:
        """Stop watching and release everything this configuration holds (bounded, never hangs)."""
        self._save_state(now=True)
        self.engine.tidy()  # after a cycle that failed, too (no save was due then)
        if self.probe is not None:
            self.probe.cancel()
            await asyncio.gather(self.probe, return_exceptions=True)
        await self.watches.stop_all()
        if self.observer is not None:
            self.observer.stop()  # its thread is a daemon thread: no join, stopping must be quick
            self.observer = None
        await self._locks.aclose()
        await self.registry.close()
        await self.engine.close()

    # --- readiness and status --------------------------------------------------------------

    def _registry_changed(self) -> None:
        """Consul lost or back: the timeline says so (not its first answer), the loop re-evaluates."""
        if not self.health.reachable:
            self.timeline.record("consul_down", f"Consul unreachable: {self.health.last_error}")
        elif self.consul_was_down:
            self.timeline.record("consul_up", "Consul answers again")
        self.consul_was_down = not self.health.reachable
        self.events.put_nowait(RegistryEvent())

    def _publish(self) -> None:
        """Something the status endpoint shows changed: the next read builds a new snapshot.

        Built on demand, not here: this runs on every turn of the loop, and at a thousand services
        a snapshot costs milliseconds that would sit between a Consul answer and its reload."""
        self._snapshot = None

    @property
    def snapshot(self) -> StatusSnapshot:
        """The immutable status the HTTP side reads (same loop: built when asked, then kept)."""
        if self._snapshot is None:
            self._snapshot = self._build_snapshot()
        return self._snapshot

    def _build_snapshot(self) -> StatusSnapshot:
        live = self.engine.live.status() if self.engine.live is not None else None
        services = {
            dep.describe(): value for dep, value in self.data.snapshot().items() if isinstance(value, HealthView)
        }
        return StatusSnapshot(
            registry_address=self.config.consul.address,
            registry_reachable=self.health.reachable,
            registry_error=self.health.last_error,
            waiting_for_first_answer=not self.health.answered_once,
            last_sync_ok=self.last_sync_ok,
            last_sync_error=self.last_sync_error,
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
                )
                for t in self.templates.values()
            ),
            services=services,
            mode=self.config.nginx.mode,
            live=live,
            pending=tuple(sorted(str(key) for key in self.quiescence.waiting())),
            cycles=self.cycles,
            not_reloaded=self.not_reloaded,
            timeline=self.timeline.events(),
            pid_file=str(self.config.nginx.pid_file),
            registry_down_since=self.health.down_since,
            kept_members=self._kept_members(),
        )

    def _kept_members(self) -> dict[str, tuple[ServiceInstance, ...]]:
        """The remembered members `on_empty = "keep"` holds in nginx, by service label."""
        kept: dict[str, tuple[ServiceInstance, ...]] = {}
        for state in self.templates.values():
            memory = self.memories.get(state.config.destination)
            for dep in state.deps:
                if memory is not None and isinstance(dep, ServiceHealth) and dep.describe() in state.kept:
                    members = memory.members.get(memory_key(dep.service, dep.tag, dep.dc, dep.passing))
                    if members:
                        kept[dep.describe()] = members
        return kept

    def _ready(self, status: str) -> None:
        """READY=1 once: after the first sync, or once the reason it cannot happen yet is known.

        A Consul outage at start-up must not make systemd kill and restart confpy in a loop:
        confpy is ready (serving /health, retrying, keeping nginx as it is) while it waits.
        """
        if self.ready_sent:
            self.notifier.notify(f"STATUS={status}"[:400])
            return
        self.ready_sent = True
        self.notifier.notify("READY=1", f"STATUS={status}"[:400])

    def _on_registry_event(self) -> None:
        self.metrics.consul_up.set(1 if self.health.reachable else 0)
        if not self.health.reachable:
            self._ready(f"waiting for Consul: {self.health.last_error}")
            if self.probe is None or self.probe.done():
                self.probe = asyncio.get_running_loop().create_task(self._probe_registry(), name="registry probe")
        elif not all(t.complete_once for t in self.templates.values()):
            self.notifier.notify("STATUS=Consul answers; waiting for every dependency's first answer")

    # --- events ----------------------------------------------------------------------------

    async def _probe_registry(self) -> None:
        """During an outage, ask the registry something cheap until it answers.

        The watches retry their blocking queries on their own, but a blocking query against a
        restarted registry may legitimately wait its whole `wait` (60 s) before it answers: this
        probe is what tells /health (and systemd's STATUS) that the registry is back, at once.
        """
        delay = self.settings.initial_backoff
        while not self.health.reachable:
            await self.sleep(delay)
            try:
                await self.registry.ping()
            except RegistryError:
                delay = min(delay * 2, self.settings.max_backoff)
                continue
            self.health.success()

    def _handle(self, event: Event) -> None:
        if isinstance(event, ValueEvent):
            self._on_value_event(event)
        elif isinstance(event, FileEvent):
            self._on_file_event(event.path)
        elif isinstance(event, RegistryEvent):
            self._on_registry_event()

    def _on_value_event(self, event: ValueEvent) -> None:
        dep = event.dep
        if dep not in self.watches:
            return  # a watcher stopped after its last answer
        self.metrics.consul_up.set(1)
        if isinstance(event.value, HealthView):
            for rejected in event.value.rejected:
                log.warning("left out of the render: %s", rejected)
            self._count_rejected(dep, event.value)
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
                    self.quiescence.change(
                        state.config.destination,
                        event.seen,
                        self.config.wait_for(state.config),
                        "first data",
                        immediate=True,
                    )
            else:
                self.quiescence.change(
                    state.config.destination,
                    event.seen,
                    self.config.wait_for(state.config),
                    f"{dep.describe()} changed",
                )

    def _count_rejected(self, dep: Dependency, view: HealthView) -> None:
        # A series only for services that have (or had) rejected instances: a thousand zero-valued
        # series would cost memory and scrape time for nothing.
        label = dep.describe()
        if view.rejected or label in self.rejected_series:
            self.metrics.invalid_instances.labels(service=label).set(len(view.rejected))
            self.rejected_series.add(label)

    def _count_unavailable(self, paused: Mapping[str, Mapping[str, float]]) -> None:
        """confpy_live_member_unavailable: a series per paused member, removed when it is used again."""
        now = {(name, member) for name, members in paused.items() for member in members}
        for name, member in self.unavailable_series - now:
            self.metrics.live_member_unavailable.remove(name, member)
        for name, member in now:
            self.metrics.live_member_unavailable.labels(upstream=name, member=member).set(1)
        self.unavailable_series = now

    def _on_file_event(self, path: Path) -> None:
        for state in self.templates.values():
            source = state.config.source
            if path == source or (path.parent == source.parent and path.suffix in TEMPLATE_SUFFIXES):
                log.info("template file %s changed; re-rendering %s", path, state.config.destination)
                self.quiescence.change(
                    state.config.destination,
                    self.clock(),
                    self.config.wait_for(state.config),
                    f"template {path.name} edited",
                    immediate=True,
                )

    async def _reconfigure(self) -> None:
        try:
            config = load_config(self.config_path, self.environ)
        except ConfigError as exc:
            log.error("SIGHUP: the new configuration is refused, the running one stays: %s", exc)
            return
        log.info("SIGHUP: re-read %s", self.config_path)
        self.notifier.notify("RELOADING=1")
        await self._stop()
        self._drop_registry_events()  # answers the old watches gave: the new configuration asks anew
        self._configure(config)
        await self._start()
        self.notifier.notify("READY=1", "STATUS=configuration re-read")

    def _drop_registry_events(self) -> None:
        kept = []
        while not self.events.empty():
            event = self.events.get_nowait()
            if not isinstance(event, (ValueEvent, RegistryEvent)):
                kept.append(event)
        for event in kept:
            self.events.put_nowait(event)

    # --- cycles ----------------------------------------------------------------------------

    def _render(self, state: TemplateState) -> RenderResult | None:
        try:
            result = self.engine.render(state.config, self.data, self.memories[state.config.destination])
        except RenderError as exc:
            state.last_error = str(exc)
            self.metrics.render_errors.labels(template=str(state.config.destination)).inc()
            log.error("%s: render failed, keeping the last good output: %s", state.config.destination, exc)
            if not self.ready_sent:
                self._ready(f"render failed: {exc}")  # systemd must not restart confpy for a template error
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
            log.info("stopped watching %s (no template uses it any more)", dep.describe())

    async def _cycle(self, states: list[TemplateState], reason: str, first_change: Mapping[Path, float]) -> None:
        """Render `states`, watch what they use, install the complete renders as one transaction."""
        self.cycles += 1
        results = [r for r in (self._render(s) for s in states) if r is not None]
        self._watch_what_templates_use()
        if not results:
            return
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
        self._note_reload(report.not_reloaded)
        for result in results:
            state = self.templates[result.template.destination]
            state.installed_once = True
            state.last_error = ""
            state.kept = result.kept
            if result.content is not None:
                state.checksum = "sha256:" + hashlib.sha256(result.content).hexdigest()
            if reloaded and result.template.destination in report.changed:
                state.last_reload = now
        if reloaded:
            self._note_reload(None, reloaded=True)
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
        if self.engine.live is not None:
            pushed = await self.engine.live.push_or_schedule()
            if pushed:
                self.timeline.record("push", f"pushed members of {', '.join(sorted(pushed))} to nginx (no reload)")
        self.unsaved.update(self.engine.remember(results, self.memories))
        if self.engine.live is not None:
            self.unsaved_results.update((r.template.destination, r) for r in results)
        if self.unsaved or self.unsaved_results or self.engine.untidy:
            # Written (and replaced backups removed) later, not now: nginx is starting its new
            # workers (or serving the pushed members), more changes may follow, and only a restart
            # reads these files.
            synced = self.clock()
            self.unsaved_since = synced if self.unsaved_since is None else self.unsaved_since
            self.save_at = min(synced + STATE_SAVE_QUIET, self.unsaved_since + STATE_SAVE_MAX_DELAY)
        if report.not_reloaded is None:
            await self._recheck_reload(now=True)
        self.last_sync_ok = True
        self.metrics.last_sync.set(now)
        in_sync = "in sync; last change installed " + time.strftime("%H:%M:%S") if report.changed else "in sync"
        if all(t.installed_once for t in self.templates.values()):
            if not self.frozen:
                self.frozen = True
                # What start-up built (the modules, the watches, a thousand services' data) stays
                # for the daemon's life: out of the collector's sight, a full collection no longer
                # walks it, which otherwise lands in the middle of a later change's render. Only
                # the young generations are collected first: a full collection here would itself
                # hold the loop (15 ms at 300 services, more in debug mode), and what the older
                # one holds has survived collections already.
                gc.collect(1)
                gc.freeze()
            self._ready(in_sync)

    def _note_reload(self, skipped: ReloadOutcome | None, reloaded: bool = False) -> None:
        """Keep /health honest: files nginx does not serve yet are a degraded state until a reload."""
        if skipped is not None:
            self.metrics.reloads_skipped.labels(reason=skipped.reason).inc()
            self.not_reloaded = skipped.detail
            self.recheck_at = self.clock() + RELOAD_RECHECK_INTERVAL
        elif reloaded and self.not_reloaded:
            log.info("nginx reloaded: it serves the installed files again")
            self.not_reloaded = ""
            self.recheck_at = None

    async def _recheck_reload(self, now: bool = False) -> None:
        """While installed files are not live, look for a usable nginx master and reload it.

        Every RELOAD_RECHECK_INTERVAL, and after each cycle (`now`): an nginx started since
        serves the installed files, one that runs older workers is reloaded."""
        if self.recheck_at is None or (not now and self.clock() < self.recheck_at):
            return
        self.recheck_at = self.clock() + RELOAD_RECHECK_INTERVAL
        destinations = [t.config.destination for t in self.templates.values()]
        if not self.engine.reloader.running():
            return
        # nginx started while the files were being installed may have read the previous ones: only
        # workers that started NGINX_START_SETTLE after the newest file surely serve it.
        if not self.engine.reloader.is_stale(destinations, settle=NGINX_START_SETTLE):
            log.info("nginx (re)started since and serves the installed files")
            self.not_reloaded, self.recheck_at = "", None
            return
        outcome = await self.engine.reloader.reload()
        if outcome.reloaded:
            log.info("reloaded nginx, which was serving older files: %s", outcome.detail)
            self._note_reload(None, reloaded=True)
        else:
            self.not_reloaded = outcome.detail

    def _sync_failed(self, results: list[RenderResult], exc: ConfpyError) -> None:
        self.last_sync_ok = False
        self.last_sync_error = str(exc)
        for result in results:
            self.templates[result.template.destination].last_error = str(exc)
        log.error("sync failed, the previous files stay installed and nginx was not reloaded: %s", exc)
        if all(t.complete_once for t in self.templates.values()):
            self._ready(f"sync failed: {exc}")

    async def _run_due(self) -> None:
        due = self.quiescence.due(self.clock())
        if not due:
            return
        states = [self.templates[key] for key in due if isinstance(key, Path) and key in self.templates]
        reasons = sorted(set().union(*(p.reasons for p in due.values())))
        first_change = {key: p.first_change for key, p in due.items() if isinstance(key, Path)}
        await self._cycle(states, "; ".join(reasons)[:300], first_change)

    async def _live_timers(self) -> None:
        live = self.engine.live
        if live is None:
            return
        deadline = live.next_deadline()
        if deadline is None or deadline <= self.clock():
            await live.on_timer()

    def _timeout(self, next_ping: float | None) -> float | None:
        deadlines = [
            d for d in (self.quiescence.next_deadline(), next_ping, self.recheck_at, self.save_at) if d is not None
        ]
        if self.engine.live is not None:
            live = self.engine.live.next_deadline()
            deadlines.append(live if live is not None else self.clock())
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock())

    # --- the loop --------------------------------------------------------------------------

    async def _main(self) -> None:
        if self.config.status.listen:
            self.status_server = StatusServer(self.config.status.listen, lambda: self.snapshot, self.metrics)
            await self.status_server.start()
        try:
            await self._start()
            interval = self.notifier.watchdog_interval
            next_ping = self.clock() + interval if interval else None
            while True:
                self._publish()
                event: Event | None = None
                try:
                    # asyncio.timeout, not wait_for: no extra task, so an event wakes this at once
                    async with asyncio.timeout(self._timeout(next_ping)):
                        event = await self.events.get()
                except TimeoutError:
                    pass
                while event is not None:
                    if isinstance(event, ReconfigureEvent):
                        await self._reconfigure()
                    else:
                        self._handle(event)
                    event = self.events.get_nowait() if not self.events.empty() else None
                await self._run_due()
                self._save_state()
                await self._live_timers()
                await self._recheck_reload()
                if next_ping is not None and interval and self.clock() >= next_ping:
                    self.notifier.notify("WATCHDOG=1")
                    next_ping = self.clock() + interval
        finally:
            await self._stop()
            if self.status_server is not None:
                await self.status_server.stop()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code.

        The signal handlers only queue the signal (no work, no logging in a handler); a small
        dispatcher task turns SIGHUP into an event for the main task and SIGTERM/SIGINT into
        cancelling it.
        """
        loop = asyncio.get_running_loop()
        signals: asyncio.Queue[int] = asyncio.Queue()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, signals.put_nowait, signum)
        main = asyncio.create_task(self._main(), name="confpy main")
        dispatcher = asyncio.create_task(self._dispatch_signals(signals, main), name="confpy signals")
        try:
            await main
        except asyncio.CancelledError:
            if not self.stopping:
                raise
        finally:
            dispatcher.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            self.notifier.notify("STOPPING=1")
        log.info("stopped")
        return 0

    async def _dispatch_signals(self, signals: asyncio.Queue[int], main: asyncio.Task[None]) -> None:
        while True:
            signum = await signals.get()
            if signum == signal.SIGHUP:
                self.events.put_nowait(ReconfigureEvent())
                continue
            log.info("received %s; stopping", signal.Signals(signum).name)
            self.stopping = True
            self.notifier.notify("STOPPING=1")
            main.cancel()
            return


def run_daemon(config: Config, config_path: Path, environ: Mapping[str, str]) -> int:
    """`confpy -c FILE`: the daemon."""
    return asyncio.run(Daemon(config, config_path, environ).run())
