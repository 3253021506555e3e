"""Running nginx's commands (real child processes) and signalling its master after a check."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from confpy.apply import command
from confpy.apply import nginx as nginx_module
from confpy.apply.installer import Change
from confpy.apply.nginx import NginxReloader, ReloadOutcome
from confpy.config import NginxConfig
from confpy.dev.lab import wait_until

from .conftest import installer_for
from .tiers import starts_processes


@pytest.fixture(params=["pidfd", "asyncio"])
@starts_processes
def child_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a command is watched: through a pidfd, and asyncio's (where pidfds are refused)."""
    if request.param == "asyncio":
        monkeypatch.setattr(command, "pidfds_work", lambda: False)
    else:
        assert command.pidfds_work(), "this kernel refuses pidfds: the pidfd path is untested here"
    return str(request.param)


def test_a_command_gives_its_status_and_both_streams_in_order(child_kind: str) -> None:
    script = "import sys; print('out'); sys.stdout.flush(); print('err', file=sys.stderr); sys.exit(3)"
    status, output = asyncio.run(command.run([sys.executable, "-c", script], 10))
    assert (status, output) == (3, "out\nerr\n")


def test_output_larger_than_a_pipe_does_not_block_the_command(child_kind: str) -> None:
    status, output = asyncio.run(command.run([sys.executable, "-c", "print('x' * 300_000)"], 10))
    assert status == 0 and output == "x" * 300_000 + "\n"


def test_a_command_that_outlives_its_timeout_is_killed(child_kind: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(command.run([sys.executable, "-c", script], 1.0))
    assert time.monotonic() - started < 10
    assert not Path(f"/proc/{pid_file.read_text()}").exists()  # killed and reaped


def test_cancelling_the_caller_kills_the_command(child_kind: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)"

    async def cancel_soon() -> None:
        task = asyncio.create_task(command.run([sys.executable, "-c", script], 60))
        while not pid_file.exists() or not pid_file.read_text():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert not Path(f"/proc/{pid_file.read_text()}").exists()


def test_meanwhile_runs_while_the_command_runs_and_its_failure_kills_it(child_kind: str, tmp_path: Path) -> None:
    started = tmp_path / "started"
    script = f"import pathlib, time; pathlib.Path({str(started)!r}).touch(); time.sleep(30)"

    def meanwhile() -> None:
        deadline = time.monotonic() + 10
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise OSError("the folder could not be synced")

    began = time.monotonic()
    with pytest.raises(OSError, match="could not be synced"):
        asyncio.run(command.run([sys.executable, "-c", script], 60, meanwhile))
    assert started.exists() and time.monotonic() - began < 10


def test_a_missing_command_is_reported_as_such(child_kind: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        asyncio.run(command.run([str(tmp_path / "no-such-nginx"), "-t"], 10))


# --- the master, verified while `nginx -t` runs and signalled through a pidfd after it --------


@pytest.fixture
@starts_processes
def fake_masters(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes that pass for nginx masters (executable named nginx, title "nginx: master
    process"): `sleep` under another name, which a SIGHUP ends, so a signal is plain to see."""
    binary = tmp_path / "nginx"
    sleep = shutil.which("sleep")
    assert sleep is not None
    shutil.copy(sleep, binary)
    masters = [subprocess.Popen(["nginx: master process", "60"], executable=str(binary)) for _ in range(2)]
    yield masters
    for proc in masters:
        proc.kill()
        proc.wait()


def _reloader(pid_file: Path) -> NginxReloader:
    return NginxReloader(NginxConfig(pid_file=pid_file, check_cmd=("true",), check_timeout=10))


def _signalled(proc: subprocess.Popen[bytes]) -> bool:
    try:
        return proc.wait(5) == -signal.SIGHUP
    except subprocess.TimeoutExpired:
        return False


def _pid_file_naming(master: subprocess.Popen[bytes], tmp_path: Path) -> Path:
    """nginx's pid file, naming `master`."""
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text(f"{master.pid}\n")
    return pid_file


def _reload_after_check(
    master: subprocess.Popen[bytes], tmp_path: Path, meanwhile: Callable[[Path], None] = lambda pid_file: None
) -> ReloadOutcome:
    """Verify `master` (as during `nginx -t`), let `meanwhile` happen, then reload."""
    pid_file = _pid_file_naming(master, tmp_path)
    reloader = _reloader(pid_file)
    verified = reloader.verify_master()
    assert verified is not None and verified.pid == master.pid
    try:
        meanwhile(pid_file)
        return asyncio.run(reloader.reload())
    finally:
        reloader.close()


def test_the_verified_master_is_signalled_through_its_pidfd(
    fake_masters: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    first, other = fake_masters
    outcome = _reload_after_check(first, tmp_path)
    assert outcome.reloaded and outcome.detail == f"sent SIGHUP to nginx master {first.pid}"
    assert _signalled(first) and other.poll() is None


def test_a_master_replaced_after_the_check_is_looked_up_again(
    fake_masters: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    first, second = fake_masters

    def upgraded(pid_file: Path) -> None:  # e.g. a binary upgrade while nginx -t ran
        pid_file.write_text(f"{second.pid}\n")

    outcome = _reload_after_check(first, tmp_path, upgraded)
    assert outcome.reloaded and outcome.detail == f"sent SIGHUP to nginx master {second.pid}"
    assert _signalled(second) and first.poll() is None


def test_a_verified_master_that_exited_is_not_running(
    fake_masters: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    first, other = fake_masters

    def exited(pid_file: Path) -> None:  # its PID is free now; the pidfd still names the dead process
        first.kill()
        first.wait()

    outcome = _reload_after_check(first, tmp_path, exited)
    assert not outcome.reloaded and outcome.reason == "not_running"
    assert other.poll() is None


def test_nothing_is_verified_for_a_reload_cmd_or_without_a_master(tmp_path: Path) -> None:
    assert _reloader(tmp_path / "missing.pid").verify_master() is None
    (tmp_path / "garbage.pid").write_text("not a pid\n")
    assert _reloader(tmp_path / "garbage.pid").verify_master() is None  # reload() says why
    with_cmd = NginxReloader(
        NginxConfig(pid_file=tmp_path / "x.pid", check_cmd=("true",), check_timeout=10, reload_cmd=("true",))
    )
    assert with_cmd.verify_master() is None


def _note_lookups(monkeypatch: pytest.MonkeyPatch, note: Callable[[], None]) -> None:
    """Call `note` on every lookup of nginx's master in /proc (then look it up)."""
    real_lookup = nginx_module.nginx_master

    def lookup(path: Path) -> object:
        note()
        return real_lookup(path)

    monkeypatch.setattr(nginx_module, "nginx_master", lookup)


def test_an_install_looks_the_master_up_during_the_check_only(
    fake_masters: list[subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = fake_masters
    pid_file = _pid_file_naming(first, tmp_path)
    running, done = tmp_path / "check-running", tmp_path / "check-done"
    script = (
        f"import pathlib, time\npathlib.Path({str(running)!r}).touch()\ntime.sleep(0.5)\n"
        f"pathlib.Path({str(done)!r}).touch()\n"
    )
    installer, template = installer_for(tmp_path, (sys.executable, "-c", script), pid_file)
    (tmp_path / "up.conf").write_bytes(b"old\n")
    lookups: list[bool] = []

    def during_the_check() -> None:
        assert wait_until(running.exists, 10)
        lookups.append(not done.exists())  # the check is still running

    _note_lookups(monkeypatch, during_the_check)
    report = asyncio.run(installer.apply([Change(template, b"new\n", b"old\n")]))
    assert report.reload.reloaded and _signalled(first)
    assert lookups == [True]  # during the check, and not again between it and the signal
    assert (tmp_path / "up.conf").read_bytes() == b"new\n"


def test_the_master_is_looked_up_again_only_when_the_pid_file_names_another_or_it_exited(
    fake_masters: list[subprocess.Popen[bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = fake_masters
    pid_file = _pid_file_naming(first, tmp_path)
    reloader = _reloader(pid_file)
    lookups: list[Path] = []
    _note_lookups(monkeypatch, lambda: lookups.append(pid_file))
    try:
        kept = reloader.verify_master()
        assert kept is not None and kept.pid == first.pid
        assert reloader.verify_master() is kept and len(lookups) == 1  # nginx keeps its master across reloads
        pid_file.write_text(f"{second.pid}\n")  # e.g. a binary upgrade
        upgraded = reloader.verify_master()
        assert upgraded is not None and upgraded.pid == second.pid and len(lookups) == 2
        second.kill()
        second.wait()  # the pid file still names it (nginx killed, not stopped)
        assert reloader.verify_master() is None and len(lookups) == 3
    finally:
        reloader.close()
