"""The agent's in-memory state: one node's services, checks and KV, with raft-like indexes.

Every write takes the next index from one monotonic counter and records it on each *view* it
changes (a service's health, the catalog, a KV key). A blocking read waits until the index of
its own view passes the client's, so a change to service A never wakes a watcher of service B.
"""

from __future__ import annotations

import logging
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
NODE_MAINT_CHECK = "_node_maintenance"
NODE_MAINT_NAME = "Node Maintenance Mode"
NODE_MAINT_DEFAULT_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)
ALL_VIEW = "all"  # touched by every catalog write: the node and state listings block on it
MAX_WAIT = 600.0
DEFAULT_WAIT = 300.0

log = logging.getLogger(__name__)

# How many readers of one view a write answers from its own thread (see `AgentState.blocking`);
# more wake their own threads, as all did before, so a write's own answer never waits on a crowd.
WRITER_ANSWERS = 16

# A blocking read's answer: (X-Consul-Index, body) to the client; it must not block (see `blocking`).
Answer = Callable[[int, Any], None]


@dataclass(frozen=True)
class Read:
    """What a blocking read waits on and answers: its view, the view's index (0 while never
    written: the table's index stands in), and the answer's body."""

    view: str
    view_index: Callable[[], int]
    table_index: Callable[[], int]
    body: Callable[[], Any]

    def reported_index(self, current: int) -> int:
        """The X-Consul-Index of an answer read at the view's `current` index (never 0)."""
        return max(current if current > 0 else self.table_index(), 1)


@dataclass(eq=False)
class _Parked:
    """A blocked reader that the write moving its view answers itself (see `AgentState.blocking`)."""

    read: Read
    index: int
    answer: Answer
    answered: bool = False


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
    node: str = ""


@dataclass
class NodeEntry:
    """A node of the catalog: the agent's own, or one registered through /v1/catalog/register."""

    name: str
    id: str
    address: str
    tagged_addresses: dict[str, str]
    meta: dict[str, str]
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
    args: list[str] = field(default_factory=list)
    node: str = ""


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
    """The catalog (the agent's node and nodes registered through the catalog) and KV behind one lock,
    with blocking reads."""

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
        self.parked: dict[str, list[_Parked]] = {}
        self.index = 10
        self.closing = False
        self.nodes: dict[str, NodeEntry] = {}
        # Services and checks by node; the agent's own node's are the agent's local state.
        self.node_services: dict[str, dict[str, ServiceEntry]] = {node: {}}
        self.node_checks: dict[str, dict[str, CheckEntry]] = {node: {}}
        self.services = self.node_services[node]
        self.checks = self.node_checks[node]
        # (node, ID) by service name, as Consul's state store indexes them: a health query reads one
        # service's entries, not the whole catalog (a thousand watches would each scan it).
        self.ids_by_name: dict[str, dict[tuple[str, str], None]] = {}
        # Each service name's tags for /v1/catalog/services, dropped when one of its instances changes:
        # a write re-reads one name's instances, not the whole catalog (Consul's index does the same).
        self.tags_by_name: dict[str, list[str]] = {}
        self.kv: dict[str, KVEntry] = {}
        self.kv_tombstones: dict[str, int] = {}
        self.view_index: dict[str, int] = {}
        self.services_table_index = 1
        self.kv_table_index = 1
        self.listeners: list[Callable[[], None]] = []
        # Network coordinates by node, as the agents' RTT estimation writes them (here: the API).
        self.coordinates: dict[str, dict[str, Any]] = {}
        # A test hook, not Consul's (`partial_catalog`): health answers list at most this many
        # instances of each service while set.
        self.partial_keep: int | None = None
        self.node_create_index = self._next()
        self.nodes[node] = NodeEntry(
            node,
            self.node_id,
            address,
            {"lan": address, "lan_ipv4": address, "wan": address, "wan_ipv4": address},
            {"consul-network-segment": ""},
            self.node_create_index,
            self.node_create_index,
        )
        self.checks[SERF_CHECK] = CheckEntry(
            SERF_CHECK,
            "Serf Health Status",
            PASSING,
            output="Agent alive and reachable",
            create_index=self.node_create_index,
            modify_index=self.node_create_index,
            node=node,
        )
        self.register({"id": "consul", "name": "consul", "port": 8300, "tags": [], "meta": {"raft_version": "3"}}, [])

    # --- indexes ---------------------------------------------------------------------------

    def _next(self) -> int:
        self.index += 1
        return self.index

    def _touch(self, index: int, views: Iterable[str]) -> None:
        # Readers of one service's views are woken before the listings' ("catalog", every view),
        # in an order that does not change with each process's string hashing (`views` is often
        # a set): the listings' answers are the larger ones to build.
        for view in [*sorted(views, key=lambda v: (":" not in v, v)), ALL_VIEW]:
            self.view_index[view] = index
            self._wake(view)

    def _wake(self, view: str) -> None:
        cond = self.view_conds.get(view)
        if cond is not None:
            self._answer_parked(view)
            cond.notify_all()

    def _wake_kv(self, key: str) -> None:
        for view, cond in self.view_conds.items():
            if view == f"kv:{key}" or (view.startswith("kvp:") and key.startswith(view[4:])):
                self._answer_parked(view)
                cond.notify_all()

    def _answer_parked(self, view: str) -> None:
        """Answer, from the writer's thread, the parked readers whose index `view` has now passed."""
        parked = self.parked.pop(view, None)
        if not parked:
            return
        waiting = []
        answered = 0
        for reader in parked:
            current = reader.read.view_index()
            if current <= reader.index or answered == WRITER_ANSWERS:
                waiting.append(reader)
                continue
            try:
                reader.answer(reader.read.reported_index(current), reader.read.body())
            except Exception:  # one reader's bad answer must not fail the write: its own thread answers it
                log.exception("answering a blocked query on %s from the writer's thread failed", view)
                waiting.append(reader)
                continue
            reader.answered = True
            answered += 1
        if waiting:
            self.parked[view] = waiting

    def view_read(self, view: str, body: Callable[[], Any]) -> Read:
        """A blocking read of a catalog view (one whose index is in `view_index`)."""
        return Read(view, lambda: self.view_index.get(view, 0), lambda: self.services_table_index, body)

    def _service_views(self, name: str) -> list[str]:
        return [f"health:{name}", f"catalog:{name}"]

    def close(self) -> None:
        """Wake every blocked reader so the server can shut down at once."""
        with self.cond:
            self.closing = True
            for cond in self.view_conds.values():
                cond.notify_all()

    def blocking(self, read: Read, index: int, wait: float, answer: Answer, *, from_writer: bool = True) -> None:
        """Answer at once when `index` is 0 or the view moved past it; else wait up to wait + jitter.

        `answer(index, body())` runs exactly once. With `from_writer`, a write that moves the view
        runs it itself, in the writer's thread and under the lock, before it wakes anyone: the
        answer is on its way without waiting for the reader's thread to be scheduled and to take
        the interpreter's lock (Consul's readers are goroutines; here each hand-over between
        threads costs a GIL switch, and a change's readers would each wait for one). Such an
        `answer` must not block; the reader's thread sends what it could not. Otherwise (a time
        out, shutting down, no `from_writer`) the reader's thread runs it, outside the lock.
        """
        wait = min(wait, MAX_WAIT)
        deadline = self.clock() + wait + random.uniform(0, wait / 16)
        view = read.view
        parked: _Parked | None = None
        with self.cond:
            cond = self.view_conds.get(view)
            if cond is None:
                cond = self.view_conds[view] = threading.Condition(self.lock)
            try:
                while True:
                    current = read.view_index()
                    if index == 0 or current > index or self.closing:
                        break
                    remaining = deadline - self.clock()
                    if remaining <= 0:
                        break
                    if from_writer and parked is None:
                        parked = _Parked(read, index, answer)
                        self.parked.setdefault(view, []).append(parked)
                    cond.wait(remaining)
                    if parked is not None and parked.answered:
                        return
            finally:
                if parked is not None and not parked.answered:
                    self._unpark(view, parked)
            reported = read.reported_index(current)
            data = read.body()
        answer(reported, data)

    def _unpark(self, view: str, reader: _Parked) -> None:
        parked = self.parked.get(view, [])
        if reader in parked:
            parked.remove(reader)
            if not parked:
                del self.parked[view]

    # --- services --------------------------------------------------------------------------

    def register(self, service: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        """Register (or replace) a service and its checks on the agent's node; both are validated."""
        with self.cond:
            self._register_locked(service, checks)

    def _put_service(self, node: str, entry: ServiceEntry) -> set[str]:
        """Store a service on a node; return the views it changed."""
        services = self.node_services[node]
        old = services.get(entry.id)
        views = set(self._service_views(entry.name))
        if old is not None:
            views.update(self._service_views(old.name))
            self.ids_by_name.get(old.name, {}).pop((node, entry.id), None)
            self.tags_by_name.pop(old.name, None)
        services[entry.id] = entry
        self.tags_by_name.pop(entry.name, None)
        self.ids_by_name.setdefault(entry.name, {})[(node, entry.id)] = None
        for existing in self.node_checks[node].values():
            if existing.service_id == entry.id:
                existing.service_tags = list(entry.tags)
                existing.service_name = entry.name
        return views

    def _drop_service(self, node: str, sid: str) -> set[str]:
        """Remove a service and its checks from a node; return the views it changed."""
        old = self.node_services[node].pop(sid, None)
        if old is None:
            return set()
        names = self.ids_by_name.get(old.name, {})
        names.pop((node, sid), None)
        self.tags_by_name.pop(old.name, None)
        if not names:
            self.ids_by_name.pop(old.name, None)
        checks = self.node_checks[node]
        for check_id in [c.check_id for c in checks.values() if c.service_id == sid]:
            del checks[check_id]
        return set(self._service_views(old.name))

    def _new_service(self, service: dict[str, Any], node: str, index: int) -> ServiceEntry:
        old = self.node_services[node].get(service["id"])
        return ServiceEntry(
            id=service["id"],
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
            node=node,
        )

    def _new_check(self, check: dict[str, Any], check_id: str, node: str, index: int) -> CheckEntry:
        previous = self.node_checks[node].get(check_id)
        same = previous is not None and previous.service_id == check.get("service_id", "")
        status = check.get("status") or (previous.status if previous and same else CRITICAL)
        ttl = float(check.get("ttl") or 0.0)
        service = self.node_services[node].get(check.get("service_id", ""))
        return CheckEntry(
            check_id=check_id,
            name=check.get("name") or "",
            status=status,
            notes=check.get("notes", ""),
            output=check.get("output") or (previous.output if previous and same else ""),
            service_id=check.get("service_id", ""),
            service_name=service.name if service else "",
            service_tags=list(service.tags) if service else [],
            type=check.get("type", ""),
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
            args=list(check.get("args") or []),
            node=node,
        )

    def _register_locked(self, service: dict[str, Any], checks: list[dict[str, Any]]) -> None:
        index = self._next()
        sid = service["id"]
        entry = self._new_service(service, self.node, index)
        views = self._put_service(self.node, entry)
        self.services_table_index = index
        for number, check in enumerate(checks, start=1):
            check_id = check.get("check_id") or (f"service:{sid}:{number}" if len(checks) > 1 else f"service:{sid}")
            named = {"name": f"Service '{entry.name}' check", **{k: v for k, v in check.items() if v}}
            self.checks[check_id] = self._new_check({**named, "service_id": sid}, check_id, self.node, index)
        self._touch(index, views | {"catalog"})
        for listener in self.listeners:
            listener()

    def deregister(self, sid: str) -> bool:
        """Remove a service and its checks; False when there was none (still a 200, as in Consul)."""
        with self.cond:
            if sid not in self.services:
                return False
            index = self._next()
            views = self._drop_service(self.node, sid)
            self.services_table_index = index
            self._touch(index, views | {"catalog"})
            return True

    def partial_catalog(self, keep: int, seconds: float) -> None:
        """A test hook, not Consul's: for `seconds`, health answers list only the first `keep`
        instances of each service, as a Consul agent restarting with a half-synced catalog answers;
        then the whole catalog again. Blocked queries are woken both times, as a change would."""
        with self.cond:
            self.partial_keep = keep
            self._touch_every_service()
        timer = threading.Timer(seconds, self._end_partial_catalog)
        timer.daemon = True
        timer.start()

    def _end_partial_catalog(self) -> None:
        with self.cond:
            self.partial_keep = None
            self._touch_every_service()

    def _touch_every_service(self) -> None:
        self._touch(self._next(), [view for name in self.ids_by_name for view in self._service_views(name)])

    def _service_check_views(self, node: str, service_id: str) -> list[str]:
        """The health views a check changes: its service's, or every service on its node for a node check."""
        services = self.node_services.get(node, {})
        if service_id:
            service = services.get(service_id)
            return [f"health:{service.name}"] if service else []
        return [f"health:{s.name}" for s in services.values()]

    def register_check(self, check: dict[str, Any]) -> None:
        """/v1/agent/check/register: a check of the agent's node, on a service of it or on the node."""
        with self.cond:
            service_id = check.get("service_id", "")
            if service_id and service_id not in self.services:
                raise KeyError(service_id)
            index = self._next()
            check_id = check.get("check_id") or check["name"]
            self.checks[check_id] = self._new_check(check, check_id, self.node, index)
            self._touch(index, self._service_check_views(self.node, service_id))
        for listener in self.listeners:
            listener()

    def deregister_check(self, check_id: str) -> bool:
        """Remove one of the agent's checks; False when it has none of that ID."""
        with self.cond:
            check = self.checks.get(check_id)
            if check is None or check_id == SERF_CHECK:
                return False
            index = self._next()
            views = self._service_check_views(self.node, check.service_id)
            del self.checks[check_id]
            self._touch(index, views)
            return True

    def set_maintenance(self, sid: str, enable: bool, reason: str) -> bool:
        """Add or remove the `_service_maintenance:<id>` check; False when the service is unknown."""
        with self.cond:
            service = self.services.get(sid)
            if service is None:
                return False
            self._maintenance_check(MAINT_PREFIX + sid, MAINT_NAME, reason or MAINT_DEFAULT_REASON, enable, sid)
            return True

    def set_node_maintenance(self, enable: bool, reason: str) -> None:
        """Add or remove `_node_maintenance`: a critical node check takes every service of the node out."""
        with self.cond:
            self._maintenance_check(NODE_MAINT_CHECK, NODE_MAINT_NAME, reason or NODE_MAINT_DEFAULT_REASON, enable, "")

    def _maintenance_check(self, check_id: str, name: str, notes: str, enable: bool, sid: str) -> None:
        if enable == (check_id in self.checks):
            return
        index = self._next()
        views = self._service_check_views(self.node, sid)
        if enable:
            service = self.services.get(sid)
            self.checks[check_id] = CheckEntry(
                check_id,
                name,
                CRITICAL,
                notes=notes,
                service_id=sid,
                service_name=service.name if service else "",
                service_tags=list(service.tags) if service else [],
                create_index=index,
                modify_index=index,
                critical_since=None,
                node=self.node,
            )
        else:
            del self.checks[check_id]
        self._touch(index, views)

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
            self._touch(index, self._service_check_views(self.node, check.service_id))

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

    # --- the catalog's own writes ------------------------------------------------------------

    def catalog_register(
        self,
        node: dict[str, Any],
        service: dict[str, Any] | None,
        checks: list[dict[str, Any]],
    ) -> None:
        """/v1/catalog/register: a node (unless skip_node_update), a service and checks on it."""
        with self.cond:
            index = self._next()
            name = node["name"]
            views: set[str] = {"catalog", "nodes"}
            existing = self.nodes.get(name)
            if existing is None or not node.get("skip_node_update"):
                self.nodes[name] = NodeEntry(
                    name,
                    node.get("id") or (existing.id if existing else str(uuid.uuid4())),
                    node.get("address") or (existing.address if existing else ""),
                    dict(node.get("tagged_addresses") or (existing.tagged_addresses if existing else {})),
                    dict(node.get("meta") or (existing.meta if existing else {})),
                    existing.create_index if existing else index,
                    index,
                )
                views.update(self._service_check_views(name, "") if existing else [])
            self.node_services.setdefault(name, {})
            self.node_checks.setdefault(name, {})
            if service is not None:
                views |= self._put_service(name, self._new_service(service, name, index))
            for check in checks:
                check_id = check.get("check_id") or check.get("name") or ""
                self.node_checks[name][check_id] = self._new_check(check, check_id, name, index)
                views.update(self._service_check_views(name, check.get("service_id", "")))
            self.services_table_index = index
            self._touch(index, views)

    def catalog_deregister(self, name: str, service_id: str, check_id: str) -> None:
        """/v1/catalog/deregister: one service, one check, or the whole node with all on it."""
        with self.cond:
            if name not in self.nodes:
                return
            index = self._next()
            views: set[str] = {"catalog", "nodes"}
            if service_id:
                views |= self._drop_service(name, service_id)
            elif check_id:
                check = self.node_checks[name].pop(check_id, None)
                if check is not None:
                    views.update(self._service_check_views(name, check.service_id))
            else:
                for sid in list(self.node_services[name]):
                    views |= self._drop_service(name, sid)
                self.node_checks[name].clear()
                if name != self.node:
                    del self.nodes[name], self.node_services[name], self.node_checks[name]
            self.services_table_index = index
            self._touch(index, views)

    # --- reads -----------------------------------------------------------------------------

    def node_json(self, node: NodeEntry) -> dict[str, Any]:
        return {
            "ID": node.id,
            "Node": node.name,
            "Address": node.address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": dict(node.tagged_addresses),
            "Meta": dict(node.meta),
            "CreateIndex": node.create_index,
            "ModifyIndex": node.modify_index,
        }

    def _node_json(self) -> dict[str, Any]:
        return self.node_json(self.nodes[self.node])

    def service_json(self, s: ServiceEntry) -> dict[str, Any]:
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

    _service_json = service_json

    def agent_service_json(self, s: ServiceEntry) -> dict[str, Any]:
        """The agent endpoint's shape: no raft indexes, and no Kind, TaggedAddresses, Proxy or Connect
        for a plain service (Consul leaves empty ones out there)."""
        data: dict[str, Any] = {
            "ID": s.id,
            "Service": s.name,
            "Tags": list(s.tags),
            "Meta": dict(s.meta),
            "Port": s.port,
            "Address": s.address,
            "Weights": dict(s.weights),
            "EnableTagOverride": s.enable_tag_override,
            "Datacenter": self.datacenter,
        }
        if s.kind:
            data["Kind"] = s.kind
        if s.tagged_addresses:
            data["TaggedAddresses"] = dict(s.tagged_addresses)
        return data

    def check_json(self, c: CheckEntry, indexes: bool = True) -> dict[str, Any]:
        return {
            "Node": c.node or self.node,
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
            "CreateIndex": c.create_index if indexes else 0,
            "ModifyIndex": c.modify_index if indexes else 0,
        }

    _check_json = check_json

    def health_index(self, name: str) -> int:
        return self.view_index.get(f"health:{name}", 0)

    def _sorted_checks(self, node: str) -> list[CheckEntry]:
        return [c for _, c in sorted(self.node_checks.get(node, {}).items())]

    def health_service(self, name: str, tags: list[str], passing: bool) -> list[dict[str, Any]]:
        out = []
        # Consul answers in its state store's order (by node, then service ID), the same from call to
        # call. `--shuffle` breaks that on purpose, to prove a client does not depend on any order.
        for node_name, sid in sorted(self.ids_by_name.get(name, {})):
            s = self.node_services[node_name][sid]
            if not all(t in s.tags for t in tags):
                continue
            checks = [c for c in self._sorted_checks(node_name) if not c.service_id or c.service_id == sid]
            if passing and any(c.status != PASSING for c in checks):
                continue
            out.append(
                {
                    "Node": self.node_json(self.nodes[node_name]),
                    "Service": self.service_json(s),
                    "Checks": [self.check_json(c) for c in checks],
                }
            )
        if self.partial_keep is not None:
            out = out[: self.partial_keep]
        if self.shuffle:
            random.shuffle(out)
        return out

    def health_checks(self, name: str) -> list[dict[str, Any]]:
        """/v1/health/checks/:service: the checks of every instance of a service."""
        out: list[dict[str, Any]] = []
        for node_name, sid in sorted(self.ids_by_name.get(name, {})):
            out.extend(self.check_json(c) for c in self._sorted_checks(node_name) if c.service_id == sid)
        return out

    def health_node(self, node: str) -> list[dict[str, Any]]:
        """/v1/health/node/:node: every check of one node."""
        return [self.check_json(c) for c in self._sorted_checks(node)]

    def health_state(self, state: str) -> list[dict[str, Any]]:
        """/v1/health/state/:state: every check in that state (`any` for all), by node then check ID."""
        return [
            self.check_json(c)
            for node in sorted(self.node_checks)
            for c in self._sorted_checks(node)
            if state == "any" or c.status == state
        ]

    def catalog_services(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in sorted(self.ids_by_name):
            tags = self.tags_by_name.get(name)
            if tags is None:
                ids = self.ids_by_name[name]
                tags = self.tags_by_name[name] = sorted({t for n, sid in ids for t in self.node_services[n][sid].tags})
            out[name] = list(tags)
        return out

    def catalog_row(self, node: NodeEntry, s: ServiceEntry) -> dict[str, Any]:
        """One /v1/catalog/service row: the node's fields (its Meta as NodeMeta) and the service's, prefixed."""
        row = self.node_json(node)
        del row["CreateIndex"], row["ModifyIndex"]
        row["NodeMeta"] = row.pop("Meta")
        return {
            **row,
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

    def catalog_service_row_sample(self, s: ServiceEntry) -> dict[str, Any]:
        return self.catalog_row(self.nodes[self.node], s)

    def catalog_service(self, name: str, tags: list[str]) -> list[dict[str, Any]]:
        out = []
        for node_name, sid in sorted(self.ids_by_name.get(name, {})):
            s = self.node_services[node_name][sid]
            if all(t in s.tags for t in tags):
                out.append(self.catalog_row(self.nodes[node_name], s))
        return out

    def catalog_service_rows(self) -> list[dict[str, Any]]:
        """Every service instance of the catalog as /v1/catalog/service rows (what ?filter sees there)."""
        return [row for name in sorted(self.ids_by_name) for row in self.catalog_service(name, [])]

    def catalog_nodes(self) -> list[dict[str, Any]]:
        return [self.node_json(n) for _, n in sorted(self.nodes.items())]

    def catalog_node(self, name: str) -> dict[str, Any] | None:
        node = self.nodes.get(name)
        if node is None:
            return None
        services = self.node_services.get(name, {})
        return {
            "Node": self.node_json(node),
            "Services": {sid: self.service_json(s) for sid, s in sorted(services.items())},
        }

    def update_coordinate(self, node: str, coord: dict[str, Any]) -> None:
        """/v1/coordinate/update; as Consul, an update for a node the catalog does not know is dropped."""
        with self.cond:
            if node not in self.nodes:
                return
            self.coordinates[node] = coord
            self._touch(self._next(), ["coordinates"])

    def coordinate_entries(self, node: str | None = None) -> list[dict[str, Any]]:
        return [
            {"Node": name, "Segment": "", "Coord": coord}
            for name, coord in sorted(self.coordinates.items())
            if node is None or name == node
        ]

    def checks_for_runner(self) -> list[CheckEntry]:
        with self.cond:
            return [c for c in self.checks.values() if c.type in ("http", "tcp", "script")]

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
