"""Deploying as an operator does: Debian's layout, honest health and exit codes, a validating
--dry-run, configuration errors all at once, the shipped templates and examples."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.config import load_config
from confpy.dev.lab import BackendServer, ConfpyProcess, NginxInstance, free_port, wait_until, write_config

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, http_get, register_backends, run_confpy
from .tiers import starts_processes


@pytest.fixture
@starts_processes
def debian_nginx(tmp_path: Path) -> Iterator[NginxInstance]:
    instance = NginxInstance(tmp_path / "root", debian=True)
    try:
        yield instance
    finally:
        instance.stop()


def test_debian_layout_destination_in_sites_enabled_ten_changes_reach_traffic(
    consul: ConsulUnderTest, debian_nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    nginx = debian_nginx
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    register_backends(consul.api, backends[:1])
    proc = ConfpyProcess(config).start()
    try:
        assert wait_until(nginx.destination.exists, 15), proc.output()
        nginx.start()
        assert wait_until(lambda: set(nginx.bodies(3)) == {"App server 1"}, 10)
        for n in range(10):  # every change installs a new file and keeps its backup: none may land in sites-enabled
            if n % 2 == 0:
                consul.api.register("web", backends[1].port, id="web-2")
                expected = {"App server 1", "App server 2"}
            else:
                consul.api.deregister("web-2")
                expected = {"App server 1"}
            assert wait_until(lambda e=expected: set(nginx.bodies(6)) == e, 15, interval=0.05), (n, proc.output())
        # Only the destination stays (an install in flight has a hidden temporary file for an instant,
        # which nginx's `include sites-enabled/*` does not match).
        listing = lambda: sorted(p.name for p in nginx.sites_enabled.iterdir())  # noqa: E731
        assert wait_until(lambda: listing() == ["default", "upstreams"], 5), listing()
        assert sorted(p.name for p in nginx.conf_d.iterdir()) == ["gzip.conf"]
        state = tmp_path / "confpy-state"
        # the remembered members are written once changes pause (STATE_SAVE_QUIET)
        suffixes = lambda: {p.suffix for p in state.iterdir()}  # noqa: E731
        assert wait_until(lambda: suffixes() >= {".bak", ".lock", ".json"}, 10), suffixes()
        # and the backups each install replaced (kept linked while `nginx -t` ran) are removed then
        leftovers = lambda: [p.name for p in state.iterdir() if p.name.endswith(".confpy-tmp")]  # noqa: E731
        assert wait_until(lambda: not leftovers(), 10), leftovers()
        backup = next(p for p in state.iterdir() if p.suffix == ".bak")
        assert f":{backends[1].port} " in backup.read_text()  # the file before the last change: it had web-2
        assert "duplicate upstream" not in proc.output() and "sync failed" not in proc.output()
    finally:
        proc.stop()


def test_upgrading_from_0_1_moves_backup_and_state_out_of_the_include_folder(
    consul: ConsulUnderTest, debian_nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    nginx = debian_nginx
    register_backends(consul.api, backends[:1])
    dest = nginx.destination
    dest.write_text("# installed by 0.1\n")
    old_backup = dest.with_name("upstreams.bak")
    old_backup.write_text("upstream web { server 127.0.0.1:1; }\n")  # 0.1's backup: nginx would include it
    old_state = dest.parent / ".upstreams.confpy-state.json"
    old_state.write_text(json.dumps({"destination": str(dest), "members": {}, "version": 1}))
    old_lock = dest.parent / ".upstreams.confpy.lock"
    old_lock.write_text("")
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    proc = run_confpy("-c", str(config), "--once", "--allow-no-reload")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in nginx.sites_enabled.iterdir()) == ["default", "upstreams"]
    assert "upgrading from confpy 0.1: moved" in proc.stderr
    state = tmp_path / "confpy-state"
    flat = str(dest).strip("/").replace("/", "_")
    assert (state / f"{flat}.bak").exists() and (state / f"{flat}.json").exists()
    assert subprocess.run(nginx.check_cmd.split(), capture_output=True, check=False).returncode == 0


def test_a_wrong_pid_file_is_not_reported_as_success(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    register_backends(consul.api, backends[:3])
    wrong = tmp_path / "wrong.pid"
    wrong.write_text("999999\n")  # names nothing: nginx runs, but confpy cannot reload it
    status_port = free_port()
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status_port}")
    config.write_text(config.read_text().replace(f'pid_file = "{nginx.pid_file}"', f'pid_file = "{wrong}"'))
    assert run_confpy("-c", str(config), "--once", "--allow-no-reload").returncode == 0
    nginx.start()
    consul.api.deregister("web-3")
    once = run_confpy("-c", str(config), "--once")
    assert once.returncode == 3, once.stderr
    assert "files installed but nginx was not reloaded: nginx is not running (no live master in" in once.stderr
    assert set(nginx.bodies(6)) == {"App server 1", "App server 2", "App server 3"}  # what --once exit 0 used to hide
    proc = ConfpyProcess(config).start()
    try:
        base = f"http://127.0.0.1:{status_port}"
        consul.api.deregister("web-1")  # a change that never reaches nginx
        assert wait_until(lambda: "files installed, reload skipped" in proc.output(), 10), proc.output()
        code, reason = http_get(base + "/health")
        assert code == 503 and "files installed but nginx not reloaded" in reason
        assert 'confpy_reloads_skipped_total{reason="not_running"}' in http_get(base + "/metrics")[1]
        assert json.loads(http_get(base + "/status")[1])["not_reloaded"].startswith("nginx is not running")
        # Fixed by the operator: the next cycle reloads, and /health is green again.
        config.write_text(config.read_text().replace(f'pid_file = "{wrong}"', f'pid_file = "{nginx.pid_file}"'))
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: http_get(base + "/health") == (200, "ok\n"), 20), proc.output()
        assert wait_until(lambda: set(nginx.bodies(4)) == {"App server 2"}, 10)
    finally:
        proc.stop()


def test_dry_run_asks_nginx_about_the_candidates_and_changes_nothing(
    consul: ConsulUnderTest, debian_nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    nginx = debian_nginx
    register_backends(consul.api, backends[:1])
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    good = run_confpy("-c", str(config), "--once", "--dry-run")
    assert good.returncode == 0, good.stderr
    assert "nginx would accept these files" in good.stdout and f"+++ {nginx.destination}" in good.stdout
    assert not nginx.destination.exists()
    # A template nginx refuses (an unknown directive): the dry run says so with nginx's words and the live path.
    bad_template = tmp_path / "bad.conf.j2"
    bad_template.write_text(
        SHIPPED_TEMPLATE.read_text().replace("keepalive {{ settings.keepalive }};", "keepalive_bogus 16;")
    )
    bad = write_config(tmp_path / "bad.toml", consul.url, nginx, bad_template)
    refused = run_confpy("-c", str(bad), "--once", "--dry-run")
    assert refused.returncode == 1
    assert 'unknown directive "keepalive_bogus"' in refused.stderr and str(nginx.destination) in refused.stderr
    assert "confpy-dry-run" not in refused.stderr
    assert not nginx.destination.exists()
    # A destination folder that does not exist.
    missing = write_config(tmp_path / "m.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    missing.write_text(missing.read_text().replace(str(nginx.destination), str(tmp_path / "nope" / "up.conf")))
    out = run_confpy("-c", str(missing), "--once", "--dry-run")
    assert out.returncode == 1 and "does not exist" in out.stderr


def test_every_configuration_problem_exits_2_before_anything_starts(nginx: NginxInstance, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", "http://127.0.0.1:1", nginx, tmp_path / "missing.j2")
    config.write_text(config.read_text().replace("[consul]", '[consul]\ntokn = "x"') + "\n[nginx2]\n")
    for args in (["--once"], []):  # the daemon too: it must not start
        proc = run_confpy("-c", str(config), *args, timeout=20)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("confpy: error: ")]
        assert len(errors) == 3, proc.stderr
        assert any("tokn: unknown key; did you mean 'token'?" in e for e in errors)
        assert any("nginx2: unknown key" in e for e in errors)
        assert any("missing.j2 not found" in e for e in errors)
    bare = tmp_path / "bare.toml"
    bare.write_text(
        write_config(tmp_path / "x.toml", "http://127.0.0.1:1", nginx, SHIPPED_TEMPLATE)
        .read_text()
        .replace('address = "http://127.0.0.1:1"\n', "")
    )
    proc = run_confpy("-c", str(bare), "--once", env={"CONSUL_HTTP_ADDR": "ftp://nope"})
    assert (
        proc.returncode == 2
        and "confpy: error: $CONSUL_HTTP_ADDR: Consul address 'ftp://nope' is not http(s)://HOST:PORT" in proc.stderr
    )


def test_a_consul_host_name_typo_keeps_the_dns_reason(nginx: NginxInstance, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", "http://consul.invalid:8500", nginx, SHIPPED_TEMPLATE)
    proc = run_confpy("-c", str(config), "--once")
    assert proc.returncode == 1
    assert "cannot resolve host 'consul.invalid'" in proc.stderr


def test_shipped_templates_and_example_configs(tmp_path: Path) -> None:
    listing = run_confpy("templates")
    assert listing.returncode == 0
    assert (
        "builtin:nginx-upstreams.conf.j2" in listing.stdout and "builtin:nginx-upstreams-live.conf.j2" in listing.stdout
    )
    copied = tmp_path / "mine.conf.j2"
    assert run_confpy("templates", "copy", "nginx-upstreams.conf.j2", str(copied)).returncode == 0
    assert copied.read_text() == SHIPPED_TEMPLATE.read_text()
    again = run_confpy("templates", "copy", "nginx-upstreams.conf.j2", str(copied))
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    unknown = run_confpy("templates", "show", "nope.j2")
    assert unknown.returncode == 2 and "no shipped template 'nope.j2'" in unknown.stderr
    for args in ([], ["--live"]):
        example = run_confpy("init", *args)
        assert example.returncode == 0 and 'source = "builtin:' in example.stdout
        path = tmp_path / f"example{len(args)}.toml"
        path.write_text(example.stdout)
        assert load_config(path, {}).templates[0].source.is_file()  # parses, and its builtin template exists


def test_json_logs_have_stable_keys(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:1])
    proc = run_confpy("-c", str(config_file), "--once", "--allow-no-reload", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert lines and all(set(entry) == {"time", "level", "logger", "message"} for entry in lines)
    assert any(entry["message"].startswith("installed ") for entry in lines)


def test_health_clears_a_consul_error_as_soon_as_consul_answers_again_and_metrics_are_conventional(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    from confpy.dev.lab import ConsulAPI, DevConsulProcess

    dev = DevConsulProcess().start()
    status_port = free_port()
    config = write_config(tmp_path / "c.toml", dev.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status_port}")
    register_backends(ConsulAPI(dev.url), backends[:1])
    assert run_confpy("-c", str(config), "--once", "--allow-no-reload").returncode == 0
    nginx.start()
    proc = ConfpyProcess(config).start()  # wait = 60s: its long polls would hide a recovery for a minute
    base = f"http://127.0.0.1:{status_port}"
    try:
        assert wait_until(lambda: http_get(base + "/health") == (200, "ok\n"), 15), proc.output()
        port = dev.port
        dev.kill()
        assert wait_until(lambda: http_get(base + "/health")[0] == 503, 15), proc.output()
        dev = DevConsulProcess(port).start()
        register_backends(ConsulAPI(dev.url), backends[:1])
        assert wait_until(lambda: http_get(base + "/health") == (200, "ok\n"), 10), proc.output()
        metrics = http_get(base + "/metrics")[1]
        assert 'confpy_build_info{version="' in metrics and "process_resident_memory_bytes" in metrics
        assert "confpy_reloads_skipped_total" in metrics and "_created" not in metrics
    finally:
        proc.stop()
        dev.stop()


def test_no_timestamp_when_stderr_is_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import os

    from confpy.cli import setup_logging

    def logged(environ: dict[str, str], name: str) -> str:
        path = tmp_path / name
        with path.open("w") as stream:
            monkeypatch.setattr(sys, "stderr", stream)
            info = os.fstat(stream.fileno())
            env = {
                key.replace("DEV", str(info.st_dev)): value.replace("DEV", str(info.st_dev)).replace(
                    "INO", str(info.st_ino)
                )
                for key, value in environ.items()
            }
            setup_logging("info", "text", env)
            logging.getLogger("confpy.test").info("installed /etc/nginx/conf.d/upstreams.conf")
        monkeypatch.undo()
        return path.read_text()

    assert logged({"JOURNAL_STREAM": "DEV:INO"}, "journal") == "INFO installed /etc/nginx/conf.d/upstreams.conf\n"
    plain = logged({}, "plain")
    assert plain[:4].isdigit() and plain.endswith(" INFO installed /etc/nginx/conf.d/upstreams.conf\n")
    other = logged({"JOURNAL_STREAM": "1:2"}, "other")  # the journal is some other stream: keep the timestamp
    assert other[:4].isdigit()
    setup_logging("warning")
