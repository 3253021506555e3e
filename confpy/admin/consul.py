"""`confpy upstream list|add|del|drain|undrain`: the operators' member commands, on Consul.

Consul stays the source of truth: these commands register, deregister and put instances in
maintenance on the Consul agent, and the running confpy carries the change into nginx.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confpy.admin.common import NGINX_TAG, AdminContext, Endpoint, parse_endpoint, parse_meta
from confpy.errors import ConfigError, ConfpyError
from confpy.model import format_endpoint
from confpy.registry.consul import ConsulClient
from confpy.render.naming import upstream_name_for

_UPSTREAM_BLOCK = re.compile(r"upstream\s+(\S+)\s*\{(.*?)\}", re.S)
_SERVER_LINE = re.compile(r"^\s*server\s+(\S+?)[\s;]", re.M)


@dataclass(frozen=True)
class NginxView:
    """What nginx serves per upstream, and (live mode) the members its balancer has paused."""

    members: dict[str, set[str]]
    paused: dict[str, set[str]]


async def nginx_members(context: AdminContext) -> NginxView | None:
    """The members nginx serves per upstream: from the admin API in live mode, else the rendered files."""
    if context.live_listen and context.live_token_file:
        from confpy.apply.live import LiveAdmin, LivePushError, passive_unavailable

        admin = LiveAdmin(context.live_listen, context.live_token_file)
        try:
            data = await admin.upstreams()
        except LivePushError:
            return None
        finally:
            await admin.close()
        members: dict[str, set[str]] = {
            name: {
                str(format_endpoint(m["host"], int(m["port"])))
                for m in entry.get("members") or []
                if isinstance(m, dict)
            }
            for name, entry in data.items()
            if isinstance(entry, dict)
        }
        return NginxView(members, {name: set(paused) for name, paused in passive_unavailable(data).items()})
    rendered = rendered_members(list(context.destinations))
    return None if rendered is None else NginxView(rendered, {})


@dataclass(frozen=True)
class InstanceStatus:
    """One registered instance with its aggregated health."""

    service: str
    id: str
    address: str
    port: int
    weight: int
    status: str
    tags: tuple[str, ...]

    @property
    def endpoint(self) -> str:
        return format_endpoint(self.address, self.port) if self.address else f"?:{self.port}"


async def _instances(client: ConsulClient, service: str) -> list[InstanceStatus]:
    _, entries = await client.health_service(service, passing=False)
    out = []
    for entry in entries or []:
        svc = entry.get("Service") or {}
        node = entry.get("Node") or {}
        checks = entry.get("Checks") or []
        statuses = [c.get("Status") for c in checks]
        if any(str(c.get("CheckID", "")).startswith("_service_maintenance:") for c in checks):
            status = "maintenance"
        elif "critical" in statuses:
            status = "critical"
        elif "warning" in statuses:
            status = "warning"
        else:
            status = "passing"
        weights = svc.get("Weights") or {}
        out.append(
            InstanceStatus(
                service=str(svc.get("Service", service)),
                id=str(svc.get("ID", "")),
                address=str(svc.get("Address") or node.get("Address") or ""),
                port=int(svc.get("Port") or 0),
                weight=int(weights.get("Passing", 1) or 1),
                status=status,
                tags=tuple(svc.get("Tags") or ()),
            )
        )
    return sorted(out, key=lambda i: (i.id, i.port))


def rendered_members(paths: list[Path]) -> dict[str, set[str]] | None:
    """`upstream NAME { server ENDPOINT ...}` members in the rendered files; None when none readable."""
    found: dict[str, set[str]] = {}
    readable = False
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        readable = True
        for match in _UPSTREAM_BLOCK.finditer(text):
            servers = {
                m.group(1)
                for m in _SERVER_LINE.finditer(match.group(2))
                if not match.group(2).count(f"{m.group(1)} down")
            }
            found.setdefault(match.group(1), set()).update(servers)
    return found if readable else None


def _find(instances: list[InstanceStatus], service: str, endpoint: Endpoint) -> InstanceStatus:
    if not instances:
        raise ConfpyError(f"service {service!r} has no registered instance in Consul (unknown service?)")
    for inst in instances:
        if inst.address == endpoint.host and inst.port == endpoint.port:
            return inst
    known = ", ".join(i.endpoint for i in instances)
    raise ConfpyError(f"service {service!r} has no instance at {endpoint.text} (it has: {known})")


async def cmd_list(client: ConsulClient, args: argparse.Namespace, context: AdminContext) -> int:
    if args.service:
        names = [args.service]
    else:
        _, catalog = await client.catalog_services()
        names = sorted(n for n in (catalog or {}) if n != "consul")
    rendered = await nginx_members(context)
    report = []
    for name in names:
        instances = await _instances(client, name)
        if args.service and not instances:
            raise ConfpyError(f"service {name!r} has no registered instance in Consul (unknown service?)")
        upstream = upstream_name_for(name) if name else name
        members = None if rendered is None else rendered.members.get(upstream, set())
        paused = set() if rendered is None else rendered.paused.get(upstream, set())
        report.append(
            {
                "service": name,
                "upstream": upstream,
                "instances": [
                    {
                        "id": i.id,
                        "endpoint": i.endpoint,
                        "weight": i.weight,
                        "status": i.status,
                        "tags": list(i.tags),
                        "in_nginx": None if members is None else i.endpoint in members,
                        "paused_by_nginx": i.endpoint in paused,
                    }
                    for i in instances
                ],
            }
        )
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for item in report:
        print(f"{item['service']} (upstream {item['upstream']})")
        for inst in item["instances"]:
            in_nginx = {True: "in nginx", False: "not in nginx", None: "nginx: unknown (no -c)"}[inst["in_nginx"]]
            if inst["paused_by_nginx"]:
                in_nginx = "paused by nginx (failed requests)"
            print(
                f"  {inst['endpoint']:<28} {inst['status']:<12} weight {inst['weight']:<4} {in_nginx:<14} id {inst['id']}"
            )
        if not item["instances"]:
            print("  (no instances)")
    return 0


async def cmd_add(client: ConsulClient, args: argparse.Namespace) -> int:
    endpoint = parse_endpoint(args.endpoint)
    if args.weight < 1:
        raise ConfigError(f"--weight {args.weight}: must be a positive integer")
    service_id = args.id or f"{args.service}-{endpoint.host}-{endpoint.port}"
    tags = [NGINX_TAG] + [t for t in args.tag if t != NGINX_TAG]
    definition: dict[str, Any] = {
        "ID": service_id,
        "Name": args.service,
        "Address": endpoint.host,
        "Port": endpoint.port,
        "Tags": tags,
        "Meta": parse_meta(args.meta),
        "Weights": {"Passing": args.weight, "Warning": 1},
    }
    if args.check == "tcp":
        definition["Check"] = {
            "Name": f"TCP {endpoint.text}",
            "TCP": endpoint.text,
            "Interval": args.check_interval,
            "Timeout": args.check_timeout,
        }
    elif args.check == "http":
        path = args.check_path if args.check_path.startswith("/") else "/" + args.check_path
        definition["Check"] = {
            "Name": f"HTTP {endpoint.text}{path}",
            "HTTP": f"http://{endpoint.text}{path}",
            "Interval": args.check_interval,
            "Timeout": args.check_timeout,
        }
    await client.register(definition)
    check = "no check" if args.check == "none" else f"{args.check} check every {args.check_interval}"
    print(
        f"registered {service_id}: service {args.service} at {endpoint.text}, weight {args.weight}, tags {','.join(tags)}, {check}"
    )
    return 0


def _last_passing(instances: list[InstanceStatus], target: InstanceStatus) -> bool:
    passing = [i for i in instances if i.status == "passing"]
    return target.status == "passing" and len(passing) == 1


LAST_MEMBER_KEPT = (
    'warning: {endpoint} was the last passing instance of {service!r}: with on_empty = "keep" (the default) nginx keeps '
    "sending it traffic as the remembered member until another instance passes"
)


async def cmd_del(client: ConsulClient, args: argparse.Namespace) -> int:
    endpoint = parse_endpoint(args.endpoint)
    instances = await _instances(client, args.service)
    target = _find(instances, args.service, endpoint)
    last = _last_passing(instances, target)
    if last and not args.force:
        print(
            f"confpy: error: refusing to remove {endpoint.text}: it is the last passing instance of {args.service!r}, "
            "so nginx would be left without a working server; add another first, or use --force",
            file=sys.stderr,
        )
        return 1
    await client.deregister(target.id)
    if last:
        print(LAST_MEMBER_KEPT.format(endpoint=endpoint.text, service=args.service), file=sys.stderr)
    print(f"deregistered {target.id}: service {args.service} at {endpoint.text}")
    return 0


async def cmd_maintenance(client: ConsulClient, args: argparse.Namespace, enable: bool) -> int:
    endpoint = parse_endpoint(args.endpoint)
    instances = await _instances(client, args.service)
    target = _find(instances, args.service, endpoint)
    last = enable and _last_passing(instances, target)
    if last and not args.force:
        print(
            f"confpy: error: refusing to drain {endpoint.text}: it is the last passing instance of {args.service!r}; "
            'with on_empty = "keep" nginx would keep sending it traffic anyway, and with "render" it would have no '
            "server at all; add another instance first, or use --force",
            file=sys.stderr,
        )
        return 1
    await client.maintenance(target.id, enable, getattr(args, "reason", None) if enable else None)
    action = "drained (maintenance on)" if enable else "undrained (maintenance off)"
    print(f"{action} {target.id}: service {args.service} at {endpoint.text}")
    if last:
        print(LAST_MEMBER_KEPT.format(endpoint=endpoint.text, service=args.service), file=sys.stderr)
    return 0


async def dispatch(context: AdminContext, args: argparse.Namespace) -> int:
    """Run one `confpy upstream ...` command against the Consul agent of `context`."""
    client = ConsulClient(context.consul)
    command = args.upstream_command
    try:
        if command == "list":
            return await cmd_list(client, args, context)
        if command == "add":
            return await cmd_add(client, args)
        if command == "del":
            return await cmd_del(client, args)
        return await cmd_maintenance(client, args, enable=command == "drain")
    finally:
        await client.close()
