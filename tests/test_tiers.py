"""The two test tiers: what makes a test end-to-end, and the guard that keeps the others in-process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess

import pytest

from . import tier_samples
from .tiers import E2E, InProcessGuard, InProcessRefused, e2e_reason, spawning_helper_named

STARTING_FIXTURES = ("consul", "nginx", "backends", "daemons", "hung_port", "config_file")


def _guard(guard: InProcessGuard | None) -> InProcessGuard:
    assert guard is not None, "an in-process test runs under the guard"
    return guard


def test_starting_a_process_is_refused_by_every_way_there_is(in_process_guard: InProcessGuard | None) -> None:
    guard = _guard(in_process_guard)

    async def from_asyncio() -> None:
        await asyncio.create_subprocess_exec("true")

    attempts = [
        lambda: subprocess.run(["true"], check=False),
        lambda: asyncio.run(from_asyncio()),
        lambda: os.posix_spawn("/bin/true", ["true"], {}),
        lambda: os.system("true"),
        os.fork,
    ]
    for attempt in attempts:
        with guard.expecting_refusal() as seen, pytest.raises(InProcessRefused, match="tried to start a process"):
            attempt()
        assert len(seen) == 1 and seen[0].startswith("start a process")


def test_a_network_or_unix_socket_is_refused_and_a_socketpair_is_not(in_process_guard: InProcessGuard | None) -> None:
    guard = _guard(in_process_guard)
    for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        with guard.expecting_refusal() as seen, pytest.raises(InProcessRefused, match="tried to open a socket"):
            socket.socket(family, socket.SOCK_STREAM)
        assert seen == [f"open a socket (family {family})"]

    async def connect() -> None:
        await asyncio.open_connection("127.0.0.1", 9)

    with guard.expecting_refusal() as seen, pytest.raises(InProcessRefused):
        asyncio.run(connect())
    assert seen

    left, right = socket.socketpair()  # and asyncio's own loop, which wakes itself through one
    with left, right:
        left.sendall(b"ping")
        assert right.recv(4) == b"ping"
    assert asyncio.run(asyncio.sleep(0, "ran")) == "ran"
    assert guard.attempts == []


def test_code_that_catches_every_exception_cannot_hide_an_attempt(in_process_guard: InProcessGuard | None) -> None:
    guard = _guard(in_process_guard)
    with guard.expecting_refusal() as seen, pytest.raises(InProcessRefused):
        try:
            subprocess.run(["true"], check=False)
        except Exception:
            pass
    assert len(seen) == 1

    async def forgotten_task() -> None:
        task = asyncio.get_running_loop().create_task(asyncio.create_subprocess_exec("true"))
        await asyncio.sleep(0)
        del task  # never awaited: only the guard's own record shows the attempt

    with guard.expecting_refusal() as seen:
        asyncio.run(forgotten_task())
    assert len(seen) == 1, "the attempt is remembered, and would fail the test at teardown"


def test_helpers_are_followed_through_the_tests_own_module() -> None:
    assert spawning_helper_named(tier_samples.runs_confpy_through_a_helper) == "run_confpy"
    assert spawning_helper_named(tier_samples.uses_a_socketpair_only) is None


def test_every_test_with_a_starting_fixture_or_helper_is_marked_e2e(
    request: pytest.FixtureRequest, in_process_guard: InProcessGuard | None
) -> None:
    assert in_process_guard is not None and e2e_reason(request.node) is None
    items = request.session.items
    for item in items:
        reason = e2e_reason(item)
        assert (reason is None) or item.get_closest_marker(E2E) is not None, item.nodeid
        if set(STARTING_FIXTURES) & set(item.fixturenames):  # type: ignore[attr-defined]
            assert reason is not None and reason.startswith("fixture "), item.nodeid
    assert request.node in items
