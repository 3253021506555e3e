"""Template functions beyond service(): KV, nodes, datacenters, env, JSON, service(dc=...), and the
per-upstream KV settings of the shipped template; rendered in-process, no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from confpy.config import TemplateConfig
from confpy.errors import RenderError
from confpy.model import KVPair, Memory, NodeInfo, NodeService, NodeServices, ServiceTags
from confpy.registry.base import (
    CatalogDatacenters,
    CatalogNode,
    CatalogNodes,
    CatalogServices,
    CatalogServiceTags,
    KVKey,
    KVTree,
    ServiceHealth,
)
from confpy.registry.consul_decode import health_view_from_entries
from confpy.render.datasource import DataSource
from confpy.render.functions import parse_upstream_settings
from confpy.render.naming import ServiceName, service_dependency
from confpy.render.renderer import TemplateRenderer

from .conftest import SHIPPED_TEMPLATE
from .test_render import SETTINGS, data_for, entry


def render(tmp_path: Path, text: str, data: DataSource, environ: dict[str, str] | None = None) -> str:
    source = tmp_path / "t.j2"
    source.write_text(text)
    result = TemplateRenderer(TemplateConfig(source, tmp_path / "out"), environ=environ).render(data, Memory())
    assert result.complete, result.missing
    assert result.content is not None
    return result.content.decode()


def pair(path: str, value: str, prefix: str = "") -> KVPair:
    return KVPair(path[len(prefix) :], path, value)


def test_kv_functions(tmp_path: Path) -> None:
    data = DataSource()
    data.set(KVKey("nginx/web/lb"), pair("nginx/web/lb", "least_conn"))
    data.set(KVKey("nginx/web/absent"), None)
    tree = (
        pair("nginx/web/a", "1", "nginx/web/"),
        pair("nginx/web/b", "2", "nginx/web/"),
        pair("nginx/web/deep/c", "3", "nginx/web/"),
    )
    data.set(KVTree("nginx/web/"), tree)
    text = (
        '{{ key("nginx/web/lb") }} {{ key_or_default("nginx/web/absent", "round_robin") }}\n'
        '{% for p in ls("nginx/web") %}{{ p.key }}={{ p.value }} {% endfor %}\n'
        '{% for p in tree("nginx/web/") %}{{ p.key }} {% endfor %}\n'
        '{{ keys("nginx/web") | join(",") }}\n'
    )
    assert (
        render(tmp_path, text, data)
        == "least_conn round_robin\na=1 b=2 a b deep/c nginx/web/a,nginx/web/b,nginx/web/deep/c\n"  # trim_blocks
    )
    source = tmp_path / "missing.j2"
    source.write_text('{{ key("nginx/web/absent") }}\n')
    with pytest.raises(RenderError, match=r"missing.j2:1: key\('nginx/web/absent'\): Consul's KV has no such key"):
        TemplateRenderer(TemplateConfig(source, tmp_path / "out")).render(data, Memory())


def test_a_first_pass_without_data_records_what_it_needs_and_does_not_fail(tmp_path: Path) -> None:
    source = tmp_path / "t.j2"
    source.write_text(
        '{{ service("web")[0].port }} {{ (service("web") | first).port }} {{ key("a/b") }} {{ node("n1").node.name }}\n'
    )
    renderer = TemplateRenderer(TemplateConfig(source, tmp_path / "out"))
    first = renderer.render(DataSource(), Memory())
    assert first.content is None and first.missing == {ServiceHealth("web"), KVKey("a/b"), CatalogNode("n1")}
    data = DataSource()
    data.set(ServiceHealth("web"), health_view_from_entries("web", [entry("w1", 8081)]))
    data.set(KVKey("a/b"), pair("a/b", "x"))
    node = NodeInfo("n1", "10.0.0.1", "dc1", {}, {})
    data.set(CatalogNode("n1"), NodeServices(node, ()))
    assert renderer.render(data, Memory()).content == b"8081 8081 x n1\n"


def test_nodes_node_datacenters_env_json_and_detailed_services(tmp_path: Path) -> None:
    data = DataSource()
    n1 = NodeInfo("n1", "10.0.0.1", "dc1", {"lan": "10.0.0.1"}, {"rack": "r1"})
    data.set(CatalogNodes(), (n1, NodeInfo("n2", "10.0.0.2", "dc1", {}, {})))
    data.set(CatalogNode("n1"), NodeServices(n1, (NodeService("web-1", "web", ("nginx",), "", 8081, {}),)))
    data.set(CatalogNode("gone"), None)
    data.set(CatalogDatacenters(), ("dc1", "dc2"))
    data.set(CatalogServiceTags(None), (ServiceTags("api", ()), ServiceTags("web", ("blue", "nginx"))))
    data.set(KVKey("cfg"), pair("cfg", '{"max_body": "10m"}'))
    text = (
        "{% for n in nodes() %}{{ n.name }}@{{ n.address }} {% endfor %}{{ node('n1').node.meta.rack }}\n"
        "{% for s in node('n1').services %}{{ s.id }}:{{ s.port }}{% endfor %} {{ node('gone') is none and 'gone' }}\n"
        "{{ datacenters() | join(',') }} {{ env('REGION') }} {{ env('NOPE', 'dflt') }} [{{ env('NOPE') }}]\n"
        "{% for s in services(detailed=True) %}{{ s.name }}:{{ s.tags | join('+') }} {% endfor %}\n"
        "{{ (key('cfg') | parse_json).max_body }} {{ n1 | default('') }}{{ {'a': [1]} | to_json | nginx_quote }}\n"
    )
    out = render(tmp_path, text, data, environ={"REGION": "eu-1"})
    assert out == (
        'n1@10.0.0.1 n2@10.0.0.2 r1\nweb-1:8081 gone\ndc1,dc2 eu-1 dflt []\napi: web:blue+nginx 10m "{\\"a\\":[1]}"\n'
    )


def test_service_datacenter_and_the_consul_template_forms() -> None:
    assert service_dependency("web", None, "dc2", True) == ServiceHealth("web", None, "dc2")
    assert service_dependency("web@dc2", "nginx", None, True) == ServiceHealth("web", "nginx", "dc2")
    assert service_dependency("my.svc", None, None, False) == ServiceHealth("my.svc", None, None, False)
    with pytest.raises(RenderError, match=r"write service\('web', tag='blue', dc='dc2'\)"):
        service_dependency("blue.web@dc2", None, None, True)
    with pytest.raises(RenderError, match=r"name@dc once, or dc=\.\.\., not both"):
        service_dependency("web@dc2", None, "dc3", True)
    # A name the catalog lists is literal: a service really named `a@b` is not service `a` in dc `b`.
    assert service_dependency(ServiceName("a@b"), "nginx", None, True) == ServiceHealth("a@b", "nginx")


def test_upstream_settings_are_whitelisted_and_bad_ones_left_out_with_a_warning() -> None:
    settings, warnings = parse_upstream_settings(
        "web",
        {"balance": "hash $remote_addr$request_uri consistent", "keepalive": "32", "max_fails": "2",
         "fail_timeout": "5s", "backup_tag": "canary"},
        SETTINGS,
    )  # fmt: skip
    assert settings.directives == ("hash $remote_addr$request_uri consistent;",) and settings.keepalive == 32
    assert warnings == [
        "KV confpy/upstreams/web/backup_tag = 'canary' left out: nginx allows no backup servers with balance hash"
    ]
    for key, value, words in (
        ("balance", "least_conn; } server 10.6.6.6:80; upstream x {", "balance is round_robin, least_conn"),
        ("balance", "hash $remote_addr weird", "the only word allowed after the hash key is `consistent`"),
        ("keepalive", "0", "keepalive is a whole number from 1 to 10000"),
        ("max_fails", "-1", "max_fails is a whole number from 0 to 1000"),
        ("fail_timeout", "10s;", "fail_timeout is an nginx time"),
        ("backup_tag", "a b", "backup_tag is one tag"),
        ("colour", "red", "not a setting"),
    ):
        settings, warnings = parse_upstream_settings("web", {key: value}, SETTINGS)
        assert settings == type(settings)() and len(warnings) == 1 and words in warnings[0], (key, warnings)


def test_shipped_template_with_kv_settings_and_without(tmp_path: Path) -> None:
    services = {"web": [entry("w1", 8081), entry("w2", 8082, tags=["nginx", "canary"], meta={"max_fails": "5"})]}
    plain = data_for(services)
    renderer = TemplateRenderer(TemplateConfig(SHIPPED_TEMPLATE, tmp_path / "out"))  # type: ignore[arg-type]
    before = renderer.render(plain, Memory()).content
    assert before is not None and b"keepalive 16;" in before and b"least_conn" not in before
    tuned = data_for(services)
    tuned.set(
        KVTree(SETTINGS),
        tuple(
            pair(f"{SETTINGS}web/{k}", v, SETTINGS)
            for k, v in (("balance", "least_conn"), ("keepalive", "64"), ("max_fails", "3"), ("backup_tag", "canary"))
        ),
    )
    after = renderer.render(tuned, Memory())
    assert after.content is not None
    text = after.content.decode()
    assert "    least_conn;\n    zone web" in text and "keepalive 64;" in text
    assert "127.0.0.1:8081 weight=1 max_fails=3;" in text
    assert "127.0.0.1:8082 weight=1 max_fails=5 backup;" in text  # the instance's own meta wins
    assert renderer.render(plain, Memory()).content == before  # keys gone: the same bytes as before
    assert CatalogServices("nginx") in after.dependencies
