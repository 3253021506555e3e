"""The reload budget, in-process: its decision on numbers, its timer on a fake clock, and the
daemon's cycle deferring a reload against a fake table of nginx's processes (no nginx, no sleeps).

The real-nginx proof (slow downloads, 8 changes) is tests/test_budget_nginx.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confpy.apply.draining import Draining, Generation, Worker, group_generations
from confpy.config import parse_config
from confpy.daemon.budget import BudgetLimits, ReloadBudget, decide
from confpy.daemon.loop import Daemon
from confpy.daemon.page import StatusPage
from confpy.errors import ConfigError
from confpy.registry.base import ServiceHealth
from confpy.timer import run_due
from tests.test_core_units import WEB, FakeClock, FakeRegistry, _daemon, _drain, _view, run

MIB = 1024 * 1024
LIMITS = BudgetLimits(max_generations=2, max_memory=0, max_defer=300.0)


def draining(*ages: float, memory: int = 0, now: float = 10_000.0) -> Draining:
    """A process table with one draining generation per age (seconds), each holding `memory`."""
    return Draining(tuple(Generation(now - age, 2, memory) for age in sorted(ages, reverse=True)), now)


# --- the process table -----------------------------------------------------------------------


def test_draining_workers_group_into_generations_by_start_time() -> None:
    workers = [
        Worker(1, 100.00, True, 10 * MIB),
        Worker(2, 100.01, True, 12 * MIB),  # same reload as pid 1
        Worker(3, 105.00, True, 5 * MIB),
        Worker(4, 110.00, False),  # current workers: not draining
        Worker(5, 110.01, False),
    ]
    generations = group_generations(workers)
    assert generations == (Generation(100.0, 2, 22 * MIB), Generation(105.0, 1, 5 * MIB))


def test_old_workers_count_at_once_after_a_reload_before_they_retitle_themselves() -> None:
    workers = [Worker(1, 100.0, False), Worker(2, 100.01, False), Worker(3, 120.0, False), Worker(4, 120.0, False)]
    assert group_generations(workers, reloaded_at=119.5) == (Generation(100.0, 2, 0),)
    # The reload did not start new workers (nginx refused it): the workers are current, nothing drains.
    assert group_generations(workers[:2], reloaded_at=119.5) == ()
    # A worker nginx restarted after a crash is no reason to count its older siblings.
    assert group_generations(workers, reloaded_at=None) == ()


# --- the decision ----------------------------------------------------------------------------


def test_below_the_generation_limit_a_reload_applies_at_once() -> None:
    assert decide(LIMITS, draining(), 0.0, None).action == "apply"
    assert decide(LIMITS, draining(30.0), 0.0, None).action == "apply"


def test_at_the_generation_limit_a_reload_waits_and_says_why() -> None:
    verdict = decide(LIMITS, draining(240.0, 30.0), 0.0, None)
    assert verdict.action == "defer"
    assert verdict.why == "2 generations of nginx workers still draining (limit 2), oldest 4 min"


def test_the_memory_limit_defers_below_the_generation_limit() -> None:
    limits = BudgetLimits(max_generations=5, max_memory=100 * MIB, max_defer=300.0)
    assert decide(limits, draining(10.0, memory=60 * MIB), 0.0, None).action == "apply"
    verdict = decide(limits, draining(10.0, 5.0, memory=60 * MIB), 0.0, None)
    assert verdict.action == "defer"
    assert verdict.why == "nginx's draining workers hold 120 MiB (limit 100 MiB, 2 generations)"
    off = BudgetLimits(max_generations=5, max_memory=0, max_defer=300.0)
    assert decide(off, draining(10.0, 5.0, memory=6000 * MIB), 0.0, None).action == "apply"


def test_after_max_defer_the_reload_happens_anyway() -> None:
    table = draining(600.0, 400.0)
    assert decide(LIMITS, table, 1299.0, 1000.0).action == "defer"
    overdue = decide(LIMITS, table, 1300.0, 1000.0)
    assert overdue.action == "overdue" and "2 generations" in overdue.why
    assert decide(LIMITS, draining(400.0), 1300.0, 1000.0).action == "apply"  # within budget again: no warning


# --- the timer -------------------------------------------------------------------------------


class FakeTable:
    """nginx's draining generations as a test sets them; counts the looks."""

    def __init__(self, table: Draining) -> None:
        self.table = table
        self.looks = 0

    def __call__(self, reloaded_at: float | None) -> Draining:
        self.looks += 1
        return self.table


def test_the_timer_looks_every_second_and_runs_what_waits_once_a_generation_exits() -> None:
    clock = FakeClock(0.0)
    table = FakeTable(draining(100.0, 50.0))
    budget = ReloadBudget(LIMITS, table, clock, clock)
    reruns: list[float] = []

    async def rerun() -> None:
        reruns.append(clock.now)
        assert budget.take() is not None
        budget.reloaded(budget.verdict())

    budget.rerun = rerun
    assert budget.verdict().action == "defer"
    budget.defer("2 generations", [Path("/a")], "web changed", {Path("/a"): 0.0})
    budget.defer("2 generations", [Path("/b")], "api changed", {})  # coalesced
    assert budget.deferred_total == 2 and budget.pending is not None
    assert budget.pending.destinations == {Path("/a"), Path("/b")}
    for second in range(1, 4):
        clock.now = float(second)
        assert budget.next_deadline() == clock.now
        run(lambda: budget.on_timer(clock.now))
    assert reruns == [] and budget.view().deferred == "2 generations"
    table.table = draining(104.0)  # the oldest generation exited
    clock.now = 4.0
    run(lambda: budget.on_timer(clock.now))
    assert reruns == [4.0] and budget.pending is None and budget.forced_total == 0


def test_the_timer_forces_the_reload_after_max_defer_and_counts_it(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    budget = ReloadBudget(BudgetLimits(2, 0, 10.0), FakeTable(draining(100.0, 50.0)), clock, clock)
    landed: list[bool] = []

    async def rerun() -> None:
        budget.take()
        verdict = budget.verdict()
        landed.append(verdict.action == "overdue")
        budget.reloaded(verdict)

    budget.rerun = rerun
    budget.defer("2 generations", [Path("/a")], "web changed", {})
    for second in range(1, 11):
        clock.now = float(second)
        run(lambda: budget.on_timer(clock.now))
    assert landed == [True] and budget.forced_total == 1 and budget.pending is None
    assert "set nginx's worker_shutdown_timeout" in caplog.text


# --- the daemon's cycle ----------------------------------------------------------------------


async def _started(tmp_path: Path, max_defer: str = "5m") -> tuple[Daemon, FakeRegistry, FakeClock, FakeTable]:
    """A daemon (reload_cmd `true`, budget of 2 generations) that installed web = [port 1]; nginx's
    processes come from the returned fake table (nothing drains yet)."""
    registry, clock = FakeRegistry(), FakeClock()
    budget = f'reload_cmd = "true"\nmax_draining_generations = 2\nmax_defer = "{max_defer}"'
    daemon = _daemon(tmp_path, WEB, registry, clock, wait_min="0s", nginx_extra=budget)
    table = FakeTable(Draining((), clock.now))
    daemon.cycles_.budget.read = table
    registry.set(ServiceHealth("web"), _view(1))
    await daemon._start()
    await _drain(daemon)
    await daemon._run_due()
    assert (tmp_path / "out.conf").read_text() == "server 127.0.0.1:1;\n"
    return daemon, registry, clock, table


async def _timers(daemon: Daemon) -> None:
    await run_due(daemon.timers(), daemon.clock())


def test_a_deferred_change_installs_nothing_keeps_health_and_lands_with_the_newest_data(tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon, registry, clock, table = await _started(tmp_path)
        out = tmp_path / "out.conf"
        table.table = draining(30.0, 10.0, now=clock.now)  # two generations drain: the budget is spent
        for ports in ((1, 2), (1, 2, 3), (1, 2, 3, 4)):
            registry.set(ServiceHealth("web"), _view(*ports))
            await _drain(daemon)
            clock.now += 1.0
            await _timers(daemon)
        assert out.read_text() == "server 127.0.0.1:1;\n", "deferred as a whole: nothing installed"
        daemon._publish()
        assert daemon.snapshot.health() == (True, "ok")
        status = json.loads(json.dumps(daemon.snapshot.to_json()))["reload_budget"]
        assert status["deferred"].startswith("reload deferred: 2 generations of nginx workers still draining")
        assert status["draining_generations"] == 2 and status["deferred_total"] == 3
        page = StatusPage("test").render(daemon.snapshot)
        assert "reload deferred 2 s: 2 generations of nginx workers still draining" in page
        assert "2 generations of old workers draining, oldest 33 s" in page
        table.table = draining(11.0, now=clock.now)  # one exited
        clock.now += 1.0
        await _timers(daemon)
        assert out.read_text().count("server") == 4, "the newest registry state landed"
        metrics = daemon.metrics.render_text().decode()
        assert "confpy_reloads_deferred_total 3.0" in metrics
        assert "confpy_reload_defer_seconds_count 1.0" in metrics
        assert "confpy_nginx_draining_generations 1.0" in metrics
        assert "confpy_reloads_forced_total 0.0" in metrics
        await daemon._stop()

    run(scenario)


def test_a_deferred_change_lands_after_max_defer_although_nothing_exited(tmp_path: Path) -> None:
    async def scenario() -> None:
        daemon, registry, clock, table = await _started(tmp_path, max_defer="10s")
        out = tmp_path / "out.conf"
        table.table = draining(30.0, 10.0, now=clock.now)
        registry.set(ServiceHealth("web"), _view(1, 2))
        await _drain(daemon)
        await _timers(daemon)
        for _ in range(9):
            clock.now += 1.0
            await _timers(daemon)
            assert out.read_text().count("server") == 1
        clock.now += 1.0
        await _timers(daemon)
        assert out.read_text().count("server") == 2
        assert "confpy_reloads_forced_total 1.0" in daemon.metrics.render_text().decode()
        await daemon._stop()

    run(scenario)


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("max_draining_generations = 0", "[nginx] max_draining_generations: must be at least 1, got 0"),
        ("max_draining_generations = -1", "[nginx] max_draining_generations: must be at least 1, got -1"),
        ('max_draining_memory_bytes = "1G"', "[nginx] max_draining_memory_bytes: expected an integer"),
        ("max_draining_memory_bytes = -5", "[nginx] max_draining_memory_bytes: must be a number of bytes"),
        ('max_defer = "soon"', "[nginx] max_defer: invalid duration 'soon'"),
        ('max_defer = "0s"', "[nginx] max_defer: must be a positive duration"),
    ],
)
def test_bad_budget_values_name_the_key(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "confpy.toml"
    path.write_text(
        f'[nginx]\n{line}\n[[template]]\nsource = "builtin:nginx-upstreams.conf.j2"\ndestination = "/tmp/x.conf"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(path.read_text(), path, {})
    assert message in str(info.value)


def test_the_budget_defaults() -> None:
    config = parse_config(
        '[[template]]\nsource = "builtin:nginx-upstreams.conf.j2"\ndestination = "/tmp/x.conf"\n',
        Path("/tmp/c.toml"),
        {},
    )
    assert BudgetLimits.of(config.nginx) == BudgetLimits(3, 0, 300.0)
