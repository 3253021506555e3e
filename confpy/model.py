"""confpy's values: what a registry answer becomes, what templates see, what is remembered.

No I/O here. An instance whose address, port, weight or nginx meta would be unusable is rejected
as it arrives, with a reason naming the service and the instance, so a template never sees it and
one bad registration never stops the rest of the gateway from updating. The registry clients
produce these values; rendering and applying consume them.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_HOST_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_NGINX_TIME = re.compile(r"^[0-9]{1,9}(?:ms|s|m|h|d|w|M|y)?$")


_NGINX_TIME_UNITS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
    "M": 2592000.0,
    "y": 31536000.0,
}


def nginx_time_seconds(text: str) -> float:
    """An nginx time (`10s`, `500ms`, `1m`, a bare number of seconds) in seconds; ValueError if not one."""
    match = re.fullmatch(r"([0-9]{1,9})(ms|s|m|h|d|w|M|y)?", text)
    if match is None:
        raise ValueError(f"{text!r} is not an nginx time such as 10s")
    return int(match.group(1)) * _NGINX_TIME_UNITS[match.group(2) or "s"]


def is_hostname(text: str) -> bool:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens."""
    if not text or len(text) > 253:
        return False
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if all(label.isdigit() for label in labels):
        return False  # looks like a dotted IPv4 address that is not one (e.g. 256.1.1.1)
    return all(_HOST_LABEL.match(label) for label in labels)


@functools.lru_cache(maxsize=65536)
def normalize_address(text: str) -> str:
    """Return the address if it is IPv4, IPv6 or an RFC 1123 host name; raise ValueError otherwise.

    Cached: every answer about a service repeats all of its instances' addresses."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        if is_hostname(text):
            return text
        raise ValueError(f"address {text[:80]!r} is neither an IP address nor a valid host name") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise ValueError(f"address {text!r} has an IPv6 zone (%{ip.scope_id}), which nginx does not accept")
    if ip.is_unspecified:
        raise ValueError(f"address {text!r} is unspecified (0.0.0.0 or ::) and cannot be connected to")
    return str(ip)


class SafeStr(str):
    """Text built only from validated parts (addresses, ports, mapped names): nginx-safe by construction."""


def format_endpoint(address: str, port: int) -> SafeStr:
    """`address:port`, with IPv6 addresses in brackets as nginx needs them."""
    return SafeStr(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")


EMPTY_META: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One passing instance of a service, as a template sees it.

    Slots and shared strings keep a large catalog small (about 1 KB per instance).
    """

    name: str
    id: str
    node: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: EMPTY_META)
    weight: int = 1
    max_fails: int | None = None
    fail_timeout: str | None = None
    # The IP the registry client resolved a host-name `address` to, off the loop, when it fetched
    # it (live mode's balancer needs an IP; templates print `address`). None: not resolved.
    ip: str | None = None

    @property
    def endpoint(self) -> SafeStr:
        """`address:port`, IPv6 bracketed: `[2001:db8::1]:8080`."""
        return format_endpoint(self.address, self.port)

    @property
    def backup(self) -> bool:
        """A backup member (tag `backup`, or meta `backup` = `true`): used only when no other is available."""
        return "backup" in self.tags or self.meta.get("backup") == "true"

    @property
    def server(self) -> SafeStr:
        """The arguments of an nginx `server` line: `endpoint weight=N [max_fails=N] [fail_timeout=T] [backup]`."""
        text = f"{self.endpoint} weight={self.weight}"
        if self.max_fails is not None:
            text += f" max_fails={self.max_fails}"
        if self.fail_timeout:
            text += f" fail_timeout={self.fail_timeout}"
        if self.backup:
            text += " backup"
        return SafeStr(text)

    def sort_key(self) -> tuple[str, str, str, int]:
        return (self.node, self.id, self.address, self.port)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "node": self.node,
            "address": self.address,
            "port": self.port,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "weight": self.weight,
            "max_fails": self.max_fails,
            "fail_timeout": self.fail_timeout,
            **({"ip": self.ip} if self.ip else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceInstance:
        """Rebuild an instance remembered in a state file; raise ValueError when it is not one."""
        tags, meta = data.get("tags", []), data.get("meta", {})
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("tags is not a list of strings")
        if not isinstance(meta, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("meta is not a map of strings")
        name, sid, node, address = data["name"], data["id"], data["node"], data["address"]
        if not all(isinstance(text, str) for text in (name, sid, node, address)):
            raise ValueError("name, id, node or address is not a string")
        instance = validated_instance(
            name=name,
            id=sid or name,
            node=node,
            address=address,
            port=data["port"],
            tags=tags,
            meta=meta,
            weight=data.get("weight", 1),
        )
        ip = data.get("ip")
        if ip is None:
            return instance
        if not isinstance(ip, str) or is_hostname(ip):
            raise ValueError("ip is not an IP address")
        return dataclasses.replace(instance, ip=normalize_address(ip))

    def field_named(self, value: object) -> str | None:
        """Which of this instance's registry fields holds `value` (for error messages)."""
        for label, candidate in (("name", self.name), ("ID", self.id), ("node", self.node)):
            if candidate == value:
                return label
        if value in self.tags:
            return "tag"
        for key, meta_value in self.meta.items():
            if value == meta_value:
                return f"meta {key!r}"
            if value == key:
                return "meta key"
        return None


@dataclass(frozen=True)
class RejectedInstance:
    """An instance left out of the render, and why."""

    service: str
    id: str
    reason: str

    def __str__(self) -> str:
        return f"service {self.service!r} instance {self.id!r}: {self.reason}"


class Interner:
    """Reuses equal strings and tuples within one answer (node names, tag lists repeat)."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        return self.values.setdefault(value, value)


def validated_instance(
    *,
    name: str,
    id: str,
    node: str,
    address: str,
    port: object,
    tags: Sequence[str],
    meta: Mapping[str, str],
    weight: object,
    intern: Interner | None = None,
) -> ServiceInstance:
    """An instance from the fields every registry has, validated as nginx needs them; ValueError says why not.

    The registry clients decode their own wire formats into these fields (tags and meta already
    strings); what nginx would refuse (an address, a port, a weight, meta max_fails/fail_timeout)
    is checked here, once, for all of them."""
    share = intern or Interner()
    checked_address = normalize_address(address)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port {port!r} is not from 1 to 65535")
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"weight {weight!r} is not a positive integer")
    max_fails: int | None = None
    if "max_fails" in meta:
        text = meta["max_fails"]
        if not text.isascii() or not text.isdigit() or len(text) > 6:
            raise ValueError(f"meta max_fails {text[:40]!r} is not a non-negative integer")
        max_fails = int(text)
    fail_timeout: str | None = None
    if "fail_timeout" in meta:
        text = meta["fail_timeout"]
        if not _NGINX_TIME.match(text):
            raise ValueError(f"meta fail_timeout {text[:40]!r} is not an nginx time such as 10s")
        fail_timeout = text
    return ServiceInstance(
        name=share(name),
        id=id,
        node=share(node),
        address=share(SafeStr(checked_address)),
        port=port,
        tags=share(tuple(sorted(tags))),
        meta=MappingProxyType(dict(sorted(meta.items()))) if meta else EMPTY_META,
        weight=weight,
        max_fails=max_fails,
        fail_timeout=fail_timeout,
    )


@dataclass(frozen=True, slots=True)
class MemberHealth:
    """An instance that is not passing (so not served), as the status page shows it."""

    id: str
    node: str
    endpoint: str
    weight: int
    status: str  # "warning", "critical" or "maintenance"
    output: str  # the first line of the worst check's output (or its notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "endpoint": self.endpoint,
            "status": self.status,
            "output": self.output,
        }


@dataclass(frozen=True)
class HealthView:
    """The passing instances of one service (sorted), the ones rejected as unusable, and those
    the registry does not call passing (for the status page; templates never see them)."""

    instances: tuple[ServiceInstance, ...]
    rejected: tuple[RejectedInstance, ...] = ()
    unhealthy: tuple[MemberHealth, ...] = ()

    @classmethod
    def of(
        cls,
        instances: Iterable[ServiceInstance],
        rejected: Iterable[RejectedInstance] = (),
        unhealthy: Iterable[MemberHealth] = (),
    ) -> HealthView:
        """A view with its instances in the order templates see them (node, id, address, port)."""
        return cls(tuple(sorted(instances, key=ServiceInstance.sort_key)), tuple(rejected), tuple(unhealthy))


def without_unresolvable(view: HealthView, resolves: Callable[[str], bool]) -> HealthView:
    """Move instances whose host name does not resolve to `rejected`.

    nginx resolves upstream host names when it loads its configuration and refuses the whole
    configuration if one does not resolve; one such registration must not block every update.
    """
    kept: list[ServiceInstance] = []
    rejected = list(view.rejected)
    for instance in view.instances:
        if is_hostname(instance.address) and not resolves(instance.address):
            rejected.append(
                RejectedInstance(instance.name, instance.id, f"host name {instance.address!r} does not resolve")
            )
        else:
            kept.append(instance)
    return HealthView(tuple(kept), tuple(rejected), view.unhealthy)


def with_resolved(view: HealthView, addresses: Mapping[str, str]) -> HealthView:
    """`without_unresolvable`, given each resolvable host name's address: the instances kept carry
    it (`ServiceInstance.ip`), so nothing resolves the name again later."""
    kept = without_unresolvable(view, addresses.__contains__)
    if not addresses:
        return kept
    instances = tuple(
        dataclasses.replace(i, ip=addresses[i.address]) if i.address in addresses else i for i in kept.instances
    )
    return HealthView(instances, kept.rejected, kept.unhealthy)


@dataclass
class Memory:
    """Last known members of each service a template used, for `on_empty = "keep"`.

    Keyed by `memory_key(service, tag)`; remembered across restarts in the state directory.
    """

    members: dict[str, tuple[ServiceInstance, ...]] = field(default_factory=dict)


def memory_key(service: str, tag: str | None, dc: str | None = None, passing: bool = True) -> str:
    """`service|tag` (as since 0.1), plus `|dc` and `|all` for another datacenter or non-passing too."""
    key = f"{service}|{tag or ''}"
    if dc:
        key += f"|{dc}"
    if not passing:
        key += "|all"
    return key


MAX_LISTED_CHANGES = 6


def describe_change(old: object, new: object) -> str:
    """What changed between two values of a dependency, for one log line: `+10.0.0.3:8080
    -10.0.0.2:8080`, `+api -old` for the catalog, or counts when many."""
    if isinstance(old, HealthView) and isinstance(new, HealthView):
        before = {i.endpoint: i for i in old.instances}
        after = {i.endpoint: i for i in new.instances}
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(e for e in set(after) & set(before) if after[e] != before[e])
        parts = _listed("+", added) + _listed("-", removed) + _listed("~", changed)
        if parts:
            return " ".join(parts)
        if old.unhealthy != new.unhealthy:
            return "no member changed; not passing: " + (
                " ".join(f"{m.id} {m.status}" for m in new.unhealthy[:MAX_LISTED_CHANGES]) or "none"
            )
        return "no member changed (only rejected instances)"
    if isinstance(old, KVPair) or isinstance(new, KVPair):
        # Values are not logged: KV often holds what an operator would not want in a journal.
        if not isinstance(new, KVPair):
            return "deleted"
        return "written" if old is None else f"new value ({len(new.value)} bytes)"
    if isinstance(old, tuple) and isinstance(new, tuple):
        added_names = sorted(set(map(str, new)) - set(map(str, old)))
        removed_names = sorted(set(map(str, old)) - set(map(str, new)))
        return " ".join(_listed("+", added_names) + _listed("-", removed_names)) or "same names"
    return "new value"


def _listed(sign: str, items: Sequence[str]) -> list[str]:
    if len(items) > MAX_LISTED_CHANGES:
        return [f"{sign}{len(items)} members" if sign != "~" else f"~{len(items)} changed"]
    return [f"{sign}{item}" for item in items]


@dataclass(frozen=True, slots=True)
class KVPair:
    """One key of the registry's KV store: `path` is the whole key, `key` the part below the prefix asked
    for (consul-template's `.Key` in `ls`/`tree`), `value` the UTF-8 text."""

    key: str
    path: str
    value: str
    flags: int = 0


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A catalog node: `nodes()` lists them, `node(name).node` is one."""

    name: str
    address: str
    datacenter: str
    tagged_addresses: Mapping[str, str]
    meta: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class NodeService:
    """A service instance registered on a node, as `node(name).services` lists them."""

    id: str
    name: str
    tags: tuple[str, ...]
    address: str
    port: int
    meta: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class NodeServices:
    """`node(name)`: the node and its services (by ID)."""

    node: NodeInfo
    services: tuple[NodeService, ...]


@dataclass(frozen=True, slots=True)
class ServiceTags:
    """One service of the catalog with the union of its instances' tags: `services(detailed=True)`."""

    name: str
    tags: tuple[str, ...]
