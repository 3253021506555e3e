"""The blocking-query loop for one dependency: index rules, rate limit, retries with backoff.

One Watcher is one thread blocked in one long poll. It follows Consul's client rules: send back
the last X-Consul-Index; reset to 0 when the index goes backwards (a restored or restarted
Consul); never send less than 1 after an answer; wait at least `min_interval` between two
queries so a flapping Consul cannot spin it; and retry failures forever with exponential backoff
and jitter. It reports only values that differ from the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from confpy.consul.client import ConsulClient
from confpy.consul.dependencies import AnyDependency
from confpy.errors import ConsulError

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.1
INITIAL_BACKOFF = 0.25


def next_index(last: int, new: int) -> int:
    """The index to send next, by Consul's rules: reset when it went backwards, never below 1."""
    if new < last:
        return 0
    return max(new, 1)


class ConsulHealth:
    """Shared view of Consul's reachability: logs state changes (down since / back after), not every retry."""

    def __init__(self, on_error: Callable[[ConsulError], None] | None = None, on_request: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self.last_error: str = ""
        self._on_error = on_error
        self.on_request = on_request

    @property
    def reachable(self) -> bool:
        return self.down_since is None

    def failure(self, dep: AnyDependency, exc: ConsulError) -> None:
        if self._on_error is not None:
            self._on_error(exc)
        with self._lock:
            self.last_error = str(exc)
            if self.down_since is not None:
                return
            self.down_since = time.time()
        log.error("Consul unavailable since %s: %s (watching %s); retrying with backoff, nginx and the installed files stay as they are",
                  time.strftime("%H:%M:%S"), exc, dep.describe())

    def success(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            outage = time.time() - self.down_since
            self.down_since = None
            self.last_error = ""
        log.info("Consul is back after %.1fs", outage)


@dataclass(frozen=True)
class WatchSettings:
    """How a watcher polls."""

    wait: float
    max_backoff: float
    min_interval: float = MIN_INTERVAL


class Watcher:
    """One dependency's blocking-query loop, on its own daemon thread."""

    def __init__(
        self,
        dep: AnyDependency,
        client: ConsulClient,
        settings: WatchSettings,
        health: ConsulHealth,
        on_value: Callable[[AnyDependency, object, int], None],
        start_index: int = 0,
        last_value: object = None,
    ) -> None:
        self.dep = dep
        self.client = client
        self.settings = settings
        self.health = health
        self.on_value = on_value
        self.index = start_index
        self.last_value = last_value
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"watch {dep.describe()}", daemon=True)
        self._last_query = 0.0

    def start(self) -> None:
        self.thread.start()

    def _sleep(self, seconds: float) -> None:
        # tenacity's backoff sleeps here, so stop() interrupts it at once.
        self.stopped.wait(seconds)

    def stop(self) -> None:
        """Stop after the current query returns (its answer is then discarded)."""
        self.stopped.set()

    def _fetch(self) -> tuple[int, object]:
        # Rate limit: a token bucket of one token refilled every min_interval.
        delay = self._last_query + self.settings.min_interval - time.monotonic()
        if delay > 0:
            self.stopped.wait(delay)
        self._last_query = time.monotonic()
        if self.health.on_request is not None:
            self.health.on_request()
        try:
            result = self.dep.fetch(self.client, self.index, self.settings.wait)
        except ConsulError as exc:
            self.health.failure(self.dep, exc)
            raise
        self.health.success()
        return result

    def _loop(self) -> None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(ConsulError),
            wait=tenacity.wait_exponential_jitter(initial=INITIAL_BACKOFF, max=self.settings.max_backoff, jitter=INITIAL_BACKOFF),
            stop=tenacity.stop_when_event_set(self.stopped),
            sleep=self._sleep,
            reraise=True,
        )
        while not self.stopped.is_set():
            try:
                new_index, value = retrying(self._fetch)
            except ConsulError:
                return  # stopped while retrying
            if self.stopped.is_set():
                return
            previous = self.index
            self.index = next_index(previous, new_index)
            if self.index == 0:
                log.info("%s: Consul's index went backwards (%d -> %d); re-reading from 0", self.dep.describe(), previous, new_index)
            if value != self.last_value:
                self.last_value = value
                self.on_value(self.dep, value, new_index)
