"""The shrink guard's decision and its holds, in-process on a fake clock (guard.py); the daemon's
and `--once`'s use of it with real processes is in test_guard_e2e.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from confpy.config import GuardConfig, parse_config
from confpy.errors import ConfigError
from confpy.guard import (
    Decision,
    GuardHooks,
    ShrinkGuard,
    allowed_drop,
    decide,
    parse_release,
    remembered_view,
    strictest,
    with_release,
)
from confpy.model import HealthView, KVPair, Memory, memory_key
from confpy.registry.base import KVKey, ServiceHealth
from tests.test_core_units import FakeClock, FakeRegistry, _daemon, _drain, _view

WEB = ServiceHealth("web")
DEFAULT = GuardConfig()


def members(*ports: int) -> HealthView:
    return _view(*ports)


def ports(view: HealthView) -> list[int]:
    return sorted(i.port for i in view.instances)


# --- the decision --------------------------------------------------------------------------


def test_the_defaults_are_half_thirty_seconds_and_four_members() -> None:
    assert (DEFAULT.max_drop, DEFAULT.hold, DEFAULT.min_members, DEFAULT.enabled) == (0.5, 30.0, 4, True)


@pytest.mark.parametrize(
    ("before", "after", "held"),
    [
        (10, 5, False),  # exactly max_drop: applies
        (10, 4, True),  # 6 of 10: held
        (10, 9, False),  # 1 of 10
        (10, 0, True),  # every member
        (5, 3, False),  # 2 of 5: 50% of 5 is 2 (rounded down)
        (5, 2, True),  # 3 of 5
        (4, 2, False),  # 2 of 4
        (4, 1, True),  # 3 of 4: 4 is min_members, so guarded
        (3, 0, False),  # smaller than min_members: not guarded
        (2, 1, False),
    ],
)
def test_a_drop_larger_than_max_drop_is_held(before: int, after: int, held: bool) -> None:
    previous = members(*range(1, before + 1))
    decision = decide(previous, members(*range(1, after + 1)), DEFAULT)
    assert decision.held is held
    assert ports(decision.view) == (list(range(1, before + 1)) if held else list(range(1, after + 1)))
    assert len(decision.kept) == (before - after if held else 0)


def test_rounding_is_down_and_exact_at_the_boundary() -> None:
    assert allowed_drop(5, DEFAULT) == 2  # 2.5 rounded down
    assert allowed_drop(10, DEFAULT) == 5
    assert allowed_drop(10, GuardConfig(max_drop=0.3)) == 3  # 0.3 * 10 is 2.9999999999999996 in floats
    assert allowed_drop(3, DEFAULT) == 3  # below min_members: every member may go
    assert allowed_drop(100, GuardConfig(max_drop=1.0)) == 100  # "100%": off


def test_added_and_changed_members_apply_at_once_while_a_drop_is_held() -> None:
    previous = members(*range(1, 11))
    decision = decide(previous, members(1, 2, 20, 21), DEFAULT)  # 8 gone, 2 new
    assert decision.held and ports(decision.view) == [*range(1, 11), 20, 21]
    assert sorted(i.port for i in decision.kept) == list(range(3, 11))


def test_nothing_before_means_nothing_to_guard() -> None:
    assert decide(None, members(1), DEFAULT) == Decision(members(1))


def test_max_drop_100_percent_switches_it_off() -> None:
    assert not decide(members(*range(1, 11)), members(), GuardConfig(max_drop=1.0)).held


def test_the_strictest_of_several_guards_protects_a_shared_service() -> None:
    relaxed = GuardConfig(max_drop=0.8, hold=10.0, min_members=10)
    tight = GuardConfig(max_drop=0.2, hold=60.0, min_members=3)
    off = GuardConfig(max_drop=1.0)
    assert strictest([relaxed, tight, off]) == GuardConfig(max_drop=0.2, hold=60.0, min_members=3)
    assert strictest([off]) == off and strictest([]) is None
    # 3 of 10 is allowed by `relaxed` alone, held by the strictest of both
    assert not decide(members(*range(1, 11)), members(*range(1, 8)), relaxed).held
    assert decide(members(*range(1, 11)), members(*range(1, 8)), strictest([relaxed, tight]) or off).held


# --- the configuration ---------------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> object:
    source = tmp_path / "t.j2"
    source.write_text("")
    return parse_config(
        text + f'\n[[template]]\nsource = "{source}"\ndestination = "{tmp_path / "out.conf"}"\n' + _template_extra,
        tmp_path / "confpy.toml",
        {},
    )


_template_extra = ""


def test_guard_table_and_per_template_override(tmp_path: Path) -> None:
    source = tmp_path / "t.j2"
    source.write_text("")
    config = parse_config(
        f"""
[guard]
max_drop = "30%"
hold = "1m"
[[template]]
source = "{source}"
destination = "{tmp_path / "a.conf"}"
[[template]]
source = "{source}"
destination = "{tmp_path / "b.conf"}"
guard = {{ max_drop = "100%" }}
""",
        tmp_path / "confpy.toml",
        {},
    )
    a, b = config.templates
    assert config.guard == GuardConfig(max_drop=0.3, hold=60.0, min_members=4)
    assert config.guard_for(a) is config.guard
    assert config.guard_for(b) == GuardConfig(max_drop=1.0, hold=60.0, min_members=4)  # the rest from [guard]
    assert not config.guard_for(b).enabled


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[guard]\nmax_drop = "150%"', r"\[guard\] max_drop: \'150%\' must be more than 0% and at most 100%"),
        ('[guard]\nmax_drop = "0%"', r"\[guard\] max_drop: '0%' must be more than 0%"),
        ('[guard]\nmax_drop = "half"', r"\[guard\] max_drop: 'half' is not a percentage"),
        ("[guard]\nmax_drop = 50", r"\[guard\] max_drop: expected a string"),
        ('[guard]\nhold = "0s"', r"\[guard\] hold: must be a positive duration"),
        ('[guard]\nhold = "soon"', r"\[guard\] hold: invalid duration"),
        ("[guard]\nmin_members = 0", r"\[guard\] min_members: must be a positive number of members"),
        ("[guard]\nmin_member = 3", r"\[guard\] min_member"),
    ],
)
def test_bad_guard_values_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    source = tmp_path / "t.j2"
    source.write_text("")
    text = f'{table}\n[[template]]\nsource = "{source}"\ndestination = "{tmp_path / "o.conf"}"\n'
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(text, tmp_path / "confpy.toml", {})
    assert info.value.exit_code == 2


def test_a_bad_template_guard_names_the_template(tmp_path: Path) -> None:
    source = tmp_path / "t.j2"
    source.write_text("")
    text = f'[[template]]\nsource = "{source}"\ndestination = "{tmp_path / "o.conf"}"\nguard = {{ max_drop = "x" }}\n'
    with pytest.raises(ConfigError, match=r"\[template #1\.guard\] max_drop: 'x' is not a percentage"):
        parse_config(text, tmp_path / "confpy.toml", {})


# --- the holds, on a fake clock ------------------------------------------------------------


class Applied:
    def __init__(self) -> None:
        self.calls: list[tuple[ServiceHealth, HealthView, str]] = []

    def __call__(self, dep: ServiceHealth, view: HealthView, reason: str) -> None:
        self.calls.append((dep, view, reason))


def _guard(clock: FakeClock, outcomes: list[str]) -> tuple[ShrinkGuard, Applied]:
    applied = Applied()
    hooks = GuardHooks(outcome=outcomes.append)
    return ShrinkGuard(lambda dep: DEFAULT, applied, clock, hooks), applied


def test_a_held_drop_applies_in_one_step_when_the_hold_has_passed(caplog: pytest.LogCaptureFixture) -> None:
    clock, outcomes = FakeClock(), list[str]()
    guard, applied = _guard(clock, outcomes)
    ten, two = members(*range(1, 11)), members(1, 2)
    view = guard.admit(WEB, ten, two)
    assert ports(view) == list(range(1, 11)) and guard.next_deadline() == clock.now + 30
    assert (
        "service web: registry dropped 8 of 10 members at once; holding the previous 10 for 30 s (guard max_drop 50%)"
        in caplog.text
    )
    clock.now += 29.9
    asyncio.run(guard.on_timer(clock.now))
    assert not applied.calls
    clock.now += 0.1
    asyncio.run(guard.on_timer(clock.now))
    assert [(dep, ports(view)) for dep, view, _ in applied.calls] == [(WEB, [1, 2])]
    assert outcomes == ["applied"] and not guard.held and guard.next_deadline() is None
    assert (
        "service web: the registry still says so after 30 s; applying the held drop of 8 of 10 members in one step: "
        "2 remain" in caplog.text
    )


def test_a_flap_within_the_hold_withdraws_it_and_the_view_is_what_it_was() -> None:
    clock, outcomes = FakeClock(), list[str]()
    guard, applied = _guard(clock, outcomes)
    ten = members(*range(1, 11))
    held_view = guard.admit(WEB, ten, members(1, 2))
    clock.now += 5
    back = guard.admit(WEB, held_view, members(*range(1, 11)))
    assert back == ten, "equal to what templates saw: nothing to write"
    assert outcomes == ["withdrawn"] and not guard.held and not applied.calls


def test_a_trickle_during_the_hold_keeps_its_deadline_and_the_latest_answer_applies() -> None:
    clock, outcomes = FakeClock(), list[str]()
    guard, applied = _guard(clock, outcomes)
    view = guard.admit(WEB, members(*range(1, 11)), members(1, 2, 3))
    deadline = guard.next_deadline()
    clock.now += 10
    view = guard.admit(WEB, view, members(1, 2, 30))  # still a large drop, and one added member
    assert ports(view) == [*range(1, 11), 30] and guard.next_deadline() == deadline
    clock.now += 20
    asyncio.run(guard.on_timer(clock.now))
    assert [ports(v) for _, v, _ in applied.calls] == [[1, 2, 30]]


def test_the_release_key_applies_a_held_drop_of_that_service_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock, outcomes = FakeClock(), list[str]()
    guard, applied = _guard(clock, outcomes)
    guard.admit(WEB, members(*range(1, 11)), members(1))
    api = ServiceHealth("api")
    guard.admit(api, members(*range(1, 11)), members(1))
    key = "confpy/guard/release"
    guard.on_release(KVPair(key, key, json.dumps({"web": "old"})))  # the first read: written before, no release
    assert not applied.calls
    guard.on_release(KVPair(key, key, with_release(KVPair(key, key, json.dumps({"web": "old"})), "web", "new")))
    assert [dep for dep, _, _ in applied.calls] == [WEB] and set(guard.held) == {api}
    assert "released by the release key confpy/guard/release (new)" in caplog.text
    assert parse_release(KVPair(key, key, "not json")) == {} and parse_release(None) == {}


def test_once_compares_with_the_remembered_members() -> None:
    memory = Memory({memory_key("web", None): members(1, 2, 3, 4).instances})
    assert remembered_view(WEB, [Memory(), memory]) == members(1, 2, 3, 4)
    assert remembered_view(ServiceHealth("api"), [memory]) is None


# --- the daemon, in-process ----------------------------------------------------------------

SERVERS = "{% for i in service('web') %}server {{ i.endpoint }};\n{% endfor %}"


def test_the_daemon_holds_applies_and_withdraws_without_writing(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, SERVERS, registry, clock, wait_min="0s")
        out = tmp_path / "out.conf"
        registry.set(WEB, _view(*range(1, 11)))
        registry.set(KVKey("confpy/guard/release"), None)  # Consul answers a missing key at once
        await daemon._start()
        await _drain(daemon)
        await daemon._run_due()
        assert out.read_text().count("server") == 10
        written = out.stat().st_mtime_ns
        cycles = daemon.cycles

        clock.now += 1  # watches keep a minimum interval between queries
        registry.set(WEB, _view(1, 2))  # 10 -> 2: held
        await _drain(daemon)
        await daemon._run_due()
        assert out.read_text().count("server") == 10 and out.stat().st_mtime_ns == written
        assert KVKey("confpy/guard/release") in daemon.watches, "the release key is watched while a drop is held"
        daemon._publish()
        held = daemon.snapshot.to_json()["guard"]["held"]
        assert [(h["service"], h["previous"], len(h["losing"])) for h in held] == [("service(web)", 10, 8)]
        text = daemon.metrics.render_text().decode()
        assert "confpy_guard_held_upstreams 1.0" in text

        clock.now += 1  # watches keep a minimum interval between queries
        registry.set(WEB, _view(*range(1, 11)))  # back within the hold: withdrawn, nothing written
        await _drain(daemon)
        await daemon._run_due()
        assert out.stat().st_mtime_ns == written and daemon.cycles == cycles
        assert 'confpy_guard_holds_total{outcome="withdrawn"} 1.0' in daemon.metrics.render_text().decode()

        clock.now += 1  # watches keep a minimum interval between queries
        registry.set(WEB, _view(1, 2, 11))  # held again; 11 is added at once
        await _drain(daemon)
        await daemon._run_due()
        assert out.read_text().count("server") == 11 and "127.0.0.1:11;" in out.read_text()
        clock.now += 30  # the hold passes: the daemon's timer applies the drop in one cycle
        cycles = daemon.cycles
        for timer in daemon.timers():
            deadline = timer.next_deadline()
            if deadline is not None and deadline <= clock.now:
                await timer.on_timer(clock.now)
        await _drain(daemon)
        await daemon._run_due()
        assert sorted(out.read_text().splitlines()) == sorted(f"server 127.0.0.1:{p};" for p in (1, 2, 11))
        assert daemon.cycles == cycles + 1
        text = daemon.metrics.render_text().decode()
        assert 'confpy_guard_holds_total{outcome="applied"} 1.0' in text and "confpy_guard_held_upstreams 0.0" in text
        await daemon._run_due()
        await daemon._stop()

    asyncio.run(scenario())
