"""The daemon: one asyncio event loop that follows the registry and keeps nginx in step.

Everything happens on one loop: a task per watched dependency (`watch/`), the status endpoint,
signal handlers that only queue, the template-file observer posting into the loop
(`events.py`). The main task turns events into cycles (`cycle.py`): a template is re-rendered
after its quiescence, or at once while it still waits for its first complete render, and every
template due in a cycle is installed as one transaction (one `nginx -t`, one reload). Nothing
polls: the main task sleeps on its queue until an event or the earliest timer's deadline
(`timers.py`: state saves, systemd's watchdog, sync retries; the engine's live-mode timer).

Stopping is cancelling the main task: whatever it awaits (a lock, a registry answer, `nginx -t`)
ends at once, an interrupted install rolls back, and the clean-up closes every connection.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path

from confpy.apply.live import LiveHooks
from confpy.config import Config, load_config
from confpy.daemon.cycle import NGINX_START_SETTLE, Cycles, TemplateState
from confpy.daemon.events import (
    Event,
    FileEvent,
    ReconfigureEvent,
    RegistryEvent,
    TemplateObserver,
    ValueEvent,
    drop_registry_events,
)
from confpy.daemon.intake import TEMPLATE_SUFFIXES, Intake
from confpy.daemon.limits import FileBudget, raise_open_file_limit
from confpy.daemon.metrics import Metrics
from confpy.daemon.reporting import build_snapshot
from confpy.daemon.signals import run_until_stopped
from confpy.daemon.snapshot import StatusSnapshot
from confpy.daemon.status import StatusServer
from confpy.daemon.systemd import SystemdNotifier
from confpy.daemon.timeline import Timeline
from confpy.daemon.timers import STATE_SAVE_MAX_DELAY, STATE_SAVE_QUIET, Readiness, WatchdogTimer
from confpy.errors import ConfigError, RegistryError
from confpy.model import HealthView
from confpy.pipeline import SyncEngine
from confpy.registry.base import Dependency, Registry
from confpy.registry.factory import open_registry
from confpy.registry.view import registry_view
from confpy.render.datasource import DataSource
from confpy.retry import Backoff
from confpy.timer import Timer, earliest, run_due
from confpy.watch.watcher import FirstFetches, RegistryHealth, Sleep, Watcher, WatchFailures, WatchSettings
from confpy.watch.watchset import WatchSet

log = logging.getLogger(__name__)

__all__ = [
    "NGINX_START_SETTLE",
    "STATE_SAVE_MAX_DELAY",
    "STATE_SAVE_QUIET",
    "TEMPLATE_SUFFIXES",
    "Daemon",
    "TemplateState",
    "ValueEvent",
    "run_daemon",
]

# Non-blocking first queries in flight at once (blocking ones are not limited: they wait).
FIRST_FETCH_CONCURRENCY = 32


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
        self.readiness = Readiness(self.notifier)
        self.status_server: StatusServer | None = None
        self.observer = TemplateObserver()
        self.files = FileBudget(raise_open_file_limit())
        self._locks = AsyncExitStack()
        self._configure(config)

    # --- set-up and tear-down --------------------------------------------------------------

    def _configure(self, config: Config) -> None:
        self.config = config
        hooks = LiveHooks(
            pushed=self.metrics.live_pushes.inc,
            failed=self.metrics.live_push_failures.inc,
            unavailable=self.metrics.count_unavailable,
            drift=lambda name: self.metrics.live_drift.labels(upstream=name).inc(),
        )
        self.engine = SyncEngine(config, hooks)
        self.registry = self.registry_factory(config)
        self.registry_view = registry_view(config)
        self.metrics.follow(self.registry_view.kind)
        self.timeline = Timeline(self.wall_clock)
        self.registry_was_down = False
        self.health = RegistryHealth(
            self.wall_clock,
            on_change=self._registry_changed,
            on_request=self.metrics.registry_request,
            on_error=self._registry_error,
            name=self.registry_view.name,
        )
        self.settings = WatchSettings(
            wait=self.registry_view.wait,
            max_backoff=self.registry_view.max_backoff,
            initial_backoff=self.registry_view.initial_backoff,
        )
        self.data = DataSource()
        self.first_fetches = FirstFetches(FIRST_FETCH_CONCURRENCY)
        self.watch_failures = WatchFailures(
            on_failure=lambda dep, exc: self.metrics.watch_failures.inc(),
            on_change=lambda: self.events.put_nowait(RegistryEvent()),  # the loop turns: /health follows
        )
        self.jitter = random.Random()
        self.watches = WatchSet(self._new_watcher)
        self.probe: asyncio.Task[None] | None = None
        self.cycles_ = Cycles(
            config,
            self.engine,
            self.data,
            self.watches,
            self.metrics,
            self.timeline,
            self.readiness,
            self.clock,
            self.wall_clock,
        )
        self.intake = Intake(config, self.cycles_, self.data, self.timeline, self.clock)
        self._snapshot: StatusSnapshot | None = None

    @property
    def cycles(self) -> int:
        return self.cycles_.cycles

    @property
    def templates(self) -> dict[Path, TemplateState]:
        return self.cycles_.templates

    def timers(self, watchdog: WatchdogTimer | None = None) -> list[Timer]:
        """Every timer the loop sleeps for: quiescence's due cycles first, then the others."""
        timers: list[Timer] = [
            self._due_cycles,
            self.cycles_.saver,
            self.cycles_.retry,
            self.cycles_.budget,
            self.cycles_.guard,
            *self.engine.timers(),
        ]
        return timers if watchdog is None else [*timers, watchdog]

    @property
    def _due_cycles(self) -> Timer:
        return _QuiescenceTimer(self.cycles_)

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
            failures=self.watch_failures,
        )

    def _on_value(self, dep: Dependency, value: object, index: int) -> None:
        self.events.put_nowait(ValueEvent(dep, value, index, self.clock()))

    def _registry_error(self, exc: RegistryError) -> None:
        self.metrics.registry_error()

    async def _start(self) -> None:
        """Locks, the file observer, then a first render that tells what to watch."""
        self.notifier.notify("STATUS=starting: taking the destination locks")
        await self._locks.enter_async_context(self.engine.locked(t.destination for t in self.config.templates))
        self.cycles_.memories = self.engine.load_memories()
        self.observer.start((t.source.parent for t in self.config.templates), self.events)
        self.notifier.notify(f"STATUS=waiting for {self.registry_view.name}'s first answer")
        await self.cycles_.cycle(list(self.templates.values()), "start-up", {})

    def _save_state(self, now: bool = False) -> None:
        """Write the state files the last syncs left for later (at once with `now`)."""
        saver = self.cycles_.saver
        if saver.save_at is not None and (now or self.clock() >= saver.save_at):
            saver.flush(self.clock())

    async def _stop(self) -> None:
        """Stop watching and release everything this configuration holds (bounded, never hangs)."""
        self._save_state(now=True)
        self.engine.tidy()  # after a cycle that failed, too (no save was due then)
        if self.probe is not None:
            self.probe.cancel()
            await asyncio.gather(self.probe, return_exceptions=True)
        await self.watches.stop_all()
        self.observer.stop()
        await self._locks.aclose()
        await self.registry.close()
        await self.engine.close()

    # --- readiness and status --------------------------------------------------------------

    def _registry_changed(self) -> None:
        """The registry lost or back: the timeline says so (not its first answer), the loop re-evaluates."""
        kind, name = self.registry_view.kind, self.registry_view.name
        if not self.health.reachable:
            self.timeline.record(f"{kind}_down", f"{name} unreachable: {self.health.last_error}")
        elif self.registry_was_down:
            self.timeline.record(f"{kind}_up", f"{name} answers again")
        self.registry_was_down = not self.health.reachable
        self.events.put_nowait(RegistryEvent())

    def _publish(self) -> None:
        """Something the status endpoint shows changed: the next read builds a new snapshot.

        Built on demand, not here: this runs on every turn of the loop, and at a thousand services
        a snapshot costs milliseconds that would sit between a registry answer and its reload."""
        self._snapshot = None

    @property
    def snapshot(self) -> StatusSnapshot:
        """The immutable status the HTTP side reads (same loop: built when asked, then kept)."""
        if self._snapshot is None:
            self._snapshot = build_snapshot(
                self.config,
                self.registry_view,
                self.cycles_,
                self.engine,
                self.health,
                self.timeline,
                self.clock(),
                self.watch_failures,
            )
        return self._snapshot

    def _on_registry_event(self) -> None:
        name = self.registry_view.name
        self.metrics.set_registry_up(self.health.reachable)
        if not self.health.reachable:
            self.readiness.ready(f"waiting for {name}: {self.health.last_error}")
            if self.probe is None or self.probe.done():
                self.probe = asyncio.get_running_loop().create_task(self._probe_registry(), name="registry probe")
        elif not all(t.complete_once for t in self.templates.values()):
            self.notifier.notify(f"STATUS={name} answers; waiting for every dependency's first answer")

    # --- events ----------------------------------------------------------------------------

    async def _probe_registry(self) -> None:
        """During an outage, ask the registry something cheap until it answers.

        The watches retry their blocking queries on their own, but a blocking query against a
        restarted registry may legitimately wait its whole `wait` (60 s) before it answers: this
        probe is what tells /health (and systemd's STATUS) that the registry is back, at once.
        """
        backoff = Backoff(self.settings.retry, self.jitter)
        while not self.health.reachable:
            await self.sleep(backoff.failed(0.0))
            try:
                await self.registry.ping()
            except RegistryError:
                continue
            self.health.success()

    def _handle(self, event: Event) -> None:
        if isinstance(event, ValueEvent):
            self._on_value_event(event)
        elif isinstance(event, FileEvent):
            self.intake.on_file(event.path)
        elif isinstance(event, RegistryEvent):
            self._on_registry_event()

    def _on_value_event(self, event: ValueEvent) -> None:
        if event.dep not in self.watches:
            return  # a watcher stopped after its last answer
        self.metrics.set_registry_up(True)
        if isinstance(event.value, HealthView):
            for rejected in event.value.rejected:
                log.warning("left out of the render: %s", rejected)
            self.metrics.count_rejected(event.dep.describe(), len(event.value.rejected))
        self.intake.on_value(event)

    async def _reconfigure(self) -> None:
        try:
            config = load_config(self.config_path, self.environ)
        except ConfigError as exc:
            log.error("SIGHUP: the new configuration is refused, the running one stays: %s", exc)
            return
        log.info("SIGHUP: re-read %s", self.config_path)
        self.notifier.notify("RELOADING=1")
        await self._stop()
        drop_registry_events(self.events)  # answers the old watches gave: the new configuration asks anew
        self._configure(config)
        await self._start()
        self.notifier.notify("READY=1", "STATUS=configuration re-read")

    async def _run_due(self) -> None:
        await self.cycles_.run_due()

    # --- the loop --------------------------------------------------------------------------

    async def _main(self) -> None:
        if self.config.status.listen:
            self.status_server = StatusServer(self.config.status, lambda: self.snapshot, self.metrics)
            await self.status_server.start()
        try:
            await self._start()
            watchdog = WatchdogTimer(self.notifier, self.clock())
            while True:
                self._publish()
                event: Event | None = None
                deadline = earliest(self.timers(watchdog))
                try:
                    # asyncio.timeout, not wait_for: no extra task, so an event wakes this at once
                    async with asyncio.timeout(None if deadline is None else max(0.0, deadline - self.clock())):
                        event = await self.events.get()
                except TimeoutError:
                    pass
                while event is not None:
                    if isinstance(event, ReconfigureEvent):
                        await self._reconfigure()
                    else:
                        self._handle(event)
                    event = self.events.get_nowait() if not self.events.empty() else None
                await run_due(self.timers(watchdog), self.clock())
                self.files.check(len(self.watches))
        finally:
            await self._stop()
            if self.status_server is not None:
                await self.status_server.stop()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (SIGHUP re-reads the configuration); return the exit code."""
        await run_until_stopped(self._main(), lambda: self.events.put_nowait(ReconfigureEvent()), self.notifier)
        log.info("stopped")
        return 0


class _QuiescenceTimer:
    """Templates whose quiescence has passed, as a timer: their cycle is its turn."""

    def __init__(self, cycles: Cycles) -> None:
        self.cycles = cycles

    def next_deadline(self) -> float | None:
        return self.cycles.quiescence.next_deadline()

    async def on_timer(self, now: float) -> None:
        await self.cycles.run_due()


def run_daemon(config: Config, config_path: Path, environ: Mapping[str, str]) -> int:
    """`confpy -c FILE`: the daemon."""
    return asyncio.run(Daemon(config, config_path, environ).run())
