"""Live mode checks members with confpy.lua's own rules (in-process): a member the balancer would
refuse is left out, not the whole push, and one refused upstream does not stop the others."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from confpy.apply.files import StateStore
from confpy.apply.live import LiveMember, LiveRefused, LiveSupervisor, LiveUpstream, PartialPush, live_upstream
from confpy.apply.nginx import NginxReloader
from confpy.config import parse_config
from confpy.model import HealthView, ServiceInstance, validated_instance, with_resolved
from confpy.render.functions import UpstreamSettings


def instance(sid: str, port: int, address: str = "127.0.0.1", **meta: str) -> ServiceInstance:
    return validated_instance(
        name="web", id=sid, node="n1", address=address, port=port, tags=["nginx"], meta=meta, weight=1
    )


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (LiveMember("127.0.0.1", 80), None),
        (LiveMember("::1", 80), None),
        (LiveMember("2001:db8::1", 65535, weight=3, max_fails=0, fail_timeout=0.5), None),
        (LiveMember("example.com", 80), "is not an IP address"),
        (LiveMember("256.0.0.1", 80), "is not an IP address"),
        (LiveMember("fe80::1%eth0", 80), "is not an IP address"),
        (LiveMember("127.0.0.1", 0), "port 0 is not from 1 to 65535"),
        (LiveMember("127.0.0.1", 80, weight=0), "weight 0 is not a positive integer"),
        (LiveMember("127.0.0.1", 80, max_fails=-1), "max_fails -1 is negative"),
        (LiveMember("127.0.0.1", 80, fail_timeout=0.0), "fail_timeout 0s is not more than 0s"),
    ],
)
def test_a_member_is_checked_with_the_balancers_rules(member: LiveMember, problem: str | None) -> None:
    found = member.problem()
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_member_the_balancer_would_refuse_is_left_out_and_the_rest_pushed() -> None:
    good, zero = instance("w1", 8001), instance("w2", 8002, fail_timeout="0s")
    upstream = live_upstream([good, zero])
    assert [m.port for m in upstream.members] == [8001]
    assert len(upstream.left_out) == 1 and "'w2'" in upstream.left_out[0] and "fail_timeout 0s" in upstream.left_out[0]
    assert upstream.version == live_upstream([good]).version  # what is left out is not part of the version
    assert "left_out" not in upstream.to_json() and upstream.status_json()["left_out"] == list(upstream.left_out)
    # A KV default of 0s leaves out every member that does not set its own.
    both = live_upstream([good, instance("w3", 8003, fail_timeout="5s")], UpstreamSettings(fail_timeout="0s"))
    assert [m.port for m in both.members] == [8003]


def test_two_members_at_one_endpoint_keep_the_first() -> None:
    first = instance("a", 8001)
    second = dataclasses.replace(instance("b", 8001), weight=5)
    upstream = live_upstream([second, first])
    assert upstream.members == (LiveMember("127.0.0.1", 8001, weight=1),)
    assert "a second member at 127.0.0.1:8001" in upstream.left_out[0]
    assert live_upstream([first, instance("c", 8001)]).left_out == ()  # the same member twice: one, nothing left out


def test_a_host_name_goes_out_as_the_address_resolved_when_fetched() -> None:
    named = instance("h", 8001, address="backend.internal")
    gone = instance("x", 80, address="x.invalid")
    view = with_resolved(HealthView((named, gone)), {"backend.internal": "127.0.0.7"})
    assert [i.id for i in view.instances] == ["h"] and [r.id for r in view.rejected] == ["x"]
    assert view.instances[0].ip == "127.0.0.7" and view.instances[0].address == "backend.internal"
    assert live_upstream(view.instances).members == (LiveMember("127.0.0.7", 8001),)
    # Never resolved (e.g. remembered from before): left out, not resolved on the loop.
    assert "is not an IP address" in live_upstream([named]).left_out[0]


class Admin:
    """The admin API: refuses the upstreams in `refuse`, records the others."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.put_names: list[str] = []

    async def versions(self) -> dict[str, str | None]:
        return {"a": None, "b": None, "c": None}

    async def put(self, name: str, upstream: LiveUpstream) -> None:
        if name in self.refuse:
            raise LiveRefused(f"live admin API refused the members of {name!r} (400): nope")
        self.put_names.append(name)

    async def close(self) -> None:
        return None


def test_one_refused_upstream_does_not_stop_the_pushes_after_it(tmp_path: Path) -> None:
    (tmp_path / "t.j2").write_text("")
    config = parse_config(
        f'[consul]\naddress = "http://127.0.0.1:1"\n[nginx]\nmode = "live"\npid_file = "{tmp_path}/pid"\n'
        f'[state]\ndir = "{tmp_path}/state"\n'
        f'[[template]]\nsource = "{tmp_path}/t.j2"\ndestination = "{tmp_path}/out"\n',
        tmp_path / "c.toml",
        {},
    )
    supervisor = LiveSupervisor(config, StateStore(config.state.dir), NginxReloader(config.nginx))
    admin = Admin({"a"})
    supervisor.admin = admin  # type: ignore[assignment]
    supervisor.reloader.worker_pids = lambda: (1,)  # type: ignore[method-assign]
    counted: list[int] = []
    supervisor.on_pushed = counted.append
    supervisor.wanted = {name: live_upstream([instance(name, 8001)]) for name in ("a", "b", "c")}
    pushed = asyncio.run(supervisor.push_or_schedule())
    assert pushed == ["b", "c"] and admin.put_names == ["b", "c"] and counted == [2]
    assert "refused the members of 'a'" in supervisor.error and supervisor.retry_at is not None
    with pytest.raises(PartialPush) as raised:
        asyncio.run(supervisor.push())  # the retry: only `a` differs, and is refused again
    assert raised.value.pushed == [] and admin.put_names == ["b", "c"]
