"""Installing a cycle's rendered files as one transaction: write, check once, reload once.

Either every changed destination ends up holding its new, nginx-validated bytes and nginx is
reloaded once, or every one of them is restored to its exact previous bytes and nginx is left
alone. The live file holds an unvalidated candidate only while `nginx -t` runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from confpy.apply.files import StateStore, atomic_write, fsync_folder, remove_file
from confpy.apply.nginx import NginxChecker, NginxReloader, ReloadOutcome
from confpy.config import TemplateConfig
from confpy.errors import CheckError, InstallError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """A destination whose rendered bytes differ from what is on disk."""

    template: TemplateConfig
    new: bytes
    old: bytes | None

    @property
    def destination(self) -> Path:
        return self.template.destination


@dataclass(frozen=True)
class ApplyReport:
    """What one transaction installed and how nginx was reloaded."""

    installed: tuple[Path, ...]
    reload: ReloadOutcome


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class PendingBackup:
    """A destination's previous file, saved before it is replaced and put in place as its backup
    while `nginx -t` runs: `link` is that file hard-linked beside the backup (no copy), None when
    it could not be linked (another file system) and `old` is written as a copy instead."""

    target: Path
    old: bytes
    mode: int | None
    link: Path | None

    def finish(self) -> Path | None:
        """`target` := the previous file. Returns a second name of the backup it replaced, for
        `Installer.tidy` to remove later (None when there was none): freeing a file's blocks is the
        costly part of replacing it, and here it would compete with `nginx -t` for the CPU."""
        retired = _second_name(self.target)
        if self.link is not None:
            try:
                os.replace(self.link, self.target)
                return retired
            except OSError:
                self.discard()
        atomic_write(self.target, self.old, self.mode)
        return retired

    def discard(self) -> None:
        if self.link is not None:
            self.link.unlink(missing_ok=True)


def _second_name(path: Path) -> Path | None:
    """Hard-link `path` under a temporary name (one that start-up's leftover sweep removes)."""
    second = path.with_name(f".{path.name}.{secrets.token_hex(4)}.confpy-tmp")
    try:
        os.link(path, second)
    except OSError:  # no file yet, or links refused: the replace frees it at once, as before
        return None
    return second


def save_previous(destination: Path, target: Path, old: bytes, mode: int | None) -> PendingBackup:
    """Hard-link the current file beside `target` (one metadata operation before the file is
    replaced; the rename onto `target` waits for `PendingBackup.finish`)."""
    link = target.with_name(f".{target.name}.confpy-tmp")
    try:
        try:
            os.link(destination, link)
        except FileExistsError:  # left by a crash between the link and its rename
            link.unlink()
            os.link(destination, link)
    except OSError:
        return PendingBackup(target, old, mode, None)
    return PendingBackup(target, old, mode, link)


class Installer:
    """Installs changes atomically, validates with nginx, rolls back or reloads."""

    def __init__(self, checker: NginxChecker, reloader: NginxReloader, state: StateStore) -> None:
        self.checker = checker
        self.reloader = reloader
        self.state = state
        self.retired: list[Path] = []  # replaced backups, still linked: see `tidy`

    async def apply(self, changes: Sequence[Change]) -> ApplyReport:
        """Install `changes`, run the check once, reload once; roll everything back on failure.

        Cancelled (the daemon is stopping) before the reload, it rolls back too: nothing is left
        half-installed.
        """
        written: list[tuple[Change, os.stat_result | None]] = []
        backups: list[PendingBackup] = []
        try:
            self._install(changes, written, backups)
            # Backups are put in place, the renames made durable and nginx's master looked up
            # while `nginx -t` runs (it reads the new files from the page cache already), not
            # before starting it or between it and the reload: these are metadata operations,
            # a folder's fsync is a journal commit and the master's checks read /proc, all off
            # the path of a change. Each file's own bytes were fsynced before its rename.
            await self._check(lambda: self._while_checking(written, backups))
        except (InstallError, CheckError, asyncio.CancelledError) as exc:
            for backup in backups:
                backup.discard()
            self._rollback(written, exc)
            raise
        return ApplyReport(tuple(c.destination for c, _ in written), await self.reloader.reload())

    def _install(
        self,
        changes: Sequence[Change],
        written: list[tuple[Change, os.stat_result | None]],
        backups: list[PendingBackup],
    ) -> None:
        """Save the previous file and atomically replace each destination, noting what was there before."""
        for change in changes:
            old_stat = _stat(change.destination)
            old_mode = stat.S_IMODE(old_stat.st_mode) if old_stat else None
            if change.template.backup and change.old is not None:
                target = self.state.backup_path_for(change.destination)
                backups.append(save_previous(change.destination, target, change.old, old_mode))
            atomic_write(change.destination, change.new, change.template.mode, sync_folder=False)
            written.append((change, old_stat))

    def _while_checking(
        self,
        written: Sequence[tuple[Change, os.stat_result | None]],
        backups: list[PendingBackup],
    ) -> None:
        while backups:
            retired = backups.pop().finish()
            if retired is not None:
                self.retired.append(retired)
        folders = {c.destination.parent: c.destination for c, _ in written}
        for destination in folders.values():
            fsync_folder(destination)
        self.reloader.verify_master()  # kept by the reloader for the signal after the check

    def tidy(self) -> None:
        """Remove the replaced backups' last names (after the reload, when nothing waits on it)."""
        retired, self.retired = self.retired, []
        for path in retired:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove %s, a replaced backup: %s", path, exc.strerror)

    async def _check(self, meanwhile: Callable[[], None]) -> None:
        started = time.monotonic()
        await self.checker.check(meanwhile)
        log.debug("check_cmd passed in %.1f ms", (time.monotonic() - started) * 1000)

    def _rollback(self, written: Sequence[tuple[Change, os.stat_result | None]], cause: BaseException) -> None:
        failures = []
        for change, old_stat in reversed(written):
            try:
                if change.old is None or old_stat is None:
                    remove_file(change.destination)
                else:
                    atomic_write(change.destination, change.old, stat.S_IMODE(old_stat.st_mode))
                    # The old times too: the file is as it was, and nginx's workers must not look
                    # older than it (that would trigger a needless reload at the next start-up).
                    os.utime(change.destination, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
                why = "stopping" if isinstance(cause, asyncio.CancelledError) else type(cause).__name__
                log.warning("restored %s to its previous contents (%s)", change.destination, why)
            except (InstallError, OSError) as exc:
                failures.append(str(exc))
        if failures:
            raise InstallError(f"{cause}; AND restoring the previous files failed: {'; '.join(failures)}") from None
