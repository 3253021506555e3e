"""Issue 35: a live-mode member change costs the same work at 300 services as at 1 (in-process).

A `Daemon` runs the shipped live template against a fake registry that wakes only the watcher of
the dependency that changed, with a fake admin API; one member change of `web` is then counted:
upstreams the live supervisor walked, fragment bodies rendered, bytes read and written.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pytest

from confpy import cli
from confpy.apply.live import LiveUpstream, LiveUpstreams
from confpy.config import parse_config
from confpy.daemon.loop import Daemon
from confpy.model import HealthView
from confpy.plan import BYTES_PER_ANSWER, BYTES_PER_ETCD_KEY, BYTES_PER_INSTANCE, BYTES_PER_NAME, registry_cost
from confpy.registry.base import CatalogServices, Dependency, KVTree, ServiceHealth
from confpy.registry.consul_decode import health_view_from_entries
from confpy.render.renderer import RenderResult
from tests.test_core_units import FakeClock, FakeRegistry, turns
from tests.tiers import starts_processes

LIVE_TEMPLATE = Path(__file__).resolve().parent.parent / "confpy" / "templates" / "nginx-upstreams-live.conf.j2"


class OneWakeRegistry(FakeRegistry):
    """As FakeRegistry, but a change wakes only its own dependency's watcher (as a registry does)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[Dependency, asyncio.Event] = {}

    def set(self, dep: Dependency, value: object, index: int | None = None) -> None:
        self.index = index if index is not None else self.index + 1
        self.values[dep] = (self.index, value)
        event = self.events.pop(dep, None)
        if event is not None:
            event.set()

    async def fetch(self, dep: Dependency, index: int, wait: float) -> tuple[int, object]:
        self.calls.append((dep, index))
        while True:
            if dep in self.values:
                current, value = self.values[dep]
                if index == 0 or current != index:
                    return current, value
            await self.events.setdefault(dep, asyncio.Event()).wait()


class FakeAdmin:
    """The Lua admin API as confpy's `LiveAdmin` sees it: versions and PUTs."""

    def __init__(self, names: list[str]) -> None:
        self.served: dict[str, str | None] = dict.fromkeys(names)
        self.puts: list[str] = []

    async def versions(self) -> dict[str, str | None]:
        return dict(self.served)

    async def upstreams(self) -> dict[str, object]:
        return {name: {"version": version, "members": []} for name, version in self.served.items()}

    async def put(self, name: str, upstream: LiveUpstream) -> None:
        self.served[name] = upstream.version
        self.puts.append(name)

    async def close(self) -> None:
        return None


def view(name: str, ports: list[int]) -> HealthView:
    entries = [
        {
            "Node": {"Node": "n1", "Address": "127.0.0.1"},
            "Service": {"ID": f"{name}-{p}", "Service": name, "Address": "127.0.0.1", "Port": p, "Tags": ["nginx"]},
            "Checks": [],
        }
        for p in ports
    ]
    return health_view_from_entries(name, entries)


@dataclass(frozen=True)
class Work:
    walked: int
    rendered: int
    unchanged: int
    bytes_read: int
    bytes_written: int
    pushed: tuple[str, ...]


@starts_processes  # the daemon runs check_cmd (`true`) before its first install
async def _build(
    tmp: Path, services: int, on_empty: str = "keep"
) -> tuple[Daemon, OneWakeRegistry, FakeClock, FakeAdmin]:
    (tmp / "state").mkdir(parents=True)
    path = tmp / "confpy.toml"
    path.write_text(f"""
[nginx]
pid_file = "{tmp / "no-nginx.pid"}"
check_cmd = "true"
mode = "live"
live_listen = "127.0.0.1:9"
live_token_file = "{tmp / "token"}"
[wait]
min = "0s"
max = "1s"
[state]
dir = "{tmp / "state"}"
[[template]]
source = "{LIVE_TEMPLATE}"
destination = "{tmp / "out.conf"}"
on_empty = "{on_empty}"
""")
    config = parse_config(path.read_text(), path, {})
    registry, clock = OneWakeRegistry(), FakeClock()

    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    daemon = Daemon(config, path, {}, registry_factory=lambda c: registry, clock=clock, wall_clock=clock, sleep=no_wait)
    names = ["web"] + [f"svc{i:04d}" for i in range(services - 1)]
    admin = FakeAdmin(names)
    live = daemon.engine.live
    assert live is not None
    live.admin = admin  # type: ignore[assignment]
    registry.set(KVTree("confpy/upstreams/"), ())
    registry.set(CatalogServices("nginx"), tuple(sorted(names)))
    for name in names:
        registry.set(ServiceHealth(name, "nginx"), view(name, [20000, 20001, 20002]))
    await daemon._start()
    for _ in range(3):
        await _cycle(daemon, clock)
    assert (tmp / "out.conf").read_text().count("\nupstream ") == services
    return daemon, registry, clock, admin


async def _cycle(daemon: Daemon, clock: FakeClock) -> None:
    await turns()
    while not daemon.events.empty():
        daemon._handle(daemon.events.get_nowait())
    clock.now += 2
    await daemon._run_due()
    await daemon.cycles_.saver.on_timer(clock.now + 10)  # the state file, written off the change's path


async def _one_change(tmp: Path, services: int) -> Work:
    daemon, registry, clock, admin = await _build(tmp, services)
    live, files = daemon.engine.live, daemon.engine.files
    assert live is not None
    results: list[tuple[int, int]] = []
    render = daemon.engine.render

    def counting(*args: object) -> object:
        result = render(*args)  # type: ignore[arg-type]
        results.append((result.rendered_fragments, result.unchanged_fragments))
        return result

    daemon.engine.render = counting  # type: ignore[assignment,method-assign]
    before = (live.walked, files.bytes_read, files.bytes_written, len(admin.puts))
    registry.set(ServiceHealth("web", "nginx"), view("web", [20000, 20001, 30000]))
    await _cycle(daemon, clock)
    work = Work(
        walked=live.walked - before[0],
        rendered=sum(r for r, _ in results),
        unchanged=sum(u for _, u in results),
        bytes_read=files.bytes_read - before[1],
        bytes_written=files.bytes_written - before[2],
        pushed=tuple(admin.puts[before[3] :]),
    )
    assert admin.served["web"] == live.wanted["web"].version
    await daemon._stop()
    return work


def test_a_member_change_does_the_same_work_at_300_services_as_at_1(tmp_path: Path) -> None:
    one = asyncio.run(_one_change(tmp_path / "one", 1))
    many = asyncio.run(_one_change(tmp_path / "many", 300))
    assert one.pushed == many.pushed == ("web",)
    assert many.walked == one.walked, (one, many)  # upstreams looked at by note() and the push
    assert many.rendered == one.rendered, (one, many)  # fragment bodies run: web's, nothing else
    assert many.unchanged >= 299 * 2  # the other services' fragments, taken from the loop memos
    assert one.bytes_read == many.bytes_read == 0  # the render is compared in memory, not re-read
    # The state file is rewritten whole (nginx reads it at a restart): its size grows with the
    # catalog, but it is written once per change, off the path, and nothing else is.
    assert one.bytes_written > 0 and many.bytes_written < 300 * 1.5 * one.bytes_written


def test_incremental_members_match_a_full_walk(tmp_path: Path) -> None:
    """Upstreams emptied (on_empty = "render": nothing to push, nginx keeps its members), refilled
    and changed: after each change the supervisor's wanted members are those a full walk of the
    render finds, and nginx got every changed list."""

    async def scenario() -> None:
        daemon, registry, clock, admin = await _build(tmp_path, 5, on_empty="render")
        live = daemon.engine.live
        assert live is not None
        rendered: list[RenderResult] = []
        render = daemon.engine.render

        def keeping(*args: object) -> RenderResult:
            result = render(*args)  # type: ignore[arg-type]
            rendered.append(result)
            return result

        daemon.engine.render = keeping  # type: ignore[assignment,method-assign]
        steps = [("svc0001", []), ("web", [41000]), ("svc0001", [40000]), ("svc0003", [40001, 40002])]
        for name, ports in steps:
            registry.set(ServiceHealth(name, "nginx"), view(name, ports))
            await _cycle(daemon, clock)
            assert rendered[-1].live_changed is not None  # the incremental path was taken
            assert live.wanted == LiveUpstreams().desired(rendered[-1])
            assert all(admin.served[n] == up.version for n, up in live.wanted.items())
        assert "svc0001" in admin.puts and admin.puts[-1] == "svc0003"
        await daemon._stop()

    asyncio.run(scenario())


# --- `confpy plan`: the registry's cost, on paper -------------------------------------------


def test_registry_cost_arithmetic_for_one_gateway_and_a_fleet() -> None:
    values: dict[Dependency, object] = {
        KVTree("confpy/upstreams/"): (),
        CatalogServices("nginx"): ("api", "web"),
        ServiceHealth("web", "nginx"): view("web", [1, 2, 3]),
        ServiceHealth("api", "nginx"): view("api", [1]),
    }
    one = registry_cost("Consul", 60.0, values)
    assert (one.watches, one.services, one.instances, one.largest_service) == (4, 2, 4, 3)
    assert one.idle_requests_per_minute == 4.0  # 4 long polls, each re-asked once a minute
    assert one.catalog_watches == 1 and one.requests_per_change == 2  # web's watch, and the catalog's
    catalog = BYTES_PER_ANSWER + 2 * BYTES_PER_NAME
    assert one.bytes_per_change == BYTES_PER_ANSWER + 3 * BYTES_PER_INSTANCE + catalog
    fleet = registry_cost("Consul", 30.0, values, gateways=1000)
    assert fleet.idle_requests_per_minute == 8.0 and fleet.fleet(fleet.idle_requests_per_minute) == 8000.0
    assert fleet.fleet(fleet.requests_per_change) == 2000
    text = fleet.describe()
    assert "4 x 60 s / wait 30 s" in text and "8,000.0 for 1000" in text and "2,000 for 1000" in text
    etcd = registry_cost("etcd", 60.0, values)
    assert etcd.catalog_bytes == BYTES_PER_ANSWER + 4 * BYTES_PER_ETCD_KEY  # the range of every instance


def test_registry_cost_without_a_catalog_listing() -> None:
    values: dict[Dependency, object] = {ServiceHealth("web"): view("web", [1, 2])}
    cost = registry_cost("Consul", 60.0, values, gateways=3)
    assert (cost.watches, cost.catalog_watches, cost.requests_per_change) == (1, 0, 1)
    assert cost.bytes_per_change == BYTES_PER_ANSWER + 2 * BYTES_PER_INSTANCE
    assert cost.fleet(cost.bytes_per_change) == 3 * cost.bytes_per_change


def test_registry_cost_refuses_no_gateways() -> None:
    with pytest.raises(ValueError, match="gateways must be at least 1, got 0"):
        registry_cost("Consul", 60.0, {}, gateways=0)


def test_plan_command_prints_the_cost_of_a_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`confpy plan --gateways 20` on a configuration, with the registry answering in-process."""
    registry = OneWakeRegistry()
    registry.set(KVTree("confpy/upstreams/"), ())
    registry.set(CatalogServices("nginx"), ("web",))
    registry.set(ServiceHealth("web", "nginx"), view("web", [20000, 20001]))
    (tmp_path / "state").mkdir()
    path = tmp_path / "confpy.toml"
    path.write_text(f"""
[nginx]
pid_file = "{tmp_path / "no-nginx.pid"}"
check_cmd = "true"
mode = "live"
live_token_file = "{tmp_path / "token"}"
[state]
dir = "{tmp_path / "state"}"
[[template]]
source = "{LIVE_TEMPLATE}"
destination = "{tmp_path / "out.conf"}"
""")
    with patch("confpy.registry.factory.open_registry", lambda config: registry):
        assert cli.main(["-c", str(path), "plan", "--gateways", "20"], {}) == 0
    out = capsys.readouterr().out
    assert "registry cost (Consul; 1 services, 2 instances)" in out
    assert "3 per gateway" in out and "60 for 20" in out  # three watches: KV, catalog, web
    assert not (tmp_path / "out.conf").exists()  # nothing installed
