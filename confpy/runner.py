"""The daemon's event loop: the only place that knows about timing.

Watchers (one thread per dependency) and the template-file observer post events to one queue;
the runner, on the main thread, turns them into cycles: it re-renders only the templates a change
touched, after their quiescence (`[wait] min`, pushed back by each change but never past `max`),
and installs every template changed in a cycle as one transaction (one `nginx -t`, one reload).
Nothing here polls: the loop sleeps on the queue until an event or a deadline.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tenacity
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from confpy.apply.files import read_bytes
from confpy.apply.live import LivePushError
from confpy.config import Config, TemplateConfig, load_config
from confpy.consul.client import ConsulClient
from confpy.consul.dependencies import AnyDependency
from confpy.consul.watcher import INITIAL_BACKOFF, ConsulHealth, Watcher, WatchSettings
from confpy.errors import CheckError, ConfigError, ConfpyError, ConsulError, LockError, RenderError
from confpy.metrics import Metrics
from confpy.pipeline import SyncEngine
from confpy.render.environment import DataSource, RenderResult
from confpy.render.values import HealthView
from confpy.status import StatusServer
from confpy.systemd import SystemdNotifier

log = logging.getLogger(__name__)

MAX_STARTUP_ROUNDS = 10
# Live mode: how often to look (locally, with psutil) for an nginx that reloaded or restarted.
LIVE_CHECK_INTERVAL = 5.0


@dataclass
class Pending:
    """A template waiting for quiescence."""

    first_change: float
    deadline: float
    max_deadline: float
    reasons: set[str] = field(default_factory=set)


@dataclass
class TemplateState:
    """What the runner knows of one template."""

    config: TemplateConfig
    deps: frozenset[AnyDependency] = frozenset()
    pending: Pending | None = None
    last_render: float | None = None
    last_reload: float | None = None
    last_error: str = ""
    checksum: str = ""


@dataclass(frozen=True)
class ValueEvent:
    dep: AnyDependency
    value: object
    index: int
    seen: float


@dataclass(frozen=True)
class FileEvent:
    path: Path


@dataclass(frozen=True)
class SignalEvent:
    signum: int


Event = ValueEvent | FileEvent | SignalEvent


class _SourceHandler(FileSystemEventHandler):
    def __init__(self, post: Any) -> None:
        self.post = post

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self.post(FileEvent(Path(str(raw))))


class Runner:
    """The daemon: follows Consul and the template files, keeps nginx in step."""

    def __init__(self, config: Config, config_path: Path, environ: Mapping[str, str]) -> None:
        self.config_path = config_path
        self.environ = environ
        # SimpleQueue.put is reentrant, so the signal handlers (on this same thread) may post to it.
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.metrics = Metrics()
        self.health = ConsulHealth(on_error=self._consul_error, on_request=self.metrics.consul_requests.inc)
        self.notifier = SystemdNotifier(environ)
        self.status_server: StatusServer | None = None
        self.watchers: dict[AnyDependency, Watcher] = {}
        self.locks = ExitStack()
        self.observer: Any = None
        self.last_sync_ok = False
        self.last_sync_error = "no sync yet"
        self.live_error = ""
        self.live_backoff = INITIAL_BACKOFF
        self.live_retry_at: float | None = None
        self.live_check_at: float | None = None
        self.nginx_generation: tuple[int, ...] = ()
        self._lock = threading.Lock()
        self._configure(config)

    # --- set-up and tear-down --------------------------------------------------------------

    def _configure(self, config: Config) -> None:
        self.config = config
        self.engine = SyncEngine(config)
        self.client = ConsulClient(config.consul)
        self.settings = WatchSettings(wait=config.consul.wait, max_backoff=config.consul.max_backoff)
        self.data = DataSource()
        self.memories = self.engine.load_memories()
        self.templates = {t.destination: TemplateState(t, checksum=installed_checksum(t.destination)) for t in config.templates}

    def _sleep(self, seconds: float) -> None:
        self.stopping.wait(seconds)

    def _consul_error(self, exc: ConsulError) -> None:
        self.metrics.consul_errors.inc()
        self.metrics.consul_up.set(0)

    def _post(self, event: Event) -> None:
        self.events.put(event)

    def _start_services(self) -> None:
        self.locks = ExitStack()
        self.locks.enter_context(self.engine.locked(t.destination for t in self.config.templates))
        if self.config.status.listen and self.status_server is None:
            self.status_server = StatusServer(self.config.status.listen, self.health_report, self.status_report, self.metrics)
            self.status_server.start()
        self.observer = Observer()
        handler = _SourceHandler(self._post)
        for folder in sorted({t.source.parent for t in self.config.templates}):
            if folder.is_dir():
                self.observer.schedule(handler, str(folder), recursive=False)
            else:
                log.warning("template folder %s does not exist; edits there will not be noticed", folder)
        self.observer.start()

    def _stop_services(self, final: bool) -> None:
        for watcher in self.watchers.values():
            watcher.stop()
        self.watchers = {}
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=1.0)
            self.observer = None
        self.locks.close()
        if final and self.status_server is not None:
            self.status_server.stop()
            self.status_server = None

    # --- status ----------------------------------------------------------------------------

    def health_report(self) -> tuple[bool, str]:
        """/health: OK when the last sync succeeded and Consul is reachable."""
        if not self.health.reachable:
            return False, f"Consul unreachable: {self.health.last_error}"
        if not self.last_sync_ok:
            return False, f"last sync failed: {self.last_sync_error}"
        if self.live_error:
            return False, f"live push failing: {self.live_error}"
        return True, "ok"

    def status_report(self) -> dict[str, Any]:
        """/status: templates and watched services."""

        def ts(value: float | None) -> str | None:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value)) if value else None

        with self._lock:
            templates = [
                {
                    "source": str(t.config.source),
                    "destination": str(t.config.destination),
                    "checksum": t.checksum,
                    "last_render": ts(t.last_render),
                    "last_reload": ts(t.last_reload),
                    "last_error": t.last_error,
                    "dependencies": sorted(d.describe() for d in t.deps),
                }
                for t in self.templates.values()
            ]
        services: dict[str, Any] = {}
        for dep, value in self.data.snapshot().items():
            if isinstance(value, HealthView):
                services[dep.describe()] = {
                    "instances": [
                        {"id": i.id, "address": i.address, "port": i.port, "weight": i.weight} for i in value.instances
                    ],
                    "rejected": [str(r) for r in value.rejected],
                }
        return {
            "consul": {"address": self.config.consul.address, "reachable": self.health.reachable, "last_error": self.health.last_error},
            "last_sync_ok": self.last_sync_ok,
            "last_sync_error": "" if self.last_sync_ok else self.last_sync_error,
            "templates": templates,
            "services": services,
            "live": {
                "mode": self.config.nginx.mode,
                "last_error": self.live_error,
                "upstreams": {name: up.to_json() for name, up in self.engine.wanted_live.items()},
            },
        }

    # --- watching --------------------------------------------------------------------------

    def _on_value(self, dep: AnyDependency, value: object, index: int) -> None:
        self.metrics.consul_up.set(1)
        self._post(ValueEvent(dep, value, index, time.monotonic()))

    def _sync_watchers(self, indexes: Mapping[AnyDependency, int] | None = None) -> None:
        """Watch exactly the dependencies the templates use now."""
        wanted: set[AnyDependency] = set().union(*(t.deps for t in self.templates.values()))
        for dep in set(self.watchers) - wanted:
            self.watchers.pop(dep).stop()
            self.data.forget(dep)
            log.info("stopped watching %s (no template uses it any more)", dep.describe())
        for dep in wanted - set(self.watchers):
            found, value = self.data.get(dep)
            start = (indexes or {}).get(dep, 0) if found else 0
            watcher = Watcher(dep, self.client, self.settings, self.health, self._on_value, start, value if found else None)
            self.watchers[dep] = watcher
            watcher.start()

    def _note_rejected(self, dep: AnyDependency, value: object) -> None:
        if isinstance(value, HealthView):
            for rejected in value.rejected:
                log.warning("left out of the render: %s", rejected)
            self.metrics.invalid_instances.labels(service=getattr(dep, "service", "?")).set(len(value.rejected))

    # --- rendering and applying ------------------------------------------------------------

    def _render(self, state: TemplateState) -> RenderResult | None:
        started = time.monotonic()
        try:
            result = self.engine.render(state.config, self.data, self.memories[state.config.destination])
            log.debug("rendered %s in %.1f ms", state.config.destination, (time.monotonic() - started) * 1000)
        except RenderError as exc:
            state.last_error = str(exc)
            self.metrics.render_errors.labels(template=str(state.config.destination)).inc()
            log.error("%s: render failed, keeping the last good output: %s", state.config.destination, exc)
            return None
        state.deps = result.dependencies
        if not result.complete:
            return None
        state.last_render = time.time()
        self.metrics.renders.labels(template=str(state.config.destination)).inc()
        return result

    def _apply(self, results: list[RenderResult], reason: str, first_change: dict[Path, float], check_stale: bool = False) -> bool:
        try:
            report = self.engine.install(results, self.memories, reason, check_stale=check_stale)
        except LivePushError as exc:
            self._live_failed(exc)
            self.last_sync_ok = True  # files are installed; only the push is pending
            return False
        except CheckError as exc:
            self.metrics.check_failures.inc()
            self._sync_failed(results, exc)
            return False
        except ConfpyError as exc:
            self.metrics.install_failures.inc()
            self._sync_failed(results, exc)
            return False
        now = time.time()
        with self._lock:
            for result in results:
                state = self.templates[result.template.destination]
                state.last_error = ""
                if result.content is not None:
                    state.checksum = "sha256:" + hashlib.sha256(result.content).hexdigest()
                if report.apply is not None and result.template.destination in report.changed and report.apply.reload.reloaded:
                    state.last_reload = now
        if report.apply is not None and report.apply.reload.reloaded:
            self.metrics.reloads.inc()
            done = time.monotonic()
            for path in report.changed:
                if path in first_change:
                    self.metrics.change_to_reload.observe(done - first_change[path])
        self.last_sync_ok = True
        self._live_ok(report.pushed)
        self.metrics.last_sync.set(now)
        self.notifier.notify(f"STATUS=in sync; last change installed {time.strftime('%H:%M:%S')}" if report.changed else "STATUS=in sync")
        return True

    def _live_ok(self, pushed: list[str]) -> None:
        self.metrics.live_pushes.inc(len(pushed))
        if self.live_error:
            log.info("live push works again")
        self.live_error = ""
        self.live_backoff = INITIAL_BACKOFF
        self.live_retry_at = None
        self.nginx_generation = self.engine.installer.reloader.worker_pids()

    def _live_failed(self, exc: LivePushError) -> None:
        self.metrics.live_push_failures.inc()
        if not self.live_error:
            log.error("live push failed, nginx keeps its current members; retrying with backoff: %s", exc)
        self.live_error = str(exc)
        self.live_retry_at = time.monotonic() + self.live_backoff
        self.live_backoff = min(self.live_backoff * 2, self.config.consul.max_backoff)

    def _live_push(self, reason: str) -> None:
        """Retry a failed push, or re-check after nginx reloaded or restarted."""
        try:
            pushed = self.engine.push_live()
        except LivePushError as exc:
            self._live_failed(exc)
            return
        if pushed:
            log.info("re-pushed live members (%s): %s", reason, ", ".join(pushed))
        self._live_ok(pushed)

    def _live_timers(self, now: float) -> None:
        if self.config.nginx.mode != "live":
            return
        if self.live_retry_at is not None and now >= self.live_retry_at:
            self._live_push("retry after a failed push")
        if self.live_check_at is None or now >= self.live_check_at:
            self.live_check_at = now + LIVE_CHECK_INTERVAL
            generation = self.engine.installer.reloader.worker_pids()
            if generation and generation != self.nginx_generation:
                if self.engine.live is not None:
                    self.engine.live.forget()
                self._live_push("nginx has new workers")

    def _sync_failed(self, results: list[RenderResult], exc: ConfpyError) -> None:
        self.last_sync_ok = False
        self.last_sync_error = str(exc)
        for result in results:
            self.templates[result.template.destination].last_error = str(exc)
        log.error("sync failed, the previous files stay installed and nginx was not reloaded: %s", exc)
        self.notifier.notify(f"STATUS=sync failed: {exc}"[:400])

    def _cycle(self, states: list[TemplateState], reason: str) -> None:
        first_change = {s.config.destination: s.pending.first_change for s in states if s.pending}
        for state in states:
            state.pending = None
        results = [r for r in (self._render(s) for s in states) if r is not None]
        self._sync_watchers()
        if results:
            self._apply(results, reason, first_change)

    # --- start-up ----------------------------------------------------------------------------

    def _initial_sync(self) -> None:
        """A full one-shot sync (retrying Consul until it answers), then watch from its indexes."""
        indexes: dict[AnyDependency, int] = {}
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ConsulError),
            wait=tenacity.wait_exponential_jitter(initial=INITIAL_BACKOFF, max=self.config.consul.max_backoff, jitter=INITIAL_BACKOFF),
            stop=tenacity.stop_when_event_set(self.stopping),
            sleep=self._sleep,
            reraise=True,
        )
        for _ in range(MAX_STARTUP_ROUNDS):
            results = [self._render(s) for s in self.templates.values()]
            missing = set().union(*(s.deps for s in self.templates.values())) - set(self.data.snapshot())
            if not missing:
                break

            def fetch(deps: set[AnyDependency] = missing) -> dict[AnyDependency, int]:
                try:
                    found = self.engine.fetch_all(self.client, deps, self.data)
                except ConsulError as exc:
                    self.health.failure(next(iter(deps)), exc)
                    self.last_sync_error = str(exc)
                    raise
                self.health.success()
                return found

            try:
                indexes.update(retrying(fetch))
            except ConsulError:
                return  # stopping
        complete = [r for r in results if r is not None]
        if complete:
            self._apply(complete, "start-up sync", {}, check_stale=True)
        self._sync_watchers(indexes)

    # --- the loop ----------------------------------------------------------------------------

    def _schedule(self, state: TemplateState, now: float, reason: str, immediate: bool = False) -> None:
        wait = self.config.wait_for(state.config)
        if state.pending is None:
            state.pending = Pending(first_change=now, deadline=now, max_deadline=now + wait.max)
        pending = state.pending
        pending.deadline = now if immediate else min(now + wait.min, pending.max_deadline)
        pending.reasons.add(reason)

    def _handle(self, event: Event) -> None:
        if isinstance(event, ValueEvent):
            if event.dep not in self.watchers:
                return  # a watcher stopped after its last answer
            self._note_rejected(event.dep, event.value)
            if not self.data.set(event.dep, event.value):
                return
            log.info("%s changed (index %d)", event.dep.describe(), event.index)
            for state in self.templates.values():
                if event.dep in state.deps:
                    self._schedule(state, event.seen, f"{event.dep.describe()} changed")
        elif isinstance(event, FileEvent):
            for state in self.templates.values():
                source = state.config.source
                if event.path == source or (event.path.parent == source.parent and event.path.suffix in (".j2", ".jinja", ".tmpl")):
                    log.info("template file %s changed; re-rendering %s", event.path, state.config.destination)
                    self._schedule(state, time.monotonic(), f"template {event.path.name} edited", immediate=True)
        elif event.signum == signal.SIGHUP:
            self._reconfigure()
        else:
            log.info("received %s; stopping", signal.Signals(event.signum).name)
            self.stopping.set()

    def _reconfigure(self) -> None:
        try:
            config = load_config(self.config_path, self.environ)
        except ConfigError as exc:
            log.error("SIGHUP: the new configuration is refused, the running one stays: %s", exc)
            return
        log.info("SIGHUP: re-read %s", self.config_path)
        self.notifier.notify("RELOADING=1")
        self._stop_services(final=False)
        self._configure(config)
        try:
            self._start_services()
        except LockError as exc:
            log.error("SIGHUP: %s", exc)
        self._initial_sync()
        self.notifier.notify("READY=1", "STATUS=configuration re-read")

    def _next_timeout(self, next_ping: float | None) -> float | None:
        deadlines = [s.pending.deadline for s in self.templates.values() if s.pending]
        deadlines += [t for t in (next_ping, self.live_retry_at, self.live_check_at) if t is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda num, frame: self._post(SignalEvent(num)))
        self._start_services()
        self.notifier.notify("STATUS=initial sync")
        self._initial_sync()
        self.notifier.notify("READY=1", "STATUS=in sync" if self.last_sync_ok else f"STATUS=waiting: {self.last_sync_error}"[:400])
        interval = self.notifier.watchdog_interval
        next_ping = time.monotonic() + interval if interval else None
        try:
            while not self.stopping.is_set():
                try:
                    event: Event | None = self.events.get(timeout=self._next_timeout(next_ping))
                except queue.Empty:
                    event = None
                while event is not None and not self.stopping.is_set():
                    self._handle(event)
                    try:
                        event = self.events.get_nowait()
                    except queue.Empty:
                        event = None
                if self.stopping.is_set():
                    break
                now = time.monotonic()
                due = [s for s in self.templates.values() if s.pending and s.pending.deadline <= now]
                if due:
                    reasons = sorted(set().union(*(s.pending.reasons for s in due if s.pending)))
                    self._cycle(due, "; ".join(reasons)[:300])
                self._live_timers(time.monotonic())
                if next_ping is not None and interval and time.monotonic() >= next_ping:
                    self.notifier.notify("WATCHDOG=1")
                    next_ping = time.monotonic() + interval
        finally:
            self.notifier.notify("STOPPING=1")
            self._stop_services(final=True)
        log.info("stopped")
        return 0


def run_daemon(config: Config, config_path: Path, environ: Mapping[str, str]) -> int:
    """`confpy -c FILE`: the daemon."""
    return Runner(config, config_path, environ).run()


def installed_checksum(path: Path) -> str:
    data = read_bytes(path)
    return "" if data is None else "sha256:" + hashlib.sha256(data).hexdigest()
