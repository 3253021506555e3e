"""What templates ask a registry for, and what a registry must answer.

A dependency is a frozen value naming one query (so it can key a dict): two templates that call
`service("web")` share one dependency and one watch. A registry answers a dependency at an index,
blocking while nothing changed past it, and turns its answer into confpy's values (`model.py`).
The watch loop and the render only see these two protocols, so a test can stand in a fake
registry with no server, and another registry can answer the same query kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Dependency(Protocol):
    """A query templates depend on: hashable, and able to say what it is."""

    def describe(self) -> str:
        """A short label for logs and /status, e.g. `service(web, tag=nginx)`."""
        ...

    def __hash__(self) -> int: ...

    def __eq__(self, other: object) -> bool: ...


class Registry(Protocol):
    """The source of dependency values (Consul today)."""

    @property
    def address(self) -> str:
        """Where the registry is, for messages (never with credentials)."""
        ...

    async def fetch(self, dep: Dependency, index: int, wait: float) -> tuple[int, object]:
        """Answer `dep`: at once when `index` is 0, else blocking up to `wait` for a change past it.

        Returns (new index, value). Raises RegistryError subclasses (ConsulError) that say what to
        check; every call is bounded in time.
        """
        ...

    async def ping(self) -> None:
        """A cheap non-blocking request: returns when the registry answers, else raises RegistryError."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class ServiceHealth:
    """The passing instances of one service: `service(name, tag=None)`."""

    service: str
    tag: str | None = None

    def describe(self) -> str:
        return f"service({self.service}, tag={self.tag})" if self.tag else f"service({self.service})"


@dataclass(frozen=True, slots=True)
class CatalogServices:
    """The names of the catalog's services, optionally only those carrying a tag: `services(tag=None)`."""

    tag: str | None = None

    def describe(self) -> str:
        return f"services(tag={self.tag})" if self.tag else "services()"


AnyDependency = ServiceHealth | CatalogServices
