"""Consul's wire format, decoded into confpy's values (`model.py`): what `ConsulRegistry` answers with.

Each function takes one endpoint's decoded JSON (`/v1/health/service`, `/v1/catalog/services`,
`/v1/kv/...?recurse`, `/v1/catalog/nodes`, `/v1/catalog/node/NAME`) and raises ValueError naming
what is wrong with its shape; one unusable instance is rejected with its reason, never the answer.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from confpy.model import (
    HealthView,
    Interner,
    KVPair,
    MemberHealth,
    NodeInfo,
    NodeService,
    NodeServices,
    RejectedInstance,
    ServiceInstance,
    ServiceTags,
    validated_instance,
)


def _str_field(data: Mapping[str, Any], key: str, default: str = "") -> str:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{key} is {type(value).__name__}, not a string")
    return value


def instance_from_health_entry(entry: Mapping[str, Any], intern: Interner | None = None) -> ServiceInstance:
    """Turn one `/v1/health/service` entry into a validated instance; ValueError says why not."""
    node = entry.get("Node") or {}
    service = entry.get("Service") or {}
    if not isinstance(node, Mapping) or not isinstance(service, Mapping):
        raise ValueError("entry has no Node or Service object")
    name = _str_field(service, "Service")
    raw_address = _str_field(service, "Address") or _str_field(node, "Address")
    if not raw_address:
        raise ValueError("neither Service.Address nor Node.Address is set")
    weights = service.get("Weights") or {}
    raw_tags = service.get("Tags") or []
    raw_meta = service.get("Meta") or {}
    if not isinstance(raw_tags, list) or not all(isinstance(t, str) for t in raw_tags):
        raise ValueError("Tags is not a list of strings")
    if not isinstance(raw_meta, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise ValueError("Meta is not a map of strings")
    return validated_instance(
        name=name,
        id=_str_field(service, "ID") or name,
        node=_str_field(node, "Node"),
        address=raw_address,
        port=service.get("Port"),
        tags=raw_tags,
        meta=raw_meta,
        weight=weights.get("Passing", 1) if isinstance(weights, Mapping) else None,
        intern=intern,
    )


_STATUS_RANK = {"passing": 0, "warning": 1, "critical": 2}
MAINTENANCE_CHECKS = ("_service_maintenance:", "_node_maintenance")


def split_passing(entries: Any) -> tuple[Any, tuple[MemberHealth, ...]]:
    """`/v1/health/service` without `?passing` -> (the entries `?passing` would give, the others).

    As Consul's `?passing`: an entry passes when every check (the node's and the service's) does.
    """
    if not isinstance(entries, list):
        return entries, ()
    passing, others = [], []
    for entry in entries:
        checks = entry.get("Checks") if isinstance(entry, Mapping) else None
        if not isinstance(checks, list):
            passing.append(entry)
            continue
        worst: Mapping[str, Any] | None = None
        for check in checks:
            if isinstance(check, Mapping) and check.get("Status") != "passing":
                rank = _STATUS_RANK.get(str(check.get("Status")), 2)
                if worst is None or rank > _STATUS_RANK.get(str(worst.get("Status")), 2):
                    worst = check
        if worst is None:
            passing.append(entry)
            continue
        service = entry.get("Service") if isinstance(entry.get("Service"), Mapping) else {}
        node = entry.get("Node") if isinstance(entry.get("Node"), Mapping) else {}
        address = str(service.get("Address") or node.get("Address") or "")
        weights: Mapping[str, Any] = service["Weights"] if isinstance(service.get("Weights"), Mapping) else {}
        check_id = str(worst.get("CheckID") or "")
        text = str(worst.get("Output") or worst.get("Notes") or "").strip()
        others.append(
            MemberHealth(
                id=str(service.get("ID") or "?")[:200],
                node=str(node.get("Node") or "")[:200],
                endpoint=f"[{address}]:{service.get('Port')}" if ":" in address else f"{address}:{service.get('Port')}",
                weight=weights.get("Passing", 1) if isinstance(weights.get("Passing", 1), int) else 1,
                status="maintenance" if check_id.startswith(MAINTENANCE_CHECKS) else str(worst.get("Status")),
                output=text.splitlines()[0][:300] if text else "",
            )
        )
    return passing, tuple(sorted(others, key=lambda m: (m.node, m.id)))


def health_view_from_entries(service_name: str, entries: Any) -> HealthView:
    """Validate a whole `/v1/health/service` answer; raise ValueError if it is not a list of entries."""
    if not isinstance(entries, list):
        raise ValueError(f"expected a JSON list for service {service_name!r}, got {type(entries).__name__}")
    instances: list[ServiceInstance] = []
    rejected: list[RejectedInstance] = []
    intern = Interner()
    for entry in entries:
        if not isinstance(entry, Mapping):
            rejected.append(RejectedInstance(service_name, "?", "entry is not a JSON object"))
            continue
        try:
            instances.append(instance_from_health_entry(entry, intern))
        except ValueError as exc:
            service = entry.get("Service") if isinstance(entry.get("Service"), Mapping) else {}
            sid = service.get("ID") if isinstance(service, Mapping) else None
            rejected.append(RejectedInstance(service_name, str(sid)[:80] if sid else "?", str(exc)))
    return HealthView.of(instances, rejected)


def catalog_names(services: Any, tag: str | None) -> tuple[str, ...]:
    """Sorted service names from `/v1/catalog/services`, without `consul`, carrying `tag` if given."""
    if not isinstance(services, Mapping):
        raise ValueError(f"expected a JSON object of services, got {type(services).__name__}")
    names = []
    for name, tags in services.items():
        if name == "consul" or not isinstance(name, str):
            continue
        if tag is not None and (not isinstance(tags, list) or tag not in tags):
            continue
        names.append(name)
    return tuple(sorted(names))


def kv_pairs_from_entries(prefix: str, entries: Any) -> tuple[KVPair, ...]:
    """`/v1/kv/PREFIX?recurse` -> pairs sorted by key (folder keys ending in `/` left out, as consul-template)."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ValueError(f"expected a JSON list of keys, got {type(entries).__name__}")
    pairs = []
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("Key"), str):
            raise ValueError("a KV entry without a Key")
        path = entry["Key"]
        if path.endswith("/"):
            continue
        raw = entry.get("Value")
        value = base64.b64decode(raw).decode("utf-8", "replace") if isinstance(raw, str) else ""
        flags = entry.get("Flags") if isinstance(entry.get("Flags"), int) else 0
        pairs.append(KVPair(path[len(prefix) :].lstrip("/") if prefix else path, path, value, int(flags or 0)))
    return tuple(sorted(pairs, key=lambda p: p.path))


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, (str, int))}


def node_from_json(data: Mapping[str, Any]) -> NodeInfo:
    if not isinstance(data.get("Node"), str):
        raise ValueError("a node without a Node name")
    return NodeInfo(
        data["Node"],
        _str_field(data, "Address"),
        _str_field(data, "Datacenter"),
        _str_map(data.get("TaggedAddresses")),
        _str_map(data.get("Meta")),
    )


def nodes_from_json(entries: Any) -> tuple[NodeInfo, ...]:
    if not isinstance(entries, list):
        raise ValueError(f"expected a JSON list of nodes, got {type(entries).__name__}")
    return tuple(sorted((node_from_json(e) for e in entries if isinstance(e, Mapping)), key=lambda n: n.name))


def node_services_from_json(data: Any) -> NodeServices | None:
    """`/v1/catalog/node/NAME`: None for an unknown node (Consul answers `null`)."""
    if data is None:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("Node"), Mapping):
        raise ValueError("expected a JSON object with a Node")
    raw = data.get("Services") or {}
    services = []
    for item in raw.values() if isinstance(raw, Mapping) else []:
        if not isinstance(item, Mapping):
            continue
        port = item.get("Port")
        services.append(
            NodeService(
                _str_field(item, "ID"),
                _str_field(item, "Service"),
                tuple(t for t in item.get("Tags") or [] if isinstance(t, str)),
                _str_field(item, "Address"),
                port if isinstance(port, int) and not isinstance(port, bool) else 0,
                _str_map(item.get("Meta")),
            )
        )
    return NodeServices(node_from_json(data["Node"]), tuple(sorted(services, key=lambda s: s.id)))


def service_tags_from_catalog(services: Any, tag: str | None) -> tuple[ServiceTags, ...]:
    """`/v1/catalog/services` with tags, as `catalog_names` but keeping each service's tags."""
    names = catalog_names(services, tag)
    return tuple(ServiceTags(name, tuple(sorted(str(t) for t in services[name] or []))) for name in names)
