"""Issue 30 with real processes: dev-consul or an etcd cluster, nginx, confpy as a daemon.

Deeply nested JSON names its key and stops nothing else; idle status pages up to the cap cost a
change nothing and the next one gets 503; 1,500 watches under systemd's default soft file limit;
a symlinked destination stays a symlink through an install and a rollback.
"""

from __future__ import annotations

import resource
import socket
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    EtcdCluster,
    NginxInstance,
    free_port,
    wait_until,
    write_config,
)

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, http_get, register_backends
from .test_daemon import settles, start_daemon

DEEP = "[" * 100_000 + "]" * 100_000


def test_deep_json_in_a_kv_value_is_named_and_every_other_update_lands(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    banner = tmp_path / "banner.j2"
    banner.write_text("# {{ key('cfg/deep') | parse_json | length }}\n")
    assert consul.api.request("PUT", "/v1/kv/cfg/deep", DEEP.encode())[0] == 200
    config = write_config(
        tmp_path / "c.toml",
        consul.url,
        nginx,
        SHIPPED_TEMPLATE,
        extra=f'\n[[template]]\nsource = "{banner}"\ndestination = "{tmp_path / "banner.conf"}"\n',
    )
    register_backends(consul.api, backends[:1])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1"}), proc.output()
    named = "the value of key 'cfg/deep': parse_json: refused: JSON nested too deep to read"
    assert wait_until(lambda: named in proc.output(), 10), proc.output()
    consul.api.register("web", backends[1].port, id="web-2")
    assert settles(nginx, {"App server 1", "App server 2"}), proc.output()
    assert proc.proc is not None and proc.proc.poll() is None, "the daemon is still up"
    assert consul.api.request("PUT", "/v1/kv/cfg/deep", b"[[1, 2], [3]]")[0] == 200
    assert wait_until(lambda: (tmp_path / "banner.conf").exists(), 10), proc.output()
    assert (tmp_path / "banner.conf").read_text() == "# 2\n"


def test_deep_json_in_an_etcd_registration_is_left_out_naming_it(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=1).start()
    try:
        api = cluster.api
        api.register("web", backends[0].port)
        deep_key = f"web/127.0.0.1:{backends[1].port}"
        metadata = '{"meta": ' + '{"x":' * 100_000 + "1" + "}" * 100_000 + "}"
        api.put(deep_key, f'{{"Addr": "127.0.0.1:{backends[1].port}", "Metadata": {metadata}}}')
        config = write_config(tmp_path / "c.toml", "", nginx, SHIPPED_TEMPLATE, etcd_endpoints=cluster.endpoints)
        proc = ConfpyProcess(config).start()
        daemons.append(proc)
        assert wait_until(nginx.destination.exists, 15), proc.output()
        nginx.start()
        assert settles(nginx, {"App server 1"}), proc.output()
        assert f"instance '{deep_key}': value is refused: JSON nested too deep" in proc.output(), proc.output()
        api.register("web", backends[2].port)
        assert settles(nginx, {"App server 1", "App server 3"}), proc.output()
        assert proc.proc is not None and proc.proc.poll() is None
        assert "Traceback" not in proc.output()
    finally:
        cluster.stop()


def _events_status(port: int) -> int:
    """The status code /events answers with (its stream, if any, closed at once)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return int(sock.recv(4096).split(b" ", 2)[1])


def _subscribe(port: int) -> socket.socket:
    """An idle status page: /events opened, its first event read, then left alone."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = sock.recv(4096)
    assert b" 200 " in head.split(b"\r\n", 1)[0], head
    return sock


def _change_to_traffic(consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer]) -> float:
    """Seconds from a registration to nginx serving it, and back (median of three round trips)."""
    took = []
    for _ in range(3):
        started = time.monotonic()
        consul.api.register("web", backends[1].port, id="web-2")
        assert settles(nginx, {"App server 1", "App server 2"})
        consul.api.deregister("web-2")
        assert settles(nginx, {"App server 1"})
        took.append(time.monotonic() - started)
    return statistics.median(took)


def test_idle_status_pages_up_to_the_cap_cost_a_change_nothing_and_the_next_gets_503(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    cap = 12
    status_port = free_port()
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status_port}")
    config.write_text(config.read_text().replace("[status]\n", f"[status]\nmax_subscribers = {cap}\n"))
    for n in range(200):  # a status worth serialising: 200 more services beside web
        consul.api.register(f"svc{n:03d}", backends[2].port, id=f"svc{n:03d}")
    register_backends(consul.api, backends[:1])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1"}), proc.output()
    alone = _change_to_traffic(consul, nginx, backends)
    pages = [_subscribe(status_port) for _ in range(cap)]
    try:
        status, body = http_get(f"http://127.0.0.1:{status_port}/events")
        assert status == 503 and f"{cap} status pages are open already" in body
        crowded = _change_to_traffic(consul, nginx, backends)
        print(f"change to traffic: {alone * 1000:.0f} ms alone, {crowded * 1000:.0f} ms with {cap} idle pages")
        assert crowded < 3 * alone, (alone, crowded)
        assert http_get(f"http://127.0.0.1:{status_port}/health")[0] == 200
    finally:
        for page in pages:
            page.close()
    assert wait_until(lambda: _events_status(status_port) == 200, 5), "the closed pages' slots are free again"


@contextmanager
def soft_file_limit(soft: int) -> Iterator[int]:
    """This process's soft RLIMIT_NOFILE (inherited by what it starts) for a while; yields the hard
    limit, left as it is: systemd's is 524288, a container's may be lower (raising it needs
    CAP_SYS_RESOURCE, and lowering it in the test process could not be undone)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = before[1]
    assert hard == resource.RLIM_INFINITY or hard > 1500 + 1024, f"a hard limit of {hard} is too low for this test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_1500_watches_work_under_systemds_default_soft_file_limit(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    services = 1500
    for n in range(services):
        consul.api.register(f"svc{n:04d}", backends[n % 3].port, id=f"svc{n:04d}")
    register_backends(consul.api, backends[:1])
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, wait_max="2s")
    with soft_file_limit(1024) as hard:  # systemd's default soft limit, inherited by the daemon
        proc = ConfpyProcess(config).start()
    daemons.append(proc)
    assert proc.proc is not None
    daemon = psutil.Process(proc.proc.pid)

    def rendered() -> int:
        text = nginx.destination.read_text() if nginx.destination.exists() else ""
        return text.count("upstream svc")

    assert wait_until(lambda: rendered() == services, 180, interval=0.5), proc.output()[-3000:]
    nginx.start()
    assert settles(nginx, {"App server 1"}, timeout=30), proc.output()[-3000:]
    assert f"raised the open-file limit from 1024 to {hard}" in proc.output()
    assert daemon.rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    # Once every blocking query is out: past the old soft limit, which only the raise allows.
    assert wait_until(lambda: daemon.num_fds() > services, 60), (daemon.num_fds(), proc.output()[-3000:])
    assert "Too many open files" not in proc.output() and "watch failing" not in proc.output()
    consul.api.register("svc1499", backends[1].port, id="svc1499-b")  # the last watch started still works
    assert wait_until(lambda: f"127.0.0.1:{backends[1].port}" in _upstream(nginx, "svc1499"), 30), proc.output()[-3000:]
    consul.api.register("svc0000", backends[2].port, id="svc0000-b")  # and so does the first
    assert wait_until(lambda: _upstream(nginx, "svc0000").count("server 127.0.0.1:") == 2, 30), (
        _upstream(nginx, "svc0000"),
        proc.output()[-3000:],
    )


def _upstream(nginx: NginxInstance, name: str) -> str:
    text = nginx.destination.read_text()
    start = text.find(f"upstream {name} {{")
    return text[start : text.find("}", start)] if start >= 0 else ""


def test_a_symlinked_destination_stays_a_symlink_through_install_and_rollback(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    template = tmp_path / "upstreams.j2"
    template.write_text(
        SHIPPED_TEMPLATE.read_text() + "\nkeepalive_timeout {{ key_or_default('cfg/keepalive', '60s') }};\n"
    )
    available = nginx.prefix / "sites-available" / "upstreams.conf"
    available.parent.mkdir()
    nginx.destination.symlink_to(available)  # dangling until confpy's first install
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template)
    register_backends(consul.api, backends[:1])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1"}), proc.output()
    assert nginx.destination.is_symlink() and available.is_file()
    consul.api.register("web", backends[1].port, id="web-2")  # an install over the link
    assert settles(nginx, {"App server 1", "App server 2"}), proc.output()
    assert nginx.destination.is_symlink() and f"127.0.0.1:{backends[1].port}" in available.read_text()
    good = available.read_bytes()
    assert consul.api.request("PUT", "/v1/kv/cfg/keepalive", b"forever")[0] == 200  # nginx -t refuses it
    assert wait_until(lambda: "restored" in proc.output(), 15), proc.output()
    assert nginx.destination.is_symlink() and available.read_bytes() == good, "rolled back through the link"
    assert not [p for p in nginx.destination.parent.iterdir() if "confpy-tmp" in p.name]
    assert consul.api.request("PUT", "/v1/kv/cfg/keepalive", b"75s")[0] == 200
    assert wait_until(lambda: "keepalive_timeout 75s;" in available.read_text(), 15), proc.output()
    assert nginx.destination.is_symlink()
    assert settles(nginx, {"App server 1", "App server 2"}), "nginx serves the file behind the link"
