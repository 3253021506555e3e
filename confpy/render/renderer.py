"""The renderer: a `[[template]]` source compiled with Jinja2, the functions its template calls, and
what a render gives (`RenderResult`), its errors naming file:line.

Templates pull their data by calling `service()` and `services()`; each call records a dependency,
so the set of queries confpy runs (and watches) is exactly what the templates use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import jinja2

from confpy import __version__
from confpy.config import TemplateConfig
from confpy.errors import RenderError, UnsafeValueError
from confpy.model import HealthView, Memory, ServiceInstance, ServiceTags, memory_key
from confpy.registry.base import AnyDependency, CatalogServices
from confpy.render.datasource import DataSource
from confpy.render.fragments import RECORDER, Fragment, FragmentExtension, FragmentRecorder, LoopMemo
from confpy.render.functions import RefusedValueError, RegistryFunctions, UpstreamSettings, parse_json, pending, to_json
from confpy.render.naming import (
    ServiceName,
    nginx_quote,
    nginx_safe,
    service_dependency,
    upstream_key,
    upstream_name_for,
)
from confpy.render.quarantine import Quarantined

# The start of the warning for a service left out for its name (no safe upstream name, a clash).
SKIPPED = "skipped: "


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
    rendered_fragments: int = 0
    # The live upstreams that may differ from the renderer's previous complete render (number
    # `live_base`; this one is `serial`), or None when every one may (a first or full render).
    live_changed: frozenset[str] | None = None
    serial: int = 0
    live_base: int = 0
    # Each upstream this render claimed (as nginx compares names, lower case) -> its service.
    upstreams: Mapping[str, str] = field(default_factory=dict)
    # The services left out because nginx refused their upstream (see `TemplateRenderer.quarantine`).
    quarantined: tuple[Quarantined, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every dependency had data, so `content` is the real output."""
        return not self.missing and self.content is not None


class _TemplateFunctions:
    """`service()`, `services()`, `upstream_name()` and `live_upstream()` for one render, each
    reporting what it read and did to the render's `FragmentRecorder`.

    Nothing this render builds refers back to it (`RegistryFunctions` holds the recorder's
    methods), so a render's leftovers go by reference counting when it ends. Left to the cycle
    collector, a thousand services' worth (the dependency set, every member handed out) waited
    for its next full pass and piled up: +4 MB of RSS under 10 changes/s at 1,000 services.
    """

    def __init__(
        self,
        record: FragmentRecorder,
        template: TemplateConfig,
        environ: Mapping[str, str],
        registry: str,
        listings: dict[CatalogServices, tuple[object, tuple[ServiceName, ...]]],
        left_out: LeftOut,
    ) -> None:
        self.record = record
        self.template = template
        self.left_out = left_out
        self.handed: list[tuple[ServiceInstance, ...]] = []
        self.names: list[tuple[str, ...]] = []
        self.listings = listings  # services(): each listing's names, kept
        self.functions = RegistryFunctions(record.lookup, record.warn, environ, registry)

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

    def _lookup(self, dep: AnyDependency) -> object | None:
        """As `FragmentRecorder.lookup`: the value, or None while the registry has not answered."""
        found, value = self.record.lookup(dep)
        return value if found else None

    def service(self, name: Any, tag: Any = None, dc: Any = None, passing: Any = True) -> list[ServiceInstance]:
        dep = service_dependency(name, tag, dc, passing)
        if dep.dc is not None:
            self.functions.consul_only("datacenters()")
        value = self._lookup(dep)
        if value is None:
            placeholder: list[ServiceInstance] = pending()
            return placeholder
        assert isinstance(value, HealthView)
        record = self.record
        key = memory_key(dep.service, dep.tag, dep.dc, dep.passing)
        if value.instances:
            record.remember(key, value.instances)
            self.handed.append(value.instances)
            return list(value.instances)
        remembered = record.recall(key)
        if self.template.on_empty == "keep" and remembered:
            record.remember(key, remembered)
            self.handed.append(remembered)
            record.keep(dep.describe())
            return list(remembered)
        return []

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
        given = settings if isinstance(settings, UpstreamSettings) and settings != UpstreamSettings() else None
        self.record.push_live(name, members, given)
        return name

    def _name_for(self, service: str) -> str:
        return upstream_name_for(service, service in self.template.dotted_upstreams)

    def upstream_mappable(self, service: Any) -> bool:
        """True when `service` gets an upstream: it has a name nginx cannot mistake for a host, no
        other service of this render's listings has a better claim to that name, and nginx did not
        refuse it (quarantine) with the data it has now."""
        service = str(service)
        try:
            name = self._name_for(service)
        except UnsafeValueError as exc:
            self.record.warn(f"{SKIPPED}{exc}")
            return False
        rival = self.left_out.rival(service, name, self.names, self._name_for)
        if rival is not None:
            self.record.uncacheable()
            self.record.warn(
                f"{SKIPPED}services {service!r} and {rival!r} both map to upstream {upstream_key(name)!r} (nginx "
                f"compares upstream names case-insensitively); {rival!r} keeps it"
            )
            return False
        held = self.left_out.quarantined.get(service)
        if held is None:
            return True
        self.record.uncacheable()
        # Read what it read, so its dependencies stay watched and a change is seen.
        unchanged = all(self.record.lookup(dep)[1] is value for dep, value in held.reads.items())
        if unchanged:
            self.record.warn(f"quarantined: {held.describe()}; retried when its data changes")
            return False
        self.left_out.lift(service)
        return True

    def upstream_name(self, service: Any) -> str:
        name = self._name_for(str(service))
        self.record.claim_upstream(name, str(service))
        return name


def _same_objects(first: Sequence[object], second: Sequence[object]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second, strict=True))


class LeftOut:
    """Which services a renderer leaves out beyond bad names: those nginx refused (quarantined, until
    their data changes), and those whose upstream name another service holds.

    Two services whose names differ only in case (`Q`, `q`) map to one upstream for nginx. The
    service that held the upstream at the last render keeps it, so a newcomer cannot take it over;
    with none, the all-lower-case name, then the first in byte order.
    """

    def __init__(self) -> None:
        self.quarantined: dict[str, Quarantined] = {}
        self.holders: Mapping[str, str] = {}  # upstream key -> service, as the last complete render left them
        self._rivals: tuple[tuple[tuple[str, ...], ...], dict[str, tuple[str, ...]]] | None = None
        self.lifted: list[str] = []

    def lift(self, service: str) -> None:
        held = self.quarantined.pop(service, None)
        if held is not None:
            self.lifted.append(service)

    def _by_key(self, listings: list[tuple[str, ...]], name_for: Callable[[str], str]) -> dict[str, tuple[str, ...]]:
        """The upstream keys that several listed services map to (cached per set of listings: a
        template that lists the catalog twice, as the live one does, asks once per service)."""
        if self._rivals is not None and _same_objects(self._rivals[0], listings):
            return self._rivals[1]
        groups: dict[str, set[str]] = {}
        for names in listings:
            for service in names:
                try:
                    key = upstream_key(name_for(service))
                except UnsafeValueError:
                    continue
                groups.setdefault(key, set()).add(service)
        shared = {key: tuple(sorted(group)) for key, group in groups.items() if len(group) > 1}
        self._rivals = (tuple(listings), shared)
        return shared

    def rival(
        self, service: str, name: str, listings: list[tuple[str, ...]], name_for: Callable[[str], str]
    ) -> str | None:
        """The service that keeps `service`'s upstream name instead of it, if any."""
        if not listings:
            return None
        key = upstream_key(name)
        group = self._by_key(listings, name_for).get(key)
        if group is None or service not in group:
            return None
        holder = self.holders.get(key)
        winner = holder if holder in group else min(group, key=lambda s: (s != s.lower(), s))
        return None if winner == service else winner


@jinja2.pass_context
def _upstream_mappable_test(context: jinja2.runtime.Context, service: Any) -> bool:
    render: _TemplateFunctions = context["__confpy__"]
    return render.upstream_mappable(service)


@jinja2.pass_context
def _upstream_name_filter(context: jinja2.runtime.Context, service: Any) -> str:
    render: _TemplateFunctions = context["__confpy__"]
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
        self._serial = 0  # complete renders so far
        self._live_outside = True  # the last complete render had live effects outside loop memos
        self.left_out = LeftOut()
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
        record = FragmentRecorder(data, remembered, self._fragments, self._loops)
        ctx = _TemplateFunctions(record, self.template, self.environ, self.registry, self._listings, self.left_out)
        result = self._render(compiled, ctx, record)
        if result.complete:
            self.left_out.holders = result.upstreams
        return result

    def quarantine(self, service: str, upstream: str, reason: str, since: float) -> Quarantined:
        """Leave `service` out of the next renders until the data its block read changes: nginx
        refused its upstream. Its cached text goes (it would be taken again)."""
        reads: dict[AnyDependency, object] = {}
        key = upstream_key(upstream)
        for fragment in self._fragments.values():
            if (key, service) in fragment.upstreams:
                reads.update(
                    (dep, value) for dep, value in fragment.reads.items() if not isinstance(dep, CatalogServices)
                )
        held = Quarantined(service, upstream, reason, reads, since)
        self.left_out.quarantined[service] = held
        self._fragments, self._loops = {}, {}
        return held

    def release(self, held: Quarantined) -> None:
        """Undo `quarantine(...)` (the sync that quarantined it failed anyway)."""
        if self.left_out.quarantined.get(held.service) is held:
            del self.left_out.quarantined[held.service]
            self._fragments, self._loops = {}, {}

    def _render(self, compiled: jinja2.Template, ctx: _TemplateFunctions, record: FragmentRecorder) -> RenderResult:
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
            text = self._execute(compiled, ctx, record, functions)
        except RenderError:
            if not record.missing:
                raise
            # A pass without all its data: its errors do not count (`service("web")[0]` fails on
            # the empty list a missing service gives); what it asked for is what matters.
            return RenderResult(
                self.template, None, frozenset(record.dependencies), frozenset(record.missing), record.memory
            )
        base = self._serial
        live_changed: frozenset[str] | None = None
        if not record.missing:
            self._fragments = record.fragments  # only the fragments this render used stay cached
            self._loops = record.loops
            # Only when neither this render nor the last had a live effect outside a loop memo is
            # every other live upstream the very one the last render had.
            if not (record.live_outside or self._live_outside or record.loop_without_memo):
                live_changed = frozenset(record.live_changed)
            self._live_outside = record.live_outside
            self._serial += 1
        content = None if record.missing else text.encode("utf-8")
        return RenderResult(
            template=self.template,
            content=content,
            dependencies=frozenset(record.dependencies),
            missing=frozenset(record.missing),
            memory=record.memory,
            kept=tuple(record.kept),
            warnings=tuple(dict.fromkeys(record.warnings)),
            live=record.live,
            live_settings=record.live_settings,
            unchanged_fragments=record.unchanged_fragments,
            rendered_fragments=record.rendered_fragments,
            live_changed=live_changed,
            serial=self._serial,
            live_base=base,
            upstreams=record.upstreams,
            quarantined=tuple(self.left_out.quarantined.values()),
        )

    def _execute(
        self,
        compiled: jinja2.Template,
        ctx: _TemplateFunctions,
        record: FragmentRecorder,
        functions: Mapping[str, Callable[..., Any]],
    ) -> str:
        """Run the template; every failure becomes a RenderError naming file:line."""
        try:
            return compiled.render(__confpy__=ctx, **{RECORDER: record}, **functions)
        except UnsafeValueError as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            origin = ctx.origin_of(exc.value) if exc.value is not None else None
            prefix = f"{origin}: " if origin else ""
            raise UnsafeValueError(f"{self._where(line)}: {prefix}{exc.message}", exc.value) from None
        except RefusedValueError as exc:
            line = _template_line(exc.__traceback__, self.template.source)
            key = ctx.functions.key_of(exc.value)
            prefix = f"the value of key {key!r}: " if key else ""
            raise RenderError(f"{self._where(line)}: {prefix}{exc.message}") from None
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
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError, RecursionError) as exc:
            # RecursionError: a template (or a value it walks) nested too deep; a bad input, not a crash
            line = _template_line(exc.__traceback__, self.template.source)
            raise RenderError(f"{self._where(line)}: {type(exc).__name__}: {exc}") from None
