"""The daemon as a real process: follows Consul, coalesces, survives outages, signals, status."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import psutil

from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    ConsulAPI,
    DevConsulProcess,
    NginxInstance,
    free_port,
    wait_until,
    write_config,
)

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, dev_consul_only, http_get, register_backends, run_confpy

ALL = {"App server 1", "App server 2", "App server 3"}


def start_daemon(
    daemons: list[ConfpyProcess], config: Path, nginx: NginxInstance, *, start_nginx: bool = True
) -> ConfpyProcess:
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    assert wait_until(lambda: nginx.destination.exists(), 15), proc.output()
    if start_nginx and nginx.master_pid() is None:
        nginx.start()
    return proc


def settles(nginx: NginxInstance, expected: set[str], timeout: float = 15) -> bool:
    return wait_until(lambda: set(nginx.bodies(6)) == expected, timeout, interval=0.05)


def test_registration_reaches_traffic_without_any_command(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    config_file: Path,
    daemons: list[ConfpyProcess],
) -> None:
    register_backends(consul.api, backends[:2])
    proc = start_daemon(daemons, config_file, nginx)
    assert settles(nginx, {"App server 1", "App server 2"})
    consul.api.register("web", backends[2].port, id="web-3")
    assert settles(nginx, ALL), proc.output()
    consul.api.deregister("web-1")
    assert settles(nginx, {"App server 2", "App server 3"}), proc.output()
    assert f"service(web, tag=nginx) changed: -127.0.0.1:{backends[0].port} (index" in proc.output()
    assert f"service(web, tag=nginx) changed: +127.0.0.1:{backends[2].port} (index" in proc.output()


def test_a_burst_within_wait_min_gives_one_reload(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    status_port = free_port()
    config = write_config(
        tmp_path / "c.toml",
        consul.url,
        nginx,
        SHIPPED_TEMPLATE,
        wait_min="2s",
        wait_max="20s",
        status=f"127.0.0.1:{status_port}",
    )
    register_backends(consul.api, backends[:1])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1"})

    def status() -> dict[str, object]:
        return dict(json.loads(http_get(f"http://127.0.0.1:{status_port}/status")[1]))

    reloads = nginx.reload_count()
    assert wait_until(lambda: status()["pending"] == [], 10)
    cycles = int(str(status()["cycles"]))
    for n in range(50):  # only the last one passes: the only change the rendered output can see
        consul.api.register(
            "web", 20000 + n, id=f"burst-{n}", Check={"TTL": "60s", "Status": "passing" if n == 49 else "critical"}
        )
    assert wait_until(lambda: "20049" in nginx.destination.read_text(), 15), proc.output()
    # Consul no longer changes, and no template waits for quiescence: nothing can reload again.
    assert wait_until(lambda: status()["pending"] == [], 10)
    assert status()["cycles"] == cycles + 1
    assert wait_until(lambda: nginx.reload_count() == reloads + 1, 5)
    assert nginx.reload_count() == reloads + 1
    assert nginx.destination.read_text().count("server 127.0.0.1:200") == 1


@dev_consul_only
def test_consul_restart_with_lower_indexes_recovers_without_churn(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    dev = DevConsulProcess().start()
    try:
        api = ConsulAPI(dev.url)
        for _ in range(30):  # push the index up so the restarted agent's indexes are lower
            api.request("PUT", "/v1/kv/confpy-test/bump", b"x")
        register_backends(api, backends)
        config = write_config(tmp_path / "c.toml", dev.url, nginx, SHIPPED_TEMPLATE, consul_wait="2s")
        proc = start_daemon(daemons, config, nginx)
        assert settles(nginx, ALL)
        before = nginx.destination.stat()
        reloads = nginx.reload_count()
        port = dev.port
        dev.kill()
        # The outage as confpy sees it: its watches fail and back off.
        assert wait_until(lambda: "Consul unavailable since" in proc.output(), 10), proc.output()
        assert nginx.destination.stat().st_mtime_ns == before.st_mtime_ns
        assert set(nginx.bodies(6)) == ALL  # nginx untouched, still serving
        dev = DevConsulProcess(port).start()
        api = ConsulAPI(dev.url)
        register_backends(api, backends)  # same members, much lower indexes
        assert wait_until(lambda: "Consul is back" in proc.output(), 20), proc.output()
        # Both watches have answered the restarted agent (its lower indexes make them re-read from
        # 0) with the same data: nothing changed, so nothing can be pending.
        for watch in ("service(web, tag=nginx)", "services(tag=nginx)"):
            assert wait_until(lambda w=watch: f"{w}: Consul's index went backwards" in proc.output(), 20), proc.output()
        assert "changed:" not in proc.output().split("Consul is back", 1)[1]
        assert nginx.reload_count() == reloads and nginx.destination.stat().st_mtime_ns == before.st_mtime_ns
        assert "Consul unavailable since" in proc.output() and proc.output().count("Consul unavailable since") == 1
        api.deregister("web-2")  # and it still follows changes after the restart
        assert settles(nginx, {"App server 1", "App server 3"}), proc.output()
    finally:
        dev.stop()


@dev_consul_only
def test_a_consul_that_never_answers_is_detected_and_retried(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    hung = socket.socket()  # accepts connections (kernel backlog) and never answers; closed below
    hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    port = int(hung.getsockname()[1])
    config = write_config(tmp_path / "c.toml", f"http://127.0.0.1:{port}", nginx, SHIPPED_TEMPLATE, consul_wait="1s")
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    try:
        assert wait_until(lambda: "did not answer" in proc.output(), 20), proc.output()
        assert proc.proc is not None and proc.proc.poll() is None
    finally:
        hung.close()
    dev = DevConsulProcess(port).start()
    try:
        register_backends(ConsulAPI(dev.url), backends[:1])
        assert wait_until(lambda: nginx.destination.exists(), 20), proc.output()
        nginx.start()
        assert settles(nginx, {"App server 1"})
    finally:
        dev.stop()


def test_edited_template_re_renders_and_a_broken_one_keeps_the_last_good_output(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    template = tmp_path / "templates" / "up.conf.j2"
    template.parent.mkdir()
    template.write_text(SHIPPED_TEMPLATE.read_text())
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template)
    register_backends(consul.api, backends)
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, ALL)
    template.write_text(template.read_text().replace("keepalive {{ settings.keepalive }};", "keepalive 32;"))
    assert wait_until(lambda: "keepalive 32;" in nginx.destination.read_text(), 10), proc.output()
    good = nginx.destination.read_bytes()
    template.write_text("upstream web {\n{% for i in service('web' %}\n}\n")
    assert wait_until(lambda: "render failed, keeping the last good output" in proc.output(), 10), proc.output()
    assert f"{template}:2: template syntax error" in proc.output()
    assert nginx.destination.read_bytes() == good
    consul.api.deregister("web-3")  # a broken template does not stop the daemon: it sees the change
    assert wait_until(lambda: "changed: -127.0.0.1" in proc.output(), 10), proc.output()
    assert wait_until(lambda: proc.output().count("render failed, keeping the last good output") >= 2, 10)
    assert proc.proc is not None and proc.proc.poll() is None
    template.write_text(SHIPPED_TEMPLATE.read_text())
    assert settles(nginx, {"App server 1", "App server 2"}), proc.output()


def test_sighup_rereads_config_and_refuses_a_broken_one(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    register_backends(consul.api, backends[:2])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1", "App server 2"})
    good_text = config.read_text()
    config.write_text(good_text + "\n[consul\nbroken")
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "SIGHUP: the new configuration is refused, the running one stays" in proc.output(), 10), (
        proc.output()
    )
    consul.api.register("web", backends[2].port, id="web-3")
    assert settles(nginx, ALL), proc.output()
    config.write_text(good_text.replace('min = "0s"', 'min = "10ms"'))
    proc.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: f"SIGHUP: re-read {config}" in proc.output(), 10), proc.output()
    consul.api.deregister("web-1")
    assert settles(nginx, {"App server 2", "App server 3"}), proc.output()


def test_startup_reloads_a_stale_nginx(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    config_file: Path,
    daemons: list[ConfpyProcess],
) -> None:
    register_backends(consul.api, backends[:1])
    assert run_confpy("-c", str(config_file), "--once", "--allow-no-reload").returncode == 0
    nginx.start()
    assert set(nginx.bodies(4)) == {"App server 1"}
    consul.api.register("web", backends[1].port, id="web-2")
    # Install the new file without reloading nginx: what a crash between install and reload leaves.
    dry = run_confpy("-c", str(config_file), "--once", "--dry-run")
    assert f"127.0.0.1:{backends[1].port}" in dry.stdout
    nginx_pid = nginx.master_pid()
    nginx.pid_file.rename(nginx.pid_file.with_suffix(".hidden"))
    assert run_confpy("-c", str(config_file), "--once", "--allow-no-reload").returncode == 0
    nginx.pid_file.with_suffix(".hidden").rename(nginx.pid_file)
    assert nginx.master_pid() == nginx_pid and set(nginx.bodies(4)) == {"App server 1"}  # stale
    reloads = nginx.reload_count()
    proc = start_daemon(daemons, config_file, nginx)
    assert wait_until(lambda: "reloaded once so it serves the current file" in proc.output(), 10), proc.output()
    assert settles(nginx, {"App server 1", "App server 2"})
    assert nginx.reload_count() == reloads + 1


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_status_health_and_metrics(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    status_port = free_port()
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status_port}")
    config.write_text(config.read_text().replace('timeout = "2s"', 'timeout = "2s"\ntoken = "tok-SECRET-123"'))
    register_backends(consul.api, backends[:2])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1", "App server 2"})
    base = f"http://127.0.0.1:{status_port}"
    # nginx was started after confpy's first install: once confpy has seen it serve that file (or,
    # when start times cannot tell, reloaded it once), /health is green. Then one change, one reload.
    assert wait_until(lambda: http_get(base + "/health") == (200, "ok\n"), 15), proc.output()
    reloads_before = _metric(http_get(base + "/metrics")[1], "confpy_reloads_total")
    consul.api.register("web", backends[2].port, id="web-3")
    assert settles(nginx, ALL)
    assert http_get(base + "/health") == (200, "ok\n")
    code, body = http_get(base + "/status")
    status = json.loads(body)
    [template] = status["templates"]
    assert template["destination"] == str(nginx.destination) and template["source"] == str(SHIPPED_TEMPLATE)
    assert template["checksum"].startswith("sha256:") and template["last_reload"] and template["last_error"] == ""
    instances = status["services"]["service(web, tag=nginx)"]["instances"]
    assert sorted((i["id"], i["port"], i["weight"]) for i in instances) == [
        (f"web-{n}", b.port, 1) for n, b in enumerate(backends, 1)
    ]
    code, metrics = http_get(base + "/metrics")
    assert code == 200
    for name in (
        "confpy_renders_total",
        "confpy_reloads_total",
        "confpy_check_failures_total",
        "confpy_consul_errors_total",
        "confpy_last_successful_sync_timestamp_seconds",
        "confpy_change_to_reload_seconds_bucket",
        "confpy_invalid_instances",
    ):
        assert name in metrics
    assert _metric(metrics, "confpy_reloads_total") == reloads_before + 1
    assert "tok-SECRET-123" not in body + metrics + proc.output()
    if consul.process is not None:
        consul.process.kill()
        assert wait_until(lambda: http_get(base + "/health")[0] == 503, 10)
        assert "Consul unreachable" in http_get(base + "/health")[1]


def test_idle_daemon_spends_no_cpu(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    config_file: Path,
    daemons: list[ConfpyProcess],
) -> None:
    register_backends(consul.api, backends)
    proc = start_daemon(daemons, config_file, nginx)
    assert settles(nginx, ALL)
    assert proc.proc is not None
    process = psutil.Process(proc.proc.pid)
    time.sleep(0.5)
    before = process.cpu_times()
    time.sleep(3.0)
    after = process.cpu_times()
    spent = (after.user - before.user) + (after.system - before.system)
    # A polling loop would burn a visible share of 3 s; blocked long polls burn ~nothing.
    assert spent < 0.15, f"idle daemon used {spent:.3f}s of CPU in 3s"


def test_check_failure_keeps_previous_files_and_the_daemon_running(
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
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template)
    register_backends(consul.api, backends[:2])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1", "App server 2"})
    good = nginx.destination.read_bytes()
    consul.api.register("web", backends[2].port, id="web-3", Meta={"extra": "not_a_directive"})
    assert wait_until(lambda: "sync failed, the previous files stay installed" in proc.output(), 10), proc.output()
    assert nginx.destination.read_bytes() == good
    consul.api.register("web", backends[2].port, id="web-3")  # fixed: the next change applies
    assert settles(nginx, ALL), proc.output()


def test_dependencies_follow_what_the_templates_call(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    template = tmp_path / "templates" / "up.conf.j2"
    template.parent.mkdir()
    body = "upstream web {\n{% for i in service('NAME') %}    server {{ i.endpoint }};\n{% endfor %}}\n"
    template.write_text(body.replace("NAME", "web"))
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template)
    consul.api.register("web", backends[0].port, id="web-1")
    consul.api.register("api", backends[1].port, id="api-1")
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, {"App server 1"})
    template.write_text(body.replace("NAME", "api"))  # the template now calls service('api')
    assert settles(nginx, {"App server 2"}), proc.output()
    assert wait_until(lambda: "stopped watching service(web)" in proc.output(), 10), proc.output()
    consul.api.register("api", backends[2].port, id="api-2")  # the new dependency is watched
    assert settles(nginx, {"App server 2", "App server 3"}), proc.output()
