"""The daemon is always stoppable: SIGTERM/SIGINT end it with exit 0 within 2 s in every state.

Each test puts a real daemon in one state, signals it and measures how long it takes to exit.
The measured figures are printed (pytest -s shows them) and asserted against 2 s.
"""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

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

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, dev_consul_only, register_backends

STOP_LIMIT = 2.0


def stop_time(proc: ConfpyProcess, sig: int = signal.SIGTERM) -> tuple[int, float]:
    """Send `sig`; return (exit code, seconds until the process exited)."""
    assert proc.proc is not None and proc.proc.poll() is None, proc.output()
    started = time.monotonic()
    proc.proc.send_signal(sig)
    code = proc.proc.wait(timeout=15)
    took = time.monotonic() - started
    print(f"stopped by {signal.Signals(sig).name} in {took * 1000:.0f} ms")
    return code, took


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_while_consul_refuses_connections_at_start_up(
    nginx: NginxInstance, tmp_path: Path, daemons: list[ConfpyProcess], sig: int
) -> None:
    config = write_config(tmp_path / "c.toml", f"http://127.0.0.1:{free_port()}", nginx, SHIPPED_TEMPLATE)
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    assert wait_until(lambda: "Consul unavailable since" in proc.output(), 15), proc.output()
    time.sleep(0.5)  # in the middle of its backoff
    code, took = stop_time(proc, sig)
    assert code == 0 and took < STOP_LIMIT, proc.output()
    assert "stopped" in proc.output()


@dev_consul_only
def test_stops_while_consul_accepts_and_never_answers(
    nginx: NginxInstance, tmp_path: Path, daemons: list[ConfpyProcess], hung_port: int
) -> None:
    config = write_config(tmp_path / "c.toml", f"http://127.0.0.1:{hung_port}", nginx, SHIPPED_TEMPLATE)
    proc = ConfpyProcess(config, args=["--log-level", "debug"]).start()
    daemons.append(proc)
    # Its first query is blocked on a connection nobody answers (the timeout is 2 s).
    assert wait_until(lambda: _connected_to(proc, hung_port), 10), proc.output()
    code, took = stop_time(proc)
    assert code == 0 and took < STOP_LIMIT, proc.output()


def _connected_to(proc: ConfpyProcess, port: int) -> bool:
    assert proc.proc is not None
    try:
        return any(c.raddr and c.raddr[1] == port for c in psutil.Process(proc.proc.pid).net_connections("tcp"))
    except psutil.Error:
        return False


def test_stops_in_the_middle_of_a_blocking_query(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    config_file: Path,
    daemons: list[ConfpyProcess],
) -> None:
    register_backends(consul.api, backends[:1])
    proc = ConfpyProcess(config_file).start()
    daemons.append(proc)
    assert wait_until(nginx.destination.exists, 15), proc.output()
    time.sleep(0.3)  # its watches are now blocked in long polls (wait = 60s)
    code, took = stop_time(proc)
    assert code == 0 and took < STOP_LIMIT, proc.output()


def test_stops_during_nginx_check_and_rolls_back(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    register_backends(consul.api, backends[:1])
    marker = tmp_path / "check-started"
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    # A check that takes 30 s: the daemon is stopped while it runs.
    script = tmp_path / "slow-check.sh"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 30\n")
    script.chmod(0o755)
    config.write_text(
        config.read_text()
        .replace(f'check_cmd = "{nginx.check_cmd}"', f'check_cmd = "{script}"')
        .replace('check_timeout = "10s"', 'check_timeout = "60s"')
    )
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    assert wait_until(marker.exists, 15), proc.output()
    assert nginx.destination.exists()  # the candidate is installed while the check runs
    code, took = stop_time(proc)
    assert code == 0 and took < STOP_LIMIT, proc.output()
    assert not nginx.destination.exists(), "an interrupted install must be rolled back"
    assert "restored" in proc.output() and "(stopping)" in proc.output()
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "30"]]


@dev_consul_only
def test_stops_after_a_sighup_whose_reload_waits_on_consul(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    dev = DevConsulProcess().start()
    try:
        register_backends(ConsulAPI(dev.url), backends[:1])
        config = write_config(tmp_path / "c.toml", dev.url, nginx, SHIPPED_TEMPLATE)
        proc = ConfpyProcess(config).start()
        daemons.append(proc)
        assert wait_until(nginx.destination.exists, 15), proc.output()
        dev.kill()
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "SIGHUP: re-read" in proc.output(), 10), proc.output()
        assert wait_until(lambda: "Consul unavailable since" in proc.output(), 10), proc.output()
        code, took = stop_time(proc)
        assert code == 0 and took < STOP_LIMIT, proc.output()
    finally:
        dev.stop()


@dev_consul_only
def test_consul_down_at_start_up_is_ready_with_the_reason_then_syncs_when_it_comes_up(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    port = free_port()
    config = write_config(tmp_path / "c.toml", f"http://127.0.0.1:{port}", nginx, SHIPPED_TEMPLATE)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    proc = ConfpyProcess(config, env={"NOTIFY_SOCKET": str(sock_path)}).start()
    daemons.append(proc)
    messages: list[str] = []
    try:
        assert wait_until(
            lambda: messages.append(sock.recv(4096).decode()) or any("READY=1" in m for m in messages), 15
        )
        ready = next(m for m in messages if "READY=1" in m)
        assert "STATUS=waiting for Consul: cannot reach Consul at" in ready and "connection refused" in ready, ready
        assert not nginx.destination.exists()
        dev = DevConsulProcess(port).start()
        try:
            register_backends(ConsulAPI(dev.url), backends[:1])
            assert wait_until(nginx.destination.exists, 20), proc.output()  # no restart needed
            assert proc.proc is not None and proc.proc.poll() is None
            assert wait_until(
                lambda: messages.append(sock.recv(4096).decode()) or any("STATUS=in sync" in m for m in messages), 10
            )
            assert "Consul is back" in proc.output()
            nginx.start()
            assert set(nginx.bodies(3)) == {"App server 1"}
        finally:
            dev.stop()
    finally:
        sock.close()
