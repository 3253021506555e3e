"""Quiescence: fold a burst of changes into one render, per template.

A template's first change starts a window; each further change pushes its deadline to `min`
after that change, but never past `max` after the first. Pure logic: the caller passes the time,
so it is tested with numbers, not sleeps (like consul-template's quiescence type).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from confpy.config import WaitConfig


@dataclass
class Pending:
    """A template waiting for quiescence."""

    first_change: float
    deadline: float
    max_deadline: float
    reasons: set[str] = field(default_factory=set)


class Quiescence:
    """The pending windows of every template, keyed by anything hashable (the destination)."""

    def __init__(self) -> None:
        self._pending: dict[Hashable, Pending] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._pending

    def change(self, key: Hashable, now: float, wait: WaitConfig, reason: str, immediate: bool = False) -> Pending:
        """Note a change for `key` at `now`; `immediate` makes it due at once (an edited template)."""
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = Pending(first_change=now, deadline=now, max_deadline=now + wait.max)
        pending.deadline = now if immediate else min(now + wait.min, pending.max_deadline)
        pending.reasons.add(reason)
        return pending

    def waiting(self) -> tuple[Hashable, ...]:
        """The keys with an open window."""
        return tuple(self._pending)

    def next_deadline(self) -> float | None:
        """When the earliest window ends (None: nothing pending)."""
        return min((p.deadline for p in self._pending.values()), default=None)

    def due(self, now: float) -> dict[Hashable, Pending]:
        """Take every window that has ended by `now`."""
        ready = {key: p for key, p in self._pending.items() if p.deadline <= now}
        for key in ready:
            del self._pending[key]
        return ready

    def clear(self) -> None:
        self._pending.clear()
