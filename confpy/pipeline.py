"""The sync pipeline shared by `--once` and the daemon: render, compare, install, check, reload.

Read top to bottom it is the steps of one sync: fetch what the templates need, render every
template, compare with the bytes on disk, and install the changed ones as one transaction.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from confpy.apply.files import (
    KnownFiles,
    StateStore,
    destination_locks,
    ensure_writable,
    read_bytes,
    remove_leftover_temp_files,
)
from confpy.apply.installer import ApplyReport, Change, Installer
from confpy.apply.live import LiveHooks, LiveStatus, LiveSupervisor, lua_dir, state_bytes
from confpy.apply.nginx import NginxChecker, NginxReloader, ReloadOutcome, check_candidates
from confpy.config import Config, TemplateConfig
from confpy.errors import CheckError, InstallError, RenderError
from confpy.guard import decide, remembered_view, service_label, strictest
from confpy.model import HealthView, Memory
from confpy.registry.base import AnyDependency, Registry, ServiceHealth
from confpy.render.datasource import DataSource
from confpy.render.quarantine import Culprit, Quarantined, find_culprits, installed_holders
from confpy.render.renderer import RenderResult, TemplateRenderer
from confpy.timer import Timer

log = logging.getLogger(__name__)

# A template may discover new dependencies from the data of earlier ones (e.g. services() then
# service(name) for each name): each round fetches what the previous render found missing.
MAX_RESOLVE_ROUNDS = 10
FETCH_CONCURRENCY = 32
LOCK_TIMEOUT = 10.0
# nginx -t names one error at a time: a sync leaves out at most this many refused upstreams, one
# check each, before it fails as a whole (the next sync goes on from there).
MAX_QUARANTINE_ROUNDS = 16

Rerender = Callable[[TemplateConfig], "RenderResult | None"]


@dataclass
class SyncReport:
    """What one sync did."""

    changed: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    diffs: dict[Path, str] = field(default_factory=dict)
    apply: ApplyReport | None = None
    indexes: dict[AnyDependency, int] = field(default_factory=dict)
    pushed: list[str] = field(default_factory=list)
    check_output: str = ""
    held: list[str] = field(default_factory=list)  # drops the shrink guard did not apply (--once)
    # The renders installed: those given, or their renders again without the services nginx refused.
    results: list[RenderResult] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)

    @property
    def not_reloaded(self) -> ReloadOutcome | None:
        """Files were installed (or found newer than nginx's workers) but nginx was not reloaded."""
        if self.apply is not None and not self.apply.reload.reloaded:
            return self.apply.reload
        return None


def unified_diff(path: Path, old: bytes | None, new: bytes) -> str:
    """A unified diff between the file on disk and the candidate, for `--dry-run`."""
    old_lines = (old or b"").decode("utf-8", "replace").splitlines(keepends=True)
    new_lines = new.decode("utf-8", "replace").splitlines(keepends=True)
    label_old = str(path) if old is not None else "/dev/null"
    return "".join(difflib.unified_diff(old_lines, new_lines, fromfile=label_old, tofile=str(path)))


@dataclass(frozen=True)
class ReloadRecheck:
    """What a look at nginx found while installed files waited for a reload: `serves` is True when
    nginx now serves them (it was started since, or it was reloaded); else `detail` says why not."""

    serves: bool
    detail: str


class SyncEngine:
    """Everything a sync needs, built once from the configuration; it owns live mode entirely.

    The steps of a sync, in order: `render` each template, `changes` against the bytes on disk,
    `install` (live state files, the stale-nginx check, the install/check/reload transaction),
    `push` live members, `stage` the members for `on_empty = "keep"` and the live state files,
    which `save_pending` writes later, off the path of a change.
    """

    def __init__(self, config: Config, live_hooks: LiveHooks | None = None) -> None:
        self.config = config
        self.state = StateStore(config.state.dir)
        self.renderers = {
            t.destination: TemplateRenderer(
                t,
                {
                    "mode": config.nginx.mode,
                    "lua_dir": str(lua_dir()),
                    "live_listen": config.nginx.live_listen,
                    "live_token_file": str(config.nginx.live_token_file),
                    "live_state_file": str(self.state.live_path_for(t.destination)),
                },
                environ=config.environ,
                registry=config.registry_name,
            )
            for t in config.templates
        }
        for renderer in self.renderers.values():
            try:
                renderer.left_out.holders = installed_holders(read_bytes(renderer.template.destination))
            except InstallError:
                pass  # unreadable: the install says so, naming the file
        self.reloader = NginxReloader(config.nginx)
        self.installer = Installer(NginxChecker(config.nginx), self.reloader, self.state)
        # What confpy last compared with or installed at each destination (and live state file):
        # a change compares its render with these bytes, reading a file again only when its stat
        # says someone else wrote it.
        self.files = KnownFiles()
        self.live = (
            LiveSupervisor(config, self.state, self.reloader, hooks=live_hooks, files=self.files)
            if config.nginx.mode == "live"
            else None
        )
        # Written by `save_pending`, off the path of a change: destinations whose remembered
        # members changed, and live renders whose state file waits.
        self._unsaved: set[Path] = set()
        self._unsaved_results: dict[Path, RenderResult] = {}

    def timers(self) -> list[Timer]:
        """The engine's own timers for the daemon's loop: live mode's push retries and checks."""
        return [self.live] if self.live is not None else []

    def live_status(self) -> LiveStatus | None:
        return self.live.status() if self.live is not None else None

    async def push(self) -> list[str]:
        """Live mode: push the changed member lists (a failure is retried by the live timer); the
        names pushed. Reload mode: nothing to push."""
        return await self.live.push_or_schedule() if self.live is not None else []

    async def push_members(self, results: Sequence[RenderResult]) -> list[str]:
        """Live mode, while a reload waits (the reload budget): push these renders' members to the
        upstreams nginx already has (never a reload); the names pushed."""
        if self.live is None:
            return []
        await self.live.note(results)
        return await self.live.push_or_schedule()

    async def recheck_reload(self, destinations: Sequence[Path], settle: float) -> ReloadRecheck:
        """Installed files wait for a reload: reload nginx if it now runs with older workers.

        nginx started while the files were being installed may have read the previous ones: only
        workers that started `settle` seconds after the newest file surely serve it."""
        if not self.reloader.running():
            return ReloadRecheck(False, "nginx is not running")
        if not self.reloader.is_stale(destinations, settle=settle):
            log.info("nginx (re)started since and serves the installed files")
            return ReloadRecheck(True, "")
        outcome = await self.reloader.reload()
        if not outcome.reloaded:
            return ReloadRecheck(False, outcome.detail)
        log.info("reloaded nginx, which was serving older files: %s", outcome.detail)
        if self.live is not None:
            self.live.nginx_reloaded()
        return ReloadRecheck(True, outcome.detail)

    def stage(self, results: Sequence[RenderResult], memories: dict[Path, Memory]) -> bool:
        """Take in what a sync leaves to save later (see `save_pending`); True when anything waits."""
        self._unsaved.update(self.remember(results, memories))
        if self.live is not None:
            self._unsaved_results.update((r.template.destination, r) for r in results)
        return self.has_pending

    @property
    def has_pending(self) -> bool:
        return bool(self._unsaved or self._unsaved_results or self.untidy)

    def save_pending(self, memories: Mapping[Path, Memory]) -> None:
        """Write what `stage` took in. On failure (ConfpyError) nothing pending is dropped: the
        next call writes it all again."""
        self.save(list(self._unsaved_results.values()), sorted(self._unsaved), memories)
        self._unsaved.clear()
        self._unsaved_results.clear()

    @property
    def templates(self) -> Sequence[TemplateConfig]:
        return self.config.templates

    def render(self, template: TemplateConfig, data: DataSource, memory: Memory) -> RenderResult:
        """Render one template (RenderError names file:line)."""
        started = time.monotonic()
        result = self.renderers[template.destination].render(data, memory)
        if result.live and self.live is None:
            raise RenderError(
                f'{template.source}: the template calls live_upstream() but [nginx] mode is "reload"; set mode = "live"'
            )
        log.debug(
            "rendered %s in %.1f ms (%d fragments taken unchanged)",
            template.destination,
            (time.monotonic() - started) * 1000,
            result.unchanged_fragments,
        )
        return result

    async def fetch_all(
        self,
        registry: Registry,
        deps: Iterable[AnyDependency],
        data: DataSource,
        guard: OnceGuard | None = None,
    ) -> dict[AnyDependency, int]:
        """Fetch each dependency once (no blocking), a bounded number at a time; store values in `data`
        (through the shrink guard, when given)."""
        limit = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def one(dep: AnyDependency) -> tuple[int, object]:
            async with limit:
                return await registry.fetch(dep, 0, 0.0)

        deps = list(deps)
        answers = await asyncio.gather(*(one(dep) for dep in deps))
        indexes: dict[AnyDependency, int] = {}
        for dep, (index, value) in zip(deps, answers, strict=True):
            data.set(dep, guard.admit(dep, value) if guard is not None else value)
            indexes[dep] = index
            if isinstance(value, HealthView):
                for rejected in value.rejected:
                    log.warning("left out of the render: %s", rejected)
        return indexes

    async def resolve(
        self, registry: Registry, data: DataSource, memories: dict[Path, Memory], guard: OnceGuard | None = None
    ) -> tuple[list[RenderResult], dict[AnyDependency, int]]:
        """Render every template, fetching what they call until all renders are complete."""
        indexes: dict[AnyDependency, int] = {}
        for _ in range(MAX_RESOLVE_ROUNDS):
            results = [self.render(t, data, memories[t.destination]) for t in self.templates]
            missing = set().union(*(r.missing for r in results))
            if not missing:
                return results, indexes
            if guard is not None:
                guard.note_users(results)
            indexes.update(await self.fetch_all(registry, missing, data, guard))
        raise RenderError(
            f"templates still asked for new data after {MAX_RESOLVE_ROUNDS} rounds of fetching; "
            "does a template derive service names from data without end?"
        )

    @asynccontextmanager
    async def locked(self, destinations: Iterable[Path], timeout: float = LOCK_TIMEOUT) -> AsyncIterator[None]:
        """Hold the locks of `destinations`, then clear what an interrupted confpy left behind."""
        destinations = sorted(set(destinations))
        self.state.prepare()
        if self.live is not None:
            self.live.prepare()
        async with destination_locks([self.state.lock_for(dest) for dest in destinations], timeout):
            for dest in destinations:
                for leftover in remove_leftover_temp_files([dest, *self.state.own_files(dest)]):
                    log.info("removed %s, left behind by an interrupted write", leftover)
                for action in self.state.migrate(dest):
                    log.info("upgrading from confpy 0.1: %s", action)
            yield

    def changes(self, results: Sequence[RenderResult]) -> tuple[list[Change], list[Path]]:
        """Split complete renders into changed destinations and unchanged ones."""
        changes: list[Change] = []
        unchanged: list[Path] = []
        for result in results:
            assert result.content is not None
            old = self.files.read(result.template.destination)
            if old == result.content:
                unchanged.append(result.template.destination)
            else:
                changes.append(Change(result.template, result.content, old))
        return changes, unchanged

    async def install(
        self,
        results: Sequence[RenderResult],
        reason: str,
        check_stale: bool = True,
        rerender: Rerender | None = None,
    ) -> SyncReport:
        """Install what changed as one transaction (caller holds the locks).

        With `check_stale`, an unchanged render still reloads nginx once when its workers are older
        than the installed file (a confpy killed between install and reload). The daemon asks for
        this at start-up only: right after its own reload, old workers would look stale.

        With `rerender`, one bad registration does not block the others: when nginx refuses an
        upstream a service's data made, that service is quarantined (left out until its data
        changes), its template rendered again with `rerender` and the rest installed. The report's
        `results` are the renders installed. A failure no upstream explains raises CheckError.
        """
        results = list(results)
        quarantined: list[tuple[Path, Quarantined]] = []
        first: CheckError | None = None  # what nginx said of the renders as they came
        try:
            for round_ in range(MAX_QUARANTINE_ROUNDS + 1):
                try:
                    report = await self._install(results, reason, check_stale)
                except CheckError as exc:
                    culprits = find_culprits(
                        str(exc), [(r.template.destination, r.content, r.upstreams) for r in results if r.content]
                    )
                    if rerender is None or not culprits or round_ == MAX_QUARANTINE_ROUNDS:
                        if not quarantined:
                            raise
                        left_out = ", ".join(repr(held.service) for _, held in quarantined)
                        raise CheckError(
                            f"{first}; leaving out service {left_out} did not help, nginx then said: {exc}"
                        ) from None
                    first = first or exc
                    quarantined.extend(self._quarantine(culprits))
                    results = self._rerendered(results, {c.destination for c in culprits}, rerender, exc)
                    continue
                report.results = results
                report.quarantined = [held for _, held in quarantined]
                return report
        except BaseException:
            # Nothing was installed without them: this sync's quarantines go with it (the next one
            # finds them again if they still are at fault).
            for destination, held in quarantined:
                self.renderers[destination].release(held)
            raise
        raise AssertionError("unreachable: the last round raises or returns")

    def _quarantine(self, culprits: Sequence[Culprit]) -> list[tuple[Path, Quarantined]]:
        held = []
        for culprit in culprits:
            renderer = self.renderers[culprit.destination]
            held.append(
                (
                    culprit.destination,
                    renderer.quarantine(culprit.service, culprit.upstream, culprit.reason, time.time()),
                )
            )
            log.error(
                "%s: quarantined service %r: %s; installing everything else without it (retried when its data changes)",
                culprit.destination,
                culprit.service,
                culprit.reason,
            )
        return held

    @staticmethod
    def _rerendered(
        results: list[RenderResult], destinations: set[Path], rerender: Rerender, cause: CheckError
    ) -> list[RenderResult]:
        again = []
        for result in results:
            if result.template.destination not in destinations:
                again.append(result)
                continue
            fresh = rerender(result.template)
            if fresh is None or fresh.content is None:
                raise cause  # the render without the refused upstream failed: the sync fails as before
            again.append(fresh)
        return again

    async def _install(self, results: Sequence[RenderResult], reason: str, check_stale: bool) -> SyncReport:
        report = SyncReport()
        if self.live is not None:
            await self.live.note(results)
        changes, report.unchanged = self.changes(results)
        if changes and self.live is not None:
            self.live.save_state(results)  # a reload follows: nginx's new workers start from these members
        for path in report.unchanged:
            log.debug("%s: rendered bytes equal the installed file; nothing to do", path)
        if not changes and check_stale:
            report.apply = await self._reload_if_stale([r.template.destination for r in results])
        if changes:
            try:
                report.apply = await self._transaction(changes, reason)
            except BaseException:
                for change in changes:  # rolled back: read again next time
                    self.files.forget(change.destination)
                raise
            for change in changes:
                self.files.note(change.destination, change.new)
            report.changed = [c.destination for c in changes]
        self._warn(results)
        if report.apply is not None and report.apply.reload.reloaded and self.live is not None:
            self.live.nginx_reloaded()  # new workers: ask nginx what it serves before pushing
        return report

    async def _reload_if_stale(self, destinations: list[Path]) -> ApplyReport | None:
        if not self.reloader.is_stale(destinations):
            return None
        # Newer than nginx's workers: confpy may have been killed while `nginx -t` ran, leaving a
        # file nobody checked. Check it before nginx loads it: a failure is a failed check (the
        # running nginx keeps its configuration, the daemon retries and reports it).
        try:
            await self.installer.checker.check()
        except CheckError as exc:
            raise CheckError(
                f"{', '.join(map(str, destinations))}: installed but never reloaded, and nginx refuses it "
                f"(confpy was stopped during a check?); not reloading: {exc}"
            ) from None
        outcome = await self.reloader.reload()
        if outcome.reloaded:
            log.info(
                "nginx's workers are older than %s; reloaded once so it serves the current file (%s)",
                ", ".join(map(str, destinations)),
                outcome.detail,
            )
        else:
            log.error(
                "nginx's workers are older than %s, but the reload failed: %s",
                ", ".join(map(str, destinations)),
                outcome.detail,
            )
        return ApplyReport((), outcome)

    async def _transaction(self, changes: Sequence[Change], reason: str) -> ApplyReport:
        started = time.monotonic()
        applied = await self.installer.apply(changes)
        took = (time.monotonic() - started) * 1000
        for change in changes:
            log.info("installed %s (%d bytes; %s)", change.destination, len(change.new), reason)
        if applied.reload.reloaded:
            log.info("reloaded nginx: %s (%.0f ms after install began)", applied.reload.detail, took)
        else:
            log.error(
                "files installed, reload skipped: %s; nginx still serves the previous configuration",
                applied.reload.detail,
            )
        return applied

    @staticmethod
    def _warn(results: Sequence[RenderResult]) -> None:
        for result in results:
            dest = result.template.destination
            for warning in result.warnings:
                log.warning("%s: %s", dest, warning)
            for dep in result.kept:
                log.warning(
                    "%s: %s has no passing instance; keeping its last known members (on_empty = keep)", dest, dep
                )

    @staticmethod
    def remember(results: Sequence[RenderResult], memories: dict[Path, Memory]) -> list[Path]:
        """Take in the members each template used (`on_empty = "keep"`); return the destinations
        whose remembered members changed, for `save` to write."""
        changed = []
        for result in results:
            dest = result.template.destination
            if result.memory.members != memories[dest].members:
                memories[dest] = result.memory
                changed.append(dest)
        return changed

    def save(
        self, results: Sequence[RenderResult], destinations: Iterable[Path], memories: Mapping[Path, Memory]
    ) -> None:
        """Write the live state files of `results` and the remembered members of `destinations`;
        remove the backups the last installs replaced.

        After the push or reload, off the critical path: only a later restart of nginx (live
        state) or of confpy (remembered members) reads them.
        """
        if self.live is not None:
            self.live.save_state(results)
        for dest in destinations:
            self.state.save(dest, memories[dest])
        self.tidy()

    def tidy(self) -> None:
        """Remove the backups the last installs replaced (see `Installer.tidy`)."""
        self.installer.tidy()

    @property
    def untidy(self) -> bool:
        """True when there are replaced backups to remove."""
        return bool(self.installer.retired)

    def load_memories(self) -> dict[Path, Memory]:
        return {t.destination: self.state.load(t.destination) for t in self.templates}

    async def dry_run(self, results: Sequence[RenderResult]) -> SyncReport:
        """The diffs a sync would install and nginx's verdict on them, changing nothing.

        InstallError when a destination could not be written; CheckError with nginx's words when
        nginx would refuse the candidates.
        """
        report = SyncReport()
        for result in results:
            ensure_writable(result.template.destination)
        changes, report.unchanged = self.changes(results)
        for change in changes:
            report.changed.append(change.destination)
            report.diffs[change.destination] = unified_diff(change.destination, change.old, change.new)
        if self.live is not None:
            for result in results:
                if result.live:
                    path = self.live.state_path(result.template.destination)
                    new, old = await state_bytes(result), read_bytes(path)
                    if new != old:
                        report.diffs[path] = unified_diff(path, old, new)
        candidates = {r.template.destination: r.content for r in results if r.content is not None}
        report.check_output = await check_candidates(self.config.nginx, candidates)
        return report

    async def sync_once(self, registry: Registry, dry_run: bool = False, guarded: bool = True) -> SyncReport:
        """The whole one-shot sync; with `dry_run`, only diffs are computed. With `guarded` (the
        default), a drop larger than the shrink guard allows is not applied (`SyncReport.held`)."""
        data = DataSource()
        if dry_run:
            memories = self.load_memories()
            guard = OnceGuard(self.config, memories) if guarded else None
            results, indexes = await self.resolve(registry, data, memories, guard)
            report = await self.dry_run(results)
        else:
            async with self.locked(t.destination for t in self.templates):
                memories = self.load_memories()
                guard = OnceGuard(self.config, memories) if guarded else None
                results, indexes = await self.resolve(registry, data, memories, guard)
                report = await self.install(
                    results, "one-shot sync", rerender=lambda t: self.render(t, data, memories[t.destination])
                )
                results = report.results
                try:
                    if self.live is not None:
                        report.pushed = await self.live.push()
                finally:
                    self.save(results, self.remember(results, memories), memories)
        report.indexes = indexes
        report.held = guard.held if guard is not None else []
        return report

    async def close(self) -> None:
        self.reloader.close()
        if self.live is not None:
            await self.live.close()


class OnceGuard:
    """The shrink guard of `--once`, which has no previous answer in memory: it compares each
    service's answer with the members remembered in the state files (those a previous sync
    rendered), and a held drop is not applied at all (there is no later to apply it at)."""

    def __init__(self, config: Config, memories: Mapping[Path, Memory]) -> None:
        self.config = config
        self.memories = memories
        self.users: dict[AnyDependency, list[TemplateConfig]] = {}
        self.held: list[str] = []

    def note_users(self, results: Sequence[RenderResult]) -> None:
        """Which templates asked for what: a service's guard is the strictest of theirs."""
        for result in results:
            for dep in result.missing:
                self.users.setdefault(dep, []).append(result.template)

    def admit(self, dep: AnyDependency, value: object) -> object:
        if not isinstance(dep, ServiceHealth) or not isinstance(value, HealthView):
            return value
        guards = [self.config.guard_for(t) for t in self.users.get(dep, [])]
        guard = strictest(guards) or self.config.guard
        decision = decide(remembered_view(dep, self.memories.values()), value, guard)
        if decision.held:
            self.held.append(
                f"{service_label(dep)}: the registry dropped {len(decision.kept)} of the {decision.previous} "
                f"members the last sync installed at once (guard max_drop {guard.max_drop * 100:g}%); "
                "they are kept: `confpy --once --no-guard` applies the drop"
            )
            log.warning("%s", self.held[-1])
        return decision.view
