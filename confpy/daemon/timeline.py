"""The last events an operator wants to see at a glance: members added and removed, reloads with
their change-to-reload time, failed checks and rollbacks, live pushes, Consul lost and back.

A bounded ring (the last 100): the status page and `/status` read it; nothing else depends on it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_EVENTS = 100


@dataclass(frozen=True)
class TimelineEvent:
    """One event: when (Unix time), what kind, what happened, for which upstream (service label)."""

    at: float
    kind: str  # "change", "reload", "check_failed", "quarantine", "rollback", "push", "consul_down"/"etcd_down", "consul_up"/"etcd_up", "recovered", "error"
    text: str
    subject: str = ""
    latency: float | None = None  # reloads: seconds from the first change to the reload

    def to_json(self) -> dict[str, Any]:
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "kind": self.kind,
            "text": self.text,
            "subject": self.subject,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 1),
        }


class Timeline:
    """The last MAX_EVENTS events, oldest first; `events()` is an immutable copy."""

    def __init__(self, wall_clock: Callable[[], float] = time.time, size: int = MAX_EVENTS) -> None:
        self.wall_clock = wall_clock
        self._events: deque[TimelineEvent] = deque(maxlen=size)

    def record(self, kind: str, text: str, subject: str = "", latency: float | None = None) -> None:
        self._events.append(TimelineEvent(self.wall_clock(), kind, text, subject, latency))

    def events(self) -> tuple[TimelineEvent, ...]:
        return tuple(self._events)
