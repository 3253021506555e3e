"""The agent's in-memory state: one node's services, checks and KV, with raft-like indexes.

Every write takes the next index from one monotonic counter and records it on each *view* it
changes (a service's health, the catalog, a KV key). A blocking read waits until the index of
its own view passes the client's, so a change to service A never wakes a watcher of service B.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
MAINT_PREFIX = "_service_maintenance:"
MAINT_NAME = "Service Maintenance Mode"
MAINT_DEFAULT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
SERF_CHECK = "serfHealth"
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0


@dataclass
class ServiceEntry:
    id: str
    name: str
    tags: list[str]
    address: str
    tagged_addresses: dict[str, Any]
    meta: dict[str, str]
    port: int
    weights: dict[str, int]
    enable_tag_override: bool
    kind: str
    create_index: int
    modify_index: int


@dataclass
class CheckEntry:
    check_id: str
    name: str
    status: str
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: list[str] = field(default_factory=list)
    type: str = ""
    interval: float = 0.0
    timeout: float = 0.0
    ttl: float = 0.0
    http: str = ""
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    tcp: str = ""
    deregister_after: float = 0.0
    create_index: int = 0
    modify_index: int = 0
    critical_since: float | None = None
    ttl_deadline: float | None = None


@dataclass
class KVEntry:
    key: str
    value: bytes
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0


def go_duration_text(seconds: float) -> str:
    if seconds <= 0:
        return ""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class AgentState:
    """All of the agent's data behind one lock, with blocking reads."""

    def __init__(
        self,
        node: str,
        datacenter: str = "dc1",
        address: str = "127.0.0.1",
        clock: Callable[[], float] = time.monotonic,
        shuffle: bool = False,
    ) -> None:
        self.shuffle = shuffle
        self.node = node
        self.node_id = str(uuid.uuid4())
        self.datacenter = datacenter
        self.address = address
        self.clock = clock
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        # One condition per view, over the same lock: a write wakes only the readers of the views
        # it changed (as Consul's per-watch channels do), not every blocked query.
        self.view_conds: dict[str, threading.Condition] = {}
        self.index = 10
        self.closing = False
        self.services: dict[str, ServiceEntry] = {}
        # IDs by service name, as Consul's state store indexes them: a health query reads one
        # service's entries, not the whole catalog (a thousand watches would each scan it).
        self.ids_by_name: dict[str, dict[str, None]] = {}
        self.checks: dict[str, CheckEntry] = {}
        self.kv: dict[str, KVEntry] = {}
        self.kv_tombstones: dict[str, int] = {}
        self.view_index: dict[str, int] = {}
        self.services_table_index = 1
        self.kv_table_index = 1
        self.listeners: list[Callable[[], None]] = []
        self.node_create_index = self._next()
        self.checks[SERF_CHECK] = CheckEntry(
            SERF_CHECK,
            "Serf Health Status",
            PASSING,
            output="Agent alive and reachable",
            create_index=self.node_create_index,
            modify_index=self.node_create_index,
        )
        self.register({"id": "consul", "name": "consul", "port": 8300, "tags": [], "meta": {"raft_version": "3"}}, [])

    # --- indexes ---------------------------------------------------------------------------

    def _next(self) -> int:
        self.index += 1
        return self.index

    def _touch(self, index: int, views: Iterable[str]) -> None:
        for view in views:
            self.view_index[view] = index
            self._wake(view)

    def _wake(self, view: str) -> None:
        cond = self.view_conds.get(view)
        if cond is not None:
            cond.notify_all()

    def _wake_kv(self, key: str) -> None:
        for view, cond in self.view_conds.items():
            if view == f"kv:{key}" or (view.startswith("kvp:") and key.startswith(view[4:])):
                cond.notify_all()

    def _service_views(self, name: str) -> list[str]:
        return [f"health:{name}", f"catalog:{name}"]

    def close(self) -> None:
        """Wake every blocked reader so the server can shut down at once."""
        with self.cond:
            self.closing = True
            for cond in self.view_conds.values():
                cond.notify_all()

    def blocking(
        self,
        view: str,
        view_index: Callable[[], int],
        table_index: Callable[[], int],
        body: Callable[[], Any],
        index: int,
        wait: float,
    ) -> tuple[int, Any]:
        """Answer at once when `index` is 0 or the view moved past it; else wait up to wait + jitter."""
        wait = min(wait, MAX_WAIT)
        deadline = self.clock() + wait + random.uniform(0, wait / 16)
        with self.cond:
            cond = self.view_conds.get(view)
            if cond is None:
                cond = self.view_conds[view] = threading.Condition(self.lock)
            while True:
                current = view_index()
                if index == 0 or current > index or self.closing:
                    break
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                cond.wait(remaining)
            reported = current if current > 0 else table_index()
            return max(reported, 1), body()

    # --- services --------------------------------------------------------------------------

    def register(self, service: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        """Register (or replace) a service and its checks; `service` and `checks` are validated."""
        with self.cond:
            self._register_locked(service, checks)

    def _register_locked(self, service: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        index = self._next()
        sid = service["id"]
        old = self.services.get(sid)
        entry = ServiceEntry(
            id=sid,
            name=service["name"],
            tags=list(service.get("tags") or []),
            address=service.get("address", ""),
            tagged_addresses=dict(service.get("tagged_addresses") or {}),
            meta=dict(service.get("meta") or {}),
            port=int(service.get("port") or 0),
            weights=dict(service.get("weights") or {"Passing": 1, "Warning": 1}),
            enable_tag_override=bool(service.get("enable_tag_override", False)),
            kind=service.get("kind", ""),
            create_index=old.create_index if old else index,
            modify_index=index,
        )
        views = set(self._service_views(entry.name))
        if old is not None and old.name != entry.name:
            views.update(self._service_views(old.name))
        if old is not None:
            self.ids_by_name.get(old.name, {}).pop(sid, None)
        self.services[sid] = entry
        self.ids_by_name.setdefault(entry.name, {})[sid] = None
        self.services_table_index = index
        for number, check in enumerate(checks, start=1):
            check_id = check.get("check_id") or (f"service:{sid}:{number}" if len(checks) > 1 else f"service:{sid}")
            previous = self.checks.get(check_id)
            status = check.get("status") or (previous.status if previous and previous.service_id == sid else CRITICAL)
            ttl = float(check.get("ttl") or 0.0)
            new = CheckEntry(
                check_id=check_id,
                name=check.get("name") or f"Service '{entry.name}' check",
                status=status,
                notes=check.get("notes", ""),
                output=previous.output if previous and previous.service_id == sid else "",
                service_id=sid,
                service_name=entry.name,
                service_tags=list(entry.tags),
                type=check["type"],
                interval=float(check.get("interval") or 0.0),
                timeout=float(check.get("timeout") or 0.0),
                ttl=ttl,
                http=check.get("http", ""),
                method=check.get("method") or "GET",
                header=dict(check.get("header") or {}),
                tcp=check.get("tcp", ""),
                deregister_after=float(check.get("deregister_after") or 0.0),
                create_index=previous.create_index if previous else index,
                modify_index=index,
                critical_since=self.clock() if status == CRITICAL else None,
                ttl_deadline=self.clock() + ttl if ttl else None,
            )
            self.checks[check_id] = new
        for existing in self.checks.values():
            if existing.service_id == sid:
                existing.service_tags = list(entry.tags)
                existing.service_name = entry.name
        self._touch(index, views | {"catalog"})
        for listener in self.listeners:
            listener()

    def deregister(self, sid: str) -> bool:
        """Remove a service and its checks; False when there was none (still a 200, as in Consul)."""
        with self.cond:
            old = self.services.pop(sid, None)
            if old is None:
                return False
            names = self.ids_by_name.get(old.name, {})
            names.pop(sid, None)
            if not names:
                self.ids_by_name.pop(old.name, None)
            index = self._next()
            for check_id in [c.check_id for c in self.checks.values() if c.service_id == sid]:
                del self.checks[check_id]
            self.services_table_index = index
            self._touch(index, set(self._service_views(old.name)) | {"catalog"})
            return True

    def set_maintenance(self, sid: str, enable: bool, reason: str) -> bool:
        """Add or remove the `_service_maintenance:<id>` check; False when the service is unknown."""
        with self.cond:
            service = self.services.get(sid)
            if service is None:
                return False
            check_id = MAINT_PREFIX + sid
            if enable:
                if check_id in self.checks:
                    return True
                index = self._next()
                self.checks[check_id] = CheckEntry(
                    check_id,
                    MAINT_NAME,
                    CRITICAL,
                    notes=reason or MAINT_DEFAULT_REASON,
                    service_id=sid,
                    service_name=service.name,
                    service_tags=list(service.tags),
                    create_index=index,
                    modify_index=index,
                    critical_since=None,
                )
            else:
                if check_id not in self.checks:
                    return True
                index = self._next()
                del self.checks[check_id]
            self._touch(index, self._service_views(service.name))
            return True

    def update_check(self, check_id: str, status: str, output: str | None = None) -> None:
        """Set a check's status and output (TTL updates, check runners); a no-op change bumps nothing."""
        with self.cond:
            check = self.checks.get(check_id)
            if check is None:
                return
            if check.ttl:
                check.ttl_deadline = self.clock() + check.ttl
            new_output = check.output if output is None else output
            if check.status == status and check.output == new_output:
                return
            if status == CRITICAL and check.status != CRITICAL:
                check.critical_since = self.clock()
            elif status != CRITICAL:
                check.critical_since = None
            check.status = status
            check.output = new_output
            index = self._next()
            check.modify_index = index
            views = (
                [f"health:{s.name}" for s in self.services.values()]
                if not check.service_id
                else [f"health:{check.service_name}"]
            )
            self._touch(index, views)

    def expire_ttls(self) -> float | None:
        """Turn checks whose TTL lapsed critical; return the next deadline (or None)."""
        now = self.clock()
        expired: list[str] = []
        next_deadline: float | None = None
        with self.cond:
            for check in self.checks.values():
                if check.ttl_deadline is None:
                    continue
                if check.ttl_deadline <= now:
                    if check.status != CRITICAL:
                        expired.append(check.check_id)
                    check.ttl_deadline = None
                elif next_deadline is None or check.ttl_deadline < next_deadline:
                    next_deadline = check.ttl_deadline
        for check_id in expired:
            self.update_check(check_id, CRITICAL, f"TTL expired (last update at {time.strftime('%H:%M:%S')})")
            with self.cond:
                lapsed = self.checks.get(check_id)
                if lapsed is not None:
                    lapsed.ttl_deadline = None
        return next_deadline

    def reap_critical(self) -> list[str]:
        """Deregister services whose check stayed critical past DeregisterCriticalServiceAfter."""
        now = self.clock()
        with self.cond:
            doomed = {
                c.service_id
                for c in self.checks.values()
                if c.service_id
                and c.deregister_after
                and c.critical_since is not None
                and now - c.critical_since >= c.deregister_after
            }
        for sid in doomed:
            self.deregister(sid)
        return sorted(doomed)

    # --- reads -----------------------------------------------------------------------------

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": self.node_id,
            "Node": self.node,
            "Address": self.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {
                "lan": self.address,
                "lan_ipv4": self.address,
                "wan": self.address,
                "wan_ipv4": self.address,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": self.node_create_index,
            "ModifyIndex": self.node_create_index,
        }

    def _service_json(self, s: ServiceEntry) -> dict[str, Any]:
        return {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Address": s.address,
            "TaggedAddresses": dict(s.tagged_addresses) if s.tagged_addresses else None,
            "Meta": dict(s.meta),
            "Port": s.port,
            "Weights": dict(s.weights),
            "EnableTagOverride": s.enable_tag_override,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
        }

    def _check_json(self, c: CheckEntry) -> dict[str, Any]:
        return {
            "Node": self.node,
            "CheckID": c.check_id,
            "Name": c.name,
            "Status": c.status,
            "Notes": c.notes,
            "Output": c.output,
            "ServiceID": c.service_id,
            "ServiceName": c.service_name,
            "ServiceTags": list(c.service_tags),
            "Type": c.type,
            "Interval": go_duration_text(c.interval),
            "Timeout": go_duration_text(c.timeout),
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": c.create_index,
            "ModifyIndex": c.modify_index,
        }

    def health_index(self, name: str) -> int:
        return self.view_index.get(f"health:{name}", 0)

    def health_service(self, name: str, tags: list[str], passing: bool) -> list[dict[str, Any]]:
        node_checks = [c for c in self.checks.values() if not c.service_id]
        out = []
        # Consul answers in its state store's order (by node, then service ID), the same from call to
        # call. `--shuffle` breaks that on purpose, to prove a client does not depend on any order.
        for sid in sorted(self.ids_by_name.get(name, {})):
            s = self.services[sid]
            if not all(t in s.tags for t in tags):
                continue
            checks = node_checks + [c for c in self.checks.values() if c.service_id == s.id]
            if passing and any(c.status != PASSING for c in checks):
                continue
            out.append(
                {
                    "Node": self._node_json(),
                    "Service": self._service_json(s),
                    "Checks": [self._check_json(c) for c in checks],
                }
            )
        if self.shuffle:
            random.shuffle(out)
        return out

    def catalog_services(self) -> dict[str, list[str]]:
        names: dict[str, set[str]] = {}
        for s in self.services.values():
            names.setdefault(s.name, set()).update(s.tags)
        return {name: sorted(tags) for name, tags in sorted(names.items())}

    def catalog_service(self, name: str, tags: list[str]) -> list[dict[str, Any]]:
        node = self._node_json()
        out = []
        for s in self.services.values():
            if s.name != name or not all(t in s.tags for t in tags):
                continue
            out.append(
                {
                    "ID": node["ID"],
                    "Node": node["Node"],
                    "Address": node["Address"],
                    "Datacenter": node["Datacenter"],
                    "TaggedAddresses": node["TaggedAddresses"],
                    "NodeMeta": node["Meta"],
                    "ServiceKind": s.kind,
                    "ServiceID": s.id,
                    "ServiceName": s.name,
                    "ServiceTags": list(s.tags),
                    "ServiceAddress": s.address,
                    "ServiceTaggedAddresses": dict(s.tagged_addresses) if s.tagged_addresses else None,
                    "ServiceWeights": dict(s.weights),
                    "ServiceMeta": dict(s.meta),
                    "ServicePort": s.port,
                    "ServiceEnableTagOverride": s.enable_tag_override,
                    "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
                    "ServiceConnect": {},
                    "CreateIndex": s.create_index,
                    "ModifyIndex": s.modify_index,
                }
            )
        return out

    def checks_for_runner(self) -> list[CheckEntry]:
        with self.cond:
            return [c for c in self.checks.values() if c.type in ("http", "tcp")]

    # --- KV --------------------------------------------------------------------------------

    def kv_index(self, key: str, prefix: bool) -> int:
        if prefix:
            live = [e.modify_index for k, e in self.kv.items() if k.startswith(key)]
            dead = [i for k, i in self.kv_tombstones.items() if k.startswith(key)]
            return max(live + dead, default=0)
        entry = self.kv.get(key)
        return entry.modify_index if entry else self.kv_tombstones.get(key, 0)

    def kv_put(self, key: str, value: bytes, flags: int, cas: int | None) -> bool:
        with self.cond:
            existing = self.kv.get(key)
            if cas is not None:
                if cas == 0 and existing is not None:
                    return False
                if cas > 0 and (existing is None or existing.modify_index != cas):
                    return False
            index = self._next()
            self.kv[key] = KVEntry(key, value, flags, existing.create_index if existing else index, index)
            self.kv_tombstones.pop(key, None)
            self.kv_table_index = index
            self._wake_kv(key)
            return True

    def kv_delete(self, key: str, recurse: bool, cas: int | None) -> bool:
        with self.cond:
            keys = [k for k in self.kv if k.startswith(key)] if recurse else [key]
            if cas is not None and not recurse:
                existing = self.kv.get(key)
                if existing is None or existing.modify_index != cas:
                    return False
            index = self._next()
            for k in keys:
                if self.kv.pop(k, None) is not None:
                    self.kv_tombstones[k] = index
                    self._wake_kv(k)
            self.kv_table_index = index
            return True

    def kv_entries(self, key: str, prefix: bool) -> list[KVEntry]:
        if prefix:
            return [e for k, e in sorted(self.kv.items()) if k.startswith(key)]
        entry = self.kv.get(key)
        return [entry] if entry else []
