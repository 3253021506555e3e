"""The data a render reads (as consul-template's brain): the latest value of each dependency, and
a numbered log of what changed so a render can ask what is new since its last pass."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import TypeVar, cast

from confpy.registry.base import Dependency

# How many changes DataSource remembers for `changed_since` (many more than arrive between two
# renders of a template, whose quiescence timers are at most seconds apart). The log holds one
# reference per change (the generation is its position), so when full it costs 4096 * 8 bytes plus
# the deque's blocks: about 36 KB, reached after 4,096 changes and flat from then on.
CHANGE_LOG = 4096

_Dep = TypeVar("_Dep")


class DataSource:
    """What a render reads: the latest value of each dependency.

    Values are kept as the very objects the registry client produced, so a fragment can tell by
    identity that nothing it read has changed.
    """

    def __init__(self) -> None:
        self._values: dict[Dependency, object] = {}
        # One object per distinct dependency, whichever render created it first: equal keys that
        # are the same object match in a dict by identity, without a call to __eq__.
        self._canonical: dict[object, object] = {}
        # Every change counts one generation; the last CHANGE_LOG of them are kept, so that a
        # render can ask what changed since its last pass instead of checking every fragment.
        # Only the dependency is stored: the newest entry is `generation`, the one before it
        # `generation - 1`, and so on (a (generation, dependency) pair per entry cost 8 times more).
        self.generation = 0
        self.identity = object()  # generations count within one data source only
        self._changes: deque[object] = deque(maxlen=CHANGE_LOG)

    def canonical(self, dep: _Dep) -> _Dep:
        """The object that stands for every dependency equal to `dep` (equal ones are the same type)."""
        return cast(_Dep, self._canonical.setdefault(dep, dep))

    def __contains__(self, dep: object) -> bool:
        return dep in self._values

    def get(self, dep: Dependency) -> tuple[bool, object]:
        if dep in self._values:
            return True, self._values[dep]
        return False, None

    def peek(self, dep: Dependency, default: object) -> object:
        """The value, or `default` when there is none (the fast path for fragments)."""
        return self._values.get(dep, default)

    @property
    def values(self) -> Mapping[Dependency, object]:
        """Every value, read-only (the loop over a thousand fragments reads it directly)."""
        return self._values

    def set(self, dep: Dependency, value: object) -> bool:
        """Store a value; return True if it differs from the previous one."""
        changed = dep not in self._values or self._values[dep] != value
        if changed:
            self._values[dep] = value
            self._changed(dep)
        return changed

    def forget(self, dep: Dependency) -> None:
        self._values.pop(dep, None)
        self._canonical.pop(dep, None)
        self._changed(dep)

    def _changed(self, dep: object) -> None:
        self.generation += 1
        self._changes.append(dep)

    def changed_since(self, generation: int) -> AbstractSet[object] | None:
        """The dependencies set or forgotten after `generation`; None when the log no longer
        reaches back that far (then everything must be checked)."""
        changes = self._changes
        newer = self.generation - generation  # how many changes came after `generation`
        if newer == 0:
            return frozenset()
        if newer < 0 or newer > len(changes):
            return None
        return set(itertools.islice(reversed(changes), newer))

    def snapshot(self) -> dict[Dependency, object]:
        return dict(self._values)
