"""Rendering: template functions, sorting, IPv6, address fallback, nginx-safe output, errors with file:line."""

from __future__ import annotations

import gc
import os
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import confpy.render.datasource as datasource_module
from confpy.config import TemplateConfig
from confpy.errors import RenderError, UnsafeValueError
from confpy.model import KVPair, Memory
from confpy.registry.base import CatalogServices, KVTree, ServiceHealth
from confpy.registry.consul_decode import health_view_from_entries
from confpy.render.datasource import CHANGE_LOG, DataSource
from confpy.render.naming import nginx_quote, upstream_name_for
from confpy.render.renderer import TemplateRenderer

from .conftest import SHIPPED_TEMPLATE


def entry(
    sid: str,
    port: int,
    address: str = "127.0.0.1",
    *,
    name: str = "web",
    node: str = "n1",
    node_address: str = "10.0.0.9",
    tags: list[str] | None = None,
    meta: dict[str, str] | None = None,
    weight: Any = 1,
) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": node_address},
        "Service": {
            "ID": sid,
            "Service": name,
            "Address": address,
            "Port": port,
            "Tags": tags if tags is not None else ["nginx"],
            "Meta": meta or {},
            "Weights": {"Passing": weight, "Warning": 1},
        },
        "Checks": [],
    }


SETTINGS = "confpy/upstreams/"


def data_for(services: dict[str, list[dict[str, Any]]], tag: str | None = "nginx") -> DataSource:
    data = DataSource()
    data.set(KVTree(SETTINGS), ())  # no per-upstream settings in KV
    data.set(CatalogServices(tag), tuple(sorted(services)))
    for name, entries in services.items():
        data.set(ServiceHealth(name, tag), health_view_from_entries(name, entries))
    return data


def renderer(tmp_path: Path, text: str | None = None, on_empty: str = "keep") -> TemplateRenderer:
    source = SHIPPED_TEMPLATE
    if text is not None:
        source = tmp_path / "t.conf.j2"
        source.write_text(text)
    return TemplateRenderer(TemplateConfig(source=source, destination=tmp_path / "out.conf", on_empty=on_empty))  # type: ignore[arg-type]


def render(r: TemplateRenderer, data: DataSource, memory: Memory | None = None) -> str:
    result = r.render(data, memory or Memory())
    assert result.complete
    assert result.content is not None
    return result.content.decode()


def test_shipped_template_renders_upstreams_sorted_and_stable(tmp_path: Path) -> None:
    entries = [
        entry("web-b", 8082),
        entry("web-a", 8081, meta={"max_fails": "3", "fail_timeout": "10s"}),
        entry("web-c", 8083, weight=5),
    ]
    r = renderer(tmp_path)
    first = render(r, data_for({"web": entries}))
    assert "upstream web {" in first and "zone web 67k;" in first and "keepalive 16;" in first
    lines = [line.strip() for line in first.splitlines() if line.strip().startswith("server ")]
    assert lines == [
        "server 127.0.0.1:8081 weight=1 max_fails=3 fail_timeout=10s;",
        "server 127.0.0.1:8082 weight=1;",
        "server 127.0.0.1:8083 weight=5;",
    ]
    for _ in range(5):
        random.shuffle(entries)
        assert render(r, data_for({"web": entries})) == first  # order from Consul never changes the bytes


def test_ipv6_is_bracketed_and_empty_address_falls_back_to_the_node(tmp_path: Path) -> None:
    out = render(
        renderer(tmp_path),
        data_for({"web": [entry("a", 80, "2001:db8::1"), entry("b", 81, "", node_address="10.1.2.3")]}),
    )
    assert "server [2001:db8::1]:80 weight=1;" in out
    assert "server 10.1.2.3:81 weight=1;" in out


def test_instance_fields(tmp_path: Path) -> None:
    text = (
        "{% for i in service('web') %}{{ i.name }} {{ i.id }} {{ i.node }} {{ i.address }} {{ i.port }} {{ i.endpoint }} {{ i.weight }} "
        "{{ i.tags | join(',') }} {{ i.meta.zone }}\n{% endfor %}"
    )
    data = DataSource()
    data.set(
        ServiceHealth("web"),
        health_view_from_entries("web", [entry("w1", 80, tags=["b", "a"], meta={"zone": "eu"}, weight=3)]),
    )
    assert render(renderer(tmp_path, text), data) == "web w1 n1 127.0.0.1 80 127.0.0.1:80 3 a,b eu\n"


def test_services_lists_catalog_without_consul_and_filters_by_tag(tmp_path: Path) -> None:
    data = DataSource()
    data.set(CatalogServices(None), ())
    from confpy.registry.consul_decode import catalog_names

    catalog = {"consul": [], "web": ["nginx"], "api": ["nginx", "v2"], "db": []}
    assert catalog_names(catalog, None) == ("api", "db", "web")
    assert catalog_names(catalog, "nginx") == ("api", "web")


def test_invalid_instances_are_left_out_with_reasons() -> None:
    view = health_view_from_entries(
        "web",
        [
            entry("ok", 80),
            entry("bad-port", 0),
            entry("bad-port2", 70000),
            entry("bad-address", 80, "10.0.0.1:80; } server { listen 80; } #"),
            entry("any", 80, "0.0.0.0"),
            entry("bad-weight", 80, weight=0),
            entry("bad-meta", 80, meta={"max_fails": "3; evil"}),
        ],
    )
    assert [i.id for i in view.instances] == ["ok"]
    reasons = {r.id: r.reason for r in view.rejected}
    assert "not from 1 to 65535" in reasons["bad-port"] and "not from 1 to 65535" in reasons["bad-port2"]
    assert "neither an IP address nor a valid host name" in reasons["bad-address"]
    assert "unspecified" in reasons["any"]
    assert "not a positive integer" in reasons["bad-weight"]
    assert "max_fails" in reasons["bad-meta"]
    assert "service 'web' instance 'bad-port'" in str(view.rejected[0])


def test_finalize_refuses_values_that_break_out_and_names_the_origin(tmp_path: Path) -> None:
    text = "upstream web {\n{% for i in service('web') %}\n  server {{ i.endpoint }}; # {{ i.meta.note }}\n{% endfor %}\n}\n"
    data = DataSource()
    data.set(
        ServiceHealth("web"),
        health_view_from_entries("web", [entry("w1", 80, meta={"note": "x;\n} server { listen 81; }"})]),
    )
    with pytest.raises(UnsafeValueError) as info:
        renderer(tmp_path, text).render(data, Memory())
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 't.conf.j2'}:3:")
    assert "meta 'note' of service 'web' instance 'w1'" in message and "nginx_quote" in message


@pytest.mark.parametrize("value", ["a b", "a;b", "{", "}", '"', "'", "#", "$x", "a\\b", "a\tb", "\x00", "é"])
def test_each_unsafe_character_is_refused(tmp_path: Path, value: str) -> None:
    env = renderer(tmp_path, "x").env
    with pytest.raises(UnsafeValueError, match="could break out of an nginx directive"):
        env.from_string("server {{ v }};").render(v=value)


def test_numbers_and_quoted_values_pass(tmp_path: Path) -> None:
    env = renderer(tmp_path, "x").env
    assert (
        env.from_string("{{ n }} {{ s | nginx_quote }}").render(n=42, s='say "hi" \\ ok;{}#')
        == '42 "say \\"hi\\" \\\\ ok;{}#"'
    )
    with pytest.raises(UnsafeValueError, match="newline"):
        nginx_quote("a\nb")
    with pytest.raises(UnsafeValueError, match=r"'\$'"):
        nginx_quote("$host")


def test_upstream_name_mapping() -> None:
    assert upstream_name_for("web") == "web"
    assert upstream_name_for("api-v2_x-1") == "api-v2_x-1"
    assert upstream_name_for("api.v2_x-1", keep_dots=True) == "api.v2_x-1"  # dotted_upstreams lists it
    mapped = upstream_name_for("my service")
    assert mapped.startswith("my_service_") and len(mapped) == len("my_service_") + 8
    assert upstream_name_for("my service") == mapped  # deterministic
    assert upstream_name_for("my/service") != mapped  # different names never share an upstream
    with pytest.raises(UnsafeValueError, match="maps to no valid nginx upstream name"):
        upstream_name_for("{};")


def test_syntax_error_and_undefined_name_report_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"t\.conf\.j2:2: template syntax error"):
        renderer(tmp_path, "ok\n{% for x in %}\n").render(DataSource(), Memory())
    with pytest.raises(RenderError, match=r"t\.conf\.j2:3: 'nope' is undefined"):
        renderer(tmp_path, "a\nb\n{{ nope }}\n").render(DataSource(), Memory())
    with pytest.raises(RenderError, match="template not found"):
        TemplateRenderer(TemplateConfig(source=tmp_path / "missing.j2", destination=tmp_path / "o")).render(
            DataSource(), Memory()
        )


def test_missing_data_makes_an_incomplete_render_that_names_its_dependencies(tmp_path: Path) -> None:
    result = renderer(tmp_path).render(DataSource(), Memory())
    assert not result.complete and result.missing == {CatalogServices("nginx")}
    data = DataSource()
    data.set(CatalogServices("nginx"), ("web",))
    result = renderer(tmp_path).render(data, Memory())
    assert result.missing == {ServiceHealth("web", "nginx"), KVTree(SETTINGS)}  # what the web block reads


def test_on_empty_keep_uses_remembered_members_and_render_gets_a_valid_placeholder(tmp_path: Path) -> None:
    full = data_for({"web": [entry("a", 8081)]})
    first = renderer(tmp_path).render(full, Memory())
    empty = data_for({"web": []})
    kept = renderer(tmp_path).render(empty, first.memory)
    assert kept.content == first.content and kept.kept == ("service(web, tag=nginx)",)
    rendered_empty = renderer(tmp_path, on_empty="render").render(empty, first.memory)
    assert rendered_empty.content is not None
    assert b"server 127.0.0.1:9 down;" in rendered_empty.content and b"8081" not in rendered_empty.content


def test_collision_between_mapped_names_is_refused(tmp_path: Path) -> None:
    taken = upstream_name_for("a b")
    ok = "{{ 'a b' | upstream_name }} {{ 'a b' | upstream_name }}"
    assert render(renderer(tmp_path, ok), DataSource()) == f"{taken} {taken}"
    clash = "{{ 'a b' | upstream_name }} {{ '" + taken + "' | upstream_name }}"
    with pytest.raises(UnsafeValueError, match="both map to upstream"):
        renderer(tmp_path, clash).render(DataSource(), Memory())


# --- incremental rendering: {% fragment %} --------------------------------------------------


def _counting(tmp_path: Path, text: str) -> tuple[TemplateRenderer, list[str]]:
    """A renderer whose template calls `count(name)` each time a fragment body really runs."""
    r = renderer(tmp_path, text)
    ran: list[str] = []
    r.env.globals["count"] = lambda name: ran.append(name) or ""
    return r, ran


def test_fragments_rerun_only_for_the_service_that_changed(tmp_path: Path) -> None:
    text = (
        "{% fragment for name in services('nginx') %}{{ count(name) }}{{ name }}:"
        "{% for i in service(name, 'nginx') %} {{ i.port }}{% endfor %};{% endfragment %}"
    )
    r, ran = _counting(tmp_path, text)
    services = {"api": [entry("a1", 81, name="api")], "web": [entry("w1", 80)], "db": [entry("d1", 82, name="db")]}
    data = data_for(services)
    first = r.render(data, Memory())
    assert first.content == b"api: 81;db: 82;web: 80;" and sorted(ran) == ["api", "db", "web"]
    ran.clear()
    data.set(ServiceHealth("web", "nginx"), health_view_from_entries("web", [entry("w1", 80), entry("w2", 90)]))
    second = r.render(data, first.memory)
    assert second.content == b"api: 81;db: 82;web: 80 90;"
    assert ran == ["web"], "only the changed service's block runs again"
    assert second.dependencies == first.dependencies  # replayed fragments still record what they use
    assert set(second.memory.members) == {"api|nginx", "db|nginx", "web|nginx"}  # and what they remember
    ran.clear()
    data.set(CatalogServices("nginx"), ("api", "web"))  # a service leaves the catalog
    third = r.render(data, second.memory)
    assert third.content == b"api: 81;web: 80 90;" and ran == []


def test_an_edited_template_drops_every_cached_fragment(tmp_path: Path) -> None:
    r, ran = _counting(
        tmp_path, "{% fragment 'k' %}{{ count('k') }}{{ service('web', 'nginx') | length }}{% endfragment %}"
    )
    data = data_for({"web": [entry("w1", 80)]})
    r.render(data, Memory())
    assert ran == ["k"]
    source = tmp_path / "t.conf.j2"
    source.write_text("{% fragment 'k' %}{{ count('k') }}n={{ service('web', 'nginx') | length }}{% endfragment %}")
    os.utime(source, (source.stat().st_atime + 5, source.stat().st_mtime + 5))  # Jinja reloads by mtime
    assert r.render(data, Memory()).content == b"n=1" and ran == ["k", "k"]


def test_fragments_replay_on_empty_keep_and_refresh_when_the_remembered_members_change(tmp_path: Path) -> None:
    text = "{% fragment for name in services('nginx') %}{{ count(name) }}{% for i in service(name, 'nginx') %}{{ i.port }} {% endfor %}{% endfragment %}"
    r, ran = _counting(tmp_path, text)
    data = data_for({"web": [entry("w1", 80)]})
    first = r.render(data, Memory())
    data.set(ServiceHealth("web", "nginx"), health_view_from_entries("web", []))  # lost every passing instance
    kept = r.render(data, first.memory)
    assert kept.content == b"80 " and kept.kept == ("service(web, tag=nginx)",)
    again = r.render(data, kept.memory)  # nothing changed: replayed, still marked as kept
    assert again.content == b"80 " and again.kept == ("service(web, tag=nginx)",) and ran == ["web", "web"]
    other = Memory(members={"web|nginx": health_view_from_entries("web", [entry("w9", 99)]).instances})
    assert r.render(data, other).content == b"99 "  # different remembered members: the body runs again


def test_shipped_templates_render_the_same_bytes_from_cache_and_from_scratch(tmp_path: Path) -> None:
    services = {f"svc{n}": [entry(f"s{n}-{i}", 8000 + i, name=f"svc{n}") for i in range(n % 4)] for n in range(12)}
    services["bad name ?"] = [entry("x", 1, name="bad name ?")]
    data = data_for(services)
    cached = renderer(tmp_path)
    first = cached.render(data, Memory())
    data.set(ServiceHealth("svc5", "nginx"), health_view_from_entries("svc5", [entry("new", 9999, name="svc5")]))
    incremental = cached.render(data, first.memory)
    scratch = renderer(tmp_path).render(data, first.memory)
    assert incremental.content == scratch.content and incremental.warnings == scratch.warnings
    assert b"127.0.0.1:9999" in (incremental.content or b"")


# Loops whose reads and upstream names depend on the data: a service with four instances also
# reads svc18 and claims the upstream name that CLASH maps to, which the catalog's last name
# (CLASH's mapped name, a valid name of its own) also claims: an error while both are there.
# Then a second loop over the same names, a loop run twice in one render, and a fragment keyed
# by a constant.
_CLASH = "svc00 ?"
_LOOPS = (
    "{% fragment for name in services('nginx') %}{% if name is upstream_mappable %}"
    "{% set label = '" + _CLASH + "' if service(name, 'nginx') | length == 4 else name %}"
    "{{ label | upstream_name }}:{% for i in service(name, 'nginx') %}{{ i.port }},{% endfor %}"
    "{% if service(name, 'nginx') | length > 2 %}+{{ service('svc18', 'nginx') | length }}{% endif %}\n"
    "{% endif %}{% endfragment %}\n"
    "{% fragment for name in services('nginx') %}{{ name | nginx_quote }}={{ service(name, 'nginx') | length }};"
    "{% endfragment %}\n"
    "{% for round in [1, 2] %}{% fragment for name in services('nginx') %}{{ round }}{{ name | nginx_quote }}"
    "{% endfragment %}{% endfor %}\n"
    "{% fragment 'all' %}{{ services('nginx') | length }}{% endfragment %}\n"
)

_STEP = st.tuples(
    st.sampled_from(["instances", "empty", "leave", "join", "settings", "bad name", "nothing"]),
    st.integers(0, 7),
    st.integers(0, 3),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_STEP, min_size=1, max_size=25), template=st.sampled_from(["shipped", "live", "loops"]))
def test_incremental_renders_equal_renders_from_scratch(
    tmp_path: Path, steps: list[tuple[str, int, int]], template: str
) -> None:
    """Whatever changes, in whatever order: what a render from its memos gives (text, what it
    reads, remembers, keeps, warns of) is what a renderer with nothing cached gives."""
    text = _LOOPS if template == "loops" else None

    def fresh(folder: Path) -> TemplateRenderer:
        if template != "live":
            return renderer(folder, text)
        live = TemplateConfig(
            source=SHIPPED_TEMPLATE.with_name("nginx-upstreams-live.conf.j2"), destination=folder / "o"
        )
        return TemplateRenderer(
            live, {"lua_dir": "/l", "live_listen": "unix:/s", "live_token_file": "/t", "live_state_file": "/f"}
        )

    names = [f"svc{n:02d}" for n in range(19)] + [upstream_name_for(_CLASH)]
    catalog = set(names[:12])
    data = data_for({name: [entry(f"{name}-0", 8000, name=name)] for name in names})
    data.set(CatalogServices("nginx"), tuple(sorted(catalog)))
    cached = fresh(tmp_path)
    (tmp_path / "scratch").mkdir(exist_ok=True)
    memory = cached.render(data, Memory()).memory
    for kind, n, size in steps:
        name = names[n + 12] if kind in ("join", "bad name") else names[n]  # eight in the catalog, eight to join
        if kind == "instances":
            view = health_view_from_entries(name, [entry(f"{name}-{i}", 8000 + i, name=name) for i in range(size + 1)])
            data.set(ServiceHealth(name, "nginx"), view)
        elif kind == "empty":
            data.set(ServiceHealth(name, "nginx"), health_view_from_entries(name, []))
        elif kind in ("leave", "join", "bad name"):
            member = "bad name ?" if kind == "bad name" else name
            catalog = catalog - {member} if kind == "leave" else catalog | {member}
            data.set(CatalogServices("nginx"), tuple(sorted(catalog)))
            if ServiceHealth(member, "nginx") not in data:
                data.set(
                    ServiceHealth(member, "nginx"), health_view_from_entries(member, [entry("x", 9000, name=member)])
                )
        elif kind == "settings":
            data.set(KVTree(SETTINGS), (KVPair(f"{name}/keepalive", f"{SETTINGS}{name}/keepalive", str(8 + size)),))
        incremental = _outcome(cached, data, memory, tmp_path)
        assert incremental == _outcome(fresh(tmp_path / "scratch"), data, memory, tmp_path / "scratch")
        if isinstance(incremental, tuple):
            memory = incremental[3]


def _outcome(r: TemplateRenderer, data: DataSource, memory: Memory, folder: Path) -> tuple[object, ...] | str:
    """Everything a render gives that later renders and installs use, or the error it raised."""
    try:
        result = r.render(data, memory)
    except RenderError as exc:
        return str(exc).replace(str(folder), "FOLDER")
    facts = (result.content, result.dependencies, result.missing, result.memory, result.kept, result.warnings)
    return (*facts, result.live, result.live_settings)


def test_the_data_source_names_what_changed_until_its_log_runs_out() -> None:
    data = DataSource()
    web, api = ServiceHealth("web"), ServiceHealth("api")
    start = data.generation
    data.set(web, health_view_from_entries("web", [entry("w1", 80)]))
    data.set(web, health_view_from_entries("web", [entry("w1", 80)]))  # equal: not a change
    data.set(api, health_view_from_entries("api", []))
    assert data.changed_since(start) == {web, api} and data.generation == start + 2
    middle = data.generation
    data.forget(web)
    assert data.changed_since(middle) == {web} and data.changed_since(data.generation) == set()
    for port in range(CHANGE_LOG):
        data.set(api, health_view_from_entries("api", [entry("a", port, name="api")]))
    assert data.changed_since(middle) is None, "older than the log: everything must be checked"
    assert data.changed_since(data.generation - 1) == {api}

    # the log's edge: a render CHANGE_LOG changes behind is still told what changed, one more is not
    edge = data.generation - CHANGE_LOG
    assert data.changed_since(edge) == {api} and data.changed_since(edge - 1) is None
    assert data.changed_since(data.generation + 1) is None, "a generation it never reached: check everything"


def _data_source_bytes(data: DataSource, changes: int) -> int:
    """What the data source's own code holds after `changes` more changes of one dependency."""
    dep = ServiceHealth("api")
    values = [health_view_from_entries("api", [entry("a", port, name="api")]) for port in (1, 2)]
    tracemalloc.start()
    try:
        for n in range(changes):
            data.set(dep, values[n % 2])
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, datasource_module.__file__)])
    finally:
        tracemalloc.stop()
    return sum(stat.size for stat in snapshot.statistics("filename"))


def test_the_data_sources_change_log_stops_growing_at_its_bound() -> None:
    """Issue 31's soak: the log grew with every reload until it held CHANGE_LOG entries; it holds
    one reference per change, so past the bound nothing grows however many changes follow."""
    data = DataSource()
    full = _data_source_bytes(data, CHANGE_LOG)
    assert len(data._changes) == CHANGE_LOG
    later = _data_source_bytes(data, 3 * CHANGE_LOG)
    assert len(data._changes) == CHANGE_LOG and later <= full
    assert full < CHANGE_LOG * 16, f"{full} bytes for {CHANGE_LOG} changes: more than a reference each"


def test_what_a_redone_fragment_stops_reading_is_no_longer_a_dependency(tmp_path: Path) -> None:
    names = [f"svc{n:02d}" for n in range(19)]
    data = data_for({name: [entry(f"{name}-0", 8000, name=name)] for name in names})
    data.set(CatalogServices("nginx"), tuple(names[:12]))
    r = renderer(tmp_path, _LOOPS)
    first = r.render(data, Memory())
    svc18 = ServiceHealth("svc18", "nginx")
    assert svc18 not in first.dependencies
    for count, reads_svc18 in ((3, True), (1, False), (4, True), (2, False)):
        data.set(
            ServiceHealth("svc03", "nginx"),
            health_view_from_entries("svc03", [entry(f"x{i}", 8000 + i, name="svc03") for i in range(count)]),
        )
        result = r.render(data, first.memory)
        assert result.unchanged_fragments > 0, "the loops' memos were used"
        assert (svc18 in result.dependencies) == reads_svc18, count


def test_a_change_to_one_service_redoes_only_its_fragment_and_checks_no_other(tmp_path: Path) -> None:
    r, ran = _counting(
        tmp_path,
        "{% fragment for name in services('nginx') %}{{ count(name) }}{{ name }}:"
        "{% for i in service(name, 'nginx') %} {{ i.port }}{% endfor %};{% endfragment %}",
    )
    services = {f"svc{n:03d}": [entry(f"s{n}", 8000 + n, name=f"svc{n:03d}")] for n in range(200)}
    data = data_for(services)
    first = r.render(data, Memory())
    assert len(ran) == 200 and first.unchanged_fragments == 0  # nothing to go by yet: all checked
    ran.clear()
    second = r.render(data, first.memory)
    assert ran == [] and second.unchanged_fragments == 200 and second.content == first.content
    data.set(ServiceHealth("svc007", "nginx"), health_view_from_entries("svc007", [entry("new", 9999, name="svc007")]))
    third = r.render(data, second.memory)
    assert ran == ["svc007"] and third.unchanged_fragments == 199
    assert b"svc007: 9999;" in (third.content or b"") and third.dependencies == first.dependencies
    data.set(CatalogServices("nginx"), tuple(sorted([*services, "svc999"])))  # the list itself changed
    data.set(ServiceHealth("svc999", "nginx"), health_view_from_entries("svc999", [entry("z", 7, name="svc999")]))
    fourth = r.render(data, third.memory)
    assert ran == ["svc007", "svc999"] and fourth.unchanged_fragments == 0  # checked one by one, as before


def test_a_pass_without_its_data_records_what_it_needs_instead_of_failing(tmp_path: Path) -> None:
    r = renderer(tmp_path, "{{ service('web')[0].port }} {{ (service('api') | first).port }}")
    data = DataSource()
    # Placeholders stand in for the missing services ([0] and | first included): one pass names both.
    first = r.render(data, Memory())
    assert not first.complete and first.missing == {ServiceHealth("web"), ServiceHealth("api")}
    data.set(ServiceHealth("web"), health_view_from_entries("web", [entry("w1", 80)]))
    second = r.render(data, Memory())
    assert not second.complete and second.missing == {ServiceHealth("api")}
    data.set(ServiceHealth("api"), health_view_from_entries("api", [entry("a1", 81, name="api")]))
    assert render(r, data) == "80 81"
    data.set(ServiceHealth("web"), health_view_from_entries("web", []))  # with all data, the error counts
    with pytest.raises(RenderError, match=r"t\.conf\.j2:1: .*no element 0"):
        r.render(data, Memory())


def test_backup_members_render_as_nginx_backup_servers(tmp_path: Path) -> None:
    text = render(
        renderer(tmp_path),
        data_for(
            {
                "web": [
                    entry("w1", 80),
                    entry("w2", 81, tags=["nginx", "backup"]),
                    entry("w3", 82, meta={"backup": "true"}),
                ]
            }
        ),
    )
    servers = [line.strip() for line in text.splitlines() if line.strip().startswith("server ")]
    assert servers == [
        "server 127.0.0.1:80 weight=1;",
        "server 127.0.0.1:81 weight=1 backup;",
        "server 127.0.0.1:82 weight=1 backup;",
    ]


def test_a_render_leaves_nothing_for_the_cycle_collector(tmp_path: Path) -> None:
    # What a render built goes when it ends, by reference counting: left to the collector, a
    # thousand services' worth waited for its next full pass and piled up (+4 MB at 10 changes/s).
    r = renderer(tmp_path)
    data = data_for({"web": [entry("web-1", 8081)], "api": [entry("api-1", 9091, name="api")]})
    render(r, data)  # the first render compiles the template and fills the caches
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            assert "upstream web" in render(r, data)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
