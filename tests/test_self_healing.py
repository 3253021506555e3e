"""Faults that pass: a failed sync is retried until it lands, with no registry change and no signal.

Each test is a real confpy daemon, a real nginx and dev-consul: the destination's file system
fills up, or turns read-only, or `nginx -t` fails on a file confpy does not own; the fault
clears; the change lands by itself.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.dev.lab import BackendServer, ConfpyProcess, NginxInstance, free_port, wait_until, write_config

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, http_get, register_backends
from .test_daemon import settles, start_daemon

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs / a read-only bind mount (needs root)")

TWO = {"App server 1", "App server 2"}
ALL = {"App server 1", "App server 2", "App server 3"}


@pytest.fixture
def mounted() -> Iterator[list[Path]]:
    """Mount points a test made; unmounted at the end whatever happened."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def _mount(mounted: list[Path], *args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)
    mounted.append(Path(args[-1]))


def _health(port: int) -> tuple[int, str]:
    return http_get(f"http://127.0.0.1:{port}/health")


def _start(
    tmp_path: Path,
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    daemons: list[ConfpyProcess],
    extra: str = "",
) -> tuple[ConfpyProcess, int]:
    status = free_port()
    config = write_config(
        tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE, status=f"127.0.0.1:{status}", extra=extra
    )
    register_backends(consul.api, backends[:2])
    proc = start_daemon(daemons, config, nginx)
    assert settles(nginx, TWO), proc.output()
    assert wait_until(lambda: _health(status)[0] == 200, 10), _health(status)
    return proc, status


def _fill(folder: Path) -> Path:
    """Fill `folder`'s file system until it refuses another byte."""
    filler = folder / "filler.bin"  # not *.conf: nginx does not include it
    with filler.open("wb", buffering=0) as out:  # unbuffered: nothing left to flush on close
        try:
            while True:
                out.write(b"\0" * 1024)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _retrying(status: int, reason: str) -> bool:
    code, body = _health(status)
    return code == 503 and reason.lower() in body.lower() and "retrying in" in body and "(attempt" in body


def test_a_full_disk_is_retried_until_space_comes_back(
    tmp_path: Path,
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    daemons: list[ConfpyProcess],
    mounted: list[Path],
) -> None:
    _mount(mounted, "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(nginx.conf_d))
    proc, status = _start(tmp_path, consul, nginx, backends, daemons)
    installed = nginx.destination.read_bytes()
    filler = _fill(nginx.conf_d)
    consul.api.register("web", backends[2].port, id="web-3")
    assert wait_until(lambda: _retrying(status, "no space left"), 15), (_health(status), proc.output())
    assert nginx.destination.read_bytes() == installed, "the installed file is intact"
    retry = json.loads(http_get(f"http://127.0.0.1:{status}/status")[1])["sync_retry"]
    assert retry["attempt"] >= 2 and retry["retry_in_s"] >= 0, retry
    assert sorted(p.name for p in nginx.conf_d.iterdir()) == sorted([nginx.destination.name, filler.name]), (
        "no partial file left behind"
    )
    assert settles(nginx, TWO), "nginx keeps serving"
    filler.unlink()  # space comes back: no registry change, no signal
    assert settles(nginx, ALL, timeout=30), proc.output()
    assert wait_until(lambda: _health(status)[0] == 200, 10), _health(status)
    assert "sync recovered after" in proc.output()
    assert proc.output().count("sync failed, the previous files stay installed") == 1, "logged once, not per attempt"
    timeline = [event["kind"] for event in json.loads(http_get(f"http://127.0.0.1:{status}/status")[1])["timeline"]]
    assert timeline.count("rollback") == 1 and timeline[-1] == "recovered", timeline


def test_a_read_only_destination_made_writable_again_is_retried(
    tmp_path: Path,
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    daemons: list[ConfpyProcess],
    mounted: list[Path],
) -> None:
    proc, status = _start(tmp_path, consul, nginx, backends, daemons)
    installed = nginx.destination.read_bytes()
    _mount(mounted, "--bind", str(nginx.conf_d), str(nginx.conf_d))
    subprocess.run(["mount", "-o", "remount,ro,bind", str(nginx.conf_d)], check=True)
    consul.api.register("web", backends[2].port, id="web-3")
    assert wait_until(lambda: _retrying(status, "read-only"), 15), (_health(status), proc.output())
    assert nginx.destination.read_bytes() == installed
    subprocess.run(["umount", str(nginx.conf_d)], check=True)  # writable again
    mounted.clear()
    assert settles(nginx, ALL, timeout=30), proc.output()
    assert wait_until(lambda: _health(status)[0] == 200, 10), _health(status)


def test_a_check_failing_on_a_file_confpy_does_not_own_lands_once_it_is_restored(
    tmp_path: Path,
    consul: ConsulUnderTest,
    backends: list[BackendServer],
    daemons: list[ConfpyProcess],
) -> None:
    # The gateway's own config names a file confpy does not own: while it is missing, every
    # `nginx -t` fails; once restored, the pending change lands unprompted.
    owned = tmp_path / "gateway-extra.conf"
    owned.write_text("# the operator's file\n")
    nginx = NginxInstance(tmp_path / "nginx", extra_http=f"include {owned};")
    try:
        proc, status = _start(tmp_path, consul, nginx, backends, daemons)
        installed = nginx.destination.read_bytes()
        owned.rename(tmp_path / "moved-away.conf")
        consul.api.register("web", backends[2].port, id="web-3")
        assert wait_until(lambda: _retrying(status, str(owned)), 15), (_health(status), proc.output())
        assert nginx.destination.read_bytes() == installed, "rolled back"
        (tmp_path / "moved-away.conf").rename(owned)
        assert settles(nginx, ALL, timeout=30), proc.output()
        assert wait_until(lambda: _health(status)[0] == 200, 10), _health(status)
        body = json.loads(http_get(f"http://127.0.0.1:{status}/status")[1])
        assert body["last_sync_ok"] is True
    finally:
        nginx.stop()


def test_sighup_during_the_backoff_retries_at_once(
    tmp_path: Path,
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    daemons: list[ConfpyProcess],
    mounted: list[Path],
) -> None:
    _mount(mounted, "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(nginx.conf_d))
    proc, status = _start(tmp_path, consul, nginx, backends, daemons)
    filler = _fill(nginx.conf_d)
    consul.api.register("web", backends[2].port, id="web-3")
    # Wait for a long backoff: the fourth failure schedules the next try 8 s (+ jitter) later.
    assert wait_until(lambda: "(attempt 5)" in _health(status)[1], 30), (_health(status), proc.output())
    filler.unlink()
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    assert settles(nginx, ALL, timeout=30), proc.output()
    # It landed through the SIGHUP's fresh start (its first render), not the retry still waiting.
    assert "SIGHUP: re-read" in proc.output()
    installs = [line for line in proc.output().splitlines() if "installed " in line and "bytes;" in line]
    assert len(installs) == 2 and installs[-1].endswith("bytes; first data)"), installs


def _remembered_ports(state_dir: Path) -> set[int]:
    files = [p for p in state_dir.glob("*.json") if not p.name.endswith(".live.json")]
    assert len(files) == 1, files
    members = json.loads(files[0].read_text())["members"]
    return {item["port"] for items in members.values() for item in items}


def test_state_that_cannot_be_saved_is_surfaced_and_saved_once_the_dir_is_writable(
    tmp_path: Path,
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    daemons: list[ConfpyProcess],
    mounted: list[Path],
) -> None:
    # No backup: with one, the install itself writes into the state dir and fails as a sync
    # (retried like the tests above); here only the remembered members, saved later, wait.
    proc, status = _start(tmp_path, consul, nginx, backends, daemons, extra="backup = false")
    state_dir = tmp_path / "confpy-state"  # write_config's [state] dir
    assert wait_until(lambda: _remembered_ports(state_dir) == {b.port for b in backends[:2]}, 15), proc.output()
    _mount(mounted, "--bind", str(state_dir), str(state_dir))
    subprocess.run(["mount", "-o", "remount,ro,bind", str(state_dir)], check=True)
    consul.api.register("web", backends[2].port, id="web-3")
    assert settles(nginx, ALL), "the change is installed: only confpy's own files wait"
    assert wait_until(lambda: _retrying(status, "cannot save confpy's state files"), 15), (
        _health(status),
        proc.output(),
    )
    assert "read-only" in _health(status)[1].lower(), _health(status)
    body = json.loads(http_get(f"http://127.0.0.1:{status}/status")[1])
    assert "cannot save confpy's state files" in body["state_save_error"] and body["last_sync_ok"] is True
    assert _remembered_ports(state_dir) == {b.port for b in backends[:2]}
    subprocess.run(["umount", str(state_dir)], check=True)  # writable again: no registry change, no signal
    mounted.clear()
    assert wait_until(lambda: _remembered_ports(state_dir) == {b.port for b in backends}, 30), proc.output()
    assert wait_until(lambda: _health(status)[0] == 200, 10), _health(status)
    assert json.loads(http_get(f"http://127.0.0.1:{status}/status")[1])["state_save_error"] == ""
    assert proc.output().count("cannot save confpy's state files") == 1, "logged once, not per attempt"
    assert "state files saved again after" in proc.output()
    assert proc.proc is not None and proc.proc.poll() is None, "the daemon never stopped"


def test_an_unwritable_state_dir_at_start_up_exits_1_naming_it(
    tmp_path: Path, consul: ConsulUnderTest, nginx: NginxInstance, mounted: list[Path]
) -> None:
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    state_dir = tmp_path / "confpy-state"
    state_dir.mkdir()
    _mount(mounted, "--bind", str(state_dir), str(state_dir))
    subprocess.run(["mount", "-o", "remount,ro,bind", str(state_dir)], check=True)
    proc = ConfpyProcess(config).start()
    assert proc.proc is not None
    code = proc.proc.wait(30)
    proc.stop()
    assert code == 1, proc.output()
    assert str(state_dir) in proc.output(), proc.output()
