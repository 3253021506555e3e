"""Files on disk: atomic replacement, per-destination locks, and the remembered-members state.

A destination is only ever replaced by rename(2) of a fully written, fsynced temporary file in
the same folder, so a crash at any moment leaves either the complete old or the complete new file.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from confpy.errors import InstallError, LockError
from confpy.model import Memory, ServiceInstance

log = logging.getLogger(__name__)

DEFAULT_MODE = 0o644


def read_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"{path}: cannot read the current file: {exc.strerror}") from None


class KnownFiles:
    """The bytes of files confpy itself compared or wrote last, so a change compares its render
    with memory instead of reading the whole file again.

    A file is read again only when its stat (inode, size, modification and change times) differs
    from when it was noted: someone else wrote it. `bytes_read` and `bytes_written` count the disk
    traffic, so tests can see that a change's cost does not grow with the file.
    """

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int, int, int], bytes]] = {}
        self.bytes_read = 0
        self.bytes_written = 0

    @staticmethod
    def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def read(self, path: Path) -> bytes | None:
        """As `read_bytes`, from memory while the file is as confpy last saw it."""
        key = self._stat_key(path)
        known = self._known.get(path)
        if key is not None and known is not None and known[0] == key:
            return known[1]
        data = read_bytes(path)
        if data is not None:
            self.bytes_read += len(data)
            self.note(path, data)
        else:
            self._known.pop(path, None)
        return data

    def note(self, path: Path, data: bytes) -> None:
        """`path` now holds `data` (confpy just wrote or read it)."""
        key = self._stat_key(path)
        if key is None:
            self._known.pop(path, None)
        else:
            self._known[path] = (key, data)

    def forget(self, path: Path) -> None:
        self._known.pop(path, None)

    def write(self, path: Path, data: bytes, mode: int | None = None) -> None:
        """`atomic_write`, then remember the bytes."""
        atomic_write(path, data, mode)
        self.bytes_written += len(data)
        self.note(path, data)


def _explain(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOENT and path.parent.is_dir():
        return f"{path}: cannot create a file in {path.parent} ({exc.strerror}); is it a writable file system?"
    if exc.errno == errno.ENOENT:
        return f"{path}: the folder {path.parent} does not exist; create it or fix the destination"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: the folder {path.parent} is not writable by this user ({exc.strerror})"
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; the previous file is intact"
    if exc.errno == errno.EDQUOT:
        return f"{path}: disk quota exceeded; the previous file is intact"
    return f"{path}: cannot write ({exc.strerror}); the previous file is intact"


def ensure_writable(path: Path) -> None:
    """InstallError unless `path` could be written (its folder exists and is writable)."""
    if not path.parent.is_dir():
        raise InstallError(f"{path}: the folder {path.parent} does not exist; create it or fix the destination")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InstallError(f"{path}: not writable by this user")


def current_mode(path: Path) -> int | None:
    """The permission bits of an existing file, or None."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


def _fsync_folder(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fsync_folder(path: Path) -> None:
    """Make the renames into `path`'s folder durable (after `atomic_write(..., sync_folder=False)`)."""
    folder = write_target(path).parent
    try:
        _fsync_folder(folder)
    except OSError as exc:
        raise InstallError(f"{path}: cannot sync its folder {folder} to disk ({exc.strerror})") from None


def _write_all(fd: int, pieces: Iterable[bytes], block: int = 65536) -> None:
    """Write every piece, gathered into blocks of about `block` bytes (one write per block)."""
    pending = bytearray()
    for piece in pieces:
        pending += piece
        if len(pending) >= block:
            _write_block(fd, pending)
            pending.clear()
    _write_block(fd, pending)


def _write_block(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_target(path: Path) -> Path:
    """The file a write to `path` replaces: `path` itself, or, when it is a symbolic link (a
    `sites-enabled/x -> ../sites-available/x` layout), the file it points to, so the link stays a
    link and the rename happens beside the real file (atomic in its folder)."""
    if not path.is_symlink():
        return path
    return Path(os.path.realpath(path))


def atomic_write(
    path: Path, data: bytes | Iterable[bytes], mode: int | None = None, *, sync_folder: bool = True
) -> None:
    """Replace `path` with `data` (bytes, or pieces written in turn) by rename; on any error the
    old file is left as it was.

    The temporary file lives in the destination's folder (rename is atomic only within one file
    system), is fsynced before the rename, and the folder is fsynced after it so the rename
    itself survives a power cut. With `sync_folder=False` the caller calls `fsync_folder` itself
    (the installer does it while `nginx -t` runs, before any reload).
    """
    path = write_target(path)
    final_mode = mode if mode is not None else (current_mode(path) or DEFAULT_MODE)
    tmp_name: str | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".confpy-tmp", dir=path.parent)
        try:
            _write_all(fd, [data] if isinstance(data, bytes) else data)
            os.fchmod(fd, final_mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_name, path)
        tmp_name = None
        if sync_folder:
            _fsync_folder(path.parent)
    except OSError as exc:
        raise InstallError(_explain(path, exc)) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def remove_file(path: Path) -> None:
    """Remove a file we installed (used to roll back a destination that did not exist before)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InstallError(f"{path}: cannot remove the rejected file: {exc.strerror}") from None


def remove_leftover_temp_files(targets: Iterable[Path]) -> list[Path]:
    """Remove the temporary files a killed confpy left for `targets` (call with their lock held).

    atomic_write names them `.NAME.XXXXXXXX.confpy-tmp` (mkstemp's 8 random characters) and a
    backup link is `.NAME.confpy-tmp`; other files in the folder are never touched.
    """
    removed = []
    for target in targets:
        pattern = re.compile(rf"^\.{re.escape(target.name)}(\.[A-Za-z0-9_]{{8}})?\.confpy-tmp$")
        try:
            candidates = [p for p in target.parent.iterdir() if pattern.match(p.name)]
        except OSError:
            continue
        for leftover in candidates:
            try:
                leftover.unlink()
                removed.append(leftover)
            except OSError:
                pass
    return removed


def check_private_folder(folder: Path, what: str) -> None:
    """A folder confpy keeps its own files in (backups, locks, the live state nginx's master loads as
    root): InstallError when every user may write in it (anyone could plant a file or a link there),
    a warning when its group may."""
    try:
        mode = stat.S_IMODE(folder.stat().st_mode)
    except OSError as exc:
        raise InstallError(f"{folder}: cannot inspect {what}: {exc.strerror}") from None
    if mode & stat.S_IWOTH:
        raise InstallError(
            f"{folder}: {what} is writable by every user (mode {mode:04o}); anyone could replace confpy's files "
            f"there: chmod o-w {folder} (0755 or 0700), or set [state] dir to a folder of confpy's own"
        )
    if mode & stat.S_IWGRP:
        log.warning(
            "%s: %s is writable by its group (mode %04o); members of that group can replace confpy's files: "
            "chmod g-w %s unless that is intended",
            folder,
            what,
            mode,
            folder,
        )


class DestinationLock:
    """An exclusive flock for one destination, held for as long as a confpy process writes it.

    The lock file records the holder's PID so the error can name it.
    """

    def __init__(self, destination: Path, path: Path) -> None:
        self.destination = destination
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (never blocks)."""
        if self._fd is None:
            try:
                # O_NOFOLLOW: a symbolic link planted in the state folder must not make confpy (root)
                # truncate and write whatever file it points to.
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InstallError(
                        f"{self.path}: the lock file is a symbolic link; refusing to follow it (remove it)"
                    ) from None
                raise InstallError(_explain(self.path, exc)) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        return True

    def holder(self) -> str:
        if self._fd is None:
            return "unknown"
        return os.pread(self._fd, 32, 0).decode("ascii", "replace").strip() or "unknown"

    def busy_error(self, waited: float) -> LockError:
        return LockError(
            f"{self.destination}: another confpy process (pid {self.holder()}) is writing this destination; "
            f"waited {waited:g}s for its lock {self.path}"
        )

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@asynccontextmanager
async def destination_locks(locks: Iterable[DestinationLock], timeout: float) -> AsyncIterator[None]:
    """Hold `locks` (taken in a fixed order, so two processes cannot deadlock).

    flock has no timeout and must not block the event loop: a held lock is retried every 50 ms
    until `timeout`, then LockError names the holder.
    """
    locks = sorted(locks, key=lambda lock: lock.destination)
    try:
        for lock in locks:
            deadline = time.monotonic() + timeout
            while not lock.try_acquire():
                if time.monotonic() >= deadline:
                    raise lock.busy_error(timeout)
                await asyncio.sleep(0.05)
        yield
    finally:
        for lock in locks:
            lock.release()


class StateStore:
    """confpy's own files, all in the state directory, never beside a destination.

    nginx includes whole folders (`sites-enabled/*`, `conf.d/*.conf`): a backup or lock file beside
    a destination would be read as configuration. Per destination there are its backup
    (`FLAT.bak`), its lock (`FLAT.lock`), its remembered members (`FLAT.json`) and in live mode its
    member state (`FLAT.live.json`), FLAT being the destination's path with `/` turned into `_`.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        # Each service's members as JSON, reused while the member tuple is the same object: a
        # change to one service of a thousand re-encodes one service, not the whole catalog.
        # Per destination, only what its last save wrote: a service gone from it is dropped
        # (kept, a fleet whose services come and go grew this with every name it ever had).
        self._encoded: dict[Path, dict[str, tuple[tuple[ServiceInstance, ...], bytes]]] = {}

    def _flat(self, destination: Path) -> str:
        return str(destination).strip("/").replace("/", "_")

    def path_for(self, destination: Path) -> Path:
        """The remembered members (`on_empty = "keep"`)."""
        return self.state_dir / f"{self._flat(destination)}.json"

    def live_path_for(self, destination: Path) -> Path:
        """The live-mode member state file that nginx loads at start and reload."""
        return self.state_dir / f"{self._flat(destination)}.live.json"

    def backup_path_for(self, destination: Path) -> Path:
        """The destination's previous bytes (`backup = true`)."""
        return self.state_dir / f"{self._flat(destination)}.bak"

    def lock_for(self, destination: Path) -> DestinationLock:
        return DestinationLock(destination, self.state_dir / f"{self._flat(destination)}.lock")

    def own_files(self, destination: Path) -> list[Path]:
        return [self.path_for(destination), self.live_path_for(destination), self.backup_path_for(destination)]

    def prepare(self) -> None:
        """Create the state directory (InstallError says why it cannot be)."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        except OSError as exc:
            raise InstallError(
                f"{self.state_dir}: cannot create the state directory ({exc.strerror}); set [state] dir to a writable folder"
            ) from None
        if not os.access(self.state_dir, os.W_OK):
            raise InstallError(f"{self.state_dir}: the state directory is not writable by this user; set [state] dir")
        check_private_folder(self.state_dir, "the state directory ([state] dir)")

    def migrate(self, destination: Path) -> list[str]:
        """Move what confpy 0.1 kept beside `destination` into the state directory (once).

        0.1 wrote `.NAME.confpy-state.json`, `.NAME.live.json`, `NAME.bak` and `.NAME.confpy.lock`
        next to the destination. Returns what it did, for the log.
        """
        done = []
        old_new = [
            (destination.parent / f".{destination.name}.confpy-state.json", self.path_for(destination)),
            (destination.parent / f".{destination.name}.live.json", self.live_path_for(destination)),
            (destination.with_name(destination.name + ".bak"), self.backup_path_for(destination)),
        ]
        for old, new in old_new:
            if not old.is_file():
                continue
            try:
                if not new.exists():
                    data = old.read_bytes()
                    atomic_write(new, data, 0o644)
                    done.append(f"moved {old} to {new}")
                else:
                    done.append(f"removed {old} ({new} is newer)")
                old.unlink()
            except (OSError, InstallError) as exc:
                done.append(f"could not move {old}: {exc}")
        stale_lock = destination.parent / f".{destination.name}.confpy.lock"
        if stale_lock.is_file():
            try:
                stale_lock.unlink()
                done.append(f"removed {stale_lock} (locks are in {self.state_dir} now)")
            except OSError as exc:
                done.append(f"could not remove {stale_lock}: {exc.strerror}")
        return done

    def load(self, destination: Path) -> Memory:
        """Read the remembered members; a missing file is empty, a corrupt one is reported and ignored."""
        path = self.path_for(destination)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            members = {
                str(key): tuple(ServiceInstance.from_json(item) for item in items)
                for key, items in raw["members"].items()
            }
        except FileNotFoundError:
            return Memory()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("state file %s is unreadable or corrupt (%s); ignoring it, it will be rewritten", path, exc)
            return Memory()
        return Memory(members=members)

    def save(self, destination: Path, memory: Memory) -> None:
        """Write the remembered members atomically.

        Written piece by piece from each service's cached encoding: at a thousand services the
        file is megabytes, and building it whole on every save raised the daemon's memory."""
        path = self.path_for(destination)
        parts = [b'{"destination":' + json.dumps(str(destination)).encode() + b',"members":{']
        previous = self._encoded.get(destination, {})
        encodings: dict[str, tuple[tuple[ServiceInstance, ...], bytes]] = {}
        for number, (key, items) in enumerate(sorted(memory.members.items())):
            cached = previous.get(key)
            if cached is None or cached[0] is not items:
                encoded = json.dumps([i.to_json() for i in items], sort_keys=True, separators=(",", ":")).encode()
                cached = (items, encoded)
            encodings[key] = cached
            parts.append(b"," if number else b"")
            parts.append(json.dumps(key).encode() + b":")
            parts.append(cached[1])
        parts.append(b'},"version":1}\n')
        self._encoded[destination] = encodings
        atomic_write(path, parts, 0o644)
