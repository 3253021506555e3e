"""Nothing blocks the event loop: a daemon cycle at 300 services in asyncio's debug mode logs no
slow callback, and live mode resolves members' host names off the loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from confpy.apply.files import StateStore
from confpy.apply.live import LiveSupervisor
from confpy.apply.nginx import NginxReloader
from confpy.config import TemplateConfig, parse_config
from confpy.daemon.loop import Daemon
from confpy.model import HealthView, Memory, ServiceInstance
from confpy.registry.base import CatalogServices, Dependency, KVKey, KVTree, ServiceHealth
from confpy.render.renderer import RenderResult

from .conftest import ROOT, SHIPPED_TEMPLATE, stand_in_config
from .tiers import starts_processes

SERVICES = 300
SLOW_CALLBACK = 0.05  # asyncio's debug mode logs any callback or task step that holds the loop longer
LIVE_TEMPLATE = ROOT / "templates" / "nginx-upstreams-live.conf.j2"


def _instances(service: str, ports: range, host: str = "127.0.0.1") -> tuple[ServiceInstance, ...]:
    # As the registries answer (registry/resolve.py): a host name carries the address it resolved
    # to, off the loop, when it was fetched.
    ip = "127.0.0.1" if host == "localhost" else None
    return tuple(ServiceInstance(service, f"{service}-{p}", "n1", host, p, ip=ip) for p in ports)


class Registry:
    """A registry stand-in: SERVICES services of three members; blocking queries wait for `set`."""

    address = "stand-in://registry"

    def __init__(self, host: str) -> None:
        self.names = tuple(f"svc-{n:03d}" for n in range(SERVICES))
        self.views = {
            name: _instances(name, range(20000 + 3 * n, 20003 + 3 * n), host) for n, name in enumerate(self.names)
        }
        self.index = 10
        self.changed = asyncio.Event()

    def set(self, name: str, instances: tuple[ServiceInstance, ...]) -> None:
        self.views[name] = instances
        self.index += 1
        self.changed.set()
        self.changed = asyncio.Event()

    def answer(self, dep: Dependency) -> object:
        if isinstance(dep, CatalogServices):
            return self.names
        if isinstance(dep, ServiceHealth):
            return HealthView(self.views[dep.service])
        if isinstance(dep, KVTree):
            return ()
        if isinstance(dep, KVKey):
            return None
        raise AssertionError(f"the stand-in cannot answer {dep.describe()}")

    async def fetch(self, dep: Dependency, index: int, wait: float) -> tuple[int, object]:
        while index == self.index:
            await self.changed.wait()
        return self.index, self.answer(dep)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(120):  # a bound on a hang, not a measurement: the loop waits on the event
        while not condition():
            await asyncio.sleep(0.01)


@starts_processes  # the daemon runs check_cmd and reload_cmd (`true`)
def _cycle_in_debug_mode(
    tmp_path: Path, template: Path, nginx: str, host: str, applied: Callable[[Daemon, int], bool]
) -> tuple[Daemon, Registry]:
    """Start a daemon on the stand-in, wait for its first install (`applied(daemon, port)` of the
    last service's last member), change one service, wait for that change to be applied (of its
    new member's port), stop: all in asyncio's debug mode."""
    (tmp_path / "state").mkdir()
    config_path = tmp_path / "confpy.toml"
    config_path.write_text(stand_in_config(tmp_path, template, 'reload_cmd = "true"\n' + nginx))
    config = parse_config(config_path.read_text(), config_path, {})
    registry = Registry(host)
    daemon = Daemon(config, config_path, {}, registry_factory=lambda c: registry)

    async def scenario() -> None:
        asyncio.get_running_loop().slow_callback_duration = SLOW_CALLBACK
        main = asyncio.create_task(daemon._main())
        try:
            await _until(lambda: applied(daemon, 20000 + 3 * SERVICES - 1))
            registry.set("svc-000", _instances("svc-000", range(30000, 30004), host))
            await _until(lambda: applied(daemon, 30003))
        finally:
            main.cancel()
            await asyncio.gather(main, return_exceptions=True)

    asyncio.run(scenario(), debug=True)
    return daemon, registry


def _slow_callbacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.getMessage().startswith("Executing ")]


def _loop_thread_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Host names passed to socket.getaddrinfo on the main thread (where the test's loop runs)."""
    on_loop: list[str] = []
    real = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            on_loop.append(str(host))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return on_loop


def test_a_reload_mode_cycle_at_300_services_never_holds_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="asyncio")
    out = tmp_path / "out.conf"

    def applied(daemon: Daemon, port: int) -> bool:
        return out.exists() and f"server 127.0.0.1:{port} " in out.read_text()

    daemon, _ = _cycle_in_debug_mode(tmp_path, SHIPPED_TEMPLATE, "", "127.0.0.1", applied)
    text = out.read_text()
    assert text.count("upstream ") >= SERVICES
    assert daemon.cycles >= 2
    assert _slow_callbacks(caplog) == []


def test_a_live_mode_cycle_at_300_services_never_holds_the_loop_nor_resolves_on_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live mode without nginx: members are noted, saved and their push found nginx not running;
    every member has a host name (localhost), which the balancer needs as an IP: the address the
    registry's answer carries, never looked up on the loop."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    on_loop = _loop_thread_lookups(monkeypatch)
    nginx = f'mode = "live"\nlive_listen = "unix:{tmp_path / "admin.sock"}"\nlive_token_file = "{tmp_path / "token"}"\n'

    def applied(daemon: Daemon, port: int) -> bool:
        live = daemon.engine.live
        return live is not None and any(m.port == port for up in live.wanted.values() for m in up.members)

    daemon, _ = _cycle_in_debug_mode(tmp_path, LIVE_TEMPLATE, nginx, "localhost", applied)
    assert daemon.engine.live is not None
    wanted = daemon.engine.live.wanted
    assert len(wanted) == SERVICES
    hosts = {m.host for up in wanted.values() for m in up.members}
    assert hosts <= {"127.0.0.1", "::1"}, hosts
    assert on_loop == [], f"name resolution on the event loop: {sorted(set(on_loop))}"
    assert _slow_callbacks(caplog) == []


def test_live_members_take_the_address_the_registry_resolved_and_never_resolve_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: LiveSupervisor.note resolves nothing (the registry's answer carries each host
    name's address, resolved off the loop when it was fetched: registry/resolve.py); a host name
    that came without one is left out, never looked up on the loop."""
    asked: list[str] = []

    def resolver(host: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(str(host))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    config = parse_config(
        f'[nginx]\nmode = "live"\npid_file = "{tmp_path}/no.pid"\n[state]\ndir = "{tmp_path}/state"\n'
        f'[[template]]\nsource = "{LIVE_TEMPLATE}"\ndestination = "{tmp_path}/out.conf"\n',
        tmp_path / "c.toml",
        {},
    )
    supervisor = LiveSupervisor(config, StateStore(tmp_path / "state"), NginxReloader(config.nginx))
    template = TemplateConfig(source=LIVE_TEMPLATE, destination=tmp_path / "out.conf")
    resolved = tuple(dataclasses.replace(i, ip="192.0.2.7") for i in _instances("web", range(1, 3), "backend.internal"))
    unresolved = _instances("web", range(5, 6), "elsewhere.internal")
    by_name = resolved + unresolved + _instances("web", range(3, 4))
    result = RenderResult(template, b"", frozenset(), frozenset(), Memory(), live={"web": by_name})

    asyncio.run(supervisor.note([result]))
    assert asked == [], "no name is resolved on the loop"
    assert [(m.host, m.port) for m in supervisor.wanted["web"].members] == [
        ("127.0.0.1", 3),
        ("192.0.2.7", 1),
        ("192.0.2.7", 2),
    ]
    assert any("elsewhere.internal" in why for why in supervisor.wanted["web"].left_out)
