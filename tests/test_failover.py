"""Live mode fails over like nginx itself: passive health (max_fails/fail_timeout), backups.

The experiment of issue 18, through real nginx: three members registered as passing, one of them
dead (nothing listens on its port; its Consul check has not failed yet), requests through a
location with `proxy_next_upstream off`, in reload mode and in live mode.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.dev.lab import BackendServer, NginxInstance, admin_token, free_port, lua_available, wait_until, write_config

from .conftest import ROOT, ConsulUnderTest, run_confpy
from .tiers import starts_processes

pytestmark = pytest.mark.skipif(
    not lua_available(), reason="nginx's Lua module is not installed (make nginx installs it)"
)

RELOAD_TEMPLATE = ROOT / "templates" / "nginx-upstreams.conf.j2"
LIVE_TEMPLATE = ROOT / "templates" / "nginx-upstreams-live.conf.j2"
WORKERS = 2


class Gateway:
    """nginx (2 workers) with a strict location: `proxy_next_upstream off`, so a failed try fails the request.

    HTTP/1.1 to the members, as the templates' `keepalive` needs: with nginx's default HTTP/1.0 and
    `Connection: close`, a cached connection the member has closed fails the next request.
    """

    def __init__(self, tmp: Path, consul: ConsulUnderTest, live: bool) -> None:
        self.strict_port = free_port()
        strict = f"""server {{
        listen 127.0.0.1:{self.strict_port};
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
            proxy_connect_timeout 1s;
        }}
    }}"""
        self.nginx = NginxInstance(tmp / "nginx", extra_http=strict, workers=WORKERS, lua=live)
        self.admin_port = free_port()
        extra = f'mode = "live"\nlive_listen = "127.0.0.1:{self.admin_port}"' if live else ""
        self.config = write_config(
            tmp / "confpy.toml", consul.url, self.nginx, LIVE_TEMPLATE if live else RELOAD_TEMPLATE, nginx_extra=extra
        )

    def sync(self) -> None:
        proc = run_confpy("-c", str(self.config), "--once", "--allow-no-reload")
        assert proc.returncode == 0, proc.stderr

    def get(self, path: str = "/") -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.strict_port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode().strip()
            return body if response.status == 200 else f"HTTP {response.status}"
        finally:
            conn.close()

    def admin(self, path: str) -> dict[str, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {admin_token(self.config)}"})
            return dict(json.loads(conn.getresponse().read()))
        finally:
            conn.close()


@pytest.fixture
@starts_processes
def servers() -> Iterator[list[BackendServer]]:
    started = [BackendServer(f"App server {n}").start() for n in (1, 2)]
    yield started
    for server in started:
        server.stop()


def run_experiment(tmp: Path, consul: ConsulUnderTest, servers: list[BackendServer], live: bool) -> tuple[int, float]:
    """600 requests with one dead member among three; (failed requests, seconds taken)."""
    gateway = Gateway(tmp, consul, live)
    dead = free_port()
    api = consul.api
    for n, server in enumerate(servers, start=1):
        api.register("web", server.port, id=f"web-{n}")
    api.register("web", dead, id="web-dead")  # no check: passing, as a crashed server is until its check fails
    try:
        if live:
            gateway.sync()
            gateway.nginx.start()
            gateway.sync()  # pushes the members into the running nginx
        else:
            gateway.sync()
            gateway.nginx.start()
        started = time.monotonic()
        bodies = [gateway.get() for _ in range(600)]
        took = time.monotonic() - started
        assert {b for b in bodies if not b.startswith("HTTP")} == {"App server 1", "App server 2"}
        return sum(1 for b in bodies if b == "HTTP 502"), took
    finally:
        gateway.nginx.stop()
        for service_id in ("web-1", "web-2", "web-dead"):
            api.deregister(service_id)


def test_live_mode_fails_no_more_requests_than_reload_mode_on_a_dead_member(
    consul: ConsulUnderTest, servers: list[BackendServer], tmp_path: Path
) -> None:
    reload_failed, _ = run_experiment(tmp_path / "reload", consul, servers, live=False)
    live_failed, took = run_experiment(tmp_path / "live", consul, servers, live=True)
    print(f"failed requests out of 600: reload mode {reload_failed}, live mode {live_failed} ({took:.1f} s)")
    assert reload_failed >= 1  # the dead member is really there and really costs a request
    assert live_failed <= reload_failed + WORKERS
    # max_fails=1 per fail_timeout=10s for the whole nginx (shared by its workers), not per worker
    assert live_failed <= 1 * (1 + int(took // 10))


def test_a_member_that_comes_back_is_probed_then_used_again(
    consul: ConsulUnderTest, servers: list[BackendServer], tmp_path: Path
) -> None:
    gateway = Gateway(tmp_path, consul, live=True)
    port = free_port()
    api = consul.api
    api.register("web", servers[0].port, id="web-1")
    api.register("web", port, id="web-3", Meta={"fail_timeout": "2s"})
    gateway.sync()
    gateway.nginx.start()
    gateway.sync()
    try:
        first = [gateway.get() for _ in range(20)]
        assert first.count("HTTP 502") == 1 and first.count("App server 1") == 19  # tried once, then paused
        members = {m["port"]: m for m in gateway.admin("/upstreams/web")["members"]}  # type: ignore[union-attr]
        assert members[port]["unavailable"] is True and members[servers[0].port]["unavailable"] is False
        back = BackendServer("App server 3", port=port).start()  # the member comes back
        try:
            assert wait_until(lambda: "App server 3" in [gateway.get() for _ in range(4)], 10), (
                "used again after fail_timeout"
            )
            bodies = [gateway.get() for _ in range(20)]
            # Its share again: round-robin state is per worker, so each worker alternates on its own
            # and the totals may differ by at most one per worker.
            assert bodies.count("App server 3") + bodies.count("App server 1") == 20, bodies
            assert abs(bodies.count("App server 3") - bodies.count("App server 1")) <= WORKERS, bodies
        finally:
            back.stop()
    finally:
        gateway.nginx.stop()


def test_backup_members_only_when_every_primary_is_unavailable(consul: ConsulUnderTest, tmp_path: Path) -> None:
    primaries = [BackendServer(f"App server {n}").start() for n in (1, 2)]
    backup = BackendServer("Backup").start()
    gateway = Gateway(tmp_path, consul, live=True)
    api = consul.api
    for n, server in enumerate(primaries, start=1):
        api.register("web", server.port, id=f"web-{n}")
    api.register("web", backup.port, id="web-backup", tags=["nginx", "backup"])
    gateway.sync()
    gateway.nginx.start()
    gateway.sync()
    try:
        bodies = [gateway.get() for _ in range(40)]
        assert "Backup" not in bodies and set(bodies) == {"App server 1", "App server 2"}
        # Both primaries die (now nothing listens where they are registered); Consul still says passing.
        for n in (1, 2):
            api.register("web", free_port(), id=f"web-{n}")
        gateway.sync()
        bodies = [gateway.get() for _ in range(20)]
        assert bodies.count("HTTP 502") <= 2 and bodies[-10:] == ["Backup"] * 10
    finally:
        gateway.nginx.stop()
        for server in [*primaries, backup]:
            server.stop()


def test_paused_members_show_on_status_metrics_and_upstream_list(
    consul: ConsulUnderTest, servers: list[BackendServer], tmp_path: Path
) -> None:
    from confpy.dev.lab import ConfpyProcess

    from .conftest import http_get

    gateway = Gateway(tmp_path, consul, live=True)
    status_port = free_port()
    gateway.config.write_text(gateway.config.read_text() + f'\n[status]\nlisten = "127.0.0.1:{status_port}"\n')
    dead = free_port()
    consul.api.register("web", servers[0].port, id="web-1")
    consul.api.register("web", dead, id="web-dead")
    gateway.sync()
    gateway.nginx.start()
    daemon = ConfpyProcess(gateway.config).start()
    try:
        assert wait_until(lambda: "App server 1" in [gateway.get() for _ in range(2)], 10), daemon.output()
        for _ in range(4):  # the dead member costs one request, then nginx pauses it
            gateway.get()
        member = f"127.0.0.1:{dead}"
        base = f"http://127.0.0.1:{status_port}"

        def paused() -> dict[str, object]:
            code, body = http_get(base + "/status")
            return dict(json.loads(body)["live"]["unavailable"]) if code == 200 else {}

        assert wait_until(lambda: member in paused().get("web", {}), 15), daemon.output()  # type: ignore[operator]
        assert (
            f'confpy_live_member_unavailable{{member="{member}",upstream="web"}} 1.0' in http_get(base + "/metrics")[1]
        )
        assert f"nginx paused {member} of upstream web after failed requests" in daemon.output()
        listing = run_confpy("upstream", "list", "web", "--json", "-c", str(gateway.config))
        [web] = json.loads(listing.stdout)
        flags = {i["endpoint"]: i["paused_by_nginx"] for i in web["instances"]}
        assert flags == {member: True, f"127.0.0.1:{servers[0].port}": False}
    finally:
        daemon.stop()
        gateway.nginx.stop()


def test_live_mode_balances_as_kv_says_without_a_reload(consul: ConsulUnderTest, tmp_path: Path) -> None:
    """`hash $arg_user consistent` from KV: each user sticks to one member, users spread over all,
    and when a member leaves only its users move; pushed to the Lua balancer, no reload."""
    servers = [BackendServer(f"App server {n}").start() for n in (1, 2, 3)]
    gateway = Gateway(tmp_path, consul, live=True)
    api = consul.api
    try:
        for n, server in enumerate(servers, start=1):
            api.register("web", server.port, id=f"web-{n}")
        gateway.sync()
        gateway.nginx.start()
        gateway.sync()
        reloads = gateway.nginx.reload_count()
        assert api.request("PUT", "/v1/kv/confpy/upstreams/web/balance", b"hash $arg_user consistent")[0] == 200
        gateway.sync()
        assert gateway.admin("/upstreams/web")["balance"] == {"method": "hash", "key": "$arg_user", "consistent": True}
        assert gateway.nginx.reload_count() == reloads  # members and balance went through the admin API

        def placement() -> dict[str, str]:
            chosen = {}
            for user in range(30):
                answers = {gateway.get(f"/?user=u{user}") for _ in range(4)}
                assert len(answers) == 1, (user, answers)  # sticky, in both workers
                chosen[f"u{user}"] = answers.pop()
            return chosen

        before = placement()
        assert set(before.values()) == {"App server 1", "App server 2", "App server 3"}
        api.deregister("web-3")
        gateway.sync()
        after = placement()
        assert all(after[u] == before[u] for u in before if before[u] != "App server 3")  # consistent hashing
        assert "App server 3" not in after.values()
        api.request("DELETE", "/v1/kv/confpy/upstreams/web/balance")
        gateway.sync()
        assert gateway.admin("/upstreams/web")["balance"] == {"method": "round_robin"}
        assert len({gateway.get("/?user=u1") for _ in range(6)}) == 2  # round-robin again
        conn = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=5)
        members = [{"host": "127.0.0.1", "port": servers[0].port}]
        for balance, words in (
            (
                {"method": "hash", "key": "$arg_user; rm"},
                "balance.key must be nginx variables, e.g. $remote_addr or $host$request_uri",
            ),
            ({"method": "sticky"}, "balance.method must be round_robin, least_conn, ip_hash, hash or random"),
        ):
            body = json.dumps({"members": members, "balance": balance})
            conn.request("PUT", "/upstreams/web", body, {"Authorization": f"Bearer {admin_token(gateway.config)}"})
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())["error"]) == (400, words)
        conn.close()
    finally:
        gateway.nginx.stop()
        for server in servers:
            server.stop()


def test_a_request_with_no_member_left_is_a_502_that_nginx_logs(
    consul: ConsulUnderTest, servers: list[BackendServer], tmp_path: Path
) -> None:
    """A 502 as from nginx's own balancer, not the 500 an HTTP status in ngx.exit() gives there."""
    gateway = Gateway(tmp_path, consul, live=True)
    consul.api.register("web", servers[0].port, id="web-1")
    gateway.sync()
    gateway.nginx.start()
    gateway.sync()
    try:
        assert gateway.get() == "App server 1"
        # Every member down (as the admin API allows): the balancer has nobody to pick.
        members = [{"host": "127.0.0.1", "port": s.port, "down": True} for s in servers]
        conn = http.client.HTTPConnection("127.0.0.1", gateway.admin_port, timeout=5)
        body = json.dumps({"members": members})
        conn.request("PUT", "/upstreams/web", body, {"Authorization": f"Bearer {admin_token(gateway.config)}"})
        assert conn.getresponse().status == 200
        conn.close()
        assert gateway.get() == "HTTP 502"
        log_text = gateway.nginx.error_log.read_text(errors="replace")
        assert "confpy: upstream web: no member left to try after 0 tries" in log_text
        assert "no live upstreams" in log_text  # and nginx's own words, as from its own balancer
    finally:
        gateway.nginx.stop()
        consul.api.deregister("web-1")
