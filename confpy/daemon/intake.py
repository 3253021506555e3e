"""What makes templates due: a watched dependency's new value, an edited template file.

Each change is stored (the data) and turned into a quiescence window of every template it
concerns (`quiescence.py`); a change also tells a failing sync to retry at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from confpy.config import Config
from confpy.daemon.cycle import TemplateState
from confpy.daemon.events import ValueEvent
from confpy.daemon.quiescence import Quiescence
from confpy.daemon.timeline import Timeline
from confpy.daemon.timers import SyncRetry
from confpy.model import describe_change
from confpy.render.datasource import DataSource

log = logging.getLogger(__name__)

TEMPLATE_SUFFIXES = (".j2", ".jinja", ".tmpl")


class Intake:
    """Changes in, due templates out."""

    def __init__(
        self,
        config: Config,
        templates: Mapping[Path, TemplateState],
        data: DataSource,
        timeline: Timeline,
        quiescence: Quiescence,
        retry: SyncRetry,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.templates = templates
        self.data = data
        self.timeline = timeline
        self.quiescence = quiescence
        self.retry = retry
        self.clock = clock

    def on_value(self, event: ValueEvent) -> None:
        """A watched dependency's new value: store it; every template that uses it becomes due."""
        dep = event.dep
        found, old = self.data.get(dep)
        if not self.data.set(dep, event.value):
            return
        if found:
            change = describe_change(old, event.value)
            log.info("%s changed: %s (index %d)", dep.describe(), change, event.index)
            self.timeline.record("change", change, dep.describe())
        for state in self.templates.values():
            if dep not in state.deps:
                continue
            if not state.complete_once:
                # Waiting for a first complete render: render again as soon as the data it lacked
                # has arrived (it may then ask for more, e.g. one service per catalog entry).
                state.missing.discard(dep)
                if not state.missing:
                    self._due(state, event.seen, "first data", immediate=True)
            else:
                self._due(state, event.seen, f"{dep.describe()} changed")
                self.retry.poke(event.seen)

    def on_file(self, path: Path) -> None:
        """A file in a template folder changed: the templates it may be part of are due at once."""
        for state in self.templates.values():
            source = state.config.source
            if path == source or (path.parent == source.parent and path.suffix in TEMPLATE_SUFFIXES):
                log.info("template file %s changed; re-rendering %s", path, state.config.destination)
                self._due(state, self.clock(), f"template {path.name} edited", immediate=True)

    def _due(self, state: TemplateState, now: float, reason: str, immediate: bool = False) -> None:
        wait = self.config.wait_for(state.config)
        self.quiescence.change(state.config.destination, now, wait, reason, immediate=immediate)
