"""etcd as the registry, against a real three-member etcd cluster (Debian's etcd-server) on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    EtcdCluster,
    LabPKI,
    NginxInstance,
    free_port,
    wait_until,
    write_config,
)

from .conftest import SHIPPED_TEMPLATE, run_confpy
from .tiers import starts_processes

LIVE_TEMPLATE = SHIPPED_TEMPLATE.with_name("nginx-upstreams-live.conf.j2")


@pytest.fixture
@starts_processes
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    started = EtcdCluster(tmp_path / "etcd").start()
    try:
        yield started
    finally:
        started.stop()


@dataclass(frozen=True)
class Site:
    """An etcd cluster, nginx, three app servers, a folder and the daemons a test starts."""

    cluster: EtcdCluster
    nginx: NginxInstance
    backends: list[BackendServer]
    tmp_path: Path
    daemons: list[ConfpyProcess]


@pytest.fixture
def site(
    cluster: EtcdCluster,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> Site:
    return Site(cluster, nginx, backends, tmp_path, daemons)


def etcd_config(
    path: Path, cluster: EtcdCluster, nginx: NginxInstance, template: Path = SHIPPED_TEMPLATE, nginx_extra: str = ""
) -> Path:
    """The lab's configuration on this etcd cluster."""
    return write_config(path, "", nginx, template, nginx_extra=nginx_extra, etcd_endpoints=cluster.endpoints)


def start_gateway(
    cluster: EtcdCluster, nginx: NginxInstance, tmp_path: Path, daemons: list[ConfpyProcess]
) -> ConfpyProcess:
    """The daemon on etcd, then nginx once the first file is in place."""
    proc = ConfpyProcess(etcd_config(tmp_path / "c.toml", cluster, nginx)).start()
    daemons.append(proc)
    assert wait_until(nginx.destination.exists, 15), proc.output()
    nginx.start()
    return proc


def serves(nginx: NginxInstance, expected: set[str]) -> bool:
    return wait_until(lambda: set(nginx.bodies(6)) == expected, 15, interval=0.05)


def test_leased_registrations_reach_traffic_and_leave_with_their_lease(site: Site) -> None:
    cluster, nginx, backends, tmp_path, daemons = site.cluster, site.nginx, site.backends, site.tmp_path, site.daemons
    api = cluster.api
    lease = api.grant(30)
    api.register("web", backends[0].port, lease)
    api.put(f"web/127.0.0.1:{backends[1].port}", "not json")  # left out with a warning naming the key
    proc = start_gateway(cluster, nginx, tmp_path, daemons)
    assert serves(nginx, {"App server 1"}), proc.output()
    bad = f"left out of the render: service 'web' instance 'web/127.0.0.1:{backends[1].port}': value is not JSON"
    assert bad in proc.output(), proc.output()

    second = api.grant(30)
    api.register("web", backends[1].port, second, weight=1, tags=["nginx"])
    assert serves(nginx, {"App server 1", "App server 2"}), proc.output()
    api.revoke(second)  # an app server that deregisters cleanly
    assert serves(nginx, {"App server 1"}), proc.output()
    short = api.grant(2)  # an app server that dies: its lease is never kept alive and expires
    api.register("web", backends[2].port, short)
    assert serves(nginx, {"App server 1", "App server 3"}), proc.output()
    assert serves(nginx, {"App server 1"}), proc.output()


def test_losing_a_follower_then_the_leader_changes_nothing_and_the_next_change_still_lands(site: Site) -> None:
    cluster, nginx, backends, tmp_path, daemons = site.cluster, site.nginx, site.backends, site.tmp_path, site.daemons
    api = cluster.api
    api.register("web", backends[0].port)
    proc = start_gateway(cluster, nginx, tmp_path, daemons)
    assert serves(nginx, {"App server 1"}), proc.output()
    leader = cluster.leader()
    assert leader is not None
    follower = next(m for m in cluster.members if m is not leader)
    follower.kill()
    before, reloads = nginx.destination.read_bytes(), nginx.reload_count()
    api.register("web", backends[1].port)
    assert serves(nginx, {"App server 1", "App server 2"}), proc.output()
    assert nginx.reload_count() == reloads + 1 and nginx.destination.read_bytes() != before

    leader.kill()  # one member left of three: no quorum until the follower is back
    follower.start()
    assert wait_until(cluster.healthy, 30), "a new leader"
    reloads = nginx.reload_count()
    api.delete(f"web/127.0.0.1:{backends[0].port}")
    assert serves(nginx, {"App server 2"}), proc.output()
    assert wait_until(lambda: nginx.reload_count() == reloads + 1, 5)
    assert nginx.reload_count() == reloads + 1  # one change, one reload: no storm


def test_compaction_past_confpys_revision_and_a_whole_cluster_outage_are_survived(site: Site) -> None:
    cluster, nginx, backends, tmp_path, daemons = site.cluster, site.nginx, site.backends, site.tmp_path, site.daemons
    api = cluster.api
    api.register("web", backends[0].port)
    proc = start_gateway(cluster, nginx, tmp_path, daemons)
    assert serves(nginx, {"App server 1"}), proc.output()
    revision = 0
    for n in range(20):  # history confpy never saw, then compacted away under its watch
        revision = api.put(f"unrelated/{n}", "x")
    api.compact(revision)
    api.register("web", backends[1].port)
    assert serves(nginx, {"App server 1", "App server 2"}), proc.output()

    cluster.stop()  # every member down: nginx keeps serving what it has
    assert serves(nginx, {"App server 1", "App server 2"})
    assert wait_until(lambda: "unavailable since" in proc.output(), 15), proc.output()
    for member in cluster.members:
        member.start()
    assert wait_until(cluster.healthy, 30)
    api.register("web", backends[2].port)
    assert serves(nginx, {"App server 1", "App server 2", "App server 3"}), proc.output()


def test_etcd_configuration_rules_and_consul_only_functions(
    cluster: EtcdCluster, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    config = etcd_config(tmp_path / "c.toml", cluster, nginx)
    both = tmp_path / "both.toml"
    both.write_text('[consul]\naddress = "http://127.0.0.1:8500"\n' + config.read_text())
    done = run_confpy("-c", str(both), "--once")
    assert done.returncode == 2 and "[consul] and [etcd] are both set" in done.stderr
    cluster.api.register("web", backends[0].port)
    from_env = tmp_path / "env.toml"
    text = config.read_text()
    from_env.write_text(text.replace(f"endpoints = {json.dumps(cluster.endpoints)}\n", ""))
    done = run_confpy(
        "-c", str(from_env), "--once", "--allow-no-reload", env={"ETCDCTL_ENDPOINTS": ",".join(cluster.endpoints)}
    )
    assert done.returncode == 0, done.stderr
    assert f"server 127.0.0.1:{backends[0].port} " in nginx.destination.read_text()
    template = tmp_path / "nodes.j2"
    template.write_text("{% for n in nodes() %}{{ n.name }}{% endfor %}\n")
    nodes = etcd_config(tmp_path / "nodes.toml", cluster, nginx, template)
    done = run_confpy("-c", str(nodes), "--once", "--allow-no-reload")
    assert done.returncode == 1 and "nodes() needs Consul; this configuration follows etcd" in done.stderr


def test_upstream_commands_on_etcd(cluster: EtcdCluster, nginx: NginxInstance, tmp_path: Path) -> None:
    config = str(etcd_config(tmp_path / "c.toml", cluster, nginx))
    done = run_confpy("upstream", "add", "-c", config, "web", "127.0.0.1:8081", "--weight", "3")
    assert done.returncode == 0 and "registered web/127.0.0.1:8081 in etcd" in done.stdout, done.stderr
    listed = run_confpy("upstream", "list", "-c", config)
    assert "web (1 in etcd)" in listed.stdout and "127.0.0.1:8081  weight 3  tags nginx" in listed.stdout
    refused = run_confpy("upstream", "del", "-c", config, "web", "127.0.0.1:8081")
    assert refused.returncode == 1 and "it is the last member of web" in refused.stderr
    assert run_confpy("upstream", "drain", "-c", config, "web", "127.0.0.1:8081").returncode == 2
    leased = subprocess.Popen(
        [sys.executable, "-m", "confpy", "upstream", "add", "-c", config, "web", "127.0.0.1:8082", "--ttl", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert leased.stdout is not None and "kept alive until Ctrl-C" in leased.stdout.readline()
        assert wait_until(lambda: "127.0.0.1:8082" in run_confpy("upstream", "list", "-c", config).stdout, 10)
        assert run_confpy("upstream", "del", "-c", config, "web", "127.0.0.1:8081").returncode == 0
    finally:
        leased.send_signal(signal.SIGINT)
        assert leased.wait(10) == 0
    # No keep-alive any more: the lease expires and the member goes, as an app server that died.
    assert wait_until(lambda: "no service" in run_confpy("upstream", "list", "-c", config).stdout, 15)


def test_live_mode_on_etcd_pushes_members_without_a_reload(
    cluster: EtcdCluster, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    nginx = NginxInstance(tmp_path / "nginx", lua=True)
    live = f'mode = "live"\nlive_listen = "127.0.0.1:{free_port()}"'
    config = etcd_config(tmp_path / "c.toml", cluster, nginx, LIVE_TEMPLATE, nginx_extra=live)
    cluster.api.register("web", backends[0].port)
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    try:
        assert wait_until(nginx.destination.exists, 15), proc.output()
        nginx.start()
        assert serves(nginx, {"App server 1"}), proc.output()
        reloads = nginx.reload_count()
        cluster.api.register("web", backends[1].port)
        assert serves(nginx, {"App server 1", "App server 2"}), proc.output()
        cluster.api.delete(f"web/127.0.0.1:{backends[0].port}")
        assert serves(nginx, {"App server 2"}), proc.output()
        assert nginx.reload_count() == reloads  # members went through the Lua admin API
    finally:
        nginx.stop()


def test_the_demo_on_etcd() -> None:
    done = run_confpy("demo", "--registry", "etcd", timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("-> reached traffic") == 5 and "lease expired" in done.stdout


def test_etcd_over_tls_with_client_certificates(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    pki = LabPKI.make(tmp_path / "pki")
    cluster = EtcdCluster(tmp_path / "etcd", size=1, tls=pki).start()
    try:
        assert cluster.endpoints[0].startswith("https://")
        cluster.api.register("web", backends[0].port)
        config = etcd_config(tmp_path / "c.toml", cluster, nginx)
        text = config.read_text()
        tls = f'ca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
        config.write_text(text.replace("[etcd]\n", "[etcd]\n" + tls, 1))
        done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
        assert done.returncode == 0, done.stderr
        assert f"server 127.0.0.1:{backends[0].port} " in nginx.destination.read_text()
        config.write_text(config.read_text().replace(f'ca_file = "{pki.ca}"', f'ca_file = "{pki.other_ca}"'))
        done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
        assert done.returncode == 1 and "certificate verify failed" in done.stderr, done.stderr
    finally:
        cluster.stop()


def test_etcd_with_authentication(nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=1).start()
    try:
        api = cluster.api
        api.register("web", backends[0].port)
        api.call("/v3/auth/user/add", {"name": "root", "password": "s3cret-pw"})
        api.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        api.call("/v3/auth/enable", {})
        config = etcd_config(tmp_path / "c.toml", cluster, nginx)
        done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
        assert done.returncode == 1 and "etcd refused" in done.stderr, done.stderr  # no user: refused, clearly
        (tmp_path / "pw").write_text("s3cret-pw\n")
        text = config.read_text().replace(
            "[etcd]\n", f'[etcd]\nusername = "root"\npassword_file = "{tmp_path / "pw"}"\n', 1
        )
        config.write_text(text)
        done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
        assert done.returncode == 0, done.stderr
        assert "s3cret-pw" not in done.stderr and f"127.0.0.1:{backends[0].port}" in nginx.destination.read_text()
        (tmp_path / "pw").write_text("wrong\n")
        done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
        assert done.returncode == 1 and "etcd at" in done.stderr and "refused user 'root'" in done.stderr
    finally:
        cluster.stop()
