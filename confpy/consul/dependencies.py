"""What templates ask Consul for: one small class per query kind.

A dependency is a frozen value (so it can key a dict): it knows how to fetch itself with a
ConsulClient, blocking when given an index, and how to turn Consul's answer into the values a
template sees. Two templates that call `service("web")` share one dependency and one watch.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol

from confpy.consul.client import ConsulClient
from confpy.errors import ConsulBadResponse
from confpy.render.values import HealthView, catalog_names, health_view_from_entries, without_unresolvable


def host_resolves(host: str) -> bool:
    """True when the system resolver knows `host` (as nginx will need it to)."""
    try:
        return bool(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError):
        return False


def health_view(service: str, entries: Any) -> HealthView:
    """A `/v1/health/service` answer as templates see it: validated, sorted, resolvable."""
    return without_unresolvable(health_view_from_entries(service, entries), host_resolves)


class Dependency(Protocol):
    """A query templates depend on."""

    def describe(self) -> str:
        """A short label for logs and /status, e.g. `service(web, tag=nginx)`."""
        ...

    def fetch(self, client: ConsulClient, index: int, wait: float | None) -> tuple[int, object]:
        """Query Consul (blocking while nothing changed past `index`); return (index, value)."""
        ...


@dataclass(frozen=True)
class ServiceHealth:
    """The passing instances of one service: `service(name, tag=None)`."""

    service: str
    tag: str | None = None

    def describe(self) -> str:
        return f"service({self.service}, tag={self.tag})" if self.tag else f"service({self.service})"

    def fetch(self, client: ConsulClient, index: int, wait: float | None) -> tuple[int, HealthView]:
        new_index, entries = client.health_service(self.service, tag=self.tag, passing=True, index=index, wait=wait)
        try:
            return new_index, health_view(self.service, entries)
        except ValueError as exc:
            raise ConsulBadResponse(f"Consul's answer for service {self.service!r} has an unexpected shape: {exc}") from None


@dataclass(frozen=True)
class CatalogServices:
    """The names of the catalog's services, optionally only those carrying a tag: `services(tag=None)`."""

    tag: str | None = None

    def describe(self) -> str:
        return f"services(tag={self.tag})" if self.tag else "services()"

    def fetch(self, client: ConsulClient, index: int, wait: float | None) -> tuple[int, tuple[str, ...]]:
        new_index, data = client.catalog_services(index=index, wait=wait)
        try:
            return new_index, catalog_names(data, self.tag)
        except ValueError as exc:
            raise ConsulBadResponse(f"Consul's service catalog has an unexpected shape: {exc}") from None


AnyDependency = ServiceHealth | CatalogServices
