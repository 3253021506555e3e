"""The reload budget: never more than N generations of nginx workers draining at once.

Each reload leaves the previous workers draining their connections (long downloads, websockets:
minutes or hours), each generation holding its memory. While `max_draining_generations` (or
`max_draining_memory_bytes`) is reached, a due reload waits, as a whole: nothing is installed, so
the files on disk keep matching what nginx runs. `ReloadBudget` is a timer: while a reload waits,
it looks at nginx's processes every `RECHECK_INTERVAL` and lets the cycle run again (with the
newest data) as soon as a generation has exited, or once `max_defer` has passed (then the reload
happens anyway, with a warning).

`decide` is the pure decision, tested with numbers; the process table is read by
`apply.draining.DrainingReader`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from confpy.apply.draining import Draining, DrainingReader
from confpy.config import NginxConfig
from confpy.daemon.metrics import Metrics

log = logging.getLogger(__name__)

RECHECK_INTERVAL = 1.0  # seconds between looks at nginx's processes while a reload waits
# Otherwise a look every DRAINING_REFRESH keeps the status figures and gauges current (a reload by
# someone else leaves generations draining too): a read of the master's children, ~1 ms.
DRAINING_REFRESH = 5.0

Action = Literal["apply", "defer", "overdue"]


@dataclass(frozen=True)
class BudgetLimits:
    max_generations: int
    max_memory: int  # bytes; 0: no limit
    max_defer: float  # seconds

    @classmethod
    def of(cls, nginx: NginxConfig) -> BudgetLimits:
        return cls(nginx.max_draining_generations, nginx.max_draining_memory_bytes, nginx.max_defer)


@dataclass(frozen=True)
class Verdict:
    """`apply` (within budget), `defer` (with why), or `overdue` (deferred `max_defer` already: apply anyway)."""

    action: Action
    why: str = ""


def describe_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def mebibytes(count: int) -> str:
    return f"{count / 1048576:.0f} MiB"


def exhausted(limits: BudgetLimits, draining: Draining) -> str:
    """Why a reload now would exceed the budget; empty when it would not."""
    count = draining.count
    if count >= limits.max_generations:
        plural = "generation" if count == 1 else "generations"
        age = describe_age(draining.oldest_age(draining.sampled_at))
        return f"{count} {plural} of nginx workers still draining (limit {limits.max_generations}), oldest {age}"
    if limits.max_memory and draining.memory >= limits.max_memory:
        return (
            f"nginx's draining workers hold {mebibytes(draining.memory)} "
            f"(limit {mebibytes(limits.max_memory)}, {count} generations)"
        )
    return ""


def decide(limits: BudgetLimits, draining: Draining, now: float, deferred_since: float | None) -> Verdict:
    """Apply a due reload now, or defer it; `overdue` once it has waited `max_defer` (`now` and
    `deferred_since` on the same monotonic clock)."""
    why = exhausted(limits, draining)
    if not why:
        return Verdict("apply")
    if deferred_since is not None and now - deferred_since >= limits.max_defer:
        return Verdict("overdue", why)
    return Verdict("defer", why)


@dataclass
class Deferred:
    """A reload waiting for the budget: the templates it covers, why they were due, since when."""

    since: float
    why: str
    destinations: set[Path] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)
    first_change: dict[Path, float] = field(default_factory=dict)

    def add(self, destinations: list[Path], reason: str, first_change: Mapping[Path, float]) -> None:
        self.destinations.update(destinations)
        if reason:
            self.reasons.update(r for r in reason.split("; ") if r)
        for path, at in first_change.items():
            self.first_change[path] = min(at, self.first_change.get(path, at))


@dataclass(frozen=True)
class BudgetView:
    """What /status shows of the budget."""

    generations: int
    oldest_age: float
    memory: int
    max_generations: int
    max_memory: int
    deferred: str  # why a reload waits ("" when none does)
    deferred_for: float
    deferred_total: int
    forced_total: int

    def describe(self) -> str:
        """The draining generations in a few words, for the status page."""
        if not self.generations:
            return f"no old workers draining (budget: {self.max_generations} generations)"
        plural = "generation" if self.generations == 1 else "generations"
        return (
            f"{self.generations} {plural} of old workers draining, oldest {describe_age(self.oldest_age)}, "
            f"{mebibytes(self.memory)} (budget: {self.max_generations} generations"
            + (f", {mebibytes(self.max_memory)})" if self.max_memory else ")")
        )

    def to_json(self) -> dict[str, object]:
        return {
            "draining_generations": self.generations,
            "oldest_draining_seconds": round(self.oldest_age, 1),
            "draining_memory_bytes": self.memory,
            "max_draining_generations": self.max_generations,
            "max_draining_memory_bytes": self.max_memory,
            "deferred": f"reload deferred: {self.deferred}" if self.deferred else "",
            "deferred_seconds": round(self.deferred_for, 1),
            "deferred_total": self.deferred_total,
            "forced_total": self.forced_total,
        }


class BudgetHooks:
    """Where the budget reports: metrics (set by the daemon), defaults do nothing."""

    def sampled(self, draining: Draining) -> None: ...

    def deferred(self) -> None: ...

    def landed(self, waited: float, forced: bool) -> None: ...


class _MetricsHooks(BudgetHooks):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def sampled(self, draining: Draining) -> None:
        self.metrics.draining_generations.set(draining.count)
        self.metrics.draining_memory.set(draining.memory)

    def deferred(self) -> None:
        self.metrics.reloads_deferred.inc()

    def landed(self, waited: float, forced: bool) -> None:
        self.metrics.reload_defer.observe(waited)
        if forced:
            self.metrics.reloads_forced.inc()


def metrics_hooks(metrics: Metrics) -> BudgetHooks:
    """The budget's reports as confpy_nginx_draining_*, confpy_reloads_deferred_total, ..."""
    return _MetricsHooks(metrics)


def budget_for(
    nginx: NginxConfig, metrics: Metrics, clock: Callable[[], float], wall_clock: Callable[[], float]
) -> ReloadBudget:
    """The reload budget of `[nginx]`, reading nginx's processes and reporting to `metrics`."""
    return ReloadBudget(
        BudgetLimits.of(nginx),
        DrainingReader(nginx.pid_file, wall_clock).read,
        clock,
        wall_clock,
        metrics_hooks(metrics),
    )


class ReloadBudget:
    """Holds due reloads while nginx drains too many generations (a timer for the daemon's loop).

    `read(reloaded_at)` samples nginx's processes (`DrainingReader.read`); `rerun()` runs the
    cycle of what waits (the daemon's `Cycles.run_deferred`).
    """

    def __init__(
        self,
        limits: BudgetLimits,
        read: Callable[[float | None], Draining],
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        hooks: BudgetHooks | None = None,
    ) -> None:
        self.limits = limits
        self.read = read
        self.clock = clock
        self.wall_clock = wall_clock
        self.hooks = hooks or BudgetHooks()
        self.rerun: Callable[[], Awaitable[None]] | None = None
        self.pending: Deferred | None = None
        self.resumed: Deferred | None = None  # taken by the cycle that runs now
        self.last = Draining()
        self.reloaded_at: float | None = None  # Unix time of confpy's last reload
        self.check_at: float | None = clock()  # a first look, for the status figures
        self.deferred_total = 0
        self.forced_total = 0

    # --- the cycle's questions -------------------------------------------------------------

    def sample(self) -> Draining:
        self.last = self.read(self.reloaded_at)
        self.hooks.sampled(self.last)
        return self.last

    def verdict(self) -> Verdict:
        """May a reload happen now? Samples nginx's processes."""
        waiting = self.pending or self.resumed
        return decide(self.limits, self.sample(), self.clock(), waiting.since if waiting is not None else None)

    def defer(self, why: str, destinations: list[Path], reason: str, first_change: Mapping[Path, float]) -> None:
        """A due reload waits: remember what it covers (coalesced with what already waits)."""
        now = self.clock()
        if self.pending is None:
            self.pending, self.resumed = self.resumed, None  # deferred again: it keeps waiting since then
        if self.pending is None:
            self.pending = Deferred(now, why)
            log.warning("reload deferred: %s; it happens once a generation exits", why)
        elif why != self.pending.why:
            log.info("reload still deferred: %s", why)
        self.pending.why = why
        if reason != RERUN_REASON:
            self.deferred_total += 1
            self.hooks.deferred()
        self.pending.add(destinations, reason, first_change)
        self.check_at = now + RECHECK_INTERVAL

    def take(self) -> Deferred | None:
        """What waits, handed to the cycle that now runs it (put back by `defer` if it must wait on)."""
        pending, self.pending = self.pending, None
        self.resumed = pending
        return pending

    def reloaded(self, verdict: Verdict | None) -> None:
        """confpy reloaded nginx: what waited has landed."""
        self.reloaded_at = self.wall_clock()
        self.after_reload()
        resumed, self.resumed = self.resumed, None
        if resumed is None:
            return
        waited = self.clock() - resumed.since
        forced = False
        if verdict is not None and verdict.action == "overdue":
            forced = True
            self.forced_total += 1
            log.warning(
                "reloading although %s: the reload waited %s (max_defer); set nginx's worker_shutdown_timeout so "
                "old workers close long connections and exit",
                verdict.why,
                describe_age(waited),
            )
        else:
            log.info("deferred reload applied after %s", describe_age(waited))
        self.hooks.landed(waited, forced)

    def settled(self) -> None:
        """The cycle that took what waited ended without a reload (nothing changed any more, or it failed)."""
        self.resumed = None

    # --- the timer -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self.check_at

    async def on_timer(self, now: float) -> None:
        if self.check_at is None or now < self.check_at:
            return
        self.check_at = None
        if self.pending is None:
            self.sample()
        elif self.rerun is not None and decide(self.limits, self.sample(), now, self.pending.since).action != "defer":
            await self.rerun()
        interval = RECHECK_INTERVAL if self.pending is not None else DRAINING_REFRESH
        self.check_at = self.clock() + interval

    def after_reload(self) -> None:
        """Look again soon: the generation just superseded now drains."""
        soon = self.clock() + RECHECK_INTERVAL
        self.check_at = soon if self.check_at is None else min(self.check_at, soon)

    def view(self) -> BudgetView:
        draining = self.last
        pending = self.pending
        return BudgetView(
            generations=draining.count,
            oldest_age=draining.oldest_age(self.wall_clock()),
            memory=draining.memory,
            max_generations=self.limits.max_generations,
            max_memory=self.limits.max_memory,
            deferred=pending.why if pending is not None else "",
            deferred_for=self.clock() - pending.since if pending is not None else 0.0,
            deferred_total=self.deferred_total,
            forced_total=self.forced_total,
        )


RERUN_REASON = "deferred reload"
