"""What templates ask a registry for, and what a registry must answer.

A dependency is a frozen value naming one query (so it can key a dict): two templates that call
`service("web")` share one dependency and one watch. A registry answers a dependency at an index,
blocking while nothing changed past it, and turns its answer into confpy's values (`model.py`).
The watch loop and the render only see these two protocols, so a test can stand in a fake
registry with no server, and another registry can answer the same query kinds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Dependency(Protocol):
    """A query templates depend on: hashable, and able to say what it is."""

    def describe(self) -> str:
        """A short label for logs and /status, e.g. `service(web, tag=nginx)`."""
        ...

    def __hash__(self) -> int: ...

    def __eq__(self, other: object) -> bool: ...


class Registry(Protocol):
    """The source of dependency values: Consul or etcd (its kind and address for operators: view.py)."""

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
    """The instances of one service: `service(name, tag=None, dc=None, passing=True)`."""

    service: str
    tag: str | None = None
    dc: str | None = None
    passing: bool = True
    # Hashed once: a render at a thousand services looks a thousand of these up in several dicts,
    # and the hash dataclass generates builds a tuple each time.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.service, self.tag, self.dc, self.passing)))

    def __hash__(self) -> int:
        return self._hash

    def describe(self) -> str:
        extra = [f"tag={self.tag}"] if self.tag else []
        extra += [f"dc={self.dc}"] if self.dc else []
        extra += [] if self.passing else ["passing=False"]
        return f"service({', '.join([self.service, *extra])})"


@dataclass(frozen=True, slots=True)
class CatalogServices:
    """The names of the catalog's services, optionally only those carrying a tag: `services(tag=None)`."""

    tag: str | None = None

    def describe(self) -> str:
        return f"services(tag={self.tag})" if self.tag else "services()"


@dataclass(frozen=True, slots=True)
class KVKey:
    """One KV key: `key(path)`, `key_or_default(path, default)`; its value is a KVPair or None."""

    path: str

    def describe(self) -> str:
        return f"key({self.path})"


@dataclass(frozen=True, slots=True)
class KVTree:
    """Every key under a prefix (`?recurse`): `ls`, `tree` and `keys` read it."""

    prefix: str

    def describe(self) -> str:
        return f"tree({self.prefix})"


@dataclass(frozen=True, slots=True)
class CatalogNodes:
    """The catalog's nodes: `nodes()`."""

    def describe(self) -> str:
        return "nodes()"


@dataclass(frozen=True, slots=True)
class CatalogNode:
    """One node and its services: `node(name)`."""

    name: str

    def describe(self) -> str:
        return f"node({self.name})"


@dataclass(frozen=True, slots=True)
class CatalogDatacenters:
    """The datacenters Consul knows: `datacenters()` (not a blocking endpoint: polled)."""

    def describe(self) -> str:
        return "datacenters()"


@dataclass(frozen=True, slots=True)
class CatalogServiceTags:
    """The catalog's services with their tags: `services(detailed=True)`."""

    tag: str | None = None

    def describe(self) -> str:
        return f"services(tag={self.tag}, detailed)" if self.tag else "services(detailed)"


AnyDependency = (
    ServiceHealth
    | CatalogServices
    | KVKey
    | KVTree
    | CatalogNodes
    | CatalogNode
    | CatalogDatacenters
    | CatalogServiceTags
)
