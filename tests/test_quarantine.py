"""No registrant steals or stops the gateway (in-process): upstream names nginx could take for a host
are refused, case-insensitive clashes leave one service out, and the upstream nginx refused is
found from its words and the rendered text, then left out until its data changes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from confpy.config import TemplateConfig
from confpy.errors import UnsafeValueError
from confpy.model import Memory, ServiceInstance, validated_instance
from confpy.registry.base import CatalogServices, ServiceHealth
from confpy.registry.consul_decode import health_view_from_entries
from confpy.render.naming import upstream_name_for
from confpy.render.quarantine import find_culprits, installed_holders, refusals, upstream_at_line
from confpy.render.renderer import TemplateRenderer

from .conftest import SHIPPED_TEMPLATE
from .test_render import data_for, entry

LIVE_TEMPLATE = SHIPPED_TEMPLATE.with_name("nginx-upstreams-live.conf.j2")


def shipped(tmp_path: Path, dotted: frozenset[str] = frozenset(), live: bool = False) -> TemplateRenderer:
    source = LIVE_TEMPLATE if live else SHIPPED_TEMPLATE
    config = TemplateConfig(source=source, destination=tmp_path / "out.conf", dotted_upstreams=dotted)
    extra = {"lua_dir": "/l", "live_listen": "unix:/s", "live_token_file": "/t", "live_state_file": "/f"}
    return TemplateRenderer(config, extra if live else None)


def one_each(*names: str) -> dict[str, list[dict[str, object]]]:
    return {name: [entry(f"{name}-1", 8001, name=name)] for name in names}


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["127.0.0.1", "auth.example.com", "api.v2", "localhost", "LocalHost"])
def test_a_name_nginx_could_resolve_as_a_host_is_refused(name: str) -> None:
    with pytest.raises(UnsafeValueError, match="would take the traffic the gateway sends to host"):
        upstream_name_for(name)


def test_plain_names_are_unchanged_and_a_listed_dotted_name_is_kept() -> None:
    assert upstream_name_for("web") == "web"
    assert upstream_name_for("Web-2_x") == "Web-2_x"
    assert upstream_name_for("auth.example.com", keep_dots=True) == "auth.example.com"


def test_the_shipped_templates_leave_a_dotted_service_out_with_a_warning(tmp_path: Path) -> None:
    for live in (False, True):
        result = shipped(tmp_path, live=live).render(data_for(one_each("web", "127.0.0.1")), Memory())
        text = (result.content or b"").decode()
        assert "upstream web {" in text and "127.0.0.1 {" not in text and '"127.0.0.1"' not in text
        assert any("'127.0.0.1' contains a dot" in w and "dotted_upstreams" in w for w in result.warnings)
        assert set(result.upstreams) == {"web"}


def test_dotted_upstreams_keeps_a_dotted_name_on_purpose(tmp_path: Path) -> None:
    result = shipped(tmp_path, frozenset({"auth.example.com"})).render(
        data_for(one_each("auth.example.com", "api.v2")), Memory()
    )
    text = (result.content or b"").decode()
    assert "upstream auth.example.com {" in text and "api.v2" not in text


def test_names_differing_only_in_case_give_one_upstream(tmp_path: Path) -> None:
    result = shipped(tmp_path).render(data_for(one_each("Q", "q", "WEB", "Web")), Memory())
    text = (result.content or b"").decode()
    # The all-lower-case name wins; else the first in byte order.
    assert "upstream q {" in text and "upstream Q {" not in text
    assert "upstream WEB {" in text and "upstream Web {" not in text
    assert any("'Q' and 'q' both map to upstream 'q'" in w for w in result.warnings)


def test_a_newcomer_differing_in_case_does_not_take_an_upstream_over(tmp_path: Path) -> None:
    r = shipped(tmp_path)
    first = r.render(data_for(one_each("Web")), Memory())
    assert b"upstream Web {" in (first.content or b"")
    later = r.render(data_for(one_each("Web", "web")), first.memory)
    text = (later.content or b"").decode()
    assert "upstream Web {" in text and "upstream web {" not in text
    assert any("'Web' keeps it" in w for w in later.warnings)
    alone = r.render(data_for(one_each("web")), later.memory)  # the holder left: the other one gets it
    assert b"upstream web {" in (alone.content or b"")


# --- where nginx's complaint points --------------------------------------------------------

RENDERED = b"""# header
upstream web {
    zone web 65k;
    server 127.0.0.1:8001 weight=1;
    keepalive 16;
}

upstream api {
    server 0.0.0.1:1;  # placeholder { not a brace }
    balancer_by_lua_block {
        require("confpy").balance("api")
    }
    keepalive 16;
}
server {
    listen 1;
}
"""


def test_a_line_maps_to_the_upstream_block_that_holds_it() -> None:
    assert [upstream_at_line(RENDERED, n) for n in range(1, 18)] == [
        None,
        *["web"] * 5,
        None,
        *["api"] * 7,
        None,
        None,
        None,
    ]


def test_nginx_complaints_are_found_in_its_output_and_in_a_check_error() -> None:
    output = (
        'check_cmd `nginx -t` failed (exit 1): nginx: [emerg] invalid parameter "fail_timeout=x" in '
        "/etc/nginx/conf.d/up.conf:4 | nginx: configuration file /etc/nginx/nginx.conf test failed"
    )
    (found,) = refusals(output)
    assert found.file == Path("/etc/nginx/conf.d/up.conf") and found.line == 4
    assert found.message == 'invalid parameter "fail_timeout=x"'
    (culprit,) = find_culprits(output, [(Path("/etc/nginx/conf.d/up.conf"), RENDERED, {"web": "web", "api": "api"})])
    assert (culprit.service, culprit.upstream) == ("web", "web") and "up.conf:4" in culprit.reason


def test_a_duplicate_upstream_is_blamed_on_the_service_that_claimed_the_name() -> None:
    output = 'nginx: [emerg] duplicate upstream "API" in /etc/nginx/nginx.conf:30'
    (culprit,) = find_culprits(output, [(Path("/x/up.conf"), RENDERED, {"web": "web", "api": "api"})])
    assert culprit.service == "api" and "already defines an upstream 'API'" in culprit.reason
    assert "/etc/nginx/nginx.conf:30" in culprit.reason


def test_a_complaint_outside_every_upstream_block_blames_nobody() -> None:
    rendered = [(Path("/x/up.conf"), RENDERED, {"web": "web", "api": "api"})]
    assert find_culprits('nginx: [emerg] unknown directive "x" in /x/up.conf:16', rendered) == []
    assert find_culprits('nginx: [emerg] unknown directive "x" in /etc/nginx/other.conf:3', rendered) == []
    assert find_culprits('nginx: [emerg] open() "/x" failed (2: No such file or directory)', rendered) == []


# --- quarantine ----------------------------------------------------------------------------


def test_a_quarantined_service_is_left_out_until_its_data_changes(tmp_path: Path) -> None:
    r = shipped(tmp_path)
    data = data_for(one_each("api", "web"))
    first = r.render(data, Memory())
    assert b"upstream web {" in (first.content or b"")
    held = r.quarantine("web", "web", "nginx -t: bad", 0.0)
    assert ServiceHealth("web", "nginx") in held.reads and CatalogServices("nginx") not in held.reads
    left = r.render(data, first.memory)
    assert b"upstream web {" not in (left.content or b"") and b"upstream api {" in (left.content or b"")
    assert [q.service for q in left.quarantined] == ["web"]
    assert ServiceHealth("web", "nginx") in left.dependencies  # still watched, so a change is seen
    assert any("quarantined: service 'web'" in w for w in left.warnings)
    # Another service's change keeps it out; its own change brings it back.
    data.set(ServiceHealth("api", "nginx"), health_view_from_entries("api", [entry("a2", 8002, name="api")]))
    assert b"upstream web {" not in (r.render(data, first.memory).content or b"")
    data.set(ServiceHealth("web", "nginx"), health_view_from_entries("web", [entry("w2", 8003, name="web")]))
    back = r.render(data, first.memory)
    assert b"upstream web {" in (back.content or b"") and back.quarantined == ()


def test_after_a_restart_the_installed_file_says_who_holds_an_upstream(tmp_path: Path) -> None:
    r = shipped(tmp_path)
    r.left_out.holders = installed_holders(RENDERED.replace(b"upstream web {", b"upstream Web {"))
    assert r.left_out.holders == {"web": "Web", "api": "api"}
    text = (r.render(data_for(one_each("Web", "web")), Memory()).content or b"").decode()
    assert "upstream Web {" in text and "upstream web {" not in text
    assert installed_holders(None) == {}


def test_a_remembered_member_keeps_the_address_its_name_resolved_to() -> None:
    named = dataclasses.replace(entry_instance("backend.internal"), ip="127.0.0.7")
    again = ServiceInstance.from_json(json.loads(json.dumps(named.to_json())))
    assert again == named and again.ip == "127.0.0.7"
    with pytest.raises(ValueError, match="ip is not an IP address"):
        ServiceInstance.from_json({**named.to_json(), "ip": "example.com"})
    assert "ip" not in entry_instance("127.0.0.1").to_json()


def entry_instance(address: str) -> ServiceInstance:
    return validated_instance(
        name="web", id="w1", node="n1", address=address, port=80, tags=["nginx"], meta={}, weight=1
    )
