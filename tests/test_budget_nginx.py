"""The reload budget with real nginx: slow downloads (`limit_rate`) keep old workers draining while
registry changes arrive; the budget holds reloads so no more than N generations drain at once.

Generations are counted by an independent sampler (`confpy.dev.slow.GenerationSampler`: nginx's
workers grouped by start time, whatever their titles say), not by confpy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    NginxInstance,
    free_port,
    lua_available,
    wait_until,
    write_config,
)
from confpy.dev.slow import GenerationSampler, SlowDownloads

from .conftest import ROOT, SHIPPED_TEMPLATE, ConsulUnderTest, http_get

LIVE_TEMPLATE = ROOT / "templates" / "nginx-upstreams-live.conf.j2"


def metric(status_port: int, name: str) -> float:
    status, text = http_get(f"http://127.0.0.1:{status_port}/metrics")
    assert status == 200, text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


class BudgetLab:
    """nginx with a slow-download server, confpy following dev-consul with a reload budget."""

    def __init__(self, tmp: Path, consul: ConsulUnderTest, budget: str, *, seconds: float, live: bool = False) -> None:
        self.slow = SlowDownloads(free_port(), seconds=seconds)
        self.nginx = NginxInstance(tmp / "nginx", extra_http=self.slow.server_block(), lua=live)
        self.status_port = free_port()
        self.consul = consul
        nginx_extra = budget
        if live:
            nginx_extra += f'\nmode = "live"\nlive_listen = "127.0.0.1:{free_port()}"'
        self.config = write_config(
            tmp / "confpy.toml",
            consul.url,
            self.nginx,
            LIVE_TEMPLATE if live else SHIPPED_TEMPLATE,
            status=f"127.0.0.1:{self.status_port}",
            nginx_extra=nginx_extra,
        )
        self.confpy: ConfpyProcess | None = None
        self.sampler = GenerationSampler(self.nginx.pid_file)

    def start(self) -> ConfpyProcess:
        self.confpy = ConfpyProcess(self.config).start()
        assert wait_until(lambda: self.nginx.destination.exists(), 15), self.confpy.output()
        self.nginx.start()
        return self.confpy

    def stop(self) -> None:
        self.sampler.stop()
        if self.confpy is not None:
            self.confpy.stop(signal.SIGKILL)
        self.nginx.stop()
        self.slow.close()

    def metric(self, name: str) -> float:
        return metric(self.status_port, name)

    def status(self) -> dict[str, object]:
        code, body = http_get(f"http://127.0.0.1:{self.status_port}/status")
        assert code == 200, body
        budget = json.loads(body)["reload_budget"]
        assert isinstance(budget, dict)
        return budget

    def serves(self, members: set[int], timeout: float = 15) -> bool:
        names = {f"App server {n}" for n in members}
        return wait_until(lambda: set(self.nginx.bodies(len(names) * 3)) == names, timeout, interval=0.05)

    def health(self) -> int:
        return http_get(f"http://127.0.0.1:{self.status_port}/health")[0]


@pytest.fixture
def app_servers() -> Iterator[list[BackendServer]]:
    servers = [BackendServer(f"App server {n}").start() for n in range(1, 5)]
    yield servers
    for server in servers:
        try:
            server.stop()
        except OSError:
            pass


def set_members(consul: ConsulUnderTest, servers: list[BackendServer], wanted: set[int], now: set[int]) -> None:
    for n in sorted(now - wanted):
        consul.api.deregister(f"web-{n}")
    for n in sorted(wanted - now):
        consul.api.register("web", servers[n - 1].port, id=f"web-{n}")


# Eight registry states, one second apart: each differs from the one before; the last is {4}.
STATES = [{1, 2}, {2}, {2, 3}, {3}, {1, 3}, {1}, {1, 4}, {4}]


def test_slow_downloads_and_8_changes_never_more_than_2_generations_draining_and_the_last_state_lands(
    tmp_path: Path, consul: ConsulUnderTest, app_servers: list[BackendServer]
) -> None:
    lab = BudgetLab(tmp_path, consul, "max_draining_generations = 2", seconds=12)
    try:
        set_members(consul, app_servers, {1}, set())
        proc = lab.start()
        assert lab.serves({1}), proc.output()
        lab.sampler.start()
        lab.slow.start(every=0.5, for_seconds=10)  # 20 downloads of 12 s: every generation holds some
        time.sleep(1)
        current = {1}
        deferred_health = []
        for wanted in STATES:
            set_members(consul, app_servers, wanted, current)
            current = wanted
            time.sleep(1)
            deferred_health.append((lab.health(), lab.status()["deferred"]))
        # While the budget holds the reload, /health stays 200 and /status says why.
        waiting = [why for code, why in deferred_health if why]
        assert waiting, f"no reload was ever deferred: {deferred_health}\n{proc.output()}"
        assert all(code == 200 for code, _ in deferred_health), deferred_health
        assert str(waiting[0]).startswith("reload deferred: 2 generations of nginx workers still draining")
        # No further registry change: as the downloads end, generations exit and the last state lands.
        assert lab.slow.wait(60)
        assert lab.serves({4}, 30), proc.output()
        lab.sampler.stop()
        assert lab.sampler.samples, "the sampler saw nginx"
        assert lab.sampler.most_draining == 2, (lab.sampler.most_draining, proc.output())
        assert lab.slow.completed >= 15, (lab.slow.completed, lab.slow.failed)  # the downloads were not cut
        assert lab.metric("confpy_reloads_deferred_total") >= 1
        assert lab.metric("confpy_reload_defer_seconds_count") >= 1
        assert lab.metric("confpy_reloads_forced_total") == 0
        assert lab.metric("confpy_reloads_total") < len(STATES)
        assert "reload deferred: 2 generations of nginx workers still draining" in proc.output()
    finally:
        lab.stop()


def test_max_defer_reached_reloads_anyway_counted_and_logged(
    tmp_path: Path, consul: ConsulUnderTest, app_servers: list[BackendServer]
) -> None:
    lab = BudgetLab(tmp_path, consul, 'max_draining_generations = 1\nmax_defer = "3s"', seconds=40)
    try:
        set_members(consul, app_servers, {1}, set())
        proc = lab.start()
        assert lab.serves({1}), proc.output()
        lab.slow.start(every=0.5, for_seconds=3)  # downloads of 40 s: no generation exits during the test
        time.sleep(1)
        set_members(consul, app_servers, {1, 2}, {1})  # reloads: the first generation drains
        assert lab.serves({1, 2}), proc.output()
        time.sleep(1)
        set_members(consul, app_servers, {2}, {1, 2})  # the budget (1 generation) is spent: deferred
        assert wait_until(lambda: "reload deferred" in proc.output(), 10), proc.output()
        assert set(lab.nginx.bodies(6)) == {"App server 1", "App server 2"}
        assert lab.serves({2}), proc.output()
        assert lab.metric("confpy_reloads_forced_total") == 1
        assert lab.metric("confpy_reloads_deferred_total") == 1
        assert "set nginx's worker_shutdown_timeout" in proc.output()
    finally:
        lab.stop()


@pytest.mark.skipif(not lua_available(), reason="needs the Lua module (make nginx)")
def test_live_mode_member_changes_reach_traffic_without_reload_or_deferral_while_the_budget_is_spent(
    tmp_path: Path, consul: ConsulUnderTest, app_servers: list[BackendServer]
) -> None:
    lab = BudgetLab(tmp_path, consul, "max_draining_generations = 1", seconds=30, live=True)
    try:
        set_members(consul, app_servers, {1}, set())
        proc = lab.start()
        assert lab.serves({1}), proc.output()
        lab.slow.start(every=0.5, for_seconds=2)
        time.sleep(1)
        pid = lab.nginx.master_pid()
        assert pid is not None
        os.kill(pid, signal.SIGHUP)  # an operator's reload: the first generation now drains (30 s downloads)
        assert wait_until(lambda: lab.status()["draining_generations"] == 1, 15), lab.status()
        reloads = lab.nginx.reload_count()
        current = {1}
        for wanted in ({1, 2}, {2}, {2, 3}, {3}):
            set_members(consul, app_servers, wanted, current)
            current = wanted
            assert lab.serves(wanted), proc.output()
        assert lab.nginx.reload_count() == reloads, "member changes reloaded nothing"
        assert lab.metric("confpy_reloads_deferred_total") == 0
        assert lab.metric("confpy_live_pushes_total") >= 4
        assert lab.status()["deferred"] == ""
        assert lab.health() == 200
    finally:
        lab.stop()
