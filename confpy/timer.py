"""Timers: small objects the daemon's loop sleeps for, on an injected clock.

A timer says when it next wants the loop's turn (`next_deadline`, None for never) and does its
work when given it (`on_timer(now)`). The loop sleeps until the earliest deadline of all its
timers or the next event, so each timer's logic is tested with numbers, without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class Timer(Protocol):
    def next_deadline(self) -> float | None:
        """When this timer wants its turn (a clock reading), or None."""
        ...  # pragma: no cover - a protocol

    async def on_timer(self, now: float) -> object:
        """Its turn: do what is due at `now` (never raises for a failure it can retry)."""
        ...  # pragma: no cover - a protocol


def earliest(timers: Iterable[Timer]) -> float | None:
    """The earliest deadline of `timers` (None: none wants a turn)."""
    return min((d for d in (t.next_deadline() for t in timers) if d is not None), default=None)


async def run_due(timers: Iterable[Timer], now: float) -> None:
    """Give each timer whose deadline has passed by `now` its turn, in order."""
    for timer in list(timers):
        deadline = timer.next_deadline()
        if deadline is not None and deadline <= now:
            await timer.on_timer(now)
