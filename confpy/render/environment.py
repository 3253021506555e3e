"""The Jinja2 environment: template functions, nginx-safe output and file:line errors.

Templates pull their data by calling `service()` and `services()`; each call records a dependency,
so the set of queries confpy runs (and watches) is exactly what the templates use. Every value a
template prints passes `finalize`, the single choke point that refuses anything able to break out
of an nginx directive, unless the template quoted it on purpose with `| nginx_quote`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar, cast

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension

from confpy import __version__
from confpy.config import TemplateConfig
from confpy.errors import RenderError, UnsafeValueError
from confpy.model import HealthView, Memory, SafeStr, ServiceInstance, ServiceTags, memory_key
from confpy.registry.base import AnyDependency, CatalogServices, Dependency, ServiceHealth
from confpy.render.functions import RegistryFunctions, UpstreamSettings, parse_json, pending, to_json

# How many changes DataSource remembers for `changed_since` (many more than arrive between two
# renders of a template, whose quiescence timers are at most seconds apart).
CHANGE_LOG = 4096
# A loop with a memo redoes at most this many items, or an eighth of them, one by one; beyond
# that, every item is checked (as fast, and it keeps the memo's bookkeeping simple).
INCREMENTAL_REDO_MIN = 16
# What may stand unquoted inside an nginx directive: printable ASCII without whitespace, the
# directive terminator, block braces, quotes, comments, variables or escapes.
_UNSAFE_CHAR = re.compile(r"[^\x21-\x7e]|[;{}\"'#$\\]")
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_NOT_UPSTREAM_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


def _describe_char(char: str) -> str:
    names = {
        " ": "a space",
        "\t": "a tab",
        "\n": "a newline",
        "\r": "a carriage return",
        ";": "';'",
        "{": "'{'",
        "}": "'}'",
    }
    if char in names:
        return names[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"control character U+{ord(char):04X}"
    if ord(char) > 0x7E:
        return f"non-ASCII character U+{ord(char):04X}"
    return repr(char)


def _preview(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "...")


_MISSING = object()
_Dep = TypeVar("_Dep")


class NginxQuoted(str):
    """A string already quoted for nginx by `nginx_quote`; finalize lets it through."""


def nginx_quote(value: Any) -> NginxQuoted:
    """Quote a value as one nginx string argument: `"..."` with `\\` and `"` escaped.

    Control characters (newlines included) and `$` (nginx would expand it as a variable) are
    refused: there is no way to write them safely in every directive.
    """
    text = str(value)
    for char in text:
        if ord(char) < 0x20 or ord(char) == 0x7F or char == "$":
            raise UnsafeValueError(
                f"value {_preview(text)} contains {_describe_char(char)}, which nginx_quote cannot write safely", text
            )
    return NginxQuoted('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def nginx_safe(value: Any) -> Any:
    """Jinja2 `finalize`: let numbers and quoted strings through, refuse unsafe text."""
    kind = type(value)
    if kind is int or kind is SafeStr or kind is NginxQuoted:
        return value  # the common cases first: this runs for every value of every render
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float, NginxQuoted)):
        return value
    if value is None:
        raise UnsafeValueError("a template printed None (an empty value); use a default or an `if`")
    text = value if isinstance(value, str) else str(value)
    bad = _UNSAFE_CHAR.search(text)
    if bad:
        raise UnsafeValueError(
            f"value {_preview(text)} contains {_describe_char(bad.group())}, which could break out of an nginx "
            "directive; it was refused (quote it on purpose with | nginx_quote)",
            text,
        )
    return value


class ServiceName(str):
    """A name as the catalog lists it (`services()`): always the service's literal name, so a
    catalog service whose name contains `@` is never read as `name@dc`."""


def service_dependency(name: Any, tag: Any, dc: Any, passing: Any) -> ServiceHealth:
    """`service(name, tag=None, dc=None, passing=True)`, and consul-template's `name@dc` form for a
    name written in the template (names from `services()` are taken literally).

    Its `tag.name` form is refused rather than guessed: a dot is valid inside a service name.
    """
    if not isinstance(name, str) or not name:
        raise RenderError(f"service() needs a service name (a non-empty string), got {name!r}")
    if tag is not None and not isinstance(tag, str):
        raise RenderError(f"service({name!r}, tag=...) needs a string tag, got {tag!r}")
    if dc is not None and (not isinstance(dc, str) or not dc):
        raise RenderError(f"service({name!r}, dc=...) needs a datacenter name, got {dc!r}")
    if not isinstance(passing, bool):
        raise RenderError(f"service({name!r}, passing=...) needs true or false, got {passing!r}")
    if "@" in name and not isinstance(name, ServiceName):
        base, _, at = name.partition("@")
        if not base or not at or "@" in at or dc is not None:
            raise RenderError(f"service({name!r}): write name@dc once, or dc=..., not both")
        if "." in base:
            raise RenderError(
                f"service({name!r}): consul-template's tag.name@dc form is ambiguous here (a service name may "
                f"contain dots); write service({base.rpartition('.')[2]!r}, tag={base.rpartition('.')[0]!r}, dc={at!r})"
            )
        name, dc = base, at
    return ServiceHealth(str(name), tag, dc, passing)


@functools.lru_cache(maxsize=65536)
def upstream_name_for(service: str) -> str:
    """The nginx upstream name for a service (documented in docs/templates.md).

    A name made of letters, digits, `_`, `-` and `.` is kept as it is. Any other name has each
    run of other characters replaced by `_` and gets `_` plus 8 hex digits of its SHA-1 appended,
    so two different services never share an upstream by accident.
    """
    if _UPSTREAM_NAME.match(service):
        return SafeStr(service)
    mapped = _NOT_UPSTREAM_CHARS.sub("_", service).strip("_.-")
    if not mapped:
        raise UnsafeValueError(
            f"service name {_preview(service)} maps to no valid nginx upstream name (it needs a letter or digit); rename the service"
        )
    digest = hashlib.sha1(service.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()[:8]
    return SafeStr(f"{mapped[:100]}_{digest}")


@dataclass(frozen=True)
class RenderResult:
    """The outcome of rendering one template against what confpy knows of the registry."""

    template: TemplateConfig
    content: bytes | None
    dependencies: frozenset[AnyDependency]
    missing: frozenset[AnyDependency]
    memory: Memory
    kept: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    live: Mapping[str, tuple[ServiceInstance, ...]] = field(default_factory=dict)
    live_settings: Mapping[str, UpstreamSettings] = field(default_factory=dict)
    # Fragments taken as they were without looking at their data: none of it changed since the
    # last render (see `LoopMemo`).
    unchanged_fragments: int = 0

    @property
    def complete(self) -> bool:
        """True when every dependency had data, so `content` is the real output."""
        return not self.missing and self.content is not None


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
        self.generation = 0
        self.identity = object()  # generations count within one data source only
        self._changes: deque[tuple[int, object]] = deque(maxlen=CHANGE_LOG)

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
        self._changes.append((self.generation, dep))

    def changed_since(self, generation: int) -> AbstractSet[object] | None:
        """The dependencies set or forgotten after `generation`; None when the log no longer
        reaches back that far (then everything must be checked)."""
        changes = self._changes
        if generation == self.generation:
            return frozenset()
        if not changes or changes[0][0] > generation + 1:
            return None
        return {dep for _, dep in itertools.takewhile(lambda change: change[0] > generation, reversed(changes))}

    def snapshot(self) -> dict[Dependency, object]:
        return dict(self._values)


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


def _clash(name: str, first: str, second: str) -> UnsafeValueError:
    """Two services claimed one upstream name (`first` did so first)."""
    return UnsafeValueError(f"services {first!r} and {second!r} both map to upstream {name!r}; rename one of them")


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


class _RenderContext:
    """The functions one render hands to its template, recording what it asked for."""

    def __init__(
        self,
        data: DataSource,
        template: TemplateConfig,
        remembered: Memory,
        fragments: dict[object, Fragment],
        environ: Mapping[str, str],
        registry: str = "Consul",
        loops: Mapping[int, LoopMemo] | None = None,
        listings: dict[CatalogServices, tuple[object, tuple[ServiceName, ...]]] | None = None,
    ) -> None:
        self.data = data
        self.template = template
        self.remembered = remembered
        self.dependencies: set[AnyDependency] = set()
        self.missing: set[AnyDependency] = set()
        self.memory = Memory()
        self.kept: list[str] = []
        self.warnings: list[str] = []
        self.live: dict[str, tuple[ServiceInstance, ...]] = {}
        self.live_settings: dict[str, UpstreamSettings] = {}
        self.upstreams: dict[str, str] = {}
        self.handed: list[tuple[ServiceInstance, ...]] = []
        self.names: list[tuple[str, ...]] = []
        self.previous_fragments = fragments
        self.fragments: dict[object, Fragment] = {}
        self.previous_loops: Mapping[int, LoopMemo] = loops or {}
        self.loops: dict[int, LoopMemo] = {}
        self.loop_calls: set[int] = set()
        self.listings = listings if listings is not None else {}  # services(): each listing's names, kept
        self.unchanged_fragments = 0
        self.recording: list[Fragment] = []
        self.functions = RegistryFunctions(self.lookup, self._warn, environ, registry)

    def release(self) -> None:
        """Break the cycle this context is part of (its functions hold bound methods of it), so a
        render's leftovers go by reference counting when it ends. Left to the cycle collector, a
        thousand services' worth (the dependency set, every member handed out) waited for its
        next full pass and piled up: +4 MB of RSS under 10 changes/s at 1,000 services."""
        del self.functions

    def origin_of(self, value: str) -> str | None:
        """Which registry field a refused value came from (searched only when refusing)."""
        for instances in self.handed:
            for instance in instances:
                label = instance.field_named(value)
                if label is not None:
                    return f"{label} of service {instance.name!r} instance {instance.id!r}"
        if any(value in names for names in self.names):
            return f"service name {value[:80]!r}"
        return None

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

    def _lookup(self, dep: AnyDependency) -> object | None:
        """As `lookup`: the value, or None while the registry has not answered."""
        found, value = self.lookup(dep)
        return value if found else None

    def _remember(self, key: str, members: tuple[ServiceInstance, ...]) -> None:
        self.memory.members[key] = members
        for fragment in self.recording:
            fragment.members[key] = members

    def service(self, name: Any, tag: Any = None, dc: Any = None, passing: Any = True) -> list[ServiceInstance]:
        dep = service_dependency(name, tag, dc, passing)
        if dep.dc is not None:
            self.functions.consul_only("datacenters()")
        value = self._lookup(dep)
        if value is None:
            placeholder: list[ServiceInstance] = pending()
            return placeholder
        assert isinstance(value, HealthView)
        key = memory_key(dep.service, dep.tag, dep.dc, dep.passing)
        if value.instances:
            self._remember(key, value.instances)
            self.handed.append(value.instances)
            return list(value.instances)
        remembered = self.remembered.members.get(key)
        for fragment in self.recording:
            fragment.remembered[key] = remembered
        if self.template.on_empty == "keep" and remembered:
            self._remember(key, remembered)
            self.handed.append(remembered)
            self._kept(dep.describe())
            return list(remembered)
        return []

    def _kept(self, label: str) -> None:
        self.kept.append(label)
        for fragment in self.recording:
            fragment.kept.append(label)

    def _warn(self, text: str) -> None:
        self.warnings.append(text)
        for fragment in self.recording:
            fragment.warnings.append(text)

    def services(self, tag: Any = None, detailed: bool = False) -> list[str] | list[ServiceTags]:
        if tag is not None and not isinstance(tag, str):
            raise RenderError(f"services(tag=...) needs a string tag, got {tag!r}")
        if detailed:
            return self.functions.services_detailed(tag)
        dep = CatalogServices(str(tag) if tag is not None else None)
        value = self._lookup(dep)
        if value is None:
            names: list[str] = pending()
            return names
        assert isinstance(value, tuple)
        self.names.append(value)
        cached = self.listings.get(dep)
        if cached is None or cached[0] is not value:
            cached = self.listings[dep] = (value, tuple(ServiceName(n) for n in value))
        listed: list[str] = list(cached[1])  # the same objects as last time: a loop's memo compares them at once
        return listed

    def live_upstream(self, service: Any, instances: Any, settings: Any = None) -> str:
        """Live mode: name the upstream and hand its members (and its KV settings, when given) to the
        pusher instead of the file."""
        name = self.upstream_name(service)
        members = tuple(i for i in instances if isinstance(i, ServiceInstance))
        self.live[name] = members
        for fragment in self.recording:
            fragment.live[name] = members
        if isinstance(settings, UpstreamSettings) and settings != UpstreamSettings():
            self.live_settings[name] = settings
            for fragment in self.recording:
                fragment.live_settings[name] = settings
        return name

    def upstream_mappable(self, service: Any) -> bool:
        try:
            upstream_name_for(str(service))
        except UnsafeValueError as exc:
            self._warn(f"skipped: {exc}")
            return False
        return True

    def upstream_name(self, service: Any) -> str:
        name = upstream_name_for(str(service))
        self._claim(name, str(service))
        for fragment in self.recording:
            fragment.upstreams.append((name, str(service)))
        return name

    def _claim(self, name: str, service: str) -> None:
        other = self.upstreams.setdefault(name, service)
        if other != service:
            raise _clash(name, other, service)

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
            self._remember(key, members)
        for label in fragment.kept:
            self._kept(label)
        for text in fragment.warnings:
            self._warn(text)
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
        listed = tuple(items)
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
        self.dependencies.update(memo.reads.keys() - gone if gone else memo.reads.keys())
        for name in upstreams.keys() & self.upstreams.keys():
            if self.upstreams[name] != upstreams[name]:
                self._clash_in_loop(lineno, name, upstreams[name], memo, redo)
        self.upstreams.update(upstreams)
        self.memory.members.update(members)
        self.live.update(live)
        self.live_settings.update(live_settings)
        self.unchanged_fragments += len(listed) - len(redo)
        fragments = list(memo.fragments)
        for i in redo:
            fragments[i] = self.fragments.get((lineno, listed[i]))
        if all(_same_shape(fragments[i], memo.fragments[i]) for i in redo):
            keyed = dict(memo.keyed)
            for i in redo:
                new = fragments[i]
                if new is not None and new.bulk:
                    keyed[(lineno, listed[i])] = new
                    members.update(new.members)
                    live.update(new.live)
                    live_settings.update(new.live_settings)
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
        else:
            self._memorize(lineno, listed, texts)
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
        raise _clash(name, first, second)

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
        render: _RenderContext = context["__confpy__"]
        return render.fragment((lineno, key), caller)

    def _each(
        self, context: jinja2.runtime.Context, lineno: int, items: Iterable[object], caller: Callable[[object], str]
    ) -> str:
        render: _RenderContext = context["__confpy__"]
        return render.each(lineno, items, caller)


@jinja2.pass_context
def _upstream_mappable_test(context: jinja2.runtime.Context, service: Any) -> bool:
    render: _RenderContext = context["__confpy__"]
    return render.upstream_mappable(service)


@jinja2.pass_context
def _upstream_name_filter(context: jinja2.runtime.Context, service: Any) -> str:
    render: _RenderContext = context["__confpy__"]
    return render.upstream_name(service)


def _template_line(tb: TracebackType | None, source: Path) -> int | None:
    """The last line of `source` in a (Jinja2-rewritten) traceback."""
    line = None
    filename = str(source)
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class TemplateRenderer:
    """Renders one `[[template]]` source; reloads it when the file changes on disk."""

    def __init__(
        self,
        template: TemplateConfig,
        extra_globals: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        registry: str = "Consul",
    ) -> None:
        self.template = template
        self.registry = registry
        self.environ: Mapping[str, str] = environ if environ is not None else {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(template.source.parent)),
            undefined=jinja2.StrictUndefined,
            finalize=nginx_safe,
            autoescape=False,  # noqa: S701 - output is nginx config, not HTML; finalize guards it
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=True,
            extensions=[FragmentExtension],
        )
        self._compiled: jinja2.Template | None = None
        self._fragments: dict[object, Fragment] = {}
        self._loops: dict[int, LoopMemo] = {}
        self._listings: dict[CatalogServices, tuple[object, tuple[ServiceName, ...]]] = {}
        self.env.filters["nginx_quote"] = nginx_quote
        self.env.filters["to_json"] = to_json
        self.env.filters["parse_json"] = parse_json
        self.env.filters["upstream_name"] = _upstream_name_filter
        self.env.tests["upstream_mappable"] = _upstream_mappable_test
        self.env.globals["confpy"] = {"version": __version__, **(extra_globals or {})}

    def _where(self, line: int | None) -> str:
        return f"{self.template.source}:{line}" if line else str(self.template.source)

    def load(self) -> jinja2.Template:
        """Compile the source (cached until it changes); RenderError names file:line."""
        try:
            return self.env.get_template(self.template.source.name)
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"{self._where(exc.lineno)}: template syntax error: {exc.message}") from None
        except jinja2.TemplateNotFound:
            raise RenderError(f"{self.template.source}: template not found; check [[template]] source") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RenderError(f"{self.template.source}: cannot read the template: {exc}") from None

    def render(self, data: DataSource, remembered: Memory) -> RenderResult:
        """Render against `data`; incomplete (content None) while a dependency has no data yet."""
        compiled = self.load()
        if compiled is not self._compiled:  # an edited template: nothing cached is valid
            self._compiled, self._fragments, self._loops = compiled, {}, {}
        ctx = _RenderContext(
            data, self.template, remembered, self._fragments, self.environ, self.registry, self._loops, self._listings
        )
        try:
            return self._render(compiled, ctx)
        finally:
            ctx.release()

    def _render(self, compiled: jinja2.Template, ctx: _RenderContext) -> RenderResult:
        more = ctx.functions
        functions: dict[str, Callable[..., Any]] = {
            "service": ctx.service,
            "services": ctx.services,
            "upstream_name": ctx.upstream_name,
            "live_upstream": ctx.live_upstream,
            "key": more.key,
            "key_or_default": more.key_or_default,
            "ls": more.ls,
            "tree": more.tree,
            "keys": more.keys,
            "nodes": more.nodes,
            "node": more.node,
            "datacenters": more.datacenters,
            "env": more.env,
            "upstream_settings": more.upstream_settings,
        }
        try:
            text = self._execute(compiled, ctx, functions)
        except RenderError:
            if not ctx.missing:
                raise
            # A pass without all its data: its errors do not count (`service("web")[0]` fails on
            # the empty list a missing service gives); what it asked for is what matters.
            return RenderResult(self.template, None, frozenset(ctx.dependencies), frozenset(ctx.missing), ctx.memory)
        if not ctx.missing:
            self._fragments = ctx.fragments  # only the fragments this render used stay cached
            self._loops = ctx.loops
        content = None if ctx.missing else text.encode("utf-8")
        return RenderResult(
            template=self.template,
            content=content,
            dependencies=frozenset(ctx.dependencies),
            missing=frozenset(ctx.missing),
            memory=ctx.memory,
            kept=tuple(ctx.kept),
            warnings=tuple(dict.fromkeys(ctx.warnings)),
            live=ctx.live,
            live_settings=ctx.live_settings,
            unchanged_fragments=ctx.unchanged_fragments,
        )

    def _execute(
        self, compiled: jinja2.Template, ctx: _RenderContext, functions: Mapping[str, Callable[..., Any]]
    ) -> str:
        """Run the template; every failure becomes a RenderError naming file:line."""
        try:
            return compiled.render(__confpy__=ctx, **functions)
        except UnsafeValueError as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            origin = ctx.origin_of(exc.value) if exc.value is not None else None
            prefix = f"{origin}: " if origin else ""
            raise UnsafeValueError(f"{self._where(line)}: {prefix}{exc.message}", exc.value) from None
        except RenderError as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            raise type(exc)(f"{self._where(line)}: {exc.message}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(
                f"{exc.filename or self.template.source}:{exc.lineno}: template syntax error: {exc.message}"
            ) from None
        except jinja2.UndefinedError as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            raise RenderError(f"{self._where(line)}: {exc.message}") from None
        except jinja2.TemplateError as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            raise RenderError(f"{self._where(line)}: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError) as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            raise RenderError(f"{self._where(line)}: {type(exc).__name__}: {exc}") from None
