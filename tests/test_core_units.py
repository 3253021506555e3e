"""The fast tier: quiescence, the watch loop, the watch set and the daemon's cycle, in-process.

No sockets and no sleeps: a fake registry answers dependencies, a fake clock tells the time, and
the daemon's steps are driven one by one (like consul-template's view_test.go with its fake
dependency, and gunicorn's arbiter tests).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import re
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import pytest

import confpy.apply.nginx as nginx_module
import confpy.registry.consul as consul_module
import confpy.render.datasource as datasource_module
from confpy.apply.live import LivePushError, read_admin_token
from confpy.config import WaitConfig, parse_config
from confpy.daemon.loop import NGINX_START_SETTLE, STATE_SAVE_MAX_DELAY, STATE_SAVE_QUIET, Daemon
from confpy.daemon.quiescence import Quiescence
from confpy.daemon.snapshot import StatusSnapshot
from confpy.errors import ConsulUnreachable, RegistryError
from confpy.model import HealthView
from confpy.registry.base import CatalogServices, Dependency, ServiceHealth
from confpy.registry.consul_decode import health_view_from_entries
from confpy.render.datasource import DataSource
from confpy.timer import run_due
from confpy.watch.watcher import FirstFetches, RegistryHealth, Watcher, WatchSettings, next_index
from confpy.watch.watchset import WatchSet

from .conftest import stand_in_config
from .tiers import starts_processes

T = TypeVar("T")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class FakeDep:
    """A dependency of a kind only the fake registry knows."""

    name: str

    def describe(self) -> str:
        return f"fake({self.name})"


class FakeRegistry:
    """Answers any dependency from a dict; blocking queries wait for `set`; failures can be queued."""

    address = "fake://registry"

    def __init__(self) -> None:
        self.index = 10
        self.values: dict[Dependency, tuple[int, object]] = {}
        self.failures: list[RegistryError] = []
        self.calls: list[tuple[Dependency, int]] = []
        self.changed = asyncio.Event()
        self.closed = False
        self.down = False

    def set(self, dep: Dependency, value: object, index: int | None = None) -> None:
        self.index = index if index is not None else self.index + 1
        self.values[dep] = (self.index, value)
        self.changed.set()
        self.changed = asyncio.Event()

    async def fetch(self, dep: Dependency, index: int, wait: float) -> tuple[int, object]:
        self.calls.append((dep, index))
        if self.failures:
            raise self.failures.pop(0)
        while True:
            if dep in self.values:
                current, value = self.values[dep]
                if index == 0 or current != index:
                    return current, value
            await self.changed.wait()

    async def ping(self) -> None:
        if self.down:
            raise ConsulUnreachable("cannot reach Consul at fake: connection refused")

    async def close(self) -> None:
        self.closed = True


async def turns(count: int = 20) -> None:
    """Let the loop's other tasks run (no time passes)."""
    for _ in range(count):
        await asyncio.sleep(0)


def run(coro: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(coro())  # type: ignore[arg-type]


# --- quiescence ------------------------------------------------------------------------------


def test_quiescence_min_pushes_the_deadline_but_never_past_max() -> None:
    q = Quiescence()
    wait = WaitConfig(min=0.1, max=1.0)
    q.change("t", 0.0, wait, "a")
    assert q.next_deadline() == pytest.approx(0.1)
    q.change("t", 0.05, wait, "b")
    assert q.next_deadline() == pytest.approx(0.15)
    for step in range(1, 30):  # a change every 50 ms for 1.5 s: min never passes, max caps it
        q.change("t", 0.05 * step, wait, "c")
    assert q.next_deadline() == pytest.approx(1.0)
    assert q.due(0.99) == {}
    due = q.due(1.0)
    assert list(due) == ["t"] and due["t"].reasons == {"a", "b", "c"} and due["t"].first_change == 0.0
    assert q.next_deadline() is None and "t" not in q


def test_quiescence_immediate_and_independent_templates() -> None:
    q = Quiescence()
    q.change("a", 5.0, WaitConfig(min=2.0, max=10.0), "data")
    q.change("b", 5.0, WaitConfig(min=0.5, max=1.0), "data")
    assert set(q.due(5.5)) == {"b"}
    q.change("a", 6.0, WaitConfig(min=2.0, max=10.0), "edited", immediate=True)
    assert set(q.due(6.0)) == {"a"}


# --- the watch loop --------------------------------------------------------------------------


def test_next_index_follows_consuls_rules() -> None:
    assert next_index(5, 9) == 9
    assert next_index(9, 5) == 0  # went backwards: re-read from 0
    assert next_index(0, 0) == 1  # never 0 after an answer


def _watcher(
    registry: FakeRegistry,
    dep: Dependency,
    seen: list[tuple[object, int]],
    clock: FakeClock,
    sleeps: list[float],
    health: RegistryHealth | None = None,
) -> Watcher:
    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    return Watcher(
        dep,
        registry,
        WatchSettings(wait=60.0, max_backoff=4.0),
        health or RegistryHealth(clock),
        lambda d, value, index: seen.append((value, index)),
        clock=clock,
        sleep=fake_sleep,
    )


def test_watcher_reports_changes_only_and_resets_a_backwards_index() -> None:
    async def scenario() -> None:
        registry, dep, clock = FakeRegistry(), FakeDep("web"), FakeClock()
        seen: list[tuple[object, int]] = []
        sleeps: list[float] = []
        watcher = _watcher(registry, dep, seen, clock, sleeps)
        registry.set(dep, "v1", index=20)
        assert await watcher.poll_once() is True and seen == [("v1", 20)] and watcher.index == 20
        registry.set(dep, "v1", index=21)  # same value, new index: nothing to report
        assert await watcher.poll_once() is False and seen == [("v1", 20)] and watcher.index == 21
        registry.set(dep, "v2", index=3)  # a restarted registry: lower index
        assert await watcher.poll_once() is True and watcher.index == 0
        assert registry.calls == [(dep, 0), (dep, 20), (dep, 21)]
        assert sleeps == [pytest.approx(0.1), pytest.approx(0.1)]  # the rate limit between back-to-back queries

    run(scenario)


class RecordingRegistry(FakeRegistry):
    """Notes each query in a shared list as it is sent."""

    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = order

    async def fetch(self, dep: Dependency, index: int, wait: float) -> tuple[int, object]:
        self.order.append(f"query {index}")
        return await super().fetch(dep, index, wait)


def test_an_answer_is_acted_on_before_the_next_query_is_sent() -> None:
    async def scenario() -> None:
        order: list[str] = []
        registry, dep, clock = RecordingRegistry(order), FakeDep("web"), FakeClock()
        loop = asyncio.get_running_loop()

        def on_value(d: Dependency, value: object, index: int) -> None:
            order.append(f"value {value}")
            loop.call_soon(order.append, f"acted on {value}")  # as a queue wakes the daemon's task

        async def no_sleep(seconds: float) -> None:
            clock.now += seconds

        watcher = Watcher(
            dep, registry, WatchSettings(wait=60.0, max_backoff=4.0), RegistryHealth(clock), on_value,
            clock=clock, sleep=no_sleep,
        )  # fmt: skip
        registry.set(dep, "v1", index=20)
        watcher.start()
        await turns()
        registry.set(dep, "v2", index=21)
        await turns()
        watcher.stop()
        await watcher.wait_stopped()
        assert order == ["query 0", "value v1", "acted on v1", "query 20", "value v2", "acted on v2", "query 21"]

    run(scenario)


def test_watcher_retries_with_growing_backoff_and_health_logs_the_outage_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def scenario() -> None:
        registry, dep, clock = FakeRegistry(), FakeDep("web"), FakeClock()
        changes: list[bool] = []
        health = RegistryHealth(clock, on_change=lambda: changes.append(health.reachable))
        seen: list[tuple[object, int]] = []
        sleeps: list[float] = []
        watcher = _watcher(registry, dep, seen, clock, sleeps, health)
        registry.set(dep, "v1")
        registry.failures = [ConsulUnreachable("refused") for _ in range(5)]
        assert await watcher.poll_once() is True
        backoffs = [s for s in sleeps if s > 0.1 + 1e-9 or s < 0.1 - 1e-9]
        assert len(backoffs) >= 4 and backoffs[-1] > backoffs[0]
        assert all(s <= 4.0 + 0.25 for s in sleeps)
        assert changes == [False, True]  # down once, back once
        assert caplog.text.count("Consul unavailable since") == 1 and "Consul is back" in caplog.text

    run(scenario)


def test_no_blocking_query_starts_while_a_first_query_is_still_out() -> None:
    """Start-up order: blocking queries wait until every first (index 0) query has been answered."""

    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        fast, slow = FakeDep("fast"), FakeDep("slow")
        registry.set(fast, "f1", index=20)
        first = FirstFetches(limit=1)
        seen: list[tuple[object, int]] = []

        async def no_sleep(seconds: float) -> None:
            pass

        def watcher(dep: FakeDep) -> Watcher:
            return Watcher(
                dep, registry, WatchSettings(wait=60.0, max_backoff=4.0), RegistryHealth(clock),
                lambda d, value, index: seen.append((value, index)), clock=clock, sleep=no_sleep, first_fetches=first,
            )  # fmt: skip

        watchers = [watcher(fast), watcher(slow)]
        for w in watchers:
            w.start()
        await turns()
        # `fast` was answered; `slow` (no data yet) holds its first query open: `fast` must not block yet.
        assert seen == [("f1", 20)]
        assert registry.calls == [(fast, 0), (slow, 0)], registry.calls
        registry.set(slow, "s1", index=21)
        await turns()
        assert ("s1", 21) in seen
        assert registry.calls[2:] and all(index > 0 for _, index in registry.calls[2:])  # now both block
        assert (fast, 20) in registry.calls[2:]
        for w in watchers:
            w.stop()
        await asyncio.gather(*(w.wait_stopped() for w in watchers))

    run(scenario)


def test_equal_dependencies_become_one_object_in_the_data_source() -> None:
    data = DataSource()
    first = data.canonical(ServiceHealth("web", "nginx"))
    again = data.canonical(ServiceHealth("web", "nginx"))
    assert again is first and hash(again) == hash(ServiceHealth("web", "nginx"))
    assert data.canonical(ServiceHealth("web")) is not first  # another tag: another dependency
    data.forget(first)
    assert data.canonical(ServiceHealth("web", "nginx")) is not first


def test_watch_set_starts_and_stops_exactly_what_is_wanted() -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        seen: list[tuple[object, int]] = []
        watches = WatchSet(lambda dep: _watcher(registry, dep, seen, clock, []))
        a, b, c = FakeDep("a"), FakeDep("b"), FakeDep("c")
        diff = watches.sync([a, b])
        assert diff.added == {a, b} and not diff.removed and watches.watching() == {a, b}
        diff = watches.sync([b, c])
        assert diff.added == {c} and diff.removed == {a} and watches.watching() == {b, c}
        registry.set(a, "ignored")
        registry.set(c, "c1")
        await turns()
        assert seen == [("c1", registry.values[c][0])]  # the stopped watcher never reports
        await watches.stop_all()
        assert len(watches) == 0

    run(scenario)


# --- the daemon's cycle, in-process ----------------------------------------------------------


def _entry(sid: str, port: int) -> dict[str, object]:
    return {
        "Node": {"Node": "n1", "Address": "127.0.0.1"},
        "Service": {"ID": sid, "Service": "web", "Address": "127.0.0.1", "Port": port},
    }


def _view(*ports: int) -> HealthView:
    return health_view_from_entries("web", [_entry(f"web-{p}", p) for p in ports])


@starts_processes  # the daemon runs check_cmd (`true`) before it installs
def _daemon(
    tmp_path: Path, template: str, registry: FakeRegistry, clock: FakeClock, wait_min: str = "1s", nginx_extra: str = ""
) -> Daemon:
    source = tmp_path / "t.conf.j2"
    source.write_text(template)
    config_path = tmp_path / "confpy.toml"
    config_path.write_text(stand_in_config(tmp_path, source, nginx=nginx_extra, wait_min=wait_min, wait_max="5s"))
    (tmp_path / "state").mkdir()
    config = parse_config(config_path.read_text(), config_path, {})

    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    return Daemon(
        config, config_path, {}, registry_factory=lambda c: registry, clock=clock, wall_clock=clock, sleep=no_wait
    )


async def _drain(daemon: Daemon) -> int:
    """Let watchers answer, then hand every queued event to the daemon; how many there were."""
    await turns()
    handled = 0
    while not daemon.events.empty():
        daemon._handle(daemon.events.get_nowait())
        handled += 1
    return handled


WEB = "{% for i in service('web') %}server {{ i.endpoint }};\n{% endfor %}"


def test_first_render_waits_for_every_dependency_then_later_rounds_discover_more(tmp_path: Path) -> None:
    template = (
        "{% for name in services() %}{{ name }}:{% for i in service(name) %} {{ i.port }}{% endfor %}\n{% endfor %}"
    )

    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, template, registry, clock)
        out = tmp_path / "out.conf"
        await daemon._start()
        assert daemon.watches.watching() == {CatalogServices()} and not out.exists()
        registry.set(CatalogServices(), ("api", "web"))
        await _drain(daemon)
        await daemon._run_due()  # the catalog arrived: render again, which asks for two services
        assert daemon.watches.watching() == {CatalogServices(), ServiceHealth("api"), ServiceHealth("web")}
        assert not out.exists()
        registry.set(ServiceHealth("web"), _view(8080))
        await _drain(daemon)
        await daemon._run_due()
        assert not out.exists(), "one service still has no answer: no partial file"
        registry.set(ServiceHealth("api"), health_view_from_entries("api", []))
        await _drain(daemon)
        await daemon._run_due()
        assert out.read_text() == "api:web: 8080"
        daemon._publish()
        ok, reason = daemon.snapshot.health()  # no nginx here: the files are not live, and /health says so
        assert not ok and reason.startswith("files installed but nginx not reloaded: nginx is not running")
        assert 'confpy_reloads_skipped_total{reason="not_running"} 1.0' in daemon.metrics.render_text().decode()
        await daemon._stop()
        assert registry.closed

    run(scenario)


def test_a_burst_inside_wait_min_is_one_cycle_and_max_bounds_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, WEB, registry, clock, wait_min="1s")
        out = tmp_path / "out.conf"
        registry.set(ServiceHealth("web"), _view(1))
        await daemon._start()
        await _drain(daemon)
        await daemon._run_due()
        assert out.read_text() == "server 127.0.0.1:1;\n"
        cycles = daemon.cycles
        for n in range(2, 12):  # ten changes 0.3 s apart: wait.min (1 s) never passes
            registry.set(ServiceHealth("web"), _view(*range(1, n + 1)))
            await _drain(daemon)
            await daemon._run_due()
            assert daemon.cycles == cycles, "no cycle before quiescence"
            clock.now += 0.3
        clock.now += 2.0  # ... but max (5 s from the first change) has passed
        await daemon._run_due()
        assert daemon.cycles == cycles + 1
        assert out.read_text().count("server") == 11
        await daemon._stop()

    run(scenario)


def test_an_unrelated_change_renders_nothing_and_equal_bytes_write_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, WEB, registry, clock, wait_min="0s")
        out = tmp_path / "out.conf"
        registry.set(ServiceHealth("web"), _view(1, 2))
        await daemon._start()
        await _drain(daemon)
        await daemon._run_due()
        await _drain(daemon)
        before = out.stat()
        cycles = daemon.cycles
        registry.set(ServiceHealth("other"), _view(9))  # nobody watches it
        assert await _drain(daemon) == 0
        registry.set(ServiceHealth("web"), _view(2, 1))  # same members, other order: equal value
        await _drain(daemon)
        await daemon._run_due()
        assert daemon.cycles == cycles and out.stat().st_mtime_ns == before.st_mtime_ns
        await daemon._stop()

    run(scenario)


def test_remembered_members_are_written_after_the_sync_and_at_once_on_stop(tmp_path: Path) -> None:
    def ports(state: Path) -> list[int]:
        members = json.loads(state.read_text())["members"]
        return sorted(item["port"] for items in members.values() for item in items)

    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, WEB, registry, clock, wait_min="0s")
        registry.set(ServiceHealth("web"), _view(1))
        await daemon._start()
        await _drain(daemon)
        await daemon._run_due()
        state = daemon.engine.state.path_for(tmp_path / "out.conf")
        assert (tmp_path / "out.conf").exists() and not state.exists(), "written after the reload, not before"
        clock.now += STATE_SAVE_QUIET
        daemon._save_state()
        assert ports(state) == [1]
        # under churn: a change every half quiet period is written once the oldest unsaved one is
        # STATE_SAVE_MAX_DELAY old, not after each change
        synced: list[float] = []
        for n in range(2, 100):
            registry.set(ServiceHealth("web"), _view(*range(1, n + 1)))
            await _drain(daemon)
            await daemon._run_due()
            synced.append(clock.now)
            daemon._save_state()
            if len(ports(state)) > 1:
                break
            clock.now += STATE_SAVE_QUIET / 2
        assert len(ports(state)) == n and synced[-1] - synced[0] >= STATE_SAVE_MAX_DELAY - STATE_SAVE_QUIET / 2
        assert synced[-1] - synced[0] <= STATE_SAVE_MAX_DELAY
        registry.set(ServiceHealth("web"), _view(*range(1, n + 2)))
        await _drain(daemon)
        await daemon._run_due()
        assert f"server 127.0.0.1:{n + 1};" in (tmp_path / "out.conf").read_text() and len(ports(state)) == n
        await daemon._stop()  # stopping writes what is pending
        assert len(ports(state)) == n + 1

    run(scenario)


def test_nothing_the_daemon_holds_grows_with_every_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 31's soak, in-process: once every bounded structure is full (the change log made
    small here so that a few hundred cycles pass its bound), more reloads allocate nothing that
    stays: what confpy's own code holds after 300 more reloads is no more than before them."""
    monkeypatch.setattr(datasource_module, "CHANGE_LOG", 64)
    confpy_code = str(Path(datasource_module.__file__).parent.parent / "*")

    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, WEB, registry, clock, wait_min="0s", nginx_extra='reload_cmd = "true"')
        registry.set(ServiceHealth("web"), _view(1, 2, 3))
        await daemon._start()

        async def reloads(count: int) -> None:
            for n in range(count):
                registry.set(ServiceHealth("web"), _view(1, 2, 3, 4) if n % 2 == 0 else _view(1, 2, 3))
                await _drain(daemon)
                await daemon._run_due()
                clock.now += 0.2  # a change every 200 ms, as the soak: state saves and retries run too
                await run_due(daemon.timers(), clock.now)
                assert daemon.snapshot.last_sync_ok

        def held() -> int:
            gc.collect()
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, confpy_code)])
            return sum(stat.size for stat in snapshot.statistics("filename"))

        await reloads(200)  # fills the change log, the timeline, the metrics' label sets
        tracemalloc.start()
        try:
            await reloads(100)
            before, reloaded = held(), daemon.metrics.reloads._value.get()
            await reloads(300)
            after = held()
            assert daemon.metrics.reloads._value.get() - reloaded == 300, "every change was one reload"
        finally:
            tracemalloc.stop()
        await daemon._stop()
        assert after - before <= 300 * 8, f"{after - before} bytes more after 300 reloads"

    run(scenario)


def test_registry_down_at_start_is_recorded_for_readiness_and_health(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        registry.failures = [ConsulUnreachable("cannot reach Consul at fake: connection refused")]
        registry.down = True
        daemon = _daemon(tmp_path, WEB, registry, clock)
        sent: list[tuple[str, ...]] = []
        daemon.notifier.notify = lambda *lines: sent.append(lines)  # type: ignore[method-assign]
        await daemon._start()
        await _drain(daemon)
        daemon._publish()
        assert ("READY=1", "STATUS=waiting for Consul: cannot reach Consul at fake: connection refused") in sent
        ok, reason = daemon.snapshot.health()
        assert not ok and "connection refused" in reason
        await daemon._stop()

    run(scenario)


def test_change_lines_name_what_changed() -> None:
    from confpy.model import describe_change

    assert describe_change(_view(1, 2), _view(2, 3)) == "+127.0.0.1:3 -127.0.0.1:1"
    assert describe_change(_view(1), _view(*range(1, 20))) == "+18 members"
    assert describe_change(("a", "b"), ("b", "c")) == "+c -a"


def test_a_probe_notices_the_registry_is_back_while_every_watch_still_blocks(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, WEB, registry, clock)
        registry.set(ServiceHealth("web"), _view(1))
        await daemon._start()
        await _drain(daemon)
        await daemon._run_due()
        # An outage: the watch's next query fails; afterwards it blocks in a long poll that, as
        # against a restarted Consul with lower indexes, would answer only after its whole wait.
        registry.down = True
        daemon.health.failure(ServiceHealth("web"), ConsulUnreachable("connection refused"))
        await _drain(daemon)
        assert not daemon.health.reachable and daemon.probe is not None
        registry.down = False
        await _drain(daemon)
        assert daemon.health.reachable, "the probe saw the registry answer"
        assert daemon.probe.done()
        await daemon._stop()

    run(scenario)


class TestFilterExpressions:
    """dev-consul's `?filter=` language (go-bexpr) on one health entry, no server."""

    ENTRY = {
        "Node": {"Node": "n1", "Meta": {}},
        "Service": {"ID": "web-1", "Tags": ["nginx", "blue"], "Meta": {"version": "2"}, "Port": 8081},
        "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, {"CheckID": "c", "Status": "critical"}],
    }

    def holds(self, expression: str) -> bool:
        from confpy.dev.devconsul.bexpr import compile_filter

        return compile_filter(expression, self.ENTRY)(self.ENTRY)

    def test_operators(self) -> None:
        assert self.holds('"blue" in Service.Tags') and not self.holds('"red" in Service.Tags')
        assert self.holds('"red" not in Service.Tags')
        assert self.holds("Service.Port == 8081") and self.holds('Service.Port != "80"')
        assert self.holds("Service.Tags contains `nginx`") and self.holds('Service.ID matches "^web-[0-9]+$"')
        assert self.holds("Service.Meta.zone is empty") and self.holds("Service.Meta.version is not empty")
        assert self.holds('Service.Meta["version"] == 2')
        assert self.holds("Checks.Status == critical") and self.holds('"passing" in Checks.Status')
        assert self.holds('not (Node.Node == "n2") and (Service.Port == 1 or Service.Port == 8081)')

    def test_bad_expressions_are_refused_with_consuls_words(self) -> None:
        from confpy.dev.devconsul.bexpr import FilterError, compile_filter

        for expression, words in (
            ("Service.Nope == 1", 'Selector "Service.Nope" is not valid'),
            ("not a valid expression((", "no match found"),
            ("Service.ID ==", "expected: a value"),
            ("", "no match found"),
        ):
            with pytest.raises(FilterError, match=re.escape(words)):
                compile_filter(expression, self.ENTRY)


class TestStatusPage:
    """The page and its verdict from snapshots, no server."""

    def snapshot(self, **changes: object) -> StatusSnapshot:
        base: dict[str, object] = {
            "registry_address": "https://user:secret@consul.example:8501",
            "registry_reachable": True,
            "registry_error": "",
            "waiting_for_first_answer": False,
            "last_sync_ok": True,
            "last_sync_error": "",
        }
        return StatusSnapshot(**{**base, **changes})  # type: ignore[arg-type]

    def test_verdicts(self) -> None:
        assert self.snapshot().state()[0] == "ok"
        assert self.snapshot(registry_reachable=False, registry_error="refused").state() == (
            "degraded",
            "Consul unreachable: refused",
        )
        assert self.snapshot(not_reloaded="nginx is not running").state()[0] == "degraded"
        failing = self.snapshot(last_sync_ok=False, last_sync_error='unknown directive "x"')
        assert failing.state() == ("failing", 'last sync failed: unknown directive "x"')

    def test_escaped_no_credentials_and_latency_bars(self) -> None:
        from confpy.daemon.page import StatusPage
        from confpy.daemon.timeline import Timeline

        view = health_view_from_entries(
            "<b>x</b>",
            [{"Node": {"Node": "n1", "Address": "10.0.0.1"},
              "Service": {"ID": "a", "Service": "<b>x</b>", "Port": 80, "Meta": {"m": "<i>y</i>"}}, "Checks": []}],
        )  # fmt: skip
        timeline = Timeline(lambda: 1_700_000_000.0)
        timeline.record("change", "+10.0.0.1:80", "service(<b>x</b>)")
        timeline.record("reload", "reloaded nginx", latency=0.25)
        page = StatusPage("0").render(self.snapshot(services={"service(<b>x</b>)": view}, timeline=timeline.events()))
        assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page and "&lt;i&gt;y&lt;/i&gt;" in page
        assert "secret" not in page and "https://consul.example:8501" in page
        assert '<svg class="spark"' in page and "change to reload: last 250 ms" in page
        assert '<script src="/static/status.js"></script>' in page and "<script>" not in page

    def test_kept_members_and_an_outage_are_shown(self) -> None:
        from confpy.daemon.page import StatusPage

        remembered = health_view_from_entries(
            "web",
            [{"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": {"ID": "w1", "Service": "web", "Port": 80}}],
        ).instances
        snapshot = self.snapshot(
            services={"service(web)": HealthView(())},
            kept_members={"service(web)": remembered},
            registry_reachable=False,
            registry_error="connection refused",
            registry_down_since=1_700_000_000.0,
        )
        page = StatusPage("0").render(snapshot)
        assert "10.0.0.1:80" in page and ">kept<" in page and "kept by on_empty" in page
        assert "unreachable since" in page and "connection refused" in page


def test_nginx_started_during_an_install_counts_as_stale_within_the_settle_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx's master reads its files before it starts its workers (and writes its pid file): one
    that was starting while confpy installed has workers newer than the file but may serve the
    previous one. The recheck after a skipped reload (settle = NGINX_START_SETTLE) reloads it; an
    nginx started after the file is fresh; without settle (start-up, --once) only older workers count."""
    destination = tmp_path / "out.conf"
    destination.write_text("upstream web { server 127.0.0.1:1; }\n")
    (tmp_path / "t.j2").write_text("")
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_text("1\n")
    mtime = destination.stat().st_mtime
    master, worker = object(), object()
    starts = {master: mtime - 0.4, worker: mtime + 0.3}  # master before the file, worker after it
    monkeypatch.setattr(nginx_module, "nginx_master", lambda path: master)
    monkeypatch.setattr(nginx_module, "current_workers", lambda proc: [worker])
    monkeypatch.setattr(nginx_module, "process_start_time", lambda proc: starts[proc])
    config = parse_config(
        f'[consul]\naddress = "http://127.0.0.1:1"\n[nginx]\npid_file = "{pid_file}"\n'
        f'[[template]]\nsource = "{tmp_path}/t.j2"\ndestination = "{destination}"\n',
        tmp_path / "c.toml",
        {},
    )
    reloader = nginx_module.NginxReloader(config.nginx)
    assert not reloader.is_stale([destination])
    assert reloader.is_stale([destination], settle=NGINX_START_SETTLE)
    starts[master], starts[worker] = mtime + 0.05, mtime + 0.1  # started after the file: it read it
    assert not reloader.is_stale([destination], settle=NGINX_START_SETTLE)
    starts[master], starts[worker] = mtime - 60, mtime - 30  # running since before, never reloaded
    assert reloader.is_stale([destination]) and reloader.is_stale([destination], settle=NGINX_START_SETTLE)


def test_a_catalog_answer_with_the_last_ones_bytes_is_not_decoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # Consul answers a catalog query after any registration anywhere, nearly always unchanged.
    answers = [
        b'{"consul": [], "web": ["nginx"], "db": []}',
        b'{"consul": [], "web": ["nginx"], "db": []}',  # a new instance of web: the same list
        b'{"consul": [], "web": ["nginx"], "api": ["nginx"], "db": []}',
    ]

    class Client:
        async def catalog_services_bytes(self, *, index: int = 0, wait: float | None = None) -> tuple[int, bytes]:
            return index + 1, answers.pop(0)

    decoded: list[str] = []
    real_decode = consul_module._decode_json

    def decode(text: str, what: str) -> object:
        decoded.append(text)
        return real_decode(text, what)

    monkeypatch.setattr(consul_module, "_decode_json", decode)
    registry = consul_module.ConsulRegistry(cast(consul_module.ConsulClient, Client()))
    dep = CatalogServices("nginx")
    first = asyncio.run(registry.fetch(dep, 0, 60.0))
    again = asyncio.run(registry.fetch(dep, 1, 60.0))
    changed = asyncio.run(registry.fetch(dep, 2, 60.0))
    assert first == (1, ("web",)) and again[0] == 2 and again[1] is first[1]
    assert changed == (3, ("api", "web"))
    assert len(decoded) == 2  # the first and the changed answer; the repeat was recognised by its bytes


def test_an_admin_token_nginx_would_refuse_or_no_header_could_carry_is_refused_unshown(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    good = "0123456789abcdef" * 4
    token.write_text(good + "\n")
    assert read_admin_token(token) == good  # the trailing newline goes, as nginx's Lua drops it
    for bad in (good + "\nX-Evil: 1\n", "short-secret\n", good[:20] + " " + good[20:], good + "\u00e9"):
        token.write_text(bad, encoding="utf-8")
        with pytest.raises(LivePushError) as info:
            read_admin_token(token)
        message = str(info.value)
        assert message.startswith(f"the live admin API's token in {token} is not one line of at least 32"), message
        assert "Evil" not in message and "short-secret" not in message and good[:20] not in message
    with pytest.raises(LivePushError, match="cannot read the live admin API's token"):
        read_admin_token(tmp_path / "missing")
