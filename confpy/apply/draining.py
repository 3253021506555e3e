"""nginx's draining workers: the old generations a reload leaves behind, and what they hold.

Every reload starts new workers and tells the old ones to finish their requests and exit; until
they do they stay children of the master, titled "nginx: worker process is shutting down", each
holding its memory. Workers are grouped into generations by start time (a reload starts all
workers of a generation within milliseconds).

Memory is each draining worker's USS (unique set size): the pages only that process maps, which
is what the kernel gets back when it exits. RSS would count the code and the shared memory zones
every worker maps (and that stay when a generation exits) once per worker; PSS shares those out
and so still counts part of what stays. USS costs a read of /proc/PID/smaps_rollup per draining
worker, only when draining workers exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from confpy.apply.nginx import nginx_master, process_start_time
from confpy.errors import ReloadError

# Workers of one generation start within milliseconds of each other; reloads are further apart.
GENERATION_GAP = 0.3


@dataclass(frozen=True)
class Worker:
    """One nginx worker as read from the process table."""

    pid: int
    started: float  # Unix time
    draining: bool  # titled "shutting down"
    memory: int = 0  # bytes (USS), read for draining workers only


@dataclass(frozen=True)
class Generation:
    """Draining workers that started together (one reload's leftovers)."""

    started: float  # Unix time of its oldest worker
    workers: int
    memory: int


@dataclass(frozen=True)
class Draining:
    """nginx's draining generations at one moment, oldest first."""

    generations: tuple[Generation, ...] = ()
    sampled_at: float = 0.0  # Unix time

    @property
    def count(self) -> int:
        return len(self.generations)

    @property
    def memory(self) -> int:
        return sum(g.memory for g in self.generations)

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest draining generation started (0 when none drains)."""
        return max(0.0, now - self.generations[0].started) if self.generations else 0.0


def group_generations(workers: Iterable[Worker], reloaded_at: float | None = None) -> tuple[Generation, ...]:
    """The draining generations among `workers`, oldest first.

    A worker is draining when its title says so, or when it started before `reloaded_at` (the last
    reload signal, Unix time) while workers started after it exist: for a moment after a reload
    the old workers have not retitled themselves yet, and they must count at once.
    """
    workers = list(workers)
    newest = max((w.started for w in workers), default=0.0)
    superseded = reloaded_at is not None and newest > reloaded_at
    draining = sorted(
        (w for w in workers if w.draining or (superseded and reloaded_at is not None and w.started < reloaded_at)),
        key=lambda w: w.started,
    )
    groups: list[list[Worker]] = []
    for worker in draining:
        if groups and worker.started - groups[-1][-1].started <= GENERATION_GAP:
            groups[-1].append(worker)
        else:
            groups.append([worker])
    return tuple(Generation(g[0].started, len(g), sum(w.memory for w in g)) for g in groups)


def unique_memory(proc: psutil.Process) -> int:
    """A process's USS in bytes; its RSS where smaps cannot be read (0 when it is gone)."""
    try:
        return int(proc.memory_full_info().uss)
    except psutil.AccessDenied:
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return 0
    except psutil.Error:
        return 0


def children_of(master: psutil.Process) -> list[psutil.Process]:
    """The master's children, from the kernel's own list of them (`/proc/PID/task/PID/children`:
    one small read) where it has one; else through psutil, which reads every process on the
    machine to find them. This runs before every reload, on the path of a change."""
    try:
        listed = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text()
    except OSError:
        return list(master.children())
    children = []
    for pid in listed.split():
        try:
            children.append(psutil.Process(int(pid)))
        except psutil.Error:
            continue  # exited meanwhile
    return children


def read_workers(master: psutil.Process) -> list[Worker]:
    """The master's worker processes (current and draining); those that vanish meanwhile are left out."""
    workers = []
    for child in children_of(master):
        try:
            title = " ".join(child.cmdline())
            if "worker process" not in title:
                continue  # cache manager/loader
            draining = "shutting down" in title
            workers.append(
                Worker(child.pid, process_start_time(child), draining, unique_memory(child) if draining else 0)
            )
        except psutil.Error:
            continue
    return workers


class DrainingReader:
    """Reads nginx's draining generations through the master named in `pid_file`."""

    def __init__(self, pid_file: Path, wall_clock: Callable[[], float]) -> None:
        self.pid_file = pid_file
        self.wall_clock = wall_clock

    def read(self, reloaded_at: float | None = None) -> Draining:
        """Now; nothing drains when nginx is not running or its master cannot be read."""
        now = self.wall_clock()
        try:
            master = nginx_master(self.pid_file)
            if master is None:
                return Draining((), now)
            workers = read_workers(master)
        except (ReloadError, psutil.Error):
            return Draining((), now)
        return Draining(group_generations(workers, reloaded_at), now)
