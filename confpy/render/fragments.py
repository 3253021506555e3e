"""Incremental rendering: what a render did so far, and the `{% fragment %}` blocks it records and
reuses.

A render re-runs a fragment's body only when a value the body read changed since the last render;
otherwise it reuses the text and replays the body's effects (dependencies, remembered members,
upstream names, live members, kept, warnings). A top-level `{% fragment for %}` loop also keeps a
`LoopMemo`, so the next render redoes only the items whose data changed: the hot path, where one
member's change re-renders one block of a thousand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, cast

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension

from confpy.model import Memory, ServiceInstance
from confpy.registry.base import AnyDependency
from confpy.render.datasource import DataSource
from confpy.render.functions import UpstreamSettings
from confpy.render.naming import upstream_clash, upstream_key

# A loop with a memo redoes at most this many items, or an eighth of them, one by one; beyond
# that, every item is checked (as fast, and it keeps the memo's bookkeeping simple).
INCREMENTAL_REDO_MIN = 16
# The name under which a render hands its `FragmentRecorder` to the template's fragment tags.
RECORDER = "__confpy_fragments__"

_MISSING = object()


@dataclass
class Fragment:
    """What one `{% fragment key %}` block read and did, so a later render can reuse its text.

    The text is reused while every value it read is the same object as then (a changed service
    is a new object), and its effects on the render (dependencies, remembered members, live
    members, upstream names, warnings) are replayed.
    """

    reads: dict[AnyDependency, object] = field(default_factory=dict)
    remembered: dict[str, tuple[ServiceInstance, ...] | None] = field(default_factory=dict)
    members: dict[str, tuple[ServiceInstance, ...]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    live: dict[str, tuple[ServiceInstance, ...]] = field(default_factory=dict)
    live_settings: dict[str, UpstreamSettings] = field(default_factory=dict)
    upstreams: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = True
    text: str = ""
    # Only reads, upstream names and members: replayed inline by a `fragment for` loop.
    plain: bool = False
    # Also live members and settings, but no remembered members, kept or warnings: a loop's
    # memo takes these at once (`LoopMemo`).
    bulk: bool = False


@dataclass(frozen=True)
class LoopMemo:
    """A top-level `{% fragment for %}` loop as the last complete render left it.

    With it the next render redoes only the items whose data changed since (the data source
    says which dependencies those are, and `readers` which items read them) and takes every
    other item's text and effects at once, instead of checking a thousand fragments one by one.
    Only `bulk` fragments (reads, upstream names, members, live members and settings) are taken
    at once; the others are in `always` and done one by one every time. Those items' upstream
    names, member keys and live upstreams are distinct from item to item, so one item's share of
    them can be taken out.
    """

    source: object  # the data source's identity and generation when the loop was rendered
    generation: int
    items: tuple[object, ...]
    texts: tuple[str, ...]
    fragments: tuple[Fragment | None, ...]  # per item
    always: frozenset[int]  # items done one by one every time (not bulk)
    readers: Mapping[AnyDependency, tuple[int, ...]]  # the bulk items that read each dependency
    reads: Mapping[AnyDependency, int]  # how many bulk items read each dependency
    keyed: Mapping[object, Fragment]  # the bulk items' fragments by key
    upstreams: Mapping[str, str]  # the bulk items' upstream names
    members: Mapping[str, tuple[ServiceInstance, ...]]  # the bulk items' remembered members
    live: Mapping[str, tuple[ServiceInstance, ...]]  # the bulk items' live members (live mode)
    live_settings: Mapping[str, UpstreamSettings]


def _same_shape(new: Fragment | None, old: Fragment | None) -> bool:
    """True when `new` has the effects of `old` on a loop's memo (only the values differ)."""
    if new is None or old is None:
        return new is old
    if not (new.bulk and old.bulk):
        return new.bulk == old.bulk  # blocks done one by one stay so; nothing of theirs is in the memo
    return (
        new.reads.keys() == old.reads.keys()
        and new.upstreams == old.upstreams
        and new.members.keys() == old.members.keys()
        and new.live.keys() == old.live.keys()
        and new.live_settings.keys() == old.live_settings.keys()
    )


class FragmentRecorder:
    """What one render did so far, recorded into every fragment being rendered, and the fragments
    and loop memos it reused from the last render or kept for the next.

    The template functions report through it what they read (`lookup`) and did (`remember`,
    `recall`, `keep`, `warn`, `claim_upstream`, `push_live`); `fragment` and `each` run the
    `{% fragment %}` tags.
    """

    def __init__(
        self,
        data: DataSource,
        remembered: Memory,
        fragments: dict[object, Fragment],
        loops: Mapping[int, LoopMemo] | None = None,
    ) -> None:
        self.data = data
        self.remembered = remembered
        self.dependencies: set[AnyDependency] = set()
        self.missing: set[AnyDependency] = set()
        self.memory = Memory()
        self.kept: list[str] = []
        self.warnings: list[str] = []
        self.live: dict[str, tuple[ServiceInstance, ...]] = {}
        self.live_settings: dict[str, UpstreamSettings] = {}
        self.upstreams: dict[str, str] = {}
        self.previous_fragments = fragments
        self.fragments: dict[object, Fragment] = {}
        self.previous_loops: Mapping[int, LoopMemo] = loops or {}
        self.loops: dict[int, LoopMemo] = {}
        self.loop_calls: set[int] = set()
        self.unchanged_fragments = 0
        self.rendered_fragments = 0  # fragment bodies run (not reused)
        self.recording: list[Fragment] = []
        # Live upstreams this render may have changed, as its loop memos' redone items say: valid
        # unless a top-level loop had no memo (`loop_without_memo`) or a live effect happened
        # outside top-level loops (`live_outside`), see `RenderResult.live_changed`.
        self.live_changed: set[str] = set()
        self.live_outside = False
        self.loop_without_memo = False
        self._in_loop = 0

    def lookup(self, dep: AnyDependency) -> tuple[bool, object]:
        """Record that the template uses `dep`; (whether the registry answered yet, its value)."""
        dep = self.data.canonical(dep)
        self.dependencies.add(dep)
        found, value = self.data.get(dep)
        for fragment in self.recording:
            fragment.reads[dep] = value
            fragment.complete = fragment.complete and found
        if not found:
            self.missing.add(dep)
        return found, value

    def remember(self, key: str, members: tuple[ServiceInstance, ...]) -> None:
        """The members of a service query, remembered for a later render that finds it empty."""
        self.memory.members[key] = members
        for fragment in self.recording:
            fragment.members[key] = members

    def recall(self, key: str) -> tuple[ServiceInstance, ...] | None:
        """The members remembered for a service query that is empty now (a fragment that asked
        stays valid only while they do)."""
        remembered = self.remembered.members.get(key)
        for fragment in self.recording:
            fragment.remembered[key] = remembered
        return remembered

    def keep(self, label: str) -> None:
        """A service rendered with its remembered members (`on_empty = "keep"`)."""
        self.kept.append(label)
        for fragment in self.recording:
            fragment.kept.append(label)

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        for fragment in self.recording:
            fragment.warnings.append(text)

    def claim_upstream(self, name: str, service: str) -> None:
        """`service` takes upstream `name`; another service claiming it is an error. Names are
        kept as nginx compares them (case-insensitively: `upstream Q` and `upstream q` clash)."""
        name = upstream_key(name)
        self._claim(name, service)
        for fragment in self.recording:
            fragment.upstreams.append((name, service))

    def uncacheable(self) -> None:
        """What the fragments being rendered did depends on more than the data they read (a
        quarantine, a rival service): they are rendered again every time."""
        for fragment in self.recording:
            fragment.complete = False

    def push_live(self, name: str, members: tuple[ServiceInstance, ...], settings: UpstreamSettings | None) -> None:
        """Live mode: an upstream's members (and its KV settings, when not the defaults) for the pusher."""
        self.live[name] = members
        if not self._in_loop:
            self.live_outside = True
        for fragment in self.recording:
            fragment.live[name] = members
        if settings is not None:
            self.live_settings[name] = settings
            for fragment in self.recording:
                fragment.live_settings[name] = settings

    def _claim(self, name: str, service: str) -> None:
        other = self.upstreams.setdefault(name, service)
        if other != service:
            raise upstream_clash(name, other, service)

    def _still_valid(self, fragment: Fragment) -> bool:
        current = self.data.peek
        for dep, value in fragment.reads.items():
            if current(dep, _MISSING) is not value:
                return False
        if fragment.remembered:
            return all(self.remembered.members.get(key) is members for key, members in fragment.remembered.items())
        return True

    def _replay(self, fragment: Fragment) -> None:
        """Apply a reused fragment's effects, as if its body had run."""
        self.dependencies.update(fragment.reads)
        if (fragment.live or fragment.live_settings) and not self._in_loop:
            self.live_outside = True
        for name, service in fragment.upstreams:
            self._claim(name, service)
        if not self.recording:  # the common case: a top-level fragment, nothing else records
            self.memory.members.update(fragment.members)
            if fragment.kept:
                self.kept.extend(fragment.kept)
            if fragment.warnings:
                self.warnings.extend(fragment.warnings)
            if fragment.live:
                self.live.update(fragment.live)
            if fragment.live_settings:
                self.live_settings.update(fragment.live_settings)
            return
        for key, members in fragment.members.items():
            self.remember(key, members)
        for label in fragment.kept:
            self.keep(label)
        for text in fragment.warnings:
            self.warn(text)
        for outer in self.recording:
            outer.live.update(fragment.live)
            outer.live_settings.update(fragment.live_settings)
            outer.upstreams.extend(fragment.upstreams)
            outer.reads.update(fragment.reads)
            outer.remembered.update(fragment.remembered)
        self.live.update(fragment.live)
        self.live_settings.update(fragment.live_settings)

    def fragment(self, key: object, body: Callable[..., str], *args: object) -> str:
        """`{% fragment key %}...{% endfragment %}`: the body's text, reused while its data is unchanged."""
        cached = self.previous_fragments.get(key)
        if cached is not None and key not in self.fragments and self._still_valid(cached):
            self._replay(cached)
            self.fragments[key] = cached
            return cached.text
        fragment = Fragment()
        self.rendered_fragments += 1
        self.recording.append(fragment)
        try:
            fragment.text = str(body(*args))
        finally:
            self.recording.pop()
        if fragment.complete and key not in self.fragments:
            fragment.bulk = not (fragment.remembered or fragment.kept or fragment.warnings)
            fragment.plain = fragment.bulk and not (fragment.live or fragment.live_settings)
            self.fragments[key] = fragment
        return fragment.text

    def each(self, lineno: int, items: Iterable[object], body: Callable[[object], str]) -> str:
        """`{% fragment for item in items %}`: one fragment per item, keyed by (lineno, item).

        The same as calling `fragment` per item. At the top level (the common case: a loop over
        a thousand services of which one changed), the last render's `LoopMemo` says which items
        can have changed; failing that, the items are checked one by one, inline."""
        if self.recording:
            return "".join([self.fragment((lineno, item), body, item) for item in items])
        self._in_loop += 1
        try:
            return self._each_top(lineno, tuple(items), body)
        finally:
            self._in_loop -= 1

    def _each_top(self, lineno: int, listed: tuple[object, ...], body: Callable[[object], str]) -> str:
        """`each` at the top level: from the last render's memo when it can stand for this loop."""
        first_call = lineno not in self.loop_calls
        self.loop_calls.add(lineno)
        if not first_call:
            self.loops.pop(lineno, None)  # run twice in one render: no memo can stand for both runs
        memo = self.previous_loops.get(lineno) if first_call else None
        if memo is not None and memo.source is self.data.identity and listed == memo.items:
            changed = self.data.changed_since(memo.generation)
            if changed is not None:
                redo = set(memo.always)
                for dep in changed:
                    redo.update(memo.readers.get(cast(AnyDependency, dep), ()))
                if len(redo) <= max(INCREMENTAL_REDO_MIN, len(listed) // 8):
                    return self._each_changed(lineno, memo, sorted(redo), body)
        self.loop_without_memo = True
        texts = self._each_checked(lineno, listed, body)
        if first_call:
            self._memorize(lineno, listed, texts)
        return "".join(texts)

    def _each_checked(self, lineno: int, listed: tuple[object, ...], body: Callable[[object], str]) -> list[str]:
        """Every item checked: a plain cached fragment whose reads are all unchanged is replayed
        inline (the cost of a render at a thousand services when there is no memo)."""
        previous, fragments, values = self.previous_fragments, self.fragments, self.data.values
        dependencies, upstreams, members = self.dependencies, self.upstreams, self.memory.members
        texts: list[str] = []
        for item in listed:
            key = (lineno, item)
            cached = previous.get(key)
            if cached is not None and cached.plain and key not in fragments:
                for dep, value in cached.reads.items():
                    if values.get(dep, _MISSING) is not value:
                        break
                else:
                    dependencies.update(cached.reads)
                    for name, service in cached.upstreams:
                        if upstreams.setdefault(name, service) != service:
                            self._claim(name, service)  # two services, one upstream name: the error
                    members.update(cached.members)
                    fragments[key] = cached
                    texts.append(cached.text)
                    continue
            texts.append(self.fragment(key, body, item))
        return texts

    def _each_changed(self, lineno: int, memo: LoopMemo, redo: list[int], body: Callable[[object], str]) -> str:
        """The items in `redo` one by one, the others (unchanged, bulk) from `memo` at once."""
        listed = memo.items
        texts = list(memo.texts)
        self.fragments.update(memo.keyed)
        for i in redo:
            self.fragments.pop((lineno, listed[i]), None)
        for i in redo:
            texts[i] = self.fragment((lineno, listed[i]), body, listed[i])
        for i in redo:
            old, new = memo.fragments[i], self.fragments.get((lineno, listed[i]))
            for done in (old, new):
                if done is not None:
                    self.live_changed.update(done.live)
                    self.live_changed.update(done.live_settings)
        fragments = list(memo.fragments)
        for i in redo:
            fragments[i] = self.fragments.get((lineno, listed[i]))
        if all(_same_shape(fragments[i], memo.fragments[i]) for i in redo):
            return self._each_same_shape(lineno, memo, redo, texts, fragments)
        # The unchanged items' effects: the memo's, less the redone items' old share.
        upstreams, members = dict(memo.upstreams), dict(memo.members)
        live, live_settings = dict(memo.live), dict(memo.live_settings)
        dropped: dict[AnyDependency, int] = {}
        for i in redo:
            old = memo.fragments[i]
            if old is None or i in memo.always:
                continue
            for name, _ in old.upstreams:
                upstreams.pop(name, None)
            for key in old.members:
                members.pop(key, None)
            for name in old.live:
                live.pop(name, None)
            for name in old.live_settings:
                live_settings.pop(name, None)
            for dep in old.reads:
                dropped[dep] = dropped.get(dep, 0) + 1
        gone = {dep for dep, count in dropped.items() if memo.reads[dep] == count}
        self.dependencies.update(memo.reads.keys() - gone if gone else memo.reads)
        for name in upstreams.keys() & self.upstreams.keys():
            if self.upstreams[name] != upstreams[name]:
                self._clash_in_loop(lineno, name, upstreams[name], memo, redo)
        self.upstreams.update(upstreams)
        self.memory.members.update(members)
        self.live.update(live)
        self.live_settings.update(live_settings)
        self.unchanged_fragments += len(listed) - len(redo)
        self._memorize(lineno, listed, texts)
        return "".join(texts)

    def _each_same_shape(
        self, lineno: int, memo: LoopMemo, redo: list[int], texts: list[str], fragments: list[Fragment | None]
    ) -> str:
        """`_each_changed` when every redone item has the effects it had (the usual case: a
        member changed): the memo's effects apply whole, with the redone items' new values over
        them, and nothing is taken out of copies of a thousand entries."""
        listed = memo.items
        # Only names claimed before this loop can clash with the memo's (the redone items claimed
        # the same names as before): look at the smaller side.
        claimed, unchanged = self.upstreams, memo.upstreams
        small = claimed if len(claimed) <= len(unchanged) else unchanged
        for name in small:
            mine, theirs = claimed.get(name), unchanged.get(name)
            if mine is not None and theirs is not None and mine != theirs:
                self._clash_in_loop(lineno, name, theirs, memo, redo)
        self.upstreams.update(unchanged)
        # A dict (not its keys view) hands set.update the stored hashes: no __hash__ call per dependency.
        self.dependencies.update(memo.reads)
        members, live, live_settings = dict(memo.members), dict(memo.live), dict(memo.live_settings)
        keyed = dict(memo.keyed)
        for i in redo:
            new = fragments[i]
            if new is not None and new.bulk:
                keyed[(lineno, listed[i])] = new
                members.update(new.members)
                live.update(new.live)
                live_settings.update(new.live_settings)
        self.memory.members.update(members)
        self.live.update(live)
        self.live_settings.update(live_settings)
        self.unchanged_fragments += len(listed) - len(redo)
        self.loops[lineno] = dataclasses.replace(
            memo,
            generation=self.data.generation,
            texts=tuple(texts),
            fragments=tuple(fragments),
            keyed=keyed,
            members=members,
            live=live,
            live_settings=live_settings,
        )
        return "".join(texts)

    def _clash_in_loop(self, lineno: int, name: str, unchanged: str, memo: LoopMemo, redo: list[int]) -> NoReturn:
        """An unchanged item's upstream name was taken by a redone item or before the loop: the
        error `_claim` raises, naming the two services in the order the template claimed them."""
        taker = self.upstreams[name]
        owner = next(i for i, f in enumerate(memo.fragments) if f is not None and (name, unchanged) in f.upstreams)
        redone = [
            i for i in redo if (name, taker) in getattr(self.fragments.get((lineno, memo.items[i])), "upstreams", ())
        ]
        first, second = (unchanged, taker) if redone and min(redone) > owner else (taker, unchanged)
        raise upstream_clash(name, first, second)

    def _memorize(self, lineno: int, listed: tuple[object, ...], texts: list[str]) -> None:
        """Keep this loop's `LoopMemo` for the next render, when its items allow one."""
        if len(set(listed)) != len(listed):
            return  # a repeated item: its two fragments share one key
        fragments: list[Fragment | None] = []
        always: list[int] = []
        readers: dict[AnyDependency, list[int]] = {}
        reads: dict[AnyDependency, int] = {}
        keyed: dict[object, Fragment] = {}
        upstreams: dict[str, tuple[str, int]] = {}
        members: dict[str, tuple[tuple[ServiceInstance, ...], int]] = {}
        live: dict[str, tuple[ServiceInstance, ...]] = {}
        live_settings: dict[str, UpstreamSettings] = {}
        for i, item in enumerate(listed):
            fragment = self.fragments.get((lineno, item))
            fragments.append(fragment)
            if fragment is None or not fragment.bulk:
                always.append(i)
                continue
            keyed[(lineno, item)] = fragment
            for dep in fragment.reads:
                readers.setdefault(dep, []).append(i)
                reads[dep] = reads.get(dep, 0) + 1
            for name, service in fragment.upstreams:
                if upstreams.setdefault(name, (service, i))[1] != i:
                    return  # two items share an upstream name: one's share could not be taken out
            for key, value in fragment.members.items():
                if members.setdefault(key, (value, i))[1] != i:
                    return  # two items share remembered members: likewise
            if live.keys() & fragment.live.keys() or live_settings.keys() & fragment.live_settings.keys():
                return  # two items push one live upstream: likewise
            live.update(fragment.live)
            live_settings.update(fragment.live_settings)
        if len(always) > max(INCREMENTAL_REDO_MIN, len(listed) // 8):
            return  # too few items the memo could take at once for it ever to be used
        self.loops[lineno] = LoopMemo(
            self.data.identity,
            self.data.generation,
            listed,
            tuple(texts),
            tuple(fragments),
            frozenset(always),
            {dep: tuple(items) for dep, items in readers.items()},
            reads,
            keyed,
            {name: service for name, (service, _) in upstreams.items()},
            {key: value for key, (value, _) in members.items()},
            live,
            live_settings,
        )


class FragmentExtension(Extension):
    """`{% fragment key %}...{% endfragment %}` and `{% fragment for x in items %}...{% endfragment %}`.

    Incremental rendering: a render re-runs a fragment's body only when a value the body read
    (through `service()`, `services()`...) changed since the last render; otherwise it reuses the
    text. `key` names the fragment among its siblings and must capture every template variable
    the body uses: registry data is tracked, template variables are not. The `for` form is one
    fragment per item, keyed by the item (which must be hashable, e.g. a service name), with the
    loop run in Python: the cheapest way through a thousand services of which one changed.
    """

    tags = {"fragment"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        if parser.stream.current.test("name:for"):
            next(parser.stream)
            target = parser.parse_assign_target(name_only=True)
            parser.stream.expect("name:in")
            items = parser.parse_expression()
            body = parser.parse_statements(("name:endfragment",), drop_needle=True)
            call = self.call_method("_each", [nodes.ContextReference(), nodes.Const(lineno), items])
            return nodes.CallBlock(call, [nodes.Name(target.name, "param")], [], body).set_lineno(lineno)
        key = parser.parse_expression()
        body = parser.parse_statements(("name:endfragment",), drop_needle=True)
        call = self.call_method("_fragment", [nodes.ContextReference(), nodes.Const(lineno), key])
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _fragment(self, context: jinja2.runtime.Context, lineno: int, key: object, caller: Callable[[], str]) -> str:
        render: FragmentRecorder = context[RECORDER]
        return render.fragment((lineno, key), caller)

    def _each(
        self, context: jinja2.runtime.Context, lineno: int, items: Iterable[object], caller: Callable[[object], str]
    ) -> str:
        render: FragmentRecorder = context[RECORDER]
        return render.each(lineno, items, caller)
