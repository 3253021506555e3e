"""The Debian package, as an operator meets it (issue 34; docs/operations.md, "Installing on Debian").

`make deb` builds it from this checkout; lintian finds no error or warning; `apt-get install`
installs it; the installed `/usr/bin/confpy` runs with an empty environment, its unit passes
`systemd-analyze verify`, it is enabled, started as installed it reports ready while it waits for
Consul and writes nothing, the shipped configuration is accepted as it is, and `--once` run as the
unit would run it (the configuration's address left to $CONSUL_HTTP_ADDR, the state in
/var/lib/confpy) brings dev-consul's members into a real nginx; `apt-get purge` then leaves
nothing behind. It installs and removes a system package, so it runs as root on Debian only (CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from confpy import __version__

# BackendServer and NginxInstance through conftest, which follows wherever the lab's classes live.
from .conftest import ROOT, BackendServer, ConsulUnderTest, NginxInstance, http_get, register_backends
from .test_wheel import as_toml

DIST = ROOT / "dist"
# systemd's PATH for services (nginx is in /usr/sbin); the bare one of `env -i PATH=/usr/bin:/bin`.
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BARE_PATH = "/usr/bin:/bin"
APT = ("apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300")
CONFIG = Path("/etc/confpy/confpy.toml")
STATE_DIR = Path("/var/lib/confpy")
ENABLED_LINK = Path("/etc/systemd/system/multi-user.target.wants/confpy.service")
# What the package, its unit and its maintainer scripts create, and purge must remove.
LEFT_BEHIND = (Path("/usr/bin/confpy"), Path("/usr/lib/confpy"), Path("/etc/confpy"), STATE_DIR, ENABLED_LINK)


def run(
    command: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False)


def reason_to_skip() -> str:
    """Why this machine cannot run the test, or ''."""
    if os.geteuid() != 0:
        return "installs and purges a Debian package: needs root (CI runs it as root)"
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return "builds and installs a .deb: needs Debian"
    state = (run(["dpkg-query", "-W", "-f=${Status}", "confpy"]).stdout.split() or ["not-installed"])[-1]
    if state != "not-installed" or any(p.exists() or p.is_symlink() for p in LEFT_BEHIND):
        return "this machine has a confpy installed (or its files) that the test's purge would remove"
    return ""


def installed_unit() -> Path:
    listing = run(["dpkg-query", "-L", "confpy"]).stdout.split()
    [unit] = [line for line in listing if line.endswith("/systemd/system/confpy.service")]
    return Path(unit)


def as_the_unit_runs_it(*args: str, consul_url: str) -> subprocess.CompletedProcess[str]:
    """The installed confpy with only what systemd and /etc/default/confpy would give it."""
    env = {"PATH": SERVICE_PATH, "CONSUL_HTTP_ADDR": consul_url, "STATE_DIRECTORY": str(STATE_DIR)}
    return run(["/usr/bin/confpy", *args], env=env, cwd=Path("/"), timeout=60)


def waits_for_consul(config: Path, notify_socket: Path) -> tuple[str, tuple[int, str]]:
    """The installed daemon started as the unit starts it, with nothing answering at its Consul
    address: what it tells systemd with READY=1, and its /health; then stopped with SIGTERM."""
    env = {
        "PATH": SERVICE_PATH,
        "CONSUL_HTTP_ADDR": "http://127.0.0.1:1",  # nothing listens on port 1: refused
        "STATE_DIRECTORY": str(STATE_DIR),
        "NOTIFY_SOCKET": str(notify_socket),
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_socket))
        sock.settimeout(120)  # the unit's TimeoutStartSec
        daemon = subprocess.Popen(["/usr/bin/confpy", "-c", str(config)], env=env, cwd="/", stderr=subprocess.PIPE)
        try:
            message = ""
            while "READY=1" not in message.splitlines():
                message = sock.recv(4096).decode()
            health = http_get("http://127.0.0.1:9118/health")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(10) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
            _, stderr = daemon.communicate(timeout=10)
    status = [line for line in message.splitlines() if line.startswith("STATUS=")]
    return (status[0] if status else stderr.decode(errors="replace")), health


def localized(shipped: dict[str, Any], nginx: NginxInstance) -> dict[str, Any]:
    """The shipped configuration pointed at the test's nginx; the rest (Consul, template) as shipped."""
    assert "address" not in shipped.get("consul", {}), "the address must be left to $CONSUL_HTTP_ADDR"
    [template] = shipped["template"]
    assert template["source"].startswith("builtin:")
    template["destination"] = str(nginx.destination)
    shipped["nginx"].update(pid_file=str(nginx.pid_file), check_cmd=nginx.check_cmd)
    return shipped


def serves(nginx: NginxInstance, expected: set[str], rounds: int = 250) -> bool:
    """Whether requests through nginx reach exactly `expected` (retried while a reload's new
    workers take over; bounded by the number of rounds)."""
    for _ in range(rounds):
        if set(nginx.bodies(2 * len(expected))) == expected:
            return True
        time.sleep(0.02)
    return False


def test_deb_builds_installs_runs_and_purges(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    reason = reason_to_skip()
    if reason:
        pytest.skip(reason)
    build = run(["make", "-C", str(ROOT), "deb", "deb-tools"], timeout=1800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    arch = run(["dpkg", "--print-architecture"]).stdout.strip()
    deb = DIST / f"confpy_{__version__}_{arch}.deb"
    assert deb.is_file(), sorted(p.name for p in DIST.iterdir())

    lint = run(["lintian", "--fail-on", "error,warning", str(deb)], env={**os.environ, "PATH": SERVICE_PATH})
    findings = [line for line in lint.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert lint.returncode == 0 and not findings, (
        "lintian: fix these, or override one with a comment saying why in debian/confpy.lintian-overrides:\n"
        + lint.stdout
        + lint.stderr
    )

    apt_env = {"PATH": SERVICE_PATH, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        install = run([*APT, "install", f"./{deb.name}"], env=apt_env, cwd=DIST, timeout=600)
        assert install.returncode == 0, install.stdout + install.stderr

        version = run(["env", "-i", f"PATH={BARE_PATH}", "/usr/bin/confpy", "--version"], cwd=Path("/"))
        assert (version.returncode, version.stdout.strip()) == (0, f"confpy {__version__}"), version.stderr

        unit = installed_unit()
        assert "ExecStart=/usr/bin/confpy -c /etc/confpy/confpy.toml" in unit.read_text().splitlines()
        verify = run(["systemd-analyze", "verify", str(unit)], env={"PATH": SERVICE_PATH})
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stdout + verify.stderr
        assert ENABLED_LINK.resolve() == unit.resolve(), "enabled on install"
        conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", "confpy"]).stdout
        assert str(CONFIG) in conffiles and "/etc/default/confpy" in conffiles, conffiles

        # Started as installed (Consul not there yet): ready, saying what it waits for; nothing written.
        STATE_DIR.mkdir(mode=0o700)  # as the unit's StateDirectory= does
        destination = Path(tomllib.loads(CONFIG.read_text())["template"][0]["destination"])
        before = destination.read_bytes() if destination.exists() else None
        status, health = waits_for_consul(CONFIG, tmp_path / "notify.sock")
        assert status.startswith("STATUS=waiting for Consul: cannot reach Consul at http://127.0.0.1:1"), status
        assert health[0] == 503 and "Consul" in health[1], health
        assert (destination.read_bytes() if destination.exists() else None) == before

        # The shipped configuration as it is, with only $CONSUL_HTTP_ADDR (/etc/default/confpy): accepted.
        register_backends(consul.api, backends[:2])
        dry = as_the_unit_runs_it("-c", str(CONFIG), "--once", "--dry-run", consul_url=consul.url)
        assert dry.returncode == 0 and "upstream web {" in dry.stdout, dry.stdout + dry.stderr

        # Its copy pointed at the test's nginx: one sync before nginx runs, then a change reloads it.
        config = tmp_path / "confpy.toml"
        config.write_text(as_toml(localized(tomllib.loads(CONFIG.read_text()), nginx)))
        first = as_the_unit_runs_it("-c", str(config), "--once", "--allow-no-reload", consul_url=consul.url)
        assert first.returncode == 0, first.stderr
        nginx.start()
        assert serves(nginx, {"App server 1", "App server 2"})
        consul.api.register("web", backends[2].port, id="web-3")
        second = as_the_unit_runs_it("-c", str(config), "--once", consul_url=consul.url)
        assert second.returncode == 0, second.stderr  # 3 if nginx had not been reloaded
        assert serves(nginx, {"App server 1", "App server 2", "App server 3"})
        assert any(STATE_DIR.iterdir()), "confpy kept its state where the unit puts it"
    finally:
        purge = run([*APT, "purge", "confpy"], env=apt_env, timeout=600)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert [p for p in LEFT_BEHIND if p.exists() or p.is_symlink()] == []
