"""The shrink guard with real processes: dev-consul, nginx, confpy (daemon, --once, upstream release).

A registry that suddenly answers 2 of an upstream's 10 members is dev-consul's partial-catalog
hook (`PUT /v1/confpy-dev/partial-catalog`), as a Consul agent restarting with a half-synced
catalog answers: every member stays registered and alive, the answer lacks 8 of them.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.dev.lab import (
    ConfpyProcess,
    EtcdCluster,
    NginxInstance,
    admin_token,
    free_port,
    lua_available,
    static_backends,
    wait_until,
    write_config,
)

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, dev_consul_only, http_get, run_confpy
from .test_live import LIVE_TEMPLATE

pytestmark = dev_consul_only
needs_lua = pytest.mark.skipif(not lua_available(), reason="needs nginx's Lua module (make nginx)")

LABEL = "service(web, tag=nginx)"


class GuardLab:
    """nginx serving `count` static backends itself, proxying to the upstream confpy writes."""

    def __init__(
        self,
        tmp: Path,
        consul: ConsulUnderTest | None,
        *,
        count: int = 11,
        live: bool = False,
        hold: str = "4s",
        etcd: EtcdCluster | None = None,
    ):
        self.ports = [free_port() for _ in range(count)]
        static = static_backends(self.ports)
        self.nginx = NginxInstance(tmp / "nginx", lua=live, extra_http=static)
        self.status_port = free_port()
        self.admin_port = free_port()
        self.consul = consul
        self.config = write_config(
            tmp / "confpy.toml",
            consul.url if consul is not None else "",
            self.nginx,
            LIVE_TEMPLATE if live else SHIPPED_TEMPLATE,
            status=f"127.0.0.1:{self.status_port}",
            nginx_extra=f'mode = "live"\nlive_listen = "127.0.0.1:{self.admin_port}"' if live else "",
            extra=f'guard = {{ hold = "{hold}" }}',  # the template's own guard: [guard]'s max_drop and min_members
            etcd_endpoints=etcd.endpoints if etcd is not None else (),
        )
        self.confpy: ConfpyProcess | None = None

    def register(self, *numbers: int, first: bool = False) -> None:
        """Register backends `numbers` as web-N (`first`: as web-0, which sorts before every other)."""
        assert self.consul is not None
        for n in numbers:
            self.consul.api.register("web", self.ports[n - 1], id="web-0" if first else f"web-{n}")

    def deregister(self, n: int) -> None:
        assert self.consul is not None
        self.consul.api.deregister(f"web-{n}")

    def partial(self, keep: int, seconds: float) -> None:
        assert self.consul is not None
        code, _, text = self.consul.api.request("PUT", f"/v1/confpy-dev/partial-catalog?keep={keep}&seconds={seconds}")
        assert code == 200, text

    def start(self) -> None:
        self.confpy = ConfpyProcess(self.config).start()
        assert wait_until(lambda: self.nginx.destination.exists(), 15), self.confpy.output()
        self.nginx.start()
        assert wait_until(lambda: self.get("/health") == (200, "ok\n"), 15), self.output()

    def stop(self) -> None:
        if self.confpy is not None:
            self.confpy.stop()
        self.nginx.stop()

    def output(self) -> str:
        return self.confpy.output() if self.confpy is not None else ""

    def get(self, path: str) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.status_port}{path}")

    def status(self) -> dict[str, object]:
        return json.loads(self.get("/status")[1])  # type: ignore[no-any-return]

    def held(self) -> list[dict[str, object]]:
        guard = self.status()["guard"]
        assert isinstance(guard, dict)
        return guard["held"]  # type: ignore[no-any-return]

    def metric(self, name: str) -> float:
        text = self.get("/metrics")[1]
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    def servers(self) -> int:
        """How many members the installed include gives the upstream."""
        text = self.nginx.destination.read_text()
        return sum(
            1 for line in text.splitlines() if line.strip().startswith("server 127.0.0.1:") and "down" not in line
        )

    def live_members(self) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", "/upstreams", headers={"Authorization": f"Bearer {admin_token(self.config)}"})
            upstreams = json.loads(conn.getresponse().read())
            return len(upstreams["web"]["members"])
        finally:
            conn.close()

    def bodies(self, count: int) -> set[str]:
        return set(self.nginx.bodies(count))


@pytest.fixture
def glab(tmp_path: Path, consul: ConsulUnderTest) -> Iterator[GuardLab]:
    lab = GuardLab(tmp_path, consul)
    try:
        yield lab
    finally:
        lab.stop()


def test_a_drop_is_held_then_applied_in_one_reload_a_flap_writes_nothing_small_drops_and_additions_apply(
    glab: GuardLab,
) -> None:
    glab.register(*range(1, 11))
    glab.start()
    assert wait_until(lambda: glab.servers() == 10, 15), glab.output()
    destination = glab.nginx.destination

    # A flap within the hold (10 -> 2 -> 10): zero writes, zero reloads.
    written, nginx_reloads = destination.stat().st_mtime_ns, glab.nginx.reload_count()
    glab.partial(keep=2, seconds=1.5)
    assert wait_until(lambda: "registry dropped 8 of 10 members at once" in glab.output(), 10), glab.output()
    assert wait_until(lambda: "the held drop is withdrawn" in glab.output(), 10), glab.output()
    assert wait_until(lambda: glab.metric('confpy_guard_holds_total{outcome="withdrawn"}') == 1, 5)
    assert destination.stat().st_mtime_ns == written and glab.nginx.reload_count() == nginx_reloads
    assert "reloaded nginx" not in glab.output().split("registry dropped 8 of 10")[1]

    # 1 of 10 removed: applied at once, no hold.
    reloads = glab.metric("confpy_reloads_total")
    glab.deregister(5)
    assert wait_until(lambda: glab.servers() == 9, 10), glab.output()
    assert glab.output().count("registry dropped") == 1
    glab.register(5)
    assert wait_until(lambda: glab.servers() == 10, 10), glab.output()
    assert wait_until(lambda: glab.metric("confpy_reloads_total") == reloads + 2, 10)

    # 10 -> 2: the include keeps 10 during the hold, /status and /metrics say held; then one reload.
    written, reloads = destination.stat().st_mtime_ns, glab.metric("confpy_reloads_total")
    glab.partial(keep=2, seconds=60)
    assert wait_until(lambda: len(glab.held()) == 1, 10), glab.output()
    [held] = glab.held()
    assert held["service"] == LABEL and held["previous"] == 10 and len(held["losing"]) == 8  # type: ignore[arg-type]
    assert held["applies_at"] and held["max_drop"] == "50%"
    assert glab.metric("confpy_guard_held_upstreams") == 1
    assert glab.servers() == 10 and destination.stat().st_mtime_ns == written
    assert "shrink guard: drop of 8 of 10 members held" in glab.get("/")[1]
    assert len(glab.bodies(30)) > 2, "nginx still spreads requests over the 10 members"
    # Members added while the drop is held: added at once ("web-0" sorts first: the partial answer has it).
    glab.register(11, first=True)
    assert wait_until(lambda: glab.servers() == 11, 10), glab.output()
    assert wait_until(lambda: glab.metric("confpy_reloads_total") == reloads + 1, 10)
    assert glab.held(), "still held"
    assert "App server 11" in glab.bodies(40)
    # The hold passes and the registry still answers 2 (web-0 and web-1): applied in one step, one reload.
    assert wait_until(lambda: glab.servers() == 2, 20), glab.output()
    assert "applying the held drop of 9 of 10 members in one step: 2 remain" in glab.output()
    assert wait_until(lambda: glab.metric("confpy_reloads_total") == reloads + 2, 10)
    assert glab.metric('confpy_guard_holds_total{outcome="applied"}') == 1
    # /status is rebuilt on the loop's next turn: wait for it rather than read it once
    assert wait_until(lambda: glab.held() == [], 5) and glab.metric("confpy_guard_held_upstreams") == 0


def test_an_agent_restart_with_a_partial_catalog_loses_no_traffic(glab: GuardLab) -> None:
    glab.register(*range(1, 11))
    glab.start()
    assert wait_until(lambda: glab.servers() == 10, 15), glab.output()
    reloads = glab.nginx.reload_count()
    answered: list[str] = []
    failed: list[str] = []
    ended = threading.Event()

    def requests() -> None:
        # One connection per request: a kept-alive client connection is closed by nginx after its
        # keepalive_requests (1000), and the race with the next request is a reset of the client's
        # own connection, not traffic lost to the upstream.
        for _ in range(20000):  # bounded; ends when the partial catalog has come and gone
            if ended.is_set():
                break
            conn = http.client.HTTPConnection("127.0.0.1", glab.nginx.port, timeout=5)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read().decode()
                (answered if resp.status == 200 else failed).append(body)
            except (OSError, http.client.HTTPException) as exc:
                failed.append(repr(exc))
            finally:
                conn.close()

    client = threading.Thread(target=requests)
    client.start()
    try:
        glab.partial(keep=2, seconds=2)
        assert wait_until(lambda: "registry dropped 8 of 10" in glab.output(), 10), glab.output()
        assert wait_until(lambda: "the held drop is withdrawn" in glab.output(), 15), glab.output()
    finally:
        ended.set()
        client.join(30)
    assert failed == [] and len(answered) > 0
    assert len(set(answered)) == 10, "every member kept serving while the catalog was partial"
    assert glab.nginx.reload_count() == reloads


def test_upstream_release_applies_a_held_drop_at_once(tmp_path: Path, consul: ConsulUnderTest) -> None:
    lab = GuardLab(tmp_path, consul, hold="10m")
    try:
        lab.register(*range(1, 11))
        lab.start()
        assert wait_until(lambda: lab.servers() == 10, 15), lab.output()
        lab.partial(keep=2, seconds=120)
        assert wait_until(lambda: len(lab.held()) == 1, 10), lab.output()
        result = run_confpy("upstream", "release", "web", "-c", str(lab.config))
        assert result.returncode == 0, result.stderr
        assert "released service web: wrote Consul KV key 'confpy/guard/release'" in result.stdout
        assert wait_until(lambda: lab.servers() == 2, 10), lab.output()
        assert "released by the release key confpy/guard/release" in lab.output()
        assert wait_until(lambda: lab.held() == [], 5)  # /status is rebuilt on the loop's next turn
        assert lab.metric('confpy_guard_holds_total{outcome="applied"}') == 1
    finally:
        lab.stop()


def test_a_confpy_started_on_a_partial_catalog_holds_against_what_it_installed(glab: GuardLab) -> None:
    glab.register(*range(1, 11))
    glab.start()
    assert wait_until(lambda: glab.servers() == 10, 15), glab.output()
    assert glab.confpy is not None and glab.confpy.stop() == 0  # the remembered members are saved on stop
    glab.partial(keep=2, seconds=60)  # a host reboot: the agent comes back with a half-synced catalog
    glab.confpy = ConfpyProcess(glab.config).start()
    assert wait_until(lambda: "registry dropped 8 of 10 members at once" in glab.output(), 15), glab.output()
    assert wait_until(lambda: len(glab.held()) == 1, 5), glab.output()
    assert glab.servers() == 10


def test_once_does_not_apply_a_held_drop_and_says_why(tmp_path: Path, consul: ConsulUnderTest) -> None:
    lab = GuardLab(tmp_path, consul)
    try:
        lab.register(*range(1, 11))
        first = run_confpy("--once", "--allow-no-reload", "-c", str(lab.config))
        assert first.returncode == 0, first.stderr
        assert lab.servers() == 10
        lab.nginx.start()
        lab.partial(keep=2, seconds=120)
        before = lab.nginx.destination.read_bytes()

        dry = run_confpy("--once", "--dry-run", "-c", str(lab.config))
        assert dry.returncode == 0, dry.stderr
        assert "the shrink guard would hold: service web (tag nginx): the registry dropped 8 of the 10" in dry.stdout

        held = run_confpy("--once", "-c", str(lab.config))
        assert held.returncode == 1
        assert (
            "confpy: error: drop not applied: service web (tag nginx): the registry dropped 8 of the 10" in held.stderr
        )
        assert "--no-guard" in held.stderr
        assert lab.nginx.destination.read_bytes() == before

        applied = run_confpy("--once", "--no-guard", "-c", str(lab.config))
        assert applied.returncode == 0, applied.stderr
        assert lab.servers() == 2
        assert run_confpy("--no-guard", "-c", str(lab.config)).returncode == 2  # the daemon has [guard]
    finally:
        lab.stop()


@needs_lua
def test_live_mode_holds_withdraws_and_applies_without_a_reload(tmp_path: Path, consul: ConsulUnderTest) -> None:
    lab = GuardLab(tmp_path, consul, live=True)
    try:
        lab.register(*range(1, 11))
        lab.start()
        assert wait_until(lambda: lab.live_members() == 10, 15), lab.output()
        reloads = lab.nginx.reload_count()
        pushes = lab.metric("confpy_live_pushes_total")

        # A flap: no push, no reload.
        lab.partial(keep=2, seconds=1.5)
        assert wait_until(lambda: "the held drop is withdrawn" in lab.output(), 15), lab.output()
        assert lab.metric("confpy_live_pushes_total") == pushes and lab.live_members() == 10

        # 1 of 10 removed: pushed at once.
        lab.deregister(5)
        assert wait_until(lambda: lab.live_members() == 9, 10), lab.output()
        lab.register(5)
        assert wait_until(lambda: lab.live_members() == 10, 10), lab.output()

        # 10 -> 2: held (nginx's balancer keeps 10), an addition pushed at once, then the drop.
        lab.partial(keep=2, seconds=60)
        assert wait_until(lambda: len(lab.held()) == 1, 10), lab.output()
        assert lab.live_members() == 10
        lab.register(11, first=True)
        assert wait_until(lambda: lab.live_members() == 11, 10), lab.output()
        assert wait_until(lambda: lab.live_members() == 2, 20), lab.output()
        assert lab.nginx.reload_count() == reloads, "live mode: every change was a push"
    finally:
        lab.stop()


def test_an_etcd_lease_storm_is_held_and_released_under_the_prefix(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=1).start()
    lab = GuardLab(tmp_path, None, hold="10m", etcd=cluster)
    try:
        doomed, staying = cluster.api.grant(600), cluster.api.grant(600)
        for n in range(1, 11):
            cluster.api.register("web", lab.ports[n - 1], doomed if n > 2 else staying)
        lab.start()
        assert wait_until(lambda: lab.servers() == 10, 15), lab.output()
        cluster.api.revoke(doomed)  # 8 of 10 leases gone in one revision
        assert wait_until(lambda: len(lab.held()) == 1, 10), lab.output()
        assert lab.servers() == 10
        result = run_confpy("upstream", "release", "web", "-c", str(lab.config))
        assert result.returncode == 0, result.stderr
        assert "wrote etcd key '.confpy-guard-release'" in result.stdout
        assert wait_until(lambda: lab.servers() == 2, 10), lab.output()
        assert "released by the release key .confpy-guard-release" in lab.output()
        listed = run_confpy("upstream", "list", "-c", str(lab.config))
        assert "web (2 in etcd)" in listed.stdout and "confpy-guard" not in listed.stdout, "the key is no service"
    finally:
        lab.stop()
        cluster.stop()
