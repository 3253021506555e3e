"""nginx itself: checking a configuration, finding the master process, reloading it.

Commands run as argument lists (never through a shell), with timeouts, so a hung `nginx -t`
cannot hang confpy.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from confpy.apply import command
from confpy.config import NginxConfig
from confpy.errors import CheckError, ReloadError

log = logging.getLogger(__name__)


async def run_command(
    cmd: Sequence[str],
    timeout: float,
    what: str,
    error: type[CheckError] | type[ReloadError],
    meanwhile: Callable[[], None] | None = None,
) -> str:
    """Run `cmd` (no shell) within `timeout`; its output, or `error` with nginx's own words.

    `meanwhile` runs once the command has started, while it runs (see `command.run`).
    """
    label = " ".join(cmd)
    try:
        status, output = await command.run(cmd, timeout, meanwhile)
    except FileNotFoundError:
        raise error(f"{what} `{label}`: command {cmd[0]!r} not found; install nginx or fix [nginx] {what}") from None
    except PermissionError:
        raise error(f"{what} `{label}`: {cmd[0]!r} is not executable by this user") from None
    except TimeoutError:  # an OSError too: before the clause below
        raise error(f"{what} `{label}` did not finish within {timeout:g}s and was killed") from None
    except OSError as exc:
        # EMFILE, ENOMEM, ENOEXEC (a script without a shebang)...: the command did not run, so the
        # files are unchecked: a failed check (rolled back, retried), never a crash of the daemon.
        raise error(f"{what} `{label}`: cannot start {cmd[0]!r}: {exc.strerror or exc}") from None
    if status != 0:
        raise error(f"{what} `{label}` failed (exit {status}): {summarize_nginx_output(output)}")
    return output


def summarize_nginx_output(output: str) -> str:
    """nginx's own complaint, on one line: its [emerg]/[alert] lines, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    important = [line for line in lines if "[emerg]" in line or "[alert]" in line or "[crit]" in line]
    chosen = important or lines[-2:]
    return " | ".join(chosen) if chosen else "no output"


class NginxChecker:
    """Runs `check_cmd` (`nginx -t`) over the whole configuration."""

    def __init__(self, config: NginxConfig) -> None:
        self.cmd = config.check_cmd
        self.timeout = config.check_timeout

    async def check(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Raise CheckError with nginx's message unless the configuration is valid; `meanwhile` runs
        while the check does (see `run_command`)."""
        await run_command(self.cmd, self.timeout, "check_cmd", CheckError, meanwhile)


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload did: `reloaded`, or not, with the detail and a short reason label.

    Labels (the `reason` of `confpy_reloads_skipped_total`): `not_running` (no live master in the
    pid file), `pid_file` (it names something that is not nginx's master), `signal` (not allowed
    to signal it), `reload_cmd` (the command failed).
    """

    reloaded: bool
    detail: str
    reason: str = ""


def read_master_pid(pid_file: Path) -> int | None:
    """The PID in nginx's pid file, or None when there is no file (nginx is not running)."""
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReloadError(f"{pid_file}: cannot read nginx's pid file: {exc.strerror}") from None
    if not text:
        return None  # `nginx -t` leaves an empty pid file behind when nginx is not running
    if not text.isdigit():
        raise ReloadError(f"{pid_file}: does not hold a PID ({text[:40]!r}); check [nginx] pid_file")
    return int(text)


def nginx_master(pid_file: Path) -> psutil.Process | None:
    """The live nginx master named by `pid_file`; None when nginx is not running (no file, stale PID).

    Raises ReloadError when the PID belongs to something that is not an nginx master, so confpy
    never signals an unrelated process that inherited a stale PID.
    """
    pid = read_master_pid(pid_file)
    if pid is None:
        return None
    try:
        proc = psutil.Process(pid)
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        raise ReloadError(
            f"{pid_file}: not allowed to inspect PID {pid}; run confpy as the user that runs nginx (or root)"
        ) from None
    if "nginx" not in name:  # the executable's name (comm), not its arguments: `python x.py --nginx` is not nginx
        raise ReloadError(f"{pid_file}: PID {pid} is {name!r}, not nginx; refusing to signal it (stale pid file?)")
    if "master process" not in cmdline:
        raise ReloadError(
            f"{pid_file}: PID {pid} is an nginx process but not the master ({cmdline[:80]!r}); check [nginx] pid_file"
        )
    return proc


def workers_started_before(master: psutil.Process, timestamp: float) -> bool:
    """True when any running worker of `master` started before `timestamp` (a file's mtime).

    Such workers cannot have read the file as it is now, so nginx serves a stale configuration.
    Process start times are rounded to clock ticks, hence the small allowance.
    """
    try:
        starts = [process_start_time(child) for child in current_workers(master)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(start < timestamp - 0.02 for start in starts)


def current_workers(master: psutil.Process) -> list[psutil.Process]:
    """The master's workers that serve the current configuration.

    After a reload, old workers stay children of the master while they finish their requests
    ("nginx: worker process is shutting down"); they must not count, or every cycle during a
    graceful shutdown would look stale and reload again.
    """
    workers = []
    for child in master.children():
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "worker process" in title and "shutting down" not in title:
            workers.append(child)
    return workers


def process_start_time(proc: psutil.Process) -> float:
    """A process's start as Unix time, to a clock tick.

    psutil's create_time() adds the start tick to the boot time from /proc/stat, which is whole
    seconds, so it can be off by up to a second; a file written a moment before nginx started
    would look newer than nginx. Boot time derived from /proc/uptime is precise to 10 ms.
    """
    try:
        with open(f"/proc/{proc.pid}/stat", encoding="ascii") as stat_file:
            fields = stat_file.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as uptime_file:
            uptime = float(uptime_file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float(proc.create_time())
    ticks = os.sysconf("SC_CLK_TCK")
    # Field 22 of /proc/PID/stat (starttime) is the 20th after the ")" that closes the command name.
    return time.time() - uptime + int(fields[19]) / ticks


@dataclass(frozen=True)
class VerifiedMaster:
    """nginx's master as found and checked: its PID, and a pidfd that holds on to that very
    process, so a signal sent later reaches it or nothing (no PID reuse can intervene)."""

    pid: int
    pidfd: int

    def alive(self) -> bool:
        """False once the process has exited (its pidfd turns readable, reaped or not)."""
        # poll, not select: past a thousand watches the pidfd's number is above select's 1024
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        os.close(self.pidfd)


class NginxReloader:
    """Reloads nginx with `reload_cmd`, or `reload_signal` to the master named in `pid_file`."""

    def __init__(self, config: NginxConfig) -> None:
        self.config = config
        self._verified: VerifiedMaster | None = None

    def verify_master(self) -> VerifiedMaster | None:
        """Find and check the master ahead of `reload` (the installer calls this while `nginx -t`
        runs), and keep it for `reload`'s signal. None when there is nothing to prepare
        (`reload_cmd`, no usable master, no pidfds): `reload` then finds out for itself. Never
        raises.

        The master found is kept, its pidfd held: nginx keeps its master across reloads, so /proc
        is read again (a few hundred microseconds of CPU that `nginx -t` would share) only when
        the pid file names another process or that one has exited."""
        if self.config.reload_cmd or not command.pidfds_work():
            return None
        kept = self._kept()
        if kept is not None:
            return kept
        self.close()
        try:
            master = nginx_master(self.config.pid_file)
            if master is None:
                return None
            self._verified = VerifiedMaster(master.pid, os.pidfd_open(master.pid))
        except (ReloadError, psutil.Error, OSError):
            return None
        return self._verified

    def _kept(self) -> VerifiedMaster | None:
        """The master `verify_master` kept, while it lives and the pid file still names it."""
        kept = self._verified
        if kept is not None and kept.alive() and self._pid_file_names(kept.pid):
            return kept
        return None

    def close(self) -> None:
        """Let go of the master found by `verify_master`."""
        if self._verified is not None:
            self._verified.close()
            self._verified = None

    async def reload(self) -> ReloadOutcome:
        """Reload nginx; when it cannot be, say why (never raises: the files are installed by then).

        The signal goes through the pidfd of the master `verify_master` kept while the pid file
        still names it; otherwise the master is looked up again."""
        if self.config.reload_cmd:
            try:
                await run_command(self.config.reload_cmd, self.config.reload_timeout, "reload_cmd", ReloadError)
            except ReloadError as exc:
                return ReloadOutcome(False, str(exc), "reload_cmd")
            return ReloadOutcome(True, f"ran {' '.join(self.config.reload_cmd)}")
        kept = self._kept()
        if kept is not None:
            try:
                signal.pidfd_send_signal(kept.pidfd, self.config.reload_signal)
                return self._signalled(kept.pid)
            except ProcessLookupError:
                pass  # it exited since: look again (a new master, or none)
            except PermissionError:
                return self._not_allowed(kept.pid)
        try:
            master = nginx_master(self.config.pid_file)
        except ReloadError as exc:
            return ReloadOutcome(False, str(exc), "pid_file")
        if master is None:
            return ReloadOutcome(
                False, f"nginx is not running (no live master in {self.config.pid_file})", "not_running"
            )
        try:
            os.kill(master.pid, self.config.reload_signal)
        except ProcessLookupError:
            return ReloadOutcome(False, f"nginx master {master.pid} exited before it could be signalled", "not_running")
        except PermissionError:
            return self._not_allowed(master.pid)
        return self._signalled(master.pid)

    def _pid_file_names(self, pid: int) -> bool:
        try:
            return read_master_pid(self.config.pid_file) == pid
        except ReloadError:
            return False

    def _signalled(self, pid: int) -> ReloadOutcome:
        return ReloadOutcome(True, f"sent {signal.Signals(self.config.reload_signal).name} to nginx master {pid}")

    @staticmethod
    def _not_allowed(pid: int) -> ReloadOutcome:
        return ReloadOutcome(
            False, f"not allowed to signal nginx master {pid}; run confpy as root or nginx's user", "signal"
        )

    def worker_pids(self) -> tuple[int, ...]:
        """The PIDs of nginx's current workers (they change when nginx reloads or restarts)."""
        try:
            master = nginx_master(self.config.pid_file)
            return tuple(sorted(child.pid for child in current_workers(master))) if master else ()
        except (ReloadError, psutil.NoSuchProcess, psutil.AccessDenied):
            return ()

    def running(self) -> bool:
        """True when the pid file names a live nginx master."""
        try:
            return nginx_master(self.config.pid_file) is not None
        except ReloadError:
            return False

    def is_stale(self, destinations: Sequence[Path], settle: float = 0.0) -> bool:
        """True when nginx runs with workers older than the newest destination file.

        With `settle`, also when nginx's master was already starting before that file was written
        and no worker started more than `settle` seconds after it: the master reads its files
        before it starts its workers (and writes its pid file), so an nginx that was starting while
        confpy installed may serve the previous file although its workers are newer."""
        if self.config.reload_cmd and not self.config.pid_file.exists():
            return False
        try:
            master = nginx_master(self.config.pid_file)
        except ReloadError:
            return False
        if master is None:
            return False
        mtimes = [p.stat().st_mtime for p in destinations if p.exists()]
        if not mtimes:
            return False
        newest = max(mtimes)
        if workers_started_before(master, newest):
            return True
        if not settle:
            return False
        try:
            started_first = process_start_time(master) < newest - 0.02
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return started_first and workers_started_before(master, newest + settle)


@dataclass(frozen=True)
class NginxLayout:
    """How `check_cmd` runs nginx: its binary, main configuration file, prefix and extra flags."""

    binary: str
    main: Path
    prefix: str
    extra: tuple[str, ...]


async def nginx_layout(check_cmd: Sequence[str], timeout: float) -> NginxLayout:
    """Read `-c`, `-p` and `-g` from check_cmd; what it leaves out, from `nginx -V` (compiled-in paths)."""
    binary = check_cmd[0]
    if "nginx" not in Path(binary).name:
        raise CheckError(
            f"--dry-run asks nginx about a staged copy of its configuration, but check_cmd `{' '.join(check_cmd)}` "
            "does not run nginx itself; run the check by hand"
        )
    main = prefix = ""
    extra: list[str] = []
    args = list(check_cmd[1:])
    for i, arg in enumerate(args):
        if arg == "-c" and i + 1 < len(args):
            main = args[i + 1]
        elif arg == "-p" and i + 1 < len(args):
            prefix = args[i + 1]
        elif arg == "-g" and i + 1 < len(args):
            extra += ["-g", args[i + 1]]
    if not main or not prefix:
        built = await run_command([binary, "-V"], timeout, "check_cmd", CheckError)
        options = dict(part.split("=", 1) for part in built.split() if part.startswith("--") and "=" in part)
        prefix = prefix or options.get("--prefix", "/usr/share/nginx")
        main = main or options.get("--conf-path", "conf/nginx.conf")
    main_path = Path(main) if Path(main).is_absolute() else Path(prefix) / main
    return NginxLayout(binary, main_path, prefix, tuple(extra))


async def check_candidates(config: NginxConfig, candidates: Mapping[Path, bytes]) -> str:
    """Ask nginx whether it would accept `candidates` (destination -> new bytes), touching nothing live.

    The folder of nginx's main configuration is copied to a temporary place, the candidates are
    put where their destinations are, every absolute path into that folder (and every destination
    path) is pointed at the copy, and nginx checks the copy. Its messages name the live paths.
    """
    layout = await nginx_layout(config.check_cmd, config.check_timeout)
    root = layout.main.parent
    with tempfile.TemporaryDirectory(prefix="confpy-dry-run.") as tmp:
        stage = Path(tmp) / "conf"
        try:
            shutil.copytree(root, stage, symlinks=False, ignore_dangling_symlinks=True)
        except (OSError, shutil.Error) as exc:
            raise CheckError(f"--dry-run cannot copy nginx's configuration folder {root}: {exc}") from None
        mapping: dict[str, str] = {}
        for number, (destination, data) in enumerate(sorted(candidates.items())):
            try:
                staged = stage / destination.relative_to(root)
            except ValueError:
                staged = Path(tmp) / f"outside-{number}" / destination.name
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.write_bytes(data)
            mapping[str(destination)] = str(staged)
        mapping[f"{root}/"] = f"{stage}/"
        _point_at_stage(stage, mapping)
        cmd = [layout.binary, "-t", "-p", layout.prefix, "-c", str(stage / layout.main.name), *layout.extra]
        try:
            output = await run_command(cmd, config.check_timeout, "check_cmd", CheckError)
        except CheckError as exc:
            raise CheckError(_unstage(str(exc), mapping)) from None
        return _unstage(output, mapping)


def _point_at_stage(stage: Path, mapping: Mapping[str, str]) -> None:
    ordered = sorted(mapping.items(), key=lambda item: -len(item[0]))  # a destination before its folder
    for path in stage.rglob("*"):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # not a text file nginx includes
        new = text
        for live, staged in ordered:
            new = new.replace(live, staged)
        if new != text:
            path.write_text(new, encoding="utf-8")


def _unstage(text: str, mapping: Mapping[str, str]) -> str:
    for live, staged in sorted(mapping.items(), key=lambda item: -len(item[1])):
        text = text.replace(staged, live)
    return text
