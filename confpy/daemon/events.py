"""What wakes the daemon's loop: the events on its queue, and the template-file observer that posts some.

Handlers on other threads (watchdog's) and signal handlers only queue an event; the main task
does the work (as gunicorn's arbiter: handlers only queue).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from confpy.registry.base import Dependency

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValueEvent:
    """A watched dependency has a new value."""

    dep: Dependency
    value: object
    index: int
    seen: float


@dataclass(frozen=True)
class FileEvent:
    """Something changed in a template folder."""

    path: Path


@dataclass(frozen=True)
class ReconfigureEvent:
    """SIGHUP: re-read the configuration."""


@dataclass(frozen=True)
class RegistryEvent:
    """The registry answered for the first time, went down, or came back."""


Event = ValueEvent | FileEvent | ReconfigureEvent | RegistryEvent


class _SourceHandler(FileSystemEventHandler):
    """watchdog's thread: hands file events to the loop, nothing else."""

    def __init__(self, post: Callable[[Path], None]) -> None:
        self.post = post

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, event.dest_path):
            if raw:
                self.post(Path(str(raw)))


class TemplateObserver:
    """Watches the template folders (inotify, through watchdog) and queues a FileEvent per change."""

    def __init__(self) -> None:
        self.observer: BaseObserver | None = None

    def start(self, folders: Iterable[Path], events: asyncio.Queue[Event]) -> None:
        loop = asyncio.get_running_loop()
        self.observer = Observer()

        def post(path: Path) -> None:
            loop.call_soon_threadsafe(events.put_nowait, FileEvent(path))

        handler = _SourceHandler(post)
        for folder in sorted(set(folders)):
            if folder.is_dir():
                self.observer.schedule(handler, str(folder), recursive=False)
            else:
                log.warning("template folder %s does not exist; edits there will not be noticed", folder)
        self.observer.start()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()  # its thread is a daemon thread: no join, stopping must be quick
            self.observer = None


def drop_registry_events(events: asyncio.Queue[Event]) -> None:
    """Drop the answers old watches gave (a SIGHUP's new configuration asks anew); keep the rest."""
    kept = []
    while not events.empty():
        event = events.get_nowait()
        if not isinstance(event, (ValueEvent, RegistryEvent)):
            kept.append(event)
    for event in kept:
        events.put_nowait(event)
