"""The daemon's timer-driven concerns, each a small object on an injected clock.

Each has `next_deadline()` and `on_timer(now)` (confpy/timer.py); the loop sleeps until the
earliest of them or the next event. None of them sleeps, so each is tested with numbers.

- `StateSaveTimer`: confpy's state files, written once changes pause (not on a change's path).
- `WatchdogTimer`: systemd's WATCHDOG=1 pings.
- `SyncRetry`: while the gateway is not in step (a sync failed, or installed files wait for a
  reload), try again with the one retry policy until it lands.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from confpy.daemon.systemd import SystemdNotifier
from confpy.errors import ConfpyError
from confpy.retry import Backoff, FailureLog, RetryPolicy

log = logging.getLogger(__name__)

# confpy's state files (remembered members, live members) are read at a restart only, and a stop
# writes them at once: they are written once changes pause for STATE_SAVE_QUIET seconds, at the
# latest STATE_SAVE_MAX_DELAY after the first change they lack. Under churn, not after every
# change: that write's CPU and journal commit would land in the middle of the next change.
STATE_SAVE_QUIET = 1.0
STATE_SAVE_MAX_DELAY = 5.0
# A state save that failed (state dir unwritable, disk full) is retried on this schedule.
STATE_SAVE_RETRY = RetryPolicy(initial=1.0, maximum=60.0)
# Installed files wait for a reload (nginx down, or reload_cmd failing): looking at nginx's
# processes is cheap, so the retries of a reload are capped lower than a sync's.
RELOAD_RECHECK_INTERVAL = 5.0


class StateSaveTimer:
    """Writes the state files the last syncs left for later, once changes pause.

    `save` writes everything pending and raises ConfpyError on failure, keeping it pending: the
    failure is logged once (then once per retry cap), retried with backoff, and `error` tells
    /health about it."""

    def __init__(self, save: Callable[[], None], clock: Callable[[], float]) -> None:
        self.save = save
        self.clock = clock
        self.save_at: float | None = None
        self.unsaved_since: float | None = None  # when the oldest change not on disk was synced
        self.backoff = Backoff(STATE_SAVE_RETRY)
        self.failures = FailureLog(STATE_SAVE_RETRY.maximum)
        self.error = ""

    def synced(self, now: float) -> None:
        """A sync left state to write: due STATE_SAVE_QUIET from now, at most MAX_DELAY after the first."""
        self.unsaved_since = now if self.unsaved_since is None else self.unsaved_since
        if not self.backoff.failing:  # while failing, the backoff says when to try again
            self.save_at = min(now + STATE_SAVE_QUIET, self.unsaved_since + STATE_SAVE_MAX_DELAY)

    def next_deadline(self) -> float | None:
        return self.save_at

    async def on_timer(self, now: float) -> None:
        if self.save_at is not None and now >= self.save_at:
            self.flush(now)

    def flush(self, now: float | None = None) -> bool:
        """Write what is pending now (a stop, a SIGHUP, or the deadline); True when it was written."""
        if self.save_at is None:
            return True
        now = self.clock() if now is None else now
        try:
            self.save()
        except ConfpyError as exc:
            self.save_at = self.backoff.failed(now)
            self.error = f"cannot save confpy's state files (read at the next restart): {exc}"
            if self.failures.should_log(str(exc), now):
                attempts = (
                    f" (still failing after {self.backoff.failures} attempts)" if self.backoff.failures > 1 else ""
                )
                log.error("%s%s; retrying in %.0f s", self.error, attempts, self.save_at - now)
            return False
        if self.backoff.failing:
            log.info("confpy's state files saved again after %d failed attempts", self.backoff.failures)
        self.backoff.succeeded()
        self.failures.reset()
        self.error = ""
        self.save_at = self.unsaved_since = None
        return True

    def failing(self, now: float) -> str:
        """What /health says while saves fail ("" when they do not): the error and the next retry."""
        if not self.error:
            return ""
        retry_in = self.save_at - now if self.save_at is not None else 0.0
        return f"{self.error}; {RetryState(self.backoff.failures + 1, retry_in).describe()}"


class WatchdogTimer:
    """WATCHDOG=1 to systemd every `interval` seconds (half of WatchdogSec), when it asked for it."""

    def __init__(self, notifier: SystemdNotifier, now: float) -> None:
        self.notifier = notifier
        self.interval = notifier.watchdog_interval
        self.next_ping = now + self.interval if self.interval else None

    def next_deadline(self) -> float | None:
        return self.next_ping

    async def on_timer(self, now: float) -> None:
        if self.interval and self.next_ping is not None and now >= self.next_ping:
            self.notifier.notify("WATCHDOG=1")
            self.next_ping = now + self.interval


class Readiness:
    """READY=1 once: after the first sync, or once the reason it cannot happen yet is known
    (a registry outage at start-up must not make systemd restart confpy in a loop); STATUS= after."""

    def __init__(self, notifier: SystemdNotifier) -> None:
        self.notifier = notifier
        self.sent = False

    def ready(self, status: str) -> None:
        if self.sent:
            self.notifier.notify(f"STATUS={status}"[:400])
            return
        self.sent = True
        self.notifier.notify("READY=1", f"STATUS={status}"[:400])


@dataclass(frozen=True)
class RetryState:
    """What /health and the status page say of a retry: attempt K, next in N seconds."""

    attempt: int
    retry_in: float

    def describe(self) -> str:
        return f"retrying in {max(0, round(self.retry_in))} s (attempt {self.attempt})"


class SyncRetry:
    """Until the gateway is in step again, try again with the one retry policy.

    Two things can be owed, with one mechanism: a **sync** that failed (the bytes confpy wants
    installed differ from the installed ones: `resync` re-renders from the current data and
    installs, never stale bytes), or a **reload** (installed files nginx does not serve yet:
    `recheck` looks at nginx and reloads it). A failed sync is retried on `sync_policy`, a
    reload on `reload_policy`; a registry change or SIGHUP retries at once (`now`). The same
    error is logged once, then once per backoff cap with a count; success says how long it took.
    """

    def __init__(
        self,
        resync: Callable[[str], Awaitable[None]],
        recheck: Callable[[], Awaitable[None]],
        sync_policy: RetryPolicy,
        reload_policy: RetryPolicy,
    ) -> None:
        self.resync = resync
        self.recheck = recheck
        self.sync_backoff = Backoff(sync_policy)
        self.reload_backoff = Backoff(reload_policy)
        self.sync_failures = FailureLog(sync_policy.maximum)
        self.sync_at: float | None = None
        self.reload_at: float | None = None
        self.last_error = ""

    # --- what the daemon reports -----------------------------------------------------------

    def sync_failed(self, now: float, error: str, content_at_fault: bool = False) -> bool:
        """A sync failed: retry it later. True when this one was logged (once per error, then once
        per backoff cap), for the other surfaces that must not flood either (the timeline)."""
        self.sync_at = self.sync_backoff.failed(now)
        self.last_error = error
        if not self.sync_failures.should_log(error, now):
            return False
        attempts = self.sync_backoff.failures
        why = (
            "nginx refuses a line confpy rendered; retrying in case the data or templates change"
            if content_at_fault
            else "retrying"
        )
        if attempts == 1:
            log.error(
                "sync failed, the previous files stay installed and nginx was not reloaded: %s; %s in %.0f s",
                error,
                why,
                self.sync_at - now,
            )
        else:
            log.error(
                "sync still failing after %d attempts: %s; %s in %.0f s", attempts, error, why, self.sync_at - now
            )
        return True

    def synced(self, now: float) -> str:
        """A sync landed; after failures, the line that says so (else "")."""
        recovered = ""
        if self.sync_backoff.failing:
            first = self.sync_backoff.first_failure
            took = now - first if first is not None else 0.0
            recovered = f"sync recovered after {self.sync_backoff.failures + 1} attempts ({took:.0f} s)"
            log.info("%s", recovered)
        self.sync_backoff.succeeded()
        self.sync_failures.reset()
        self.sync_at = None
        self.last_error = ""
        return recovered

    def reload_owed(self, now: float) -> None:
        """Installed files wait for a reload: look at nginx again later."""
        self.reload_at = self.reload_backoff.failed(now)

    def reload_done(self) -> None:
        self.reload_backoff.succeeded()
        self.reload_at = None

    def poke(self, now: float) -> None:
        """A registry change or SIGHUP: a failed sync is retried at once."""
        if self.sync_at is not None:
            self.sync_at = now

    # --- the timer -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.sync_at, self.reload_at) if d is not None]
        return min(deadlines) if deadlines else None

    async def on_timer(self, now: float) -> None:
        if self.sync_at is not None and now >= self.sync_at:
            self.sync_at = None  # the resync sets it again if it fails
            await self.resync(f"retry after a failed sync (attempt {self.sync_backoff.failures + 1})")
        if self.reload_at is not None and now >= self.reload_at:
            self.reload_at = None  # the recheck sets it again while the reload is still owed
            await self.recheck()

    @property
    def failing(self) -> bool:
        return self.sync_backoff.failing

    def state(self, now: float) -> RetryState | None:
        """The retry /health shows, or None when no sync is failing."""
        if not self.sync_backoff.failing:
            return None
        retry_in = (self.sync_at - now) if self.sync_at is not None else 0.0
        return RetryState(self.sync_backoff.failures + 1, retry_in)
