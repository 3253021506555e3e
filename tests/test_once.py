"""`confpy --once` end to end: dev-consul (or a real agent), real nginx, real backends, real requests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from confpy.dev.lab import BackendServer, ConsulAPI, NginxInstance, wait_until, write_config
from confpy.model import HealthView

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, register_backends, run_confpy


def sync(config: Path, *extra: str, strict: bool = False) -> tuple[int, str, str]:
    """`confpy --once`; most tests sync before they start nginx (bootstrapping): --allow-no-reload."""
    proc = run_confpy("-c", str(config), "--once", *extra, *([] if strict else ["--allow-no-reload"]))
    return proc.returncode, proc.stdout, proc.stderr


def test_once_renders_and_traffic_round_robins(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends)
    code, _, err = sync(config_file)
    assert code == 0, err
    nginx.start()
    bodies = nginx.bodies(30)
    assert set(bodies) == {"App server 1", "App server 2", "App server 3"}
    assert all(bodies.count(f"App server {n}") == 10 for n in (1, 2, 3))  # round-robin, not random


def test_removed_instance_never_gets_traffic_again(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends)
    assert sync(config_file)[0] == 0
    nginx.start()
    workers_before = nginx.workers()
    consul.api.deregister("web-3")
    code, _, err = sync(config_file)
    assert code == 0, err
    assert "reloaded nginx" in err
    # New workers serve at once, but for ~100 ms nginx lets the old ones accept too: wait for them to go.
    assert wait_until(lambda: not set(workers_before) & set(nginx.workers()), 10)
    assert set(nginx.bodies(30)) == {"App server 1", "App server 2"}
    assert not nginx.destination.with_name("upstreams.conf.bak").exists()  # never beside the destination
    flat = str(nginx.destination).strip("/").replace("/", "_")
    backup = (config_file.parent / "confpy-state" / f"{flat}.bak").read_text()
    assert f":{backends[2].port} " in backup and f":{backends[2].port} " not in nginx.destination.read_text()


def test_same_data_in_another_order_writes_nothing_and_does_not_reload(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends)
    assert sync(config_file)[0] == 0
    nginx.start()
    stat_before = os.stat(nginx.destination)
    workers_before = nginx.workers()
    reloads_before = nginx.reload_count()
    # Re-register in the reverse order: new modify indexes, same members.
    for number, server in reversed(list(enumerate(backends, start=1))):
        consul.api.register("web", server.port, id=f"web-{number}")
    code, _, err = sync(config_file)
    assert code == 0, err
    stat_after = os.stat(nginx.destination)
    assert (stat_after.st_ino, stat_after.st_mtime_ns) == (stat_before.st_ino, stat_before.st_mtime_ns)
    assert nginx.workers() == workers_before
    assert nginx.reload_count() == reloads_before
    assert "no change" in err


def test_invalid_config_is_rolled_back_and_nginx_not_reloaded(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    register_backends(consul.api, backends)
    good = write_config(tmp_path / "good.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    assert sync(good)[0] == 0
    nginx.start()
    before = nginx.destination.read_bytes()
    mtime = nginx.destination.stat().st_mtime_ns
    workers = nginx.workers()
    bad_template = tmp_path / "bad.conf.j2"
    bad_template.write_text(
        "upstream web {\n{% for i in service('web') %}  server {{ i.endpoint }} bogus_parameter=1;\n{% endfor %}}\n"
    )
    bad = write_config(tmp_path / "bad.toml", consul.url, nginx, bad_template)
    code, _, err = sync(bad)
    assert code == 1
    assert "check_cmd" in err and "bogus_parameter" in err  # nginx's own message
    assert nginx.destination.read_bytes() == before
    assert nginx.destination.stat().st_mtime_ns == mtime  # restored exactly, times included
    assert nginx.workers() == workers and nginx.reload_count() == 0
    assert set(nginx.bodies(6)) == {"App server 1", "App server 2", "App server 3"}


def test_dry_run_prints_a_diff_and_writes_nothing(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:2])
    code, out, err = sync(config_file, "--dry-run")
    assert code == 0, err
    assert out.startswith("--- /dev/null\n+++ ") and f"+    server 127.0.0.1:{backends[0].port} weight=1;" in out
    assert not nginx.destination.exists()
    assert sync(config_file)[0] == 0
    consul.api.register("web", backends[2].port, id="web-3")
    code, out, _ = sync(config_file, "--dry-run")
    assert f"+    server 127.0.0.1:{backends[2].port} weight=1;" in out
    assert f"127.0.0.1:{backends[2].port}" not in nginx.destination.read_text()
    assert sync(config_file)[0] == 0
    code, out, _ = sync(config_file, "--dry-run")
    assert code == 0 and out.splitlines() == [
        f"{nginx.destination}: no change",
        "nginx would accept these files (checked on a staged copy of its configuration; nothing was changed)",
    ]


def test_ipv6_and_node_address_fallback_reach_traffic(
    consul: ConsulUnderTest, nginx: NginxInstance, config_file: Path
) -> None:
    v6 = BackendServer("App server v6", host="::1").start()
    v4 = BackendServer("App server node-address").start()
    try:
        consul.api.register("web", v6.port, id="web-v6", address="::1")
        consul.api.register("web", v4.port, id="web-node", address="")  # falls back to Node.Address (127.0.0.1)
        code, _, err = sync(config_file)
        assert code == 0, err
        text = nginx.destination.read_text()
        assert f"server [::1]:{v6.port} weight=1;" in text and f"server 127.0.0.1:{v4.port} weight=1;" in text
        nginx.start()
        assert set(nginx.bodies(10)) == {"App server v6", "App server node-address"}
    finally:
        v6.stop()
        v4.stop()


def test_on_empty_keep_remembers_members_across_runs(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:1], Check={"TTL": "60s", "Status": "passing"})
    assert sync(config_file)[0] == 0
    nginx.start()
    rendered = nginx.destination.read_bytes()
    consul.api.request("PUT", "/v1/agent/check/fail/service:web-1")
    code, _, err = sync(config_file)
    assert code == 0, err
    assert "keeping its last known members" in err
    assert nginx.destination.read_bytes() == rendered
    assert nginx.bodies(3) == ["App server 1"] * 3


def test_on_empty_render_keeps_nginx_valid(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, extra='on_empty = "render"')
    register_backends(consul.api, backends[:1], Check={"TTL": "60s", "Status": "passing"})
    assert sync(config)[0] == 0
    nginx.start()
    consul.api.request("PUT", "/v1/agent/check/fail/service:web-1")
    code, _, err = sync(config)
    assert code == 0, err
    assert "server 127.0.0.1:9 down;" in nginx.destination.read_text()
    assert wait_until(lambda: nginx.get()[0] == 502, 10)  # the old workers finish first


def test_nginx_not_running_installs_and_says_so(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends)
    code, _, err = sync(config_file, strict=True)
    assert code == 3
    assert "reload skipped: nginx is not running" in err
    assert "files installed but nginx was not reloaded: nginx is not running" in err.splitlines()[-1]
    assert nginx.destination.exists()
    assert sync(config_file)[0] == 0  # --allow-no-reload: the bootstrap case


def test_mode_is_kept_and_configurable(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    register_backends(consul.api, backends[:1])
    nginx.destination.write_text("# old\n")
    os.chmod(nginx.destination, 0o600)
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    assert sync(config)[0] == 0
    assert os.stat(nginx.destination).st_mode & 0o777 == 0o600
    consul.api.register("web", backends[1].port, id="web-2")
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, extra='mode = "0640"')
    assert sync(config)[0] == 0
    assert os.stat(nginx.destination).st_mode & 0o777 == 0o640


def test_exit_codes_for_usage_config_and_consul_errors(tmp_path: Path, nginx: NginxInstance) -> None:
    proc = run_confpy("--once", "--bogus")
    assert proc.returncode == 2
    proc = run_confpy("-c", str(tmp_path / "missing.toml"), "--once")
    assert proc.returncode == 2 and "configuration file not found" in proc.stderr
    dead = write_config(tmp_path / "dead.toml", "http://127.0.0.1:1", nginx, SHIPPED_TEMPLATE)
    proc = run_confpy("-c", str(dead), "--once")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "confpy: error: cannot reach Consul at http://127.0.0.1:1 for the service catalog: connection refused"
    )
    proc = run_confpy("-c", str(dead), "--dry-run")
    assert proc.returncode == 2 and "--dry-run works with --once only" in proc.stderr


def test_config_from_environment_variable(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:1])
    proc = run_confpy("--once", "--allow-no-reload", env={"CONFPY_CONFIG": str(config_file)})
    assert proc.returncode == 0, proc.stderr
    assert nginx.destination.exists()


def test_the_client_reads_the_answers(consul: ConsulUnderTest, backends: list[BackendServer]) -> None:
    api = ConsulAPI(consul.url)
    register_backends(api, backends[:2])
    from confpy.config import ConsulConfig
    from confpy.registry.base import ServiceHealth
    from confpy.registry.consul import ConsulClient, ConsulRegistry

    async def fetch() -> tuple[int, object]:
        registry = ConsulRegistry(ConsulClient(ConsulConfig(address=consul.url)))
        try:
            return await registry.fetch(ServiceHealth("web"), 0, 0.0)
        finally:
            await registry.close()

    index, view = asyncio.run(fetch())
    assert isinstance(view, HealthView)
    assert index >= 1
    assert [(i.id, i.port) for i in view.instances] == [("web-1", backends[0].port), ("web-2", backends[1].port)]
