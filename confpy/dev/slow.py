"""Slow downloads through the lab's nginx: long-lived connections that keep old workers draining.

`SlowDownloads` makes a file nginx's worker user can read (a folder of its own under /tmp: the
tests' temporary folders are private to root), a loopback `server` block serving it with
`limit_rate` (pass `server_block()` in NginxInstance's `extra_http`), and a bounded number of
download clients on loopback, each of which stops by itself at the end of its download (or its
deadline). `WorkerGenerations` counts nginx's worker generations the way an operator would see
them (`ps`), independently of confpy.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from confpy.apply.draining import Generation, group_generations, read_workers
from confpy.apply.nginx import nginx_master
from confpy.errors import ReloadError

LOOPBACK = "127.0.0.1"


class SlowDownloads:
    """A `limit_rate` file server in nginx and the clients that download from it."""

    def __init__(self, port: int, *, seconds: float = 12.0, rate: int = 64 * 1024) -> None:
        self.port = port
        self.rate = rate
        self.size = int(seconds * rate)
        self.folder = Path(tempfile.mkdtemp(prefix="confpy-slow-"))
        self.folder.chmod(0o755)
        big = self.folder / "big.bin"
        with open(big, "wb") as out:
            out.truncate(self.size)  # sparse: nginx reads zeros, nothing is written to disk
        big.chmod(0o644)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.completed = 0
        self.failed = 0
        self.running = 0

    @property
    def seconds(self) -> float:
        return self.size / self.rate

    def server_block(self) -> str:
        return (
            f"server {{ listen {LOOPBACK}:{self.port}; access_log off; "
            f"location / {{ root {self.folder}; limit_rate {self.rate}; }} }}"
        )

    def start(self, every: float, for_seconds: float) -> None:
        """Start a download every `every` seconds for `for_seconds` (a thread starts them; at most
        for_seconds / every downloads in all)."""
        starter = threading.Thread(target=self._start_downloads, args=(every, for_seconds), daemon=True)
        starter.start()
        self._threads.append(starter)

    def _start_downloads(self, every: float, for_seconds: float) -> None:
        end = time.monotonic() + for_seconds
        while time.monotonic() < end:
            thread = threading.Thread(target=self._download, daemon=True)
            thread.start()
            with self._lock:
                self._threads.append(thread)
            time.sleep(every)

    def _download(self) -> None:
        deadline = time.monotonic() + self.seconds * 3 + 10
        with self._lock:
            self.running += 1
        received = 0
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=10) as sock:
                sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: slow\r\nConnection: close\r\n\r\n")
                while time.monotonic() < deadline:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += len(chunk)
        except OSError:
            pass
        with self._lock:
            self.running -= 1
            if received >= self.size:
                self.completed += 1
            else:
                self.failed += 1

    def wait(self, timeout: float) -> bool:
        """Wait until every download has ended; False when some still run after `timeout`."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                alive = [t for t in self._threads if t.is_alive()]
            if not alive:
                return True
            if time.monotonic() >= end:
                return False
            alive[0].join(max(0.0, end - time.monotonic()))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def worker_generations(pid_file: Path) -> tuple[Generation, ...]:
    """Every generation of nginx's workers, oldest first (the last one is current): grouped by
    start time, whatever their titles say."""
    try:
        master = nginx_master(pid_file)
        if master is None:
            return ()
        workers = read_workers(master)
    except (ReloadError, psutil.Error):
        return ()
    return group_generations(replace(w, draining=True) for w in workers)


def nginx_rss(pid_file: Path) -> int:
    """The resident memory of nginx's master and all its children, in bytes (0: not running)."""
    try:
        master = nginx_master(pid_file)
        if master is None:
            return 0
        total = 0
        for proc in (master, *master.children()):
            try:
                total += int(proc.memory_info().rss)
            except psutil.Error:
                continue
        return total
    except (ReloadError, psutil.Error):
        return 0


class GenerationSampler:
    """Samples nginx's old worker generations every `interval` in a thread: the most seen at once."""

    def __init__(self, pid_file: Path, interval: float = 0.1) -> None:
        self.pid_file = pid_file
        self.interval = interval
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, old generations, nginx RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GenerationSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            generations = worker_generations(self.pid_file)
            self.samples.append((time.monotonic(), max(0, len(generations) - 1), nginx_rss(self.pid_file)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)

    @property
    def most_draining(self) -> int:
        return max((s[1] for s in self.samples), default=0)
