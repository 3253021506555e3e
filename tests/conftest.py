"""Shared fixtures: dev-consul (or a real agent), nginx under a temp prefix, backends, confpy runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from confpy.apply.files import StateStore
from confpy.apply.installer import Installer
from confpy.apply.nginx import NginxChecker, NginxReloader
from confpy.config import NginxConfig, TemplateConfig
from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    ConsulAPI,
    DevConsulProcess,
    EtcdCluster,
    LabPKI,
    NginxInstance,
    free_port,
    write_config,
)

from .tiers import E2E, InProcessGuard, e2e_reason, starts_processes

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TEMPLATE = ROOT / "templates" / "nginx-upstreams.conf.j2"
REAL_CONSUL = os.environ.get("CONFPY_TEST_CONSUL", "")

dev_consul_only = pytest.mark.skipif(bool(REAL_CONSUL), reason="needs dev-consul internals (restart, kill, fake clock)")


@dataclass
class ConsulUnderTest:
    """The agent a test talks to: dev-consul started for the test, or the real one in CONFPY_TEST_CONSUL."""

    url: str
    api: ConsulAPI
    process: DevConsulProcess | None

    @property
    def is_real(self) -> bool:
        return self.process is None


def _clean_real_agent(api: ConsulAPI) -> None:
    _, _, body = api.request("GET", "/v1/agent/services")
    for service_id in json.loads(body or b"{}"):
        api.deregister(service_id)
    api.request("DELETE", "/v1/kv/confpy-test/?recurse")


@pytest.fixture
@starts_processes
def consul() -> Iterator[ConsulUnderTest]:
    if REAL_CONSUL:
        api = ConsulAPI(REAL_CONSUL)
        _clean_real_agent(api)
        yield ConsulUnderTest(REAL_CONSUL, api, None)
        _clean_real_agent(api)
        return
    # Shuffled answers: every test proves confpy does not depend on Consul's order.
    proc = DevConsulProcess(shuffle=True).start()
    try:
        yield ConsulUnderTest(proc.url, ConsulAPI(proc.url), proc)
    finally:
        proc.stop()


@pytest.fixture
@starts_processes
def nginx(tmp_path: Path) -> Iterator[NginxInstance]:
    instance = NginxInstance(tmp_path / "nginx")
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
@starts_processes
def backends() -> Iterator[list[BackendServer]]:
    """Three running app servers answering "App server 1/2/3"."""
    servers = [BackendServer(f"App server {n}").start() for n in (1, 2, 3)]
    try:
        yield servers
    finally:
        for server in servers:
            try:
                server.stop()
            except OSError:
                pass


@pytest.fixture
def config_file(tmp_path: Path, consul: ConsulUnderTest, nginx: NginxInstance) -> Path:
    return write_config(tmp_path / "confpy.toml", consul.url, nginx, SHIPPED_TEMPLATE)


def run_confpy(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "confpy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def stand_in_config(tmp_path: Path, source: Path, nginx: str = "", wait_min: str = "0s", wait_max: str = "1s") -> str:
    """A confpy.toml for a Daemon driven in-process with a registry stand-in: no nginx running
    (its pid file does not exist), `check_cmd = "true"`, state and output under `tmp_path`;
    `nginx` adds lines to the [nginx] table."""
    return f"""
[nginx]
pid_file = "{tmp_path / "no-nginx.pid"}"
check_cmd = "true"
{nginx}
[wait]
min = "{wait_min}"
max = "{wait_max}"
[state]
dir = "{tmp_path / "state"}"
[[template]]
source = "{source}"
destination = "{tmp_path / "out.conf"}"
"""


def register_backends(api: ConsulAPI, servers: list[BackendServer], name: str = "web", **extra: object) -> None:
    for number, server in enumerate(servers, start=1):
        api.register(name, server.port, id=f"{name}-{number}", **extra)


@pytest.fixture
@starts_processes
def daemons() -> Iterator[list[ConfpyProcess]]:
    """confpy daemons a test starts; killed at the end whatever happened."""
    started: list[ConfpyProcess] = []
    yield started
    for proc in started:
        proc.stop(signal.SIGKILL)


@pytest.fixture
@starts_processes
def hung_port() -> Iterator[int]:
    """A port that accepts connections (kernel backlog) and never answers: a hung Consul."""
    port = free_port()
    hung = socket.socket()
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hung.bind(("127.0.0.1", port))
    hung.listen(64)
    yield port
    hung.close()


def http_get(url: str) -> tuple[int, str]:
    """GET on loopback: (status, body); (0, reason) while nothing listens yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        return 0, str(exc.reason)


def installer_for(tmp_path: Path, check_cmd: tuple[str, ...], pid_file: Path) -> tuple[Installer, TemplateConfig]:
    """An installer of `tmp_path/up.conf` (kept backups under `tmp_path/state`) checking with `check_cmd`."""
    nginx_config = NginxConfig(pid_file=pid_file, check_cmd=check_cmd, check_timeout=10)
    template = TemplateConfig(source=tmp_path / "t.j2", destination=tmp_path / "up.conf", backup=True)
    state = StateStore(tmp_path / "state")
    state.state_dir.mkdir()
    return Installer(NginxChecker(nginx_config), NginxReloader(nginx_config), state), template


# --- the two tiers (tests/tiers.py): `make unit` runs `-m "not e2e"` ------------------------------

# What a test may call only end-to-end: each starts a process or opens a socket. A test that names
# one (or calls a helper of its own module that does) is `e2e` even without a starting fixture.
for _helper in (
    run_confpy,
    http_get,
    free_port,
    ConsulAPI,
    ConfpyProcess,
    DevConsulProcess,
    NginxInstance,
    BackendServer,
    EtcdCluster,
    LabPKI,
):
    starts_processes(_helper)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if e2e_reason(item) is not None:
            item.add_marker(E2E)


@pytest.fixture(autouse=True)
def in_process_guard(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InProcessGuard | None]:
    """In a test not marked e2e, starting a process or opening a socket (but a socketpair) fails it.

    Yields the guard (None in an e2e test), which the guard's own tests ask for.
    """
    if request.node.get_closest_marker(E2E) is not None:
        yield None
        return
    guard = InProcessGuard()
    guard.install(monkeypatch)
    yield guard
    if guard.attempts:
        pytest.fail(f"an in-process test tried to: {'; '.join(guard.attempts)}", pytrace=False)
