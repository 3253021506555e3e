"""No registrant can steal the gateway's traffic or stop its updates (real processes, real nginx):
a service named like a host gets no upstream, and a registration nginx refuses is quarantined
while every other change still lands."""

from __future__ import annotations

import json
from pathlib import Path

from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    EtcdCluster,
    NginxInstance,
    free_port,
    wait_until,
    write_config,
)

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, http_get, run_confpy
from .test_daemon import settles, start_daemon

# The gateway's own service at 127.0.0.1:80, reached by `proxy_pass http://127.0.0.1;` (no port).
GATEWAY_OWN = "the gateway's own service"


def _gateway(tmp_path: Path, extra: str = "") -> tuple[NginxInstance, int]:
    own = free_port()
    extra_http = f"""
    server {{ listen 127.0.0.1:80; access_log off; location / {{ return 200 "{GATEWAY_OWN}\\n"; }} }}
    server {{ listen 127.0.0.1:{own}; access_log off; location / {{ proxy_pass http://127.0.0.1; }} }}
    {extra}"""
    return NginxInstance(tmp_path / "nginx", extra_http=extra_http), own


def _own(port: int) -> str:
    status, body = http_get(f"http://127.0.0.1:{port}/")
    return body.strip() if status == 200 else f"HTTP {status}"


def _status(port: int) -> dict[str, object]:
    status, body = http_get(f"http://127.0.0.1:{port}/status")
    assert status in (200, 503), body
    parsed: dict[str, object] = json.loads(body)
    return parsed


def _gauge(port: int, name: str) -> float | None:
    _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), None)


def test_a_service_named_like_a_host_does_not_take_its_traffic(
    consul: ConsulUnderTest, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    nginx, own = _gateway(tmp_path)
    status_port = free_port()
    try:
        config = write_config(
            tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status_port}"
        )
        consul.api.register("web", backends[0].port, id="web-1")
        consul.api.register("127.0.0.1", backends[1].port, id="thief-1")  # tagged nginx
        proc = start_daemon(daemons, config, nginx)
        assert settles(nginx, {"App server 1"}), proc.output()
        assert {_own(own) for _ in range(4)} == {GATEWAY_OWN}
        assert "service name '127.0.0.1' contains a dot" in proc.output()
        assert _gauge(status_port, "confpy_skipped_services") == 1.0
        consul.api.register("127.0.0.1", backends[2].port, id="thief-2")
        consul.api.register("web", backends[2].port, id="web-3")  # a later change: the thief still gets nothing
        assert settles(nginx, {"App server 1", "App server 3"}), proc.output()
        assert {_own(own) for _ in range(4)} == {GATEWAY_OWN}
        assert b"127.0.0.1 {" not in nginx.destination.read_bytes()
        daemons.pop().stop()

        # The check can fail: kept on purpose (dotted_upstreams), the name does take the traffic.
        keep = write_config(
            tmp_path / "keep.toml", consul.url, nginx, SHIPPED_TEMPLATE, extra='dotted_upstreams = ["127.0.0.1"]'
        )
        done = run_confpy("--once", "--config", str(keep))
        assert done.returncode == 0, done.stderr
        assert wait_until(lambda: _own(own) in ("App server 2", "App server 3"), 10), _own(own)
    finally:
        nginx.stop()


def test_a_name_clashing_with_a_hand_written_upstream_is_quarantined_and_others_still_land(
    consul: ConsulUnderTest, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    nginx = NginxInstance(tmp_path / "nginx", extra_http="upstream Billing { server 127.0.0.1:9 down; }")
    status_port = free_port()
    try:
        config = write_config(
            tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status_port}"
        )
        consul.api.register("web", backends[0].port, id="web-1")
        consul.api.register("billing", backends[2].port, id="billing-1")
        # Not start_daemon: the file nginx refused is in place while `nginx -t` runs, and nginx
        # must start from the one installed without billing.
        proc = ConfpyProcess(config).start()
        daemons.append(proc)
        assert wait_until(lambda: f"installed {nginx.destination} (" in proc.output(), 15), proc.output()
        nginx.start()
        assert settles(nginx, {"App server 1"}), proc.output()
        assert b"upstream billing {" not in nginx.destination.read_bytes()
        assert "quarantined service 'billing'" in proc.output()
        assert "already defines an upstream 'Billing'" in proc.output()  # as nginx spells it
        consul.api.register("web", backends[1].port, id="web-2")  # another service's change lands
        assert settles(nginx, {"App server 1", "App server 2"}), proc.output()
        held = _status(status_port)["quarantined"]
        assert isinstance(held, list) and [q["service"] for q in held] == ["billing"], held
        assert _gauge(status_port, "confpy_quarantined_upstreams") == 1.0
        _, page = http_get(f"http://127.0.0.1:{status_port}/")
        assert "quarantined" in page and "billing" in page

        # --once installs the rest, says what it left out and exits non-zero.
        daemons.pop().stop()
        consul.api.register("web", backends[2].port, id="web-3")
        once = run_confpy("--once", "--config", str(config))
        assert once.returncode == 1, once.stderr
        assert "left out service 'billing'" in once.stderr and "everything else was installed" in once.stderr
        assert settles(nginx, {"App server 1", "App server 2", "App server 3"})
    finally:
        nginx.stop()


def test_a_registration_nginx_refuses_is_quarantined_until_its_data_changes(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    template = tmp_path / "t.conf.j2"
    # Meta `extra` lands in the config unquoted-but-safe: a valid token nginx still rejects.
    extra = "keepalive 16;{% for i in service(name, 'nginx') if i.meta.get('extra') %} {{ i.meta.extra }};{% endfor %}"
    template.write_text(SHIPPED_TEMPLATE.read_text().replace("keepalive {{ settings.keepalive }};", extra))
    status_port = free_port()
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template, status=f"127.0.0.1:{status_port}")
    consul.api.register("web", backends[0].port, id="web-1")
    consul.api.register("api", backends[1].port, id="api-1")
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1"}), proc.output()
    consul.api.register("api", backends[2].port, id="api-3", Meta={"extra": "not_a_directive"})
    assert wait_until(lambda: "quarantined service 'api'" in proc.output(), 10), proc.output()
    consul.api.register("web", backends[1].port, id="web-2")  # lands while api is quarantined
    assert settles(nginx, {"App server 1", "App server 2"}), proc.output()
    assert b"upstream api {" not in nginx.destination.read_bytes()
    assert _gauge(status_port, "confpy_quarantined_upstreams") == 1.0
    reason = _status(status_port)["quarantined"]
    assert isinstance(reason, list) and 'unknown directive "not_a_directive"' in reason[0]["reason"], reason
    assert _status(status_port)["last_sync_ok"] is True
    consul.api.register("api", backends[2].port, id="api-3")  # fixed: its data changed, so it is retried
    assert wait_until(lambda: b"upstream api {" in nginx.destination.read_bytes(), 10), proc.output()
    assert wait_until(lambda: _gauge(status_port, "confpy_quarantined_upstreams") == 0.0, 10)
    assert wait_until(lambda: nginx.get("/u/api/")[1] in ("App server 2", "App server 3"), 10)


def test_an_etcd_member_that_does_not_resolve_is_left_out_and_others_still_land(
    tmp_path: Path, nginx: NginxInstance, backends: list[BackendServer], daemons: list[ConfpyProcess]
) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=1).start()
    try:
        api = cluster.api
        api.register("web", backends[0].port)
        api.register("api", backends[1].port)
        api.put("api/x.invalid:80", json.dumps({"Addr": "x.invalid:80"}))
        config = write_config(tmp_path / "c.toml", "", nginx, SHIPPED_TEMPLATE, etcd_endpoints=cluster.endpoints)
        proc = start_daemon(daemons, config, nginx)
        assert settles(nginx, {"App server 1"}), proc.output()
        assert wait_until(lambda: nginx.get("/u/api/")[1] == "App server 2", 10), proc.output()
        assert "host name 'x.invalid' does not resolve" in proc.output()
        assert b"x.invalid" not in nginx.destination.read_bytes()
        api.register("web", backends[2].port)  # another service's change lands
        assert settles(nginx, {"App server 1", "App server 3"}), proc.output()
    finally:
        cluster.stop()
