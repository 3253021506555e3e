"""The sync pipeline shared by `--once` and the daemon: render, compare, install, check, reload.

Read top to bottom it is the steps of one sync: fetch what the templates need, render every
template, compare with the bytes on disk, and install the changed ones as one transaction.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from confpy.apply.files import StateStore, destination_lock, read_bytes, remove_leftover_temp_files
from confpy.apply.installer import ApplyReport, Change, Installer, backup_path
from confpy.apply.live import LiveSync, LiveUpstream, lua_dir
from confpy.apply.nginx import NginxChecker, NginxReloader
from confpy.config import Config, TemplateConfig
from confpy.consul.client import ConsulClient
from confpy.consul.dependencies import AnyDependency
from confpy.errors import RenderError
from confpy.render.environment import DataSource, Memory, RenderResult, TemplateRenderer
from confpy.render.values import HealthView

log = logging.getLogger(__name__)

# A template may discover new dependencies from the data of earlier ones (e.g. services() then
# service(name) for each name): each round fetches what the previous render found missing.
MAX_RESOLVE_ROUNDS = 10
FETCH_THREADS = 8
LOCK_TIMEOUT = 10.0


@dataclass
class SyncReport:
    """What one sync did."""

    changed: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    diffs: dict[Path, str] = field(default_factory=dict)
    apply: ApplyReport | None = None
    indexes: dict[AnyDependency, int] = field(default_factory=dict)
    pushed: list[str] = field(default_factory=list)


def unified_diff(path: Path, old: bytes | None, new: bytes) -> str:
    """A unified diff between the file on disk and the candidate, for `--dry-run`."""
    old_lines = (old or b"").decode("utf-8", "replace").splitlines(keepends=True)
    new_lines = new.decode("utf-8", "replace").splitlines(keepends=True)
    label_old = str(path) if old is not None else "/dev/null"
    return "".join(difflib.unified_diff(old_lines, new_lines, fromfile=label_old, tofile=str(path)))


class SyncEngine:
    """Everything a sync needs, built once from the configuration."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = StateStore(config.state.dir)
        self.renderers = {
            t.destination: TemplateRenderer(t, {
                "mode": config.nginx.mode,
                "lua_dir": str(lua_dir()),
                "live_listen": config.nginx.live_listen,
                "live_state_file": str(self.state.live_path_for(t.destination)),
            })
            for t in config.templates
        }
        self.installer = Installer(NginxChecker(config.nginx), NginxReloader(config.nginx))
        self.live = LiveSync(config, self.state) if config.nginx.mode == "live" else None
        self.wanted_live: dict[str, LiveUpstream] = {}
        self._wanted_by_template: dict[Path, dict[str, LiveUpstream]] = {}

    @property
    def templates(self) -> Sequence[TemplateConfig]:
        return self.config.templates

    def render(self, template: TemplateConfig, data: DataSource, memory: Memory) -> RenderResult:
        """Render one template (RenderError names file:line)."""
        result = self.renderers[template.destination].render(data, memory)
        if result.live and self.live is None:
            raise RenderError(f"{template.source}: the template calls live_upstream() but [nginx] mode is \"reload\"; set mode = \"live\"")
        return result

    def fetch_all(self, client: ConsulClient, deps: Iterable[AnyDependency], data: DataSource) -> dict[AnyDependency, int]:
        """Fetch each dependency once (no blocking), a few in parallel; store values in `data`."""
        deps = list(deps)
        indexes: dict[AnyDependency, int] = {}
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, max(1, len(deps)))) as pool:
            for dep, (index, value) in zip(deps, pool.map(lambda d: d.fetch(client, 0, None), deps), strict=True):
                data.set(dep, value)
                indexes[dep] = index
                if isinstance(value, HealthView):
                    for rejected in value.rejected:
                        log.warning("left out of the render: %s", rejected)
        return indexes

    def resolve(self, client: ConsulClient, data: DataSource, memories: dict[Path, Memory]) -> tuple[list[RenderResult], dict[AnyDependency, int]]:
        """Render every template, fetching what they call until all renders are complete."""
        indexes: dict[AnyDependency, int] = {}
        for _ in range(MAX_RESOLVE_ROUNDS):
            results = [self.render(t, data, memories[t.destination]) for t in self.templates]
            missing = set().union(*(r.missing for r in results))
            if not missing:
                return results, indexes
            indexes.update(self.fetch_all(client, missing, data))
        raise RenderError(
            f"templates still asked for new data after {MAX_RESOLVE_ROUNDS} rounds of fetching; "
            "does a template derive service names from data without end?"
        )

    @contextmanager
    def locked(self, destinations: Iterable[Path], timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """Hold the locks of `destinations` (in a fixed order, so two processes cannot deadlock)."""
        with ExitStack() as stack:
            for dest in sorted(set(destinations)):
                stack.enter_context(destination_lock(dest, timeout))
                targets = [dest, backup_path(dest), self.state.path_for(dest), self.state.live_path_for(dest)]
                for leftover in remove_leftover_temp_files(targets):
                    log.info("removed %s, left behind by an interrupted write", leftover)
            yield

    def changes(self, results: Sequence[RenderResult]) -> tuple[list[Change], list[Path]]:
        """Split complete renders into changed destinations and unchanged ones."""
        changes: list[Change] = []
        unchanged: list[Path] = []
        for result in results:
            assert result.content is not None
            old = read_bytes(result.template.destination)
            if old == result.content:
                unchanged.append(result.template.destination)
            else:
                changes.append(Change(result.template, result.content, old))
        return changes, unchanged

    def install(self, results: Sequence[RenderResult], memories: dict[Path, Memory], reason: str, check_stale: bool = True) -> SyncReport:
        """Install what changed as one transaction, then remember the members (caller holds the locks).

        With `check_stale`, an unchanged render still reloads nginx once when its workers are older
        than the installed file (a confpy killed between install and reload). The daemon asks for
        this at start-up only: right after its own reload, old workers would look stale.
        """
        report = SyncReport()
        if self.live is not None:
            # The state file first: a reload below, or any later restart, starts from these members.
            self.live.save(results)
            # A cycle may render only some templates: keep the other templates' members.
            for result in results:
                self._wanted_by_template[result.template.destination] = self.live.desired([result])
            self.wanted_live = {name: up for wanted in self._wanted_by_template.values() for name, up in wanted.items()}
        changes, report.unchanged = self.changes(results)
        for path in report.unchanged:
            log.debug("%s: rendered bytes equal the installed file; nothing to do", path)
        if not changes and check_stale:
            destinations = [r.template.destination for r in results]
            if self.installer.reloader.is_stale(destinations):
                outcome = self.installer.reloader.reload()
                report.apply = ApplyReport((), outcome)
                log.info("nginx's workers are older than %s; reloaded once so it serves the current file (%s)",
                         ", ".join(map(str, destinations)), outcome.detail)
        if changes:
            started = time.monotonic()
            report.apply = self.installer.apply(changes)
            report.changed = [c.destination for c in changes]
            took = (time.monotonic() - started) * 1000
            for change in changes:
                log.info("installed %s (%d bytes; %s)", change.destination, len(change.new), reason)
            if report.apply.reload.reloaded:
                log.info("reloaded nginx: %s (%.0f ms after install began)", report.apply.reload.detail, took)
            else:
                log.warning("files installed, reload skipped: %s", report.apply.reload.detail)
        for result in results:
            dest = result.template.destination
            for warning in result.warnings:
                log.warning("%s: %s", dest, warning)
            for dep in result.kept:
                log.warning("%s: %s has no passing instance; keeping its last known members (on_empty = keep)", dest, dep)
        if report.apply is not None and report.apply.reload.reloaded and self.live is not None:
            self.live.forget()  # new workers: ask nginx what it serves before pushing
        try:
            report.pushed = self.push_live()
        finally:
            for result in results:  # after the push, off the critical path: only a restart needs these
                dest = result.template.destination
                if result.memory.members != memories[dest].members:
                    self.state.save(dest, result.memory)
                    memories[dest] = result.memory
        return report

    def push_live(self) -> list[str]:
        """Live mode: push the wanted members to nginx (skipped while nginx is not running)."""
        if self.live is None or not self.wanted_live:
            return []
        if not self.installer.reloader.running():
            log.warning("live members not pushed: nginx is not running (it will load them from the state file)")
            return []
        return self.live.push(self.wanted_live)

    def load_memories(self) -> dict[Path, Memory]:
        return {t.destination: self.state.load(t.destination) for t in self.templates}

    def sync_once(self, client: ConsulClient, dry_run: bool = False) -> SyncReport:
        """The whole one-shot sync; with `dry_run`, only diffs are computed."""
        data = DataSource()
        memories = self.load_memories()
        results, indexes = self.resolve(client, data, memories)
        if dry_run:
            report = SyncReport(indexes=indexes)
            changes, report.unchanged = self.changes(results)
            for change in changes:
                report.changed.append(change.destination)
                report.diffs[change.destination] = unified_diff(change.destination, change.old, change.new)
            if self.live is not None:
                for result in results:
                    if result.live:
                        path = self.live.state_path(result.template.destination)
                        new, old = self.live.state_bytes(result), read_bytes(path)
                        if new != old:
                            report.diffs[path] = unified_diff(path, old, new)
            return report
        with self.locked(t.destination for t in self.templates):
            report = self.install(results, memories, "one-shot sync")
        report.indexes = indexes
        return report
