"""The registry a configuration follows, as operators see it: which one, where, and how it is retried.

Status, the status page, log lines, systemd's STATUS, metrics labels and retries read this one
value, so an etcd configuration is named etcd (with its endpoints) everywhere, never Consul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from confpy.config import Config

RegistryKind = Literal["consul", "etcd"]
INITIAL_BACKOFF = 0.25  # seconds before the first retry of a failed registry request

REGISTRY_NAMES: dict[RegistryKind, str] = {"consul": "Consul", "etcd": "etcd"}  # as sentences write them


@dataclass(frozen=True)
class RegistryView:
    """Which registry, where (its endpoints, without credentials), and its timeouts and backoff."""

    kind: RegistryKind
    endpoints: tuple[str, ...]
    wait: float  # a blocking query's longest wait
    timeout: float  # one request's own bound (connecting, a non-blocking answer)
    max_backoff: float
    initial_backoff: float = INITIAL_BACKOFF

    @property
    def name(self) -> str:
        """`Consul` or `etcd`, as log lines and messages write it."""
        return REGISTRY_NAMES[self.kind]

    @property
    def address(self) -> str:
        """The endpoints, for one line: `http://127.0.0.1:8500`, or etcd's `http://a:2379, http://b:2379`."""
        return ", ".join(self.endpoints)


def without_credentials(address: str) -> str:
    """A URL without user, password, query or fragment: what may be shown on a page or in a log."""
    parts = urlsplit(address)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def registry_view(config: Config) -> RegistryView:
    """The view of the registry `config` names: its [etcd] table when set, else [consul]."""
    if config.etcd is not None:
        etcd = config.etcd
        return RegistryView(
            "etcd", tuple(map(without_credentials, etcd.endpoints)), etcd.wait, etcd.timeout, etcd.max_backoff
        )
    consul = config.consul
    return RegistryView(
        "consul", (without_credentials(consul.address),), consul.wait, consul.timeout, consul.max_backoff
    )
