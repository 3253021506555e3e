"""What makes templates due: a watched dependency's new value, an edited template file.

Each answer passes the shrink guard (`guard.py`: a drop larger than `max_drop` is held), is
stored (the data) and turned into a quiescence window of every template it concerns
(`quiescence.py`); a change also tells a failing sync to retry at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from confpy.config import Config
from confpy.daemon.cycle import Cycles, TemplateState
from confpy.daemon.events import ValueEvent
from confpy.daemon.timeline import Timeline
from confpy.guard import remembered_view
from confpy.model import HealthView, describe_change
from confpy.registry.base import Dependency, ServiceHealth
from confpy.render.datasource import DataSource

log = logging.getLogger(__name__)

TEMPLATE_SUFFIXES = (".j2", ".jinja", ".tmpl")


class Intake:
    """Changes in, due templates out (into `cycles`' quiescence)."""

    def __init__(
        self, config: Config, cycles: Cycles, data: DataSource, timeline: Timeline, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.cycles = cycles
        self.data = data
        self.timeline = timeline
        self.clock = clock
        cycles.store = self._store

    def on_value(self, event: ValueEvent) -> None:
        """A watched dependency's new value, through the shrink guard: store it; every template that
        uses it becomes due."""
        dep, value, cycles = event.dep, event.value, self.cycles
        if dep == cycles.release_dep:
            cycles.guard.on_release(value)
        if isinstance(dep, ServiceHealth) and isinstance(value, HealthView):
            # Before its first answer (a start, a SIGHUP), what the templates saw is what the last
            # sync installed: an agent restarting with a partial catalog at boot is held too.
            found, old = self.data.get(dep)
            previous = old if found and isinstance(old, HealthView) else remembered_view(dep, cycles.memories.values())
            value = cycles.guard.admit(dep, previous, value)
            if cycles.guard.held and cycles.release_dep not in cycles.watches:
                cycles.watch_release()
        self._store(dep, value, f"index {event.index}", event.seen)

    def _store(self, dep: Dependency, value: object, why: str, seen: float | None = None) -> None:
        seen = self.clock() if seen is None else seen
        found, old = self.data.get(dep)
        if not self.data.set(dep, value):
            return
        if found:
            change = describe_change(old, value)
            log.info("%s changed: %s (%s)", dep.describe(), change, why)
            self.timeline.record("change", change, dep.describe())
        for state in self.cycles.templates.values():
            if dep not in state.deps:
                continue
            if not state.complete_once:
                # Waiting for a first complete render: render again as soon as the data it lacked
                # has arrived (it may then ask for more, e.g. one service per catalog entry).
                state.missing.discard(dep)
                if not state.missing:
                    self._due(state, seen, "first data", immediate=True)
            else:
                self._due(state, seen, f"{dep.describe()} changed")
                self.cycles.retry.poke(seen)

    def on_file(self, path: Path) -> None:
        """A file in a template folder changed: the templates it may be part of are due at once."""
        for state in self.cycles.templates.values():
            source = state.config.source
            if path == source or (path.parent == source.parent and path.suffix in TEMPLATE_SUFFIXES):
                log.info("template file %s changed; re-rendering %s", path, state.config.destination)
                self._due(state, self.clock(), f"template {path.name} edited", immediate=True)

    def _due(self, state: TemplateState, now: float, reason: str, immediate: bool = False) -> None:
        wait = self.config.wait_for(state.config)
        self.cycles.quiescence.change(state.config.destination, now, wait, reason, immediate=immediate)
