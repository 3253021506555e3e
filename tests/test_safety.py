"""Safety: hostile registry data, the bad-input table, crash safety, full disks, locks and secrets."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confpy.apply import files
from confpy.apply import installer as installer_module
from confpy.apply.installer import Change, Installer
from confpy.config import TemplateConfig, load_config
from confpy.dev.lab import BackendServer, ConfpyProcess, NginxInstance, wait_until, write_config
from confpy.errors import CheckError, InstallError, RenderError
from confpy.model import Memory, ServiceInstance, without_unresolvable
from confpy.pipeline import SyncEngine
from confpy.registry.base import CatalogServices, KVTree, ServiceHealth
from confpy.registry.consul import ConsulClient, ConsulRegistry
from confpy.registry.consul_decode import health_view_from_entries
from confpy.render.datasource import DataSource
from confpy.render.renderer import TemplateRenderer

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, installer_for, register_backends, run_confpy
from .tiers import starts_processes

# --- hostile registry values ------------------------------------------------------------------

INJECTION = "10.0.0.1:80; } server { listen 80; location / { return 200 pwned; } } #"
HOSTILE_ADDRESSES = [
    INJECTION,
    "127.0.0.1\n}",
    "127.0.0.1;",
    "$host",
    "a b",
    "exa mple.com",
    "ex{ample}.com",
    "-bad.example",
    "é.example",
    "::ffff:127.0.0.1:80",
    "[::1]",
    "fe80::1%eth0",
    "x" * 10_000,
    "0.0.0.0" if False else "256.1.1.1",
    "127.0.0.1#",
]
HOSTILE_TAGS = ["nginx", "a;b", "}", "x" * 10_000, "line\nbreak", "ünïcode"]
HOSTILE_META = {"note": "a;\n} server { listen 81; }", "max_fails": "2", "uni": "ünïcode", "big": "y" * 512}
HOSTILE_NAMES = ["web; evil", "we{b}", "ünïcödé", "a" * 300, "{};", "x\ny"]

ALLOWED_LINE = re.compile(
    r"^(#.*|upstream [A-Za-z0-9_.-]+ \{|\s+zone [A-Za-z0-9_.-]+ \d+k;|\s+server \S+ weight=\d+( max_fails=\d+)?( fail_timeout=\w+)?;"
    r"|\s+server 127\.0\.0\.1:9 down;  # no passing instance|\s+keepalive 16;|\}|)$"
)


def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError):
        return False


def test_hostile_registrations_never_become_directives(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    api = consul.api
    register_backends(api, backends[:2], tags=HOSTILE_TAGS, Meta={"max_fails": "2"})
    for n, address in enumerate(HOSTILE_ADDRESSES):
        api.register("web", 8000 + n, id=f"evil-addr-{n}", address=address)
    api.register("web", backends[2].port, id="evil-meta", Meta=HOSTILE_META, tags=["nginx"])
    api.register("web", 70000, id="evil-port")
    api.register("web", 8100, id="evil-weight", Weights={"Passing": 1, "Warning": 1}, Meta={"fail_timeout": "1s;evil"})
    api.register("web", backends[0].port, id="v6-mapped", address="::ffff:127.0.0.1")
    for n, name in enumerate(HOSTILE_NAMES):
        api.register(name, backends[0].port, id=f"evil-name-{n}")
    proc = run_confpy("-c", str(config_file), "--once", "--allow-no-reload")
    assert proc.returncode == 0, proc.stderr
    text = nginx.destination.read_text()
    bad = [line for line in text.splitlines() if not ALLOWED_LINE.match(line)]
    assert bad == [], bad
    assert "pwned" not in text and "listen" not in text and "return" not in text
    for n in range(len(HOSTILE_ADDRESSES)):
        assert f"evil-addr-{n}'" in proc.stderr  # each refusal names the instance
    assert "skipped: service name '{};' maps to no valid nginx upstream name" in proc.stderr
    nginx.start()  # nginx accepts the whole configuration...
    assert set(nginx.bodies(12)) == {"App server 1", "App server 2", "App server 3"}  # ...and the valid instances serve


entry_strategy = st.fixed_dictionaries(
    {
        "Node": st.fixed_dictionaries(
            {"Node": st.sampled_from(["n1", "n2"]), "Address": st.sampled_from(["127.0.0.1", "", "::1", "x;y"])}
        ),
        "Service": st.fixed_dictionaries(
            {
                "ID": st.text(min_size=1, max_size=20),
                "Service": st.just("web"),
                "Address": st.one_of(
                    st.just(""),
                    st.ip_addresses().map(str),
                    st.text(max_size=30),
                    st.from_regex(r"\A[a-z][a-z0-9-]{0,10}(\.[a-z]{2,5}){0,2}\Z"),
                ),
                "Port": st.one_of(st.integers(-5, 70000), st.text(max_size=3), st.none()),
                "Tags": st.lists(st.text(max_size=10), max_size=3),
                "Meta": st.dictionaries(
                    st.sampled_from(["max_fails", "fail_timeout", "x"]), st.text(max_size=12), max_size=3
                ),
                "Weights": st.one_of(
                    st.none(), st.fixed_dictionaries({"Passing": st.integers(-2, 300), "Warning": st.just(1)})
                ),
            }
        ),
        "Checks": st.just([]),
    }
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    entries=st.lists(entry_strategy, max_size=6),
    names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=3),
)
def test_any_consul_answer_renders_a_valid_config_or_is_refused(
    tmp_path_factory: pytest.TempPathFactory, entries: list[dict[str, Any]], names: list[str]
) -> None:
    prefix = tmp_path_factory.mktemp("prop")
    nginx = NginxInstance(prefix / "nginx")
    data = DataSource()
    data.set(KVTree("confpy/upstreams/"), ())
    data.set(CatalogServices("nginx"), tuple(sorted(set(names))))
    for name in set(names):
        data.set(ServiceHealth(name, "nginx"), without_unresolvable(health_view_from_entries(name, entries), _resolves))
    renderer = TemplateRenderer(TemplateConfig(source=SHIPPED_TEMPLATE, destination=nginx.destination))
    try:
        result = renderer.render(data, Memory())
    except RenderError as exc:
        assert str(exc).startswith(str(SHIPPED_TEMPLATE))  # refused with file:line
        return
    assert result.content is not None
    nginx.destination.write_bytes(result.content)
    # Every server line is one the template wrote, and nginx accepts the file.
    assert all(ALLOWED_LINE.match(line) for line in result.content.decode().splitlines())
    # `upstream web` is referenced by the lab's server block: give it one when the data had none.
    if b"upstream web {" not in result.content:
        (nginx.conf_d / "web.conf").write_text("upstream web { server 127.0.0.1:9 down; }\n")
    check = subprocess.run(nginx.check_cmd.split(), capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, (check.stderr, result.content.decode())


# --- the bad-input table ----------------------------------------------------------------------


def canned_consul(status: int, body: bytes) -> BackendServer:
    """An endpoint that answers every query the same way, with a Consul index header."""
    return BackendServer(body, status=status, headers={"X-Consul-Index": "5"}).start()


@pytest.fixture
@starts_processes
def canned() -> Iterator[list[BackendServer]]:
    servers: list[BackendServer] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            403,
            b"Permission denied: token lacks service:read",
            "(403 Permission denied: token lacks service:read): check the token",
        ),
        (
            500,
            b"rpc error: No cluster leader",
            "Consul answered the service catalog with 500 rpc error: No cluster leader",
        ),
        (200, b"<html>not consul</html>", "Consul's answer to the service catalog is not valid JSON"),
        (
            200,
            b'["a list, not an object"]',
            "Consul's service catalog has an unexpected shape: expected a JSON object of services, got list",
        ),
        (200, b'{"web": ["nginx"]}' + b" " * 3000, "is larger than max_response_bytes (2048 bytes)"),
    ],
)
def test_consul_errors_are_one_clear_line(
    tmp_path: Path, nginx: NginxInstance, canned: list[BackendServer], status: int, body: bytes, message: str
) -> None:
    server = canned_consul(status, body)
    canned.append(server)
    config = write_config(tmp_path / "c.toml", server.url, nginx, SHIPPED_TEMPLATE)
    config.write_text(config.read_text().replace('timeout = "2s"', 'timeout = "2s"\nmax_response_bytes = 2048'))
    proc = run_confpy("-c", str(config), "--once")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("confpy: error: ") and message in last
    assert not nginx.destination.exists()


def _sync_error(config: Path) -> tuple[int, str]:
    proc = run_confpy("-c", str(config), "--once")
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def test_template_and_destination_errors(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    register_backends(consul.api, backends[:1])
    missing = write_config(tmp_path / "c.toml", consul.url, nginx, tmp_path / "missing.j2")
    proc = run_confpy("-c", str(missing), "--once")  # a configuration error: exit 2 before anything starts
    assert proc.returncode == 2 and f"[template #1] source: template {tmp_path / 'missing.j2'} not found" in proc.stderr
    cases = {
        "binary.j2": (b"\xff\xfe{{ x }}", "binary.j2: cannot read the template"),
        "syntax.j2": (b"a\n{% if %}\n", "syntax.j2:2: template syntax error"),
        "undefined.j2": (b"\n\n{{ nope }}\n", "undefined.j2:3: 'nope' is undefined"),
    }
    for name, (content, message) in cases.items():
        source = tmp_path / name
        if content is not None:
            source.write_bytes(content)
        code, line = _sync_error(write_config(tmp_path / "c.toml", consul.url, nginx, source))
        assert code == 1 and message in line, line
    missing_dir = NginxInstance(tmp_path / "other")
    config = write_config(tmp_path / "c.toml", consul.url, missing_dir, SHIPPED_TEMPLATE)
    config.write_text(
        config.read_text().replace(str(missing_dir.destination), str(tmp_path / "no" / "such" / "dir" / "up.conf"))
    )
    code, line = _sync_error(config)
    assert code == 1 and "the folder" in line and "does not exist; create it or fix the destination" in line
    config.write_text(
        config.read_text().replace(str(tmp_path / "no" / "such" / "dir" / "up.conf"), "/proc/sys/up.conf")
    )
    code, line = _sync_error(config)
    assert code == 1 and "cannot create a file in /proc/sys" in line


def test_nginx_process_and_command_errors(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    register_backends(consul.api, backends[:1])
    base = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE).read_text()

    def run(replace: tuple[str, str], add: str = "") -> tuple[int, str, str]:
        text = base.replace(*replace).replace("[nginx]", "[nginx]\n" + add)
        (tmp_path / "x.toml").write_text(text)
        if nginx.destination.exists():
            nginx.destination.unlink()
        proc = run_confpy("-c", str(tmp_path / "x.toml"), "--once")
        return proc.returncode, proc.stderr.strip().splitlines()[-1], proc.stderr

    code, line, _ = run((nginx.check_cmd, "/nonexistent/nginx -t"))
    assert code == 1 and "command '/nonexistent/nginx' not found; install nginx or fix [nginx] check_cmd" in line
    assert not nginx.destination.exists()  # rolled back: the file did not exist before
    nginx.pid_file.write_text("999999\n")  # a stale PID
    code, line, err = run(("", ""))
    assert code == 3 and "reload skipped: nginx is not running" in err
    nginx.pid_file.write_text(f"{os.getpid()}\n")  # a live process that is not nginx
    code, line, _ = run(("", ""))
    assert code == 3 and f"PID {os.getpid()} is" in line and "not nginx; refusing to signal it" in line
    nginx.pid_file.unlink()
    code, line, _ = run(("", ""), 'reload_cmd = "false"\n')
    assert code == 3 and "reload_cmd `false` failed (exit 1)" in line  # installed (the check passed), not reloaded


def test_a_hanging_check_is_killed_and_rolled_back(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    register_backends(consul.api, backends[:1])
    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    config.write_text(
        config.read_text()
        .replace(nginx.check_cmd, "sleep 30")
        .replace('check_timeout = "10s"', 'check_timeout = "500ms"')
    )
    nginx.destination.write_text("# previous\n")
    started = time.monotonic()
    code, line = _sync_error(config)
    assert code == 1 and "check_cmd `sleep 30` did not finish within 0.5s and was killed" in line
    assert time.monotonic() - started < 20
    assert nginx.destination.read_text() == "# previous\n"


# --- crash safety -----------------------------------------------------------------------------


def test_kill_9_at_any_moment_leaves_a_complete_file(
    consul: ConsulUnderTest, nginx: NginxInstance, tmp_path: Path
) -> None:
    """200 syncs, each killed at a random moment: the destination is always one complete render."""
    api = consul.api
    states = [list(range(8000, 8000 + n * 7, 7)) for n in (5, 40, 120)]  # small, medium and large files

    current: set[int] = set()

    def apply_state(ports: list[int]) -> None:
        for port in current - set(ports):
            api.deregister(f"web-{port}")
        for port in set(ports) - current:
            api.register("web", port, id=f"web-{port}")
        current.clear()
        current.update(ports)

    config = write_config(tmp_path / "c.toml", consul.url, nginx, SHIPPED_TEMPLATE)
    engine = SyncEngine(load_config(config, {}))

    def sync(engine: SyncEngine) -> None:
        async def run() -> None:
            registry = ConsulRegistry(ConsulClient(engine.config.consul))
            try:
                await engine.sync_once(registry)
            finally:
                await registry.close()

        asyncio.run(run())

    renders: set[bytes] = set()
    for ports in states:
        apply_state(ports)
        sync(engine)
        renders.add(nginx.destination.read_bytes())
    assert len(renders) == len(states)
    rng = random.Random(7)
    killed = 0
    for _ in range(200):
        apply_state(rng.choice(states))
        pid = os.fork()
        if pid == 0:  # the child: one sync, as fast as it goes
            try:
                sync(SyncEngine(load_config(config, {})))
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 0.03))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed += os.WIFSIGNALED(status)
        assert nginx.destination.read_bytes() in renders
    assert killed > 50  # most syncs really were interrupted
    check = subprocess.run(nginx.check_cmd.split(), capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    sync(engine)  # the next sync cleans up what the killed ones left
    assert list(nginx.conf_d.glob("*.confpy-tmp")) == []


def test_enospc_while_writing_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "up.conf"
    target.write_bytes(b"old complete file\n")
    real_write = os.write
    calls = [0]

    def failing_write(fd: int, data: Any) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data)[:10])  # a short write first, then the disk is full

    monkeypatch.setattr(files.os, "write", failing_write)
    with pytest.raises(InstallError, match="no space left on the device; the previous file is intact"):
        files.atomic_write(target, b"x" * 100_000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old complete file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["up.conf"]


@pytest.fixture
@starts_processes
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 KB tmpfs (mount(8) and umount(8) are run), or a skip where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root or no permission)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_enospc_on_a_real_tiny_filesystem(tiny_filesystem: Path) -> None:
    target = tiny_filesystem / "up.conf"
    target.write_bytes(b"old\n")
    with pytest.raises(InstallError, match="no space left on the device"):
        files.atomic_write(target, b"y" * 64 * 1024)
    assert target.read_bytes() == b"old\n"
    assert [p.name for p in tiny_filesystem.iterdir()] == ["up.conf"]


def test_corrupt_state_file_is_reported_and_ignored(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:1])
    state = config_file.parent / "confpy-state" / (str(nginx.destination).strip("/").replace("/", "_") + ".json")
    state.parent.mkdir()
    state.write_text("{not json")
    proc = run_confpy("-c", str(config_file), "--once", "--allow-no-reload")
    assert proc.returncode == 0
    assert f"state file {state} is unreadable or corrupt" in proc.stderr
    assert '"members"' in state.read_text()  # rewritten


def test_two_confpy_processes_cannot_interleave(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:1])
    daemon = ConfpyProcess(config_file).start()
    try:
        assert wait_until(lambda: nginx.destination.exists(), 15)
        proc = run_confpy("-c", str(config_file), "--once")
        assert proc.returncode == 1
        assert daemon.proc is not None
        assert f"another confpy process (pid {daemon.proc.pid}) is writing this destination" in proc.stderr
    finally:
        daemon.stop()


def test_the_token_never_appears_in_errors(tmp_path: Path, nginx: NginxInstance, canned: list[BackendServer]) -> None:
    server = canned_consul(403, b"ACL not found")
    canned.append(server)
    config = write_config(tmp_path / "c.toml", server.url, nginx, SHIPPED_TEMPLATE)
    proc = run_confpy("-c", str(config), "--once", "--log-level", "debug", env={"CONSUL_HTTP_TOKEN": "tok-SECRET-456"})
    assert proc.returncode == 1 and "check the token" in proc.stderr
    assert "tok-SECRET-456" not in proc.stderr + proc.stdout


def test_leftover_cleanup_removes_only_confpys_own_temp_files(tmp_path: Path) -> None:
    dest = tmp_path / "up.conf"
    ours = [
        tmp_path / ".up.conf.ab12cd_9.confpy-tmp",
        tmp_path / ".up.conf.bak.confpy-tmp",
        tmp_path / "..up.conf.confpy-state.json.zz99yy88.confpy-tmp",
    ]
    others = [
        tmp_path / ".up.conf.extra.ab12cd_9.confpy-tmp",
        tmp_path / "up.conf",
        tmp_path / ".other.conf.ab12cd_9.confpy-tmp",
    ]
    for path in ours + others:
        path.write_text("x")
    removed = files.remove_leftover_temp_files(
        [dest, tmp_path / "up.conf.bak", tmp_path / ".up.conf.confpy-state.json"]
    )
    assert sorted(removed) == sorted(ours)
    assert all(path.exists() for path in others)


@starts_processes  # the installer runs check_cmd
def _installer(tmp_path: Path, check_cmd: tuple[str, ...]) -> tuple[Installer, TemplateConfig]:
    return installer_for(tmp_path, check_cmd, tmp_path / "none.pid")


def _state_files(installer: Installer) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in installer.state.state_dir.iterdir()}


def test_the_folder_is_synced_while_the_check_runs_and_before_the_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check records that it started, then waits for the folder's fsync to have happened.
    started = tmp_path / "check-started"
    synced = tmp_path / "folder-synced"
    script = f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\nwhile not pathlib.Path({str(synced)!r}).exists(): time.sleep(0.01)\n"
    installer, template = _installer(tmp_path, (sys.executable, "-c", script))
    (tmp_path / "up.conf").write_bytes(b"old\n")
    seen: list[tuple[Path, bool, bytes]] = []

    backup = installer.state.backup_path_for(template.destination)
    backup.write_bytes(b"older\n")
    backups: list[bytes] = []

    def fsync_folder(path: Path) -> None:
        wait_until(started.exists, 10)
        seen.append((path, started.exists(), path.read_bytes()))
        backups.append(backup.read_bytes())
        synced.touch()

    monkeypatch.setattr(installer_module, "fsync_folder", fsync_folder)
    report = asyncio.run(installer.apply([Change(template, b"new\n", b"old\n")]))
    # once, for the destination, with the check already running and the new bytes in place
    assert seen == [(tmp_path / "up.conf", True, b"new\n")]
    assert backups == [b"old\n"]  # the backup was put in place before, while the check ran
    # The backup it replaced keeps a second name until `tidy` (its blocks are not freed while
    # the check runs); no temporary link of the new backup is left.
    (retired,) = installer.retired
    assert retired.parent == backup.parent and _state_files(installer) == {
        backup.name: b"old\n",
        retired.name: b"older\n",
    }
    assert report.installed == (tmp_path / "up.conf",)
    assert not report.reload.reloaded and "nginx is not running" in report.reload.detail
    installer.tidy()
    assert _state_files(installer) == {backup.name: b"old\n"} and installer.retired == []
    # a second name left by a crash before `tidy` matches the pattern that start-up sweeps away
    os.link(backup, retired)
    assert files.remove_leftover_temp_files([backup]) == [retired] and _state_files(installer) == {
        backup.name: b"old\n"
    }


def test_a_first_backup_leaves_nothing_to_tidy(tmp_path: Path) -> None:
    installer, template = _installer(tmp_path, ("true",))
    (tmp_path / "up.conf").write_bytes(b"old\n")
    asyncio.run(installer.apply([Change(template, b"new\n", b"old\n")]))
    backup = installer.state.backup_path_for(template.destination)
    assert installer.retired == [] and _state_files(installer) == {backup.name: b"old\n"}


def test_a_folder_that_cannot_be_synced_stops_the_check_and_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "check-finished"
    script = f"import pathlib, time\ntime.sleep(5)\npathlib.Path({str(marker)!r}).touch()\n"
    installer, template = _installer(tmp_path, (sys.executable, "-c", script))
    (tmp_path / "up.conf").write_bytes(b"old\n")
    real_fsync = files.os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    started = time.monotonic()
    with pytest.raises(InstallError, match=r"up.conf: cannot sync its folder .* to disk \(Input/output error\)"):
        asyncio.run(installer.apply([Change(template, b"new\n", b"old\n")]))
    monkeypatch.undo()
    assert time.monotonic() - started < 4  # the check was killed, not waited for
    assert not marker.exists()
    assert (tmp_path / "up.conf").read_bytes() == b"old\n"
    assert list(_state_files(installer).values()) == [b"old\n"]


def test_a_check_that_cannot_start_leaves_the_backup_as_it_was(tmp_path: Path) -> None:
    installer, template = _installer(tmp_path, (str(tmp_path / "no-such-nginx"), "-t"))
    (tmp_path / "up.conf").write_bytes(b"old\n")
    backup = installer.state.backup_path_for(template.destination)
    backup.write_bytes(b"older\n")
    # a link left by a crash between the link and its rename does not stand in the way
    backup.with_name(f".{backup.name}.confpy-tmp").write_bytes(b"left by a crash\n")
    with pytest.raises(CheckError, match=r"command .*no-such-nginx' not found"):
        asyncio.run(installer.apply([Change(template, b"new\n", b"old\n")]))
    assert (tmp_path / "up.conf").read_bytes() == b"old\n"
    assert _state_files(installer) == {backup.name: b"older\n"}


def test_the_state_stores_encodings_hold_only_what_the_last_save_wrote(tmp_path: Path) -> None:
    """Services that come and go: the cache of their encodings does not keep every name it saw."""
    store = files.StateStore(tmp_path / "state")
    store.prepare()
    destination = tmp_path / "out.conf"
    steady = (ServiceInstance("web", "web-1", "n1", "127.0.0.1", 8001),)
    for n in range(200):
        passing = (ServiceInstance(f"svc{n}", f"svc{n}-1", "n1", "127.0.0.1", 9000 + n),)
        store.save(destination, Memory(members={"web": steady, f"svc{n}": passing}))
    assert set(store._encoded[destination]) == {"web", "svc199"}
    encoded = store._encoded[destination]["web"][1]
    store.save(destination, Memory(members={"web": steady}))
    assert store._encoded[destination]["web"][1] is encoded, "an unchanged service is not encoded again"
    assert '"svc199"' not in store.path_for(destination).read_text()
