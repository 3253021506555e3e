"""The running watches: exactly one per dependency the templates use now.

As templates' calls change (an edited template, a new service in the catalog), `sync` starts the
watches that are new and stops the ones no template uses any more, like consul-template's
watcher Add/Remove/Watching.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from confpy.registry.base import Dependency
from confpy.watch.watcher import Watcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchDiff:
    """What one `sync` changed."""

    added: frozenset[Dependency]
    removed: frozenset[Dependency]


class WatchSet:
    """Starts and stops watchers; `factory` builds the watcher for a new dependency."""

    def __init__(self, factory: Callable[[Dependency], Watcher]) -> None:
        self.factory = factory
        self._watchers: dict[Dependency, Watcher] = {}

    def __contains__(self, dep: object) -> bool:
        return dep in self._watchers

    def __len__(self) -> int:
        return len(self._watchers)

    def watching(self) -> frozenset[Dependency]:
        return frozenset(self._watchers)

    def add(self, dep: Dependency) -> bool:
        """Start watching `dep`; False when it is watched already."""
        if dep in self._watchers:
            return False
        watcher = self.factory(dep)
        self._watchers[dep] = watcher
        watcher.start()
        return True

    def remove(self, dep: Dependency) -> bool:
        """Stop watching `dep`; False when it was not watched."""
        watcher = self._watchers.pop(dep, None)
        if watcher is None:
            return False
        watcher.stop()
        return True

    def sync(self, wanted: Iterable[Dependency]) -> WatchDiff:
        """Watch exactly `wanted`."""
        target = set(wanted)
        if target == self._watchers.keys():
            return WatchDiff(frozenset(), frozenset())  # the usual case, after every render
        removed = frozenset(dep for dep in list(self._watchers) if dep not in target and self.remove(dep))
        new = sorted((dep for dep in target if dep not in self._watchers), key=lambda d: d.describe())
        added = frozenset(dep for dep in new if self.add(dep))
        return WatchDiff(added, removed)

    async def stop_all(self) -> None:
        """Stop every watcher and wait until their tasks have ended (cancellation is immediate)."""
        watchers = list(self._watchers.values())
        self._watchers.clear()
        for watcher in watchers:
            watcher.stop()
        await asyncio.gather(*(w.wait_stopped() for w in watchers))
