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

# Watchers started or stopped in one turn of the loop. Each start or cancel costs microseconds, but
# asyncio's debug mode records a stack with every task and callback: a thousand at once would hold
# the loop for a quarter of a second there (about 0.3 ms each; 5 ms a batch, with room for a busy
# machine). The rest follow, a batch a turn.
BATCH = 16


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
        self._unstarted: list[Watcher] = []  # watched, their tasks started by `_starter`
        self._starter: asyncio.Task[None] | None = None

    def __contains__(self, dep: object) -> bool:
        return dep in self._watchers

    def __len__(self) -> int:
        return len(self._watchers)

    def watching(self) -> frozenset[Dependency]:
        return frozenset(self._watchers)

    def remove(self, dep: Dependency) -> bool:
        """Stop watching `dep`; False when it was not watched."""
        watcher = self._watchers.pop(dep, None)
        if watcher is None:
            return False
        watcher.stop()
        return True

    def sync(self, wanted: Iterable[Dependency]) -> WatchDiff:
        """Watch exactly `wanted`; beyond the first BATCH, new watchers' tasks start in later turns
        of the loop (their first queries count as to come at once: see FirstFetches)."""
        target = set(wanted)
        if target == self._watchers.keys():
            return WatchDiff(frozenset(), frozenset())  # the usual case, after every render
        removed = frozenset(dep for dep in list(self._watchers) if dep not in target and self.remove(dep))
        new = sorted((dep for dep in target if dep not in self._watchers), key=lambda d: d.describe())
        for dep in new:
            watcher = self._watchers[dep] = self.factory(dep)
            watcher.expect_first()
            self._unstarted.append(watcher)
        self._start_batch()
        if self._unstarted and self._starter is None:
            self._starter = asyncio.get_running_loop().create_task(self._start_rest(), name="start watches")
        return WatchDiff(frozenset(new), removed)

    def _start_batch(self) -> None:
        batch, self._unstarted = self._unstarted[:BATCH], self._unstarted[BATCH:]
        for watcher in batch:
            if self._watchers.get(watcher.dep) is watcher:  # not removed meanwhile
                watcher.start()

    async def _start_rest(self) -> None:
        try:
            while self._unstarted:
                await asyncio.sleep(0)
                self._start_batch()
        finally:
            self._starter = None

    async def stop_all(self) -> None:
        """Stop every watcher and wait until their tasks have ended (cancellation is immediate)."""
        if self._starter is not None:
            self._starter.cancel()
        watchers = list(self._watchers.values())
        self._watchers.clear()
        self._unstarted.clear()
        for start in range(0, len(watchers), BATCH):
            if start:
                await asyncio.sleep(0)
            for watcher in watchers[start : start + BATCH]:
                watcher.stop()
        await asyncio.gather(*(w.task for w in watchers if w.task is not None), return_exceptions=True)
