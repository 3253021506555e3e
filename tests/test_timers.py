"""The one retry policy and the daemon's timers, on a fake clock: numbers, no sleeps."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import replace

import pytest

from confpy.daemon.snapshot import StatusSnapshot
from confpy.daemon.systemd import SystemdNotifier
from confpy.daemon.timers import (
    STATE_SAVE_MAX_DELAY,
    STATE_SAVE_QUIET,
    Readiness,
    StateSaveTimer,
    SyncRetry,
    WatchdogTimer,
)
from confpy.errors import ConfigError, InstallError
from confpy.retry import Backoff, FailureLog, RetryPolicy
from confpy.timer import earliest, run_due
from confpy.watch.watcher import WatchSettings


class NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


def test_the_policy_doubles_from_initial_to_the_cap_and_jitter_stays_within_initial() -> None:
    policy = RetryPolicy(initial=1.0, maximum=60.0)
    assert [policy.base_delay(n) for n in range(0, 9)] == [0.0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.base_delay(10_000) == 60.0  # no overflow however long it fails
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert all(4.0 <= d <= 5.0 for d in delays) and len(set(delays)) > 100, "jitter spreads retries"
    assert RetryPolicy(1.0, 60.0, jitter=0.0).delay(3, rng) == 4.0
    for bad in (
        {"initial": 0.0, "maximum": 1.0},
        {"initial": 1.0, "maximum": 0.0},
        {"initial": 1, "maximum": 2, "factor": 0.5},
    ):
        with pytest.raises(ConfigError, match="retry policy needs"):
            RetryPolicy(**bad)  # type: ignore[arg-type]


def test_watches_use_the_one_policy_with_their_own_settings() -> None:
    settings = WatchSettings(wait=60.0, max_backoff=10.0)
    assert settings.retry == RetryPolicy(0.25, 10.0) and settings.retry is settings.retry


def test_backoff_counts_failures_in_a_row_and_resets_on_success() -> None:
    backoff = Backoff(RetryPolicy(1.0, 8.0), NoJitter())
    assert [backoff.failed(100.0 + n) for n in range(5)] == [101.0, 103.0, 106.0, 111.0, 112.0]
    assert backoff.failures == 5 and backoff.first_failure == 100.0 and backoff.failing
    backoff.succeeded()
    assert not backoff.failing and backoff.failed(200.0) == 201.0


def test_a_repeated_failure_is_logged_once_then_once_per_period() -> None:
    said = FailureLog(every=60.0)
    texts = ["disk full"] * 10 + ["read-only"] + ["read-only"]
    logged = [said.should_log(text, now) for now, text in zip(range(0, 120, 10), texts, strict=True)]
    # the first; again after 60 s of the same; a new text at once; not its repeat
    assert logged == [True, False, False, False, False, False, True, False, False, False, True, False]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_state_save_waits_for_a_pause_and_never_longer_than_the_max_delay() -> None:
    clock, saved = Clock(), []
    timer = StateSaveTimer(lambda: saved.append(clock.now), clock)
    assert timer.next_deadline() is None
    timer.synced(clock.now)
    assert timer.next_deadline() == clock.now + STATE_SAVE_QUIET
    start = clock.now
    while not saved:  # a change every half quiet period: written once the first is MAX_DELAY old
        clock.now += STATE_SAVE_QUIET / 2
        timer.synced(clock.now)
        asyncio.run(run_due([timer], clock.now))
    assert saved == [start + STATE_SAVE_MAX_DELAY] and timer.next_deadline() is None


def test_a_failed_state_save_keeps_what_is_pending_and_retries_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    clock, attempts = Clock(), []

    def save() -> None:
        attempts.append(clock.now)
        if len(attempts) < 4:
            raise InstallError("cannot write /var/lib/confpy/x.json: read-only file system")

    timer = StateSaveTimer(save, clock)
    timer.backoff.rng = NoJitter()
    timer.synced(clock.now)
    with caplog.at_level(logging.INFO):
        for _ in range(40):
            clock.now += 0.5
            asyncio.run(timer.on_timer(clock.now))
            if timer.next_deadline() is None:
                break
    assert [round(t - attempts[0], 1) for t in attempts] == [0.0, 1.0, 3.0, 7.0], "1 s doubling"
    assert timer.error == "" and timer.next_deadline() is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "read-only file system" in errors[0], "logged once, not per attempt"
    assert any("saved again after 3 failed attempts" in r.getMessage() for r in caplog.records)


def test_a_failing_state_save_is_surfaced_on_health_until_it_is_written() -> None:
    clock, failing = Clock(), [True]

    def save() -> None:
        if failing[0]:
            raise InstallError("cannot write /var/lib/confpy/x.json: read-only file system")

    timer = StateSaveTimer(save, clock)
    timer.backoff.rng = NoJitter()
    assert timer.failing(clock.now) == ""
    timer.synced(clock.now)
    clock.now += STATE_SAVE_QUIET
    asyncio.run(timer.on_timer(clock.now))
    clock.now += 0.4
    said = timer.failing(clock.now)
    assert said.startswith("cannot save confpy's state files (read at the next restart): cannot write /var/lib")
    assert said.endswith("; retrying in 1 s (attempt 2)")
    healthy = StatusSnapshot("fake://registry", True, "", False, True, "")
    ok, reason = replace(healthy, state_save_error=said).health()
    assert (ok, reason) == (False, said) and healthy.health() == (True, "ok")
    assert replace(healthy, state_save_error=said).state() == ("degraded", said), "nginx is not affected"
    failing[0] = False
    clock.now += 1
    asyncio.run(timer.on_timer(clock.now))
    assert timer.failing(clock.now) == "" and timer.next_deadline() is None


def test_the_watchdog_pings_every_interval_and_readiness_is_sent_once() -> None:
    sent: list[tuple[str, ...]] = []
    notifier = SystemdNotifier({"WATCHDOG_USEC": "4000000"})
    notifier.notify = lambda *lines: sent.append(lines)  # type: ignore[method-assign]
    watchdog = WatchdogTimer(notifier, 0.0)
    assert watchdog.next_deadline() == 2.0
    for now in (1.0, 2.0, 3.0, 4.1):
        asyncio.run(watchdog.on_timer(now))
    assert sent == [("WATCHDOG=1",), ("WATCHDOG=1",)] and watchdog.next_deadline() == pytest.approx(6.1)
    assert WatchdogTimer(SystemdNotifier({}), 0.0).next_deadline() is None
    readiness = Readiness(notifier)
    readiness.ready("waiting for Consul")
    readiness.ready("in sync")
    assert sent[2:] == [("READY=1", "STATUS=waiting for Consul"), ("STATUS=in sync",)]


class Retried:
    """A SyncRetry whose resync fails `fails` times, then lands."""

    def __init__(self, clock: Clock, fails: int) -> None:
        self.clock, self.fails = clock, fails
        self.resyncs: list[float] = []
        self.rechecks: list[float] = []
        self.retry = SyncRetry(self.resync, self.recheck, RetryPolicy(1.0, 60.0), RetryPolicy(1.0, 5.0))
        self.retry.sync_backoff.rng = NoJitter()
        self.retry.reload_backoff.rng = NoJitter()

    async def resync(self, reason: str) -> None:
        self.resyncs.append(self.clock.now)
        if len(self.resyncs) <= self.fails:
            self.retry.sync_failed(self.clock.now, "no space left on device")
        else:
            self.retry.synced(self.clock.now)

    async def recheck(self) -> None:
        self.rechecks.append(self.clock.now)
        self.retry.reload_owed(self.clock.now)

    def run(self, seconds: float, step: float = 0.25) -> None:
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.clock.now += step
            asyncio.run(run_due([self.retry], self.clock.now))


def test_a_failed_sync_is_retried_1s_doubling_to_the_cap_until_it_lands(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    retried = Retried(clock, fails=8)
    with caplog.at_level(logging.INFO):
        retried.retry.sync_failed(clock.now, "no space left on device")
        assert retried.retry.state(clock.now) is not None
        assert retried.retry.state(clock.now).describe() == "retrying in 1 s (attempt 2)"  # type: ignore[union-attr]
        retried.run(400)
    gaps = [round(b - a) for a, b in zip([1000.0, *retried.resyncs], retried.resyncs, strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 32, 60, 60, 60], gaps
    assert retried.retry.state(clock.now) is None and retried.retry.next_deadline() is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    # once at first, then once per backoff cap with a count: never one line per attempt
    assert errors[0].startswith("sync failed, the previous files stay installed and nginx was not reloaded: no space")
    assert len(errors) < 9 and any(e.startswith("sync still failing after") for e in errors), errors
    assert any(r.getMessage().startswith("sync recovered after 10 attempts") for r in caplog.records)


def test_a_registry_change_or_sighup_retries_a_failed_sync_at_once() -> None:
    clock = Clock()
    retried = Retried(clock, fails=10)
    for _ in range(5):
        retried.retry.sync_failed(clock.now, "read-only file system")
    assert retried.retry.next_deadline() == clock.now + 16
    clock.now += 0.5
    retried.retry.poke(clock.now)
    assert retried.retry.next_deadline() == clock.now
    asyncio.run(run_due([retried.retry], clock.now))
    assert retried.resyncs == [clock.now]


def test_a_reload_owed_is_rechecked_on_the_same_mechanism_with_a_lower_cap() -> None:
    clock = Clock()
    retried = Retried(clock, fails=0)
    retried.retry.reload_owed(clock.now)
    retried.run(30)
    gaps = [round(b - a) for a, b in zip([1000.0, *retried.rechecks], retried.rechecks, strict=False)]
    assert gaps[:5] == [1, 2, 4, 5, 5], gaps
    retried.retry.reload_done()
    assert retried.retry.next_deadline() is None and not retried.resyncs


def test_the_loop_sleeps_until_the_earliest_timer() -> None:
    clock = Clock()
    saver = StateSaveTimer(lambda: None, clock)
    retried = Retried(clock, fails=0)
    assert earliest([saver, retried.retry]) is None
    saver.synced(clock.now)
    retried.retry.sync_failed(clock.now, "x")
    retried.retry.sync_backoff.rng = NoJitter()
    assert earliest([saver, retried.retry]) == min(clock.now + STATE_SAVE_QUIET, retried.retry.next_deadline() or 0)
