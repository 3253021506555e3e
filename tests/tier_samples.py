"""Functions the tier tests classify (never called): a module apart, so that naming them does not
make the tier tests themselves end-to-end."""

from __future__ import annotations

import socket

from .conftest import run_confpy


def runs_confpy_through_a_helper() -> None:
    _version()


def _version() -> None:
    run_confpy("--version")


def uses_a_socketpair_only() -> None:
    left, right = socket.socketpair()
    left.close()
    right.close()
