"""The systemd unit verifies, and the daemon speaks sd_notify (READY, WATCHDOG, STATUS, STOPPING)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from confpy.dev.lab import BackendServer, ConfpyProcess, NginxInstance, wait_until

from .conftest import ROOT, ConsulUnderTest, register_backends

# systemd-analyze and a daemon talking sd_notify over a Unix socket: end-to-end, with no fixture to say so.
pytestmark = pytest.mark.e2e


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "confpy.service").read_text()
    assert "Type=notify" in unit and "Restart=on-failure" in unit and "ProtectSystem=strict" in unit
    lines = [line.strip() for line in unit.splitlines()]
    assert not any(
        line.startswith(("Wants=", "Requires=", "BindsTo=")) and "nginx" in line for line in lines
    )  # never pulls nginx in
    assert any(line.startswith("After=") and "nginx.service" in line for line in lines)
    assert "RestartPreventExitStatus=2" in lines
    assert "EnvironmentFile=-/etc/default/confpy" in lines
    assert "StateDirectory=confpy" in lines
    assert "#LoadCredential=consul-token:/etc/confpy/consul-token" in lines
    for hardening in (
        "SystemCallFilter=@system-service",
        "UMask=0077",
        "RuntimeDirectory=confpy",
        "RuntimeDirectoryMode=0700",
        "RuntimeDirectoryPreserve=yes",
        "PrivateMounts=yes",
    ):
        assert hardening in lines, hardening
    capabilities = next(line for line in lines if line.startswith("CapabilityBoundingSet="))
    assert "CAP_SETUID" not in capabilities and "CAP_NET_BIND_SERVICE" not in capabilities
    # verify insists that ExecStart exists: point it at this checkout's interpreter.
    local = tmp_path / "confpy.service"
    local.write_text(unit.replace("/usr/local/bin/confpy", f"{sys.executable} -m confpy"))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_sd_notify_ready_after_first_sync_and_watchdog(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path, tmp_path: Path
) -> None:
    register_backends(consul.api, backends[:1])
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    proc = ConfpyProcess(config_file, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}).start()
    try:
        messages: list[str] = []
        assert wait_until(
            lambda: messages.append(sock.recv(4096).decode()) or any("READY=1" in m for m in messages), 15
        )
        assert nginx.destination.exists()  # READY comes after the first sync
        assert wait_until(
            lambda: messages.append(sock.recv(4096).decode()) or any("WATCHDOG=1" in m for m in messages), 5
        )
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert wait_until(
            lambda: messages.append(sock.recv(4096).decode()) or any("STOPPING=1" in m for m in messages), 5
        )
        assert proc.proc.wait(5) == 0
    finally:
        proc.stop()
        sock.close()
