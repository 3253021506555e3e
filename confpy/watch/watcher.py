"""The blocking-query loop for one dependency: index rules, rate limit, retries with backoff.

One Watcher is one asyncio task awaiting one long poll. It follows Consul's client rules: send
back the last index; reset to 0 when the index goes backwards (a restored or restarted Consul);
never send less than 1 after an answer; wait at least `min_interval` between two queries so a
flapping registry cannot spin it; and retry failures forever with exponential backoff and jitter.
It reports only values that differ from the last one. Cancelling the task stops it at once, in
the middle of a query or of a backoff sleep alike.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from confpy.errors import RegistryError
from confpy.registry.base import Dependency, Registry
from confpy.retry import RetryPolicy

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.1
INITIAL_BACKOFF = 0.25

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def next_index(last: int, new: int) -> int:
    """The index to send next, by Consul's rules: reset when it went backwards, never below 1."""
    if new < last:
        return 0
    return max(new, 1)


class FirstFetches:
    """Start-up order, shared by every watcher: at most `limit` first (non-blocking) queries at once,
    so a thousand watches starting together do not buffer a thousand answers at the same time; and
    no blocking query starts while a watcher has not yet made its first query, so the queries the
    first render needs are not slowed by a thousand long polls being set up beside them. Nothing is
    missed by waiting: a blocking query sends the index of its first answer and returns at once
    when the data moved since. A first query that fails counts as made (its retries do not hold
    the others back)."""

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)  # held while a first query runs
        self._pending = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def expect(self) -> None:
        """A watcher starts: its first query is still to come."""
        self._pending += 1
        self._settled.clear()

    def done(self) -> None:
        """That first query was made (answered, failed or abandoned)."""
        self._pending -= 1
        if not self._pending:
            self._settled.set()

    async def settled(self) -> None:
        """Return once every started watcher has made its first query."""
        await self._settled.wait()


class RegistryHealth:
    """Whether the registry answers: logs state changes (down since / back after), not every retry.

    `on_change` runs on every transition (first answer, down, back), `on_request` and `on_error`
    on every query and failure: the daemon hangs readiness, status and metrics on them.
    """

    def __init__(
        self,
        wall_clock: Clock = time.time,
        on_change: Callable[[], None] | None = None,
        on_request: Callable[[], None] | None = None,
        on_error: Callable[[RegistryError], None] | None = None,
        name: str = "Consul",
    ) -> None:
        self.name = name  # the registry, in log lines
        self.wall_clock = wall_clock
        self.on_change = on_change
        self.on_request = on_request
        self.on_error = on_error
        self.down_since: float | None = None
        self.last_error: str = ""
        self.answered_once = False

    def request(self) -> None:
        if self.on_request is not None:
            self.on_request()

    @property
    def reachable(self) -> bool:
        return self.down_since is None

    def failure(self, dep: Dependency, exc: RegistryError) -> None:
        if self.on_error is not None:
            self.on_error(exc)
        self.last_error = str(exc)
        if self.down_since is not None:
            return
        self.down_since = self.wall_clock()
        log.error(
            "%s unavailable since %s: %s (watching %s); retrying with backoff, nginx and the installed files stay as they are",
            self.name,
            time.strftime("%H:%M:%S", time.localtime(self.down_since)),
            exc,
            dep.describe(),
        )
        self._changed()

    def success(self) -> None:
        first = not self.answered_once
        self.answered_once = True
        if self.down_since is None:
            if first:
                self._changed()
            return
        outage = self.wall_clock() - self.down_since
        self.down_since = None
        self.last_error = ""
        log.info("%s is back after %.1fs", self.name, outage)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


class WatchFailures:
    """The watches whose loop failed with something other than a registry error (a bug, a value
    no decoder expected): each is logged with its dependency, counted through `on_failure`, and
    restarted after a backoff; /health is not OK while one is failing (`failing`)."""

    def __init__(
        self,
        on_failure: Callable[[Dependency, BaseException], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.on_failure = on_failure
        self.on_change = on_change
        self.failing: dict[Dependency, str] = {}

    def failed(self, dep: Dependency, exc: BaseException, retry_in: float) -> None:
        first = dep not in self.failing
        self.failing[dep] = f"{type(exc).__name__}: {exc}"[:300]
        log.error(
            "the watch of %s failed: %s; restarting it in %.1fs (nginx keeps what it has)",
            dep.describe(),
            self.failing[dep],
            retry_in,
            exc_info=exc if first else None,  # the traceback once, not on every retry
        )
        if self.on_failure is not None:
            self.on_failure(dep, exc)
        if first and self.on_change is not None:
            self.on_change()

    def recovered(self, dep: Dependency) -> None:
        if self.failing.pop(dep, None) is not None:
            log.info("the watch of %s works again", dep.describe())
            if self.on_change is not None:
                self.on_change()

    def forget(self, dep: Dependency) -> None:
        """`dep` is no longer watched: its failure no longer counts."""
        if self.failing.pop(dep, None) is not None and self.on_change is not None:
            self.on_change()

    def describe(self) -> str:
        """The failing watches, for /health (empty when none)."""
        return "; ".join(
            f"{dep.describe()}: {why}" for dep, why in sorted(self.failing.items(), key=lambda i: i[0].describe())
        )


@dataclass(frozen=True)
class WatchSettings:
    """How a watcher polls."""

    wait: float
    max_backoff: float
    min_interval: float = MIN_INTERVAL
    initial_backoff: float = INITIAL_BACKOFF

    @functools.cached_property
    def retry(self) -> RetryPolicy:
        """The one retry policy, as watches use it: doubling from `initial_backoff` to `max_backoff`."""
        return RetryPolicy(self.initial_backoff, self.max_backoff)


OnValue = Callable[[Dependency, object, int], None]


class Watcher:
    """One dependency's blocking-query loop, as one task on the running event loop."""

    def __init__(
        self,
        dep: Dependency,
        registry: Registry,
        settings: WatchSettings,
        health: RegistryHealth,
        on_value: OnValue,
        *,
        start_index: int = 0,
        last_value: object = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        first_fetches: FirstFetches | None = None,
        jitter: random.Random | None = None,
        failures: WatchFailures | None = None,
    ) -> None:
        self.dep = dep
        self.registry = registry
        self.settings = settings
        self.health = health
        self.on_value = on_value
        self.index = start_index
        self.last_value = last_value
        self.has_value = last_value is not None
        self.clock = clock
        self.sleep = sleep
        self.queries = 0
        self.first_fetches = first_fetches
        self._first_pending = False
        self._last_query: float | None = None
        self._task: asyncio.Task[None] | None = None
        # One generator shared by a daemon's watchers: each Random holds 2.5 KB of state.
        self.random = jitter or random.Random()
        self.failures = failures or WatchFailures()

    def expect_first(self) -> None:
        """Count this watcher's first query as still to come (done by `start`; earlier by a
        WatchSet that starts its task a few loop turns later)."""
        if self.first_fetches is not None and self.index == 0 and not self._first_pending:
            self.first_fetches.expect()
            self._first_pending = True

    def start(self) -> None:
        self.expect_first()
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"watch {self.dep.describe()}")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running task (None before `start`)."""
        return self._task

    def stop(self) -> None:
        """Cancel the task: an in-flight query is abandoned and its answer never reported."""
        self._first_made()
        self.failures.forget(self.dep)
        if self._task is not None:
            self._task.cancel()

    def _first_made(self) -> None:
        if self._first_pending and self.first_fetches is not None:
            self._first_pending = False
            self.first_fetches.done()

    async def wait_stopped(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after `failures` failures in a row: doubling from `initial_backoff`, capped
        at `max_backoff`, plus up to `initial_backoff` of jitter so watches do not retry in step."""
        return self.settings.retry.delay(failures, self.random)

    async def _fetch(self) -> tuple[int, object]:
        # Rate limit: a token bucket of one token refilled every min_interval.
        if self._last_query is not None:
            delay = self._last_query + self.settings.min_interval - self.clock()
            if delay > 0:
                await self.sleep(delay)
        self._last_query = self.clock()
        self.queries += 1
        self.health.request()
        try:
            if self.first_fetches is None:
                answer = await self.registry.fetch(self.dep, self.index, self.settings.wait)
            elif self.index == 0:
                try:
                    async with self.first_fetches.slots:
                        answer = await self.registry.fetch(self.dep, self.index, self.settings.wait)
                finally:
                    self._first_made()
            else:
                await self.first_fetches.settled()
                answer = await self.registry.fetch(self.dep, self.index, self.settings.wait)
        except RegistryError as exc:
            self.health.failure(self.dep, exc)
            raise
        self.health.success()
        return answer

    async def poll_once(self) -> bool:
        """One query (retried until it succeeds); True when it brought a new value."""
        failures = 0
        while True:  # inline, not a helper coroutine: a thousand watches each hold these frames
            try:
                new_index, value = await self._fetch()
                break
            except RegistryError:
                failures += 1
                await self.sleep(self.backoff(failures))
        previous = self.index
        self.index = next_index(previous, new_index)
        if self.index == 0:
            log.info(
                "%s: %s's index went backwards (%d -> %d); re-reading from 0",
                self.dep.describe(),
                self.health.name,
                previous,
                new_index,
            )
        if self.has_value and value == self.last_value:
            return False
        self.last_value = value
        self.has_value = True
        self.on_value(self.dep, value, new_index)
        return True

    async def run(self) -> None:
        """Poll forever. Registry errors are retried inside `poll_once`; anything else (a value no
        decoder expected, a bug) must not end the watch silently: it is reported, backed off with
        the one retry policy and the loop starts again from a fresh query."""
        crashes = 0
        while True:
            try:
                await self.poll_once()
            except Exception as exc:  # noqa: BLE001 - supervised: any failure restarts the watch
                self._first_made()
                crashes += 1
                delay = self.backoff(crashes)
                self.failures.failed(self.dep, exc, delay)
                self.index = 0  # the query starts anew: a fresh answer, whatever went wrong mid-way
                await self.sleep(delay)
                continue
            if crashes:
                crashes = 0
                self.failures.recovered(self.dep)
            # Let the daemon act first on what has arrived (render, install, start `nginx -t` or
            # push) before this task spends CPU on sending its next query: that query only waits.
            await asyncio.sleep(0)
