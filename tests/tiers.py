"""The two test tiers: which tests are end-to-end, and the guard that keeps the others in-process.

A test is end-to-end (`e2e`) when its fixture closure holds a fixture that starts something (nginx,
dev-consul, etcd, a backend server, a confpy process: registered with `starts_processes`), or when
its code, or a helper of its own module that it calls, names one of `SPAWNING_HELPERS`. Every other
test is in-process and runs under `InProcessGuard`, which refuses to start a process or open a
socket other than a socketpair: a test put in the wrong tier fails loudly instead of hiding in
`make unit`.
"""

from __future__ import annotations

import _posixsubprocess
import inspect
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, FunctionType, ModuleType
from typing import Any, NoReturn, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

E2E = "e2e"
_STARTING: dict[int, object] = {}  # id -> the fixture function or helper, kept alive


def starts_processes(starter: F) -> F:
    """Declare a fixture (put this under `@pytest.fixture`) or a helper end-to-end: every test
    using the fixture, directly or through another fixture, or calling the helper, directly or
    through a helper of its own module, is marked `e2e`."""
    _STARTING[id(starter)] = starter
    return starter


def is_starting(thing: object) -> bool:
    return id(thing) in _STARTING


def _fixture_functions(item: pytest.Item) -> Iterator[Callable[..., Any]]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return
    for name in item.fixturenames:  # type: ignore[attr-defined]
        for definition in info.name2fixturedefs.get(name, ()):
            yield definition.func


def _names(code: CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _names(const)


def _unwrapped(function: Callable[..., Any]) -> Callable[..., Any]:
    """The test's own function under hypothesis's `@given` or another decorator's wrapper."""
    inner = getattr(getattr(function, "hypothesis", None), "inner_test", None)
    return inspect.unwrap(inner if callable(inner) else function)


def spawning_helper_named(function: Callable[..., Any]) -> str | None:
    """The first helper registered with `starts_processes` that `function`, or a function or class
    of its own module it names, names (followed through that module's helpers, not beyond); None
    if it names none."""
    function = _unwrapped(function)
    module = inspect.getmodule(function)
    seen: set[int] = set()
    todo: list[Callable[..., Any] | type] = [function]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        codes = [current.__code__] if isinstance(current, FunctionType) else _class_codes(current)
        namespace = current.__globals__ if isinstance(current, FunctionType) else vars(module or ModuleType(""))
        for code in codes:
            for name in _names(code):
                target = namespace.get(name)
                if target is None:
                    continue
                if is_starting(target):
                    return name
                if (
                    isinstance(target, FunctionType | type)
                    and module is not None
                    and target.__module__ == module.__name__
                ):
                    todo.append(target)
    return None


def _class_codes(cls: type) -> list[CodeType]:
    return [v.__code__ for v in vars(cls).values() if isinstance(v, FunctionType)]


def e2e_reason(item: pytest.Item) -> str | None:
    """Why `item` is end-to-end (a fixture that starts processes, or a spawning helper it calls), or None."""
    for function in _fixture_functions(item):
        if is_starting(function):
            return f"fixture {function.__name__}"
    test_function = getattr(item, "function", None)
    if callable(test_function):
        helper = spawning_helper_named(test_function)
        if helper is not None:
            return f"calls {helper}"
    return None


class InProcessRefused(BaseException):
    """An in-process test tried to start a process or open a socket.

    A BaseException, so no `except Exception` (or `except OSError`) in the code under test can
    swallow it.
    """


class InProcessGuard:
    """Refuses processes and non-socketpair sockets while a unit test runs; remembers each attempt
    (an attempt made in a task nobody awaits still fails the test at teardown)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> NoReturn:
        self.attempts.append(what)
        raise InProcessRefused(
            f"an in-process test tried to {what}; use an in-process stand-in, or make the test "
            "end-to-end through a fixture registered with tests.tiers.starts_processes"
        )

    @contextmanager
    def expecting_refusal(self) -> Iterator[list[str]]:
        """For the guard's own tests: the attempts made inside are expected (and then forgotten)."""
        before = len(self.attempts)
        seen: list[str] = []
        try:
            yield seen
        finally:
            seen.extend(self.attempts[before:])
            del self.attempts[before:]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        refuse = self.refuse

        def no_child(*args: object, **kwargs: object) -> NoReturn:
            refuse(f"start a process ({_command(args)})")

        # Popen._execute_child is where every subprocess (asyncio's too) is made; the os and
        # _posixsubprocess entry points catch what goes around it (os.system, multiprocessing).
        monkeypatch.setattr(subprocess.Popen, "_execute_child", lambda self, args, *rest: no_child(args))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "execv", "execve", "execvp"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, no_child)
        monkeypatch.setattr(_posixsubprocess, "fork_exec", no_child)
        if hasattr(subprocess, "_fork_exec"):
            monkeypatch.setattr(subprocess, "_fork_exec", no_child)

        real_init = socket.socket.__init__

        def guarded_init(
            sock: socket.socket,
            family: int = -1,
            type: int = -1,
            proto: int = -1,
            fileno: int | None = None,
        ) -> None:
            # socket.socketpair() wraps the pair it made with `fileno`: allowed; so is adopting an
            # accepted connection. A new socket of a network or Unix family is not.
            if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
                refuse(f"open a socket (family {family})")
            real_init(sock, family, type, proto, fileno)

        monkeypatch.setattr(socket.socket, "__init__", guarded_init)


def _command(args: tuple[object, ...]) -> str:
    first = args[0] if args else "?"
    if isinstance(first, list | tuple):
        return " ".join(map(str, first))[:80]
    return str(first)[:80]
