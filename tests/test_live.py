"""Live mode through real nginx with Debian's Lua module: no reloads for member changes."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.dev.lab import (
    ConfpyProcess,
    NginxInstance,
    admin_token,
    free_port,
    lua_available,
    static_backends,
    wait_until,
    write_config,
)

from .conftest import ROOT, ConsulUnderTest
from .tiers import starts_processes

pytestmark = pytest.mark.skipif(
    not lua_available(), reason="needs libnginx-mod-http-lua, lua-resty-core and lua-cjson (make nginx)"
)

LIVE_TEMPLATE = ROOT / "templates" / "nginx-upstreams-live.conf.j2"


class LiveLab:
    """nginx with the Lua module, static backends served by nginx itself, and a live-mode config."""

    def __init__(self, tmp: Path, consul: ConsulUnderTest, backends: int = 4) -> None:
        self.ports = [free_port() for _ in range(backends)]
        static = static_backends(self.ports)
        self.nginx = NginxInstance(tmp / "nginx", lua=True, extra_http=static)
        self.admin_port = free_port()
        self.status_port = free_port()
        self.config = write_config(
            tmp / "confpy.toml",
            consul.url,
            self.nginx,
            LIVE_TEMPLATE,
            status=f"127.0.0.1:{self.status_port}",
            nginx_extra=f'mode = "live"\nlive_listen = "127.0.0.1:{self.admin_port}"',
        )
        self.consul = consul
        self.confpy: ConfpyProcess | None = None

    def register(self, n: int, name: str = "web", weight: int = 1) -> None:
        self.consul.api.register(name, self.ports[n - 1], id=f"{name}-{n}", Weights={"Passing": weight, "Warning": 1})

    def deregister(self, n: int, name: str = "web") -> None:
        self.consul.api.deregister(f"{name}-{n}")

    def start(self) -> None:
        self.confpy = ConfpyProcess(self.config).start()
        assert wait_until(lambda: self.nginx.destination.exists(), 15), self.confpy.output()
        self.nginx.start()

    def stop(self) -> None:
        if self.confpy is not None:
            self.confpy.stop(signal.SIGKILL)
        self.nginx.stop()

    def admin(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        try:
            payload = body if isinstance(body, bytes) or body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Authorization": f"Bearer {admin_token(self.config)}"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def settles(self, expected: set[int], path: str = "/") -> bool:
        names = {f"App server {n}" for n in expected}

        def check() -> bool:
            return set(self.bodies(len(expected) * 3, path)) == names

        return wait_until(check, 15, interval=0.05)

    def bodies(self, count: int, path: str = "/") -> list[str]:
        out = []
        for _ in range(count):
            try:
                status, body = self.nginx.get(path)
                out.append(body if status == 200 else f"HTTP {status}")
            except OSError as exc:
                out.append(f"error {exc}")
        return out


@pytest.fixture
@starts_processes
def lab(tmp_path: Path, consul: ConsulUnderTest) -> Iterator[LiveLab]:
    live = LiveLab(tmp_path, consul)
    try:
        yield live
    finally:
        live.stop()


def keepalive_load(port: int, seconds: float, threads: int = 4, why: list[str] | None = None) -> tuple[int, int]:
    """Keep-alive GETs through nginx from `threads` clients for `seconds`: (ok, failed); what
    each failure was goes to `why`."""
    ok = [0] * threads
    failed = [0] * threads
    deadline = time.monotonic() + seconds
    reasons = why if why is not None else []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while time.monotonic() < deadline:
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    ok[i] += 1
                else:
                    failed[i] += 1
                    reasons.append(f"{time.strftime('%H:%M:%S')} HTTP {resp.status}: {body[:80]!r}")
            except (OSError, http.client.HTTPException) as exc:
                failed[i] += 1
                reasons.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.close()

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 30)
    return sum(ok), sum(failed)


def test_member_churn_under_load_gives_no_errors_and_no_reloads(lab: LiveLab) -> None:
    for n in (1, 2, 3):
        lab.register(n)
    lab.start()
    assert lab.settles({1, 2, 3})
    reloads = lab.nginx.reload_count()
    result: dict[str, tuple[int, int]] = {}
    why: list[str] = []
    load = threading.Thread(target=lambda: result.update(load=keepalive_load(lab.nginx.port, 10.0, why=why)))
    load.start()
    changes = 0
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and changes < 200:
        # Churn every 100 ms: member 4 comes and goes, member 1 leaves and returns; 2 and 3 stay.
        step = changes % 4
        if step == 0:
            lab.register(4)
        elif step == 1:
            lab.deregister(1)
        elif step == 2:
            lab.deregister(4)
        else:
            lab.register(1)
        changes += 1
        time.sleep(0.1)
    load.join(60)
    ok, failed = result["load"]
    assert changes >= 50
    log_lines = lab.nginx.error_log.read_text(errors="replace").splitlines()
    errors = [line for line in log_lines if "[error]" in line or "signal" in line or "[alert]" in line]
    confpy_said = [line for line in lab.confpy.output().splitlines() if "reload" in line] if lab.confpy else []
    assert ok > 1000 and failed == 0, (ok, failed, why[:5], errors[-5:], confpy_said[-5:])
    assert lab.nginx.reload_count() == reloads
    assert lab.confpy is not None and lab.confpy.output().count("without a reload") >= 20


def test_weights_split_traffic_in_proportion(lab: LiveLab) -> None:
    lab.register(1, weight=1)
    lab.register(2, weight=3)
    lab.start()
    assert lab.settles({1, 2})
    conn = http.client.HTTPConnection("127.0.0.1", lab.nginx.port, timeout=5)
    counts = {"App server 1": 0, "App server 2": 0}
    resets = 0
    for _ in range(10_000):
        try:
            conn.request("GET", "/")
            body = conn.getresponse().read()
        except (ConnectionResetError, http.client.RemoteDisconnected):
            # nginx may close a kept-alive connection as the next request arrives (keepalive_requests,
            # a worker replaced): a client sends an idempotent GET again on a new connection.
            resets += 1
            conn.close()
            conn.request("GET", "/")
            body = conn.getresponse().read()
        counts[body.decode().strip()] += 1
    conn.close()
    assert resets <= 10, resets  # at most once per 1,000 requests (nginx's keepalive_requests)
    assert abs(counts["App server 1"] - 2500) <= 0.05 * 2500, counts
    assert abs(counts["App server 2"] - 7500) <= 0.05 * 7500, counts


def test_a_new_service_reloads_once_and_is_then_live(lab: LiveLab) -> None:
    lab.register(1)
    lab.start()
    assert lab.settles({1})
    reloads = lab.nginx.reload_count()
    lab.register(2, name="api")
    assert lab.settles({2}, path="/u/api/"), lab.confpy.output() if lab.confpy else ""
    assert wait_until(lambda: lab.nginx.reload_count() == reloads + 1, 5)
    lab.register(3, name="api")
    assert lab.settles({2, 3}, path="/u/api/")
    lab.register(4)
    # Member 4 reaches traffic by a push, which a cycle makes only after its install step decided
    # (and would have sent) any reload: once it serves, that decision is in nginx's log.
    assert lab.settles({1, 4})
    assert lab.nginx.reload_count() == reloads + 1, lab.confpy.output() if lab.confpy else ""


def test_nginx_restarted_while_confpy_is_stopped_serves_the_last_members(lab: LiveLab) -> None:
    for n in (1, 2):
        lab.register(n)
    lab.start()
    assert lab.settles({1, 2})
    lab.deregister(1)
    lab.register(3)
    assert lab.settles({2, 3})
    assert lab.confpy is not None
    lab.confpy.stop()
    lab.nginx.restart()
    assert set(lab.bodies(6)) == {"App server 2", "App server 3"}  # at once: from the state file


def test_admin_api_lists_and_refuses_bad_changes(lab: LiveLab) -> None:
    for n in (1, 2):
        lab.register(n)
    lab.start()
    assert lab.settles({1, 2})
    status, all_upstreams = lab.admin("GET", "/upstreams")
    assert status == 200 and set(all_upstreams) == {"web"}
    web = all_upstreams["web"]
    assert isinstance(web, dict) and web["version"] and len(web["members"]) == 2
    assert lab.admin("PUT", "/upstreams/web", {"version": "x", "members": []}) == (
        400,
        {"error": "members must be a non-empty list of {host, port, weight}"},
    )
    status, body = lab.admin("PUT", "/upstreams/web", {"members": [{"host": "example.com", "port": 80}]})
    assert status == 400 and "host must be an IPv4 or IPv6 address" in str(body["error"])
    status, body = lab.admin("PUT", "/upstreams/web", {"members": [{"host": "127.0.0.1", "port": 0}]})
    assert status == 400 and "port must be an integer from 1 to 65535" in str(body["error"])
    status, body = lab.admin("PUT", "/upstreams/web", {"members": [{"host": "127.0.0.1", "port": 80, "weight": 0}]})
    assert status == 400 and "weight must be a positive integer" in str(body["error"])
    assert lab.admin("GET", "/upstreams/nope")[0] == 404
    assert lab.admin("PUT", "/upstreams/web", b"not json")[0] == 400
    status, body = lab.admin("DELETE", f"/upstreams/web/members/127.0.0.1:{lab.ports[0]}")
    assert status == 200 and len(body["members"]) == 1  # type: ignore[arg-type]
    assert lab.settles({2})
    status, body = lab.admin("DELETE", f"/upstreams/web/members/127.0.0.1:{lab.ports[1]}")
    assert status == 409 and "last member" in str(body["error"])
    status, body = lab.admin("POST", f"/upstreams/web/members/127.0.0.1:{lab.ports[2]}", {"weight": 2})
    assert status == 200 and len(body["members"]) == 2  # type: ignore[arg-type]
    assert lab.settles({2, 3})
    assert lab.admin("DELETE", "/upstreams/web/members/127.0.0.1:1")[0] == 404


def test_confpy_recovers_after_nginx_restarts_and_reports_failed_pushes(lab: LiveLab) -> None:
    for n in (1, 2):
        lab.register(n)
    lab.start()
    assert lab.settles({1, 2})
    lab.nginx.stop()
    lab.register(3)  # nginx is down: the state file takes the change
    assert lab.confpy is not None
    assert wait_until(lambda: "live members not pushed: nginx is not running" in lab.confpy.output(), 10)
    lab.nginx.start()
    assert lab.settles({1, 2, 3})
    reloads = lab.nginx.reload_count()
    lab.deregister(1)  # and pushes work again
    assert lab.settles({2, 3})
    assert lab.nginx.reload_count() == reloads
    health = http.client.HTTPConnection("127.0.0.1", lab.status_port, timeout=5)
    health.request("GET", "/health")
    assert health.getresponse().status == 200


def test_a_failed_push_is_retried_and_reported(tmp_path: Path, consul: ConsulUnderTest) -> None:
    lab = LiveLab(tmp_path, consul)
    served = free_port()
    # A template whose admin server listens elsewhere than confpy pushes: every push is refused.
    template = tmp_path / "live.conf.j2"
    template.write_text(
        LIVE_TEMPLATE.read_text().replace("listen {{ confpy.live_listen }};", f"listen 127.0.0.1:{served};")
    )
    lab.config.write_text(lab.config.read_text().replace(str(LIVE_TEMPLATE), str(template)))
    try:
        lab.register(1)
        lab.start()
        assert lab.settles({1})  # from the state file
        lab.register(2)
        assert lab.confpy is not None
        assert wait_until(
            lambda: "live push failed, nginx keeps its current members; retrying" in lab.confpy.output(), 15
        )
        assert set(lab.bodies(4)) == {"App server 1"}

        def failures() -> float:
            conn = http.client.HTTPConnection("127.0.0.1", lab.status_port, timeout=5)
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
            return float(
                next(
                    line.split()[1] for line in text.splitlines() if line.startswith("confpy_live_push_failures_total")
                )
            )

        first = failures()
        assert wait_until(lambda: failures() > first, 10)  # retried with backoff
        conn = http.client.HTTPConnection("127.0.0.1", lab.status_port, timeout=5)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        assert resp.status == 503 and "live push failing" in resp.read().decode()
    finally:
        lab.stop()


def test_upstream_list_reads_live_members_from_nginx(lab: LiveLab) -> None:
    from .conftest import run_confpy

    for n in (1, 2):
        lab.register(n)
    lab.start()
    assert lab.settles({1, 2})
    status, _ = lab.admin("DELETE", f"/upstreams/web/members/127.0.0.1:{lab.ports[1]}")  # by hand, until the next push
    assert status == 200
    out = run_confpy("upstream", "list", "web", "--json", "-c", str(lab.config))
    assert out.returncode == 0, out.stderr
    [svc] = json.loads(out.stdout)
    assert {i["endpoint"]: i["in_nginx"] for i in svc["instances"]} == {
        f"127.0.0.1:{lab.ports[0]}": True,
        f"127.0.0.1:{lab.ports[1]}": False,
    }


def test_an_upstream_of_a_thousand_members_is_pushed_and_served(lab: LiveLab) -> None:
    # 999 backup members (used only when no other is up; nothing listens on their ports) and one
    # real one: every push carries a thousand members (~70 KB, past nginx's default 16 KB buffer).
    for n in range(999):
        lab.consul.api.register("web", 10 + n, id=f"spare-{n}", tags=["nginx", "backup"])
    lab.register(1)
    lab.start()
    assert lab.settles({1})
    reloads = lab.nginx.reload_count()
    lab.register(2)
    lab.deregister(1)  # a member swapped: pushed, no reload
    assert lab.settles({2}), lab.confpy.output() if lab.confpy else ""
    assert lab.confpy is not None and "pushed 1000 members to upstream web" in lab.confpy.output()
    assert lab.nginx.reload_count() == reloads
    status, served = lab.admin("GET", "/upstreams/web")
    assert status == 200 and len(served["members"]) == 1000  # type: ignore[arg-type]


def test_a_member_the_balancer_would_refuse_is_left_out_and_other_pushes_land(lab: LiveLab) -> None:
    lab.register(1)
    lab.register(2, name="api")
    lab.start()
    assert lab.settles({1}) and lab.settles({2}, path="/u/api/")
    reloads = lab.nginx.reload_count()
    # `api` sorts before `web`: a refused push of api's members used to stop web's.
    lab.consul.api.register("api", lab.ports[2], id="api-3", Meta={"fail_timeout": "0s"})
    lab.register(4)
    assert lab.settles({1, 4}), lab.confpy.output() if lab.confpy else ""
    assert lab.confpy is not None
    assert wait_until(lambda: "left out of the live push: instance 'api-3'" in lab.confpy.output(), 10)
    assert "fail_timeout 0s is not more than 0s" in lab.confpy.output()
    assert lab.settles({2}, path="/u/api/")
    assert "live push failed" not in lab.confpy.output()
    assert lab.nginx.reload_count() == reloads
    status_conn = http.client.HTTPConnection("127.0.0.1", lab.status_port, timeout=5)
    status_conn.request("GET", "/status")
    live = json.loads(status_conn.getresponse().read())["live"]["upstreams"]
    assert "api-3" in live["api"]["left_out"][0] and len(live["api"]["members"]) == 1
