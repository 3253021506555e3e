"""`confpy upstream list|add|del|drain|undrain`: the operators' member commands, on Consul.

Consul stays the source of truth: these commands register, deregister and put instances in
maintenance on the Consul agent, and the running confpy carries the change into nginx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confpy.config import ConsulConfig, EtcdConfig, consul_from_env, load_config, split_host_port
from confpy.errors import ConfigError, ConfpyError
from confpy.model import format_endpoint, normalize_address
from confpy.registry.consul import ConsulClient
from confpy.render.naming import upstream_name_for

NGINX_TAG = "nginx"
_UPSTREAM_BLOCK = re.compile(r"upstream\s+(\S+)\s*\{(.*?)\}", re.S)
_SERVER_LINE = re.compile(r"^\s*server\s+(\S+?)[\s;]", re.M)


@dataclass(frozen=True)
class Endpoint:
    """A validated HOST:PORT given on the command line."""

    host: str
    port: int

    @property
    def text(self) -> str:
        return format_endpoint(self.host, self.port)


def parse_endpoint(text: str) -> Endpoint:
    """Parse HOST:PORT (`[v6]:port` for IPv6); ConfigError (exit 2) says what is wrong."""
    try:
        host, port = split_host_port(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if port == 0:
        raise ConfigError(f"{text!r}: port 0 is not a number from 1 to 65535")
    try:
        address = normalize_address(host)
    except ValueError as exc:
        raise ConfigError(f"{text!r}: {exc}") from None
    return Endpoint(address, port)


def _meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta {item!r}: write it as KEY=VALUE")
        meta[key] = value
    return meta


def add_parser(sub: Any) -> None:
    """Attach `upstream ...` to the main parser's subcommands."""
    upstream = sub.add_parser("upstream", help="list, add, delete or drain upstream members (via Consul)")
    cmds = upstream.add_subparsers(dest="upstream_command", metavar="ACTION", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help="confpy configuration ([consul] settings)"
        )
        return p

    lst = with_config(cmds.add_parser("list", help="services, their instances, health, and whether nginx has them"))
    lst.add_argument("service", nargs="?", help="only this service")
    lst.add_argument("--json", action="store_true", help="machine-readable output")

    add = with_config(cmds.add_parser("add", help="register an instance (tagged nginx) with the Consul agent"))
    add.add_argument("service")
    add.add_argument("endpoint", metavar="HOST:PORT")
    add.add_argument("--id", help="service ID (default: SERVICE-HOST-PORT)")
    add.add_argument("--weight", type=int, default=1, help="nginx weight (default 1)")
    add.add_argument("--tag", action="append", default=[], help="extra tag (repeatable); `nginx` is always added")
    add.add_argument("--meta", action="append", default=[], help="KEY=VALUE service meta (repeatable)")
    add.add_argument("--check", choices=["tcp", "http", "none"], default="tcp", help="health check (default tcp)")
    add.add_argument("--check-path", default="/health", help="path of the HTTP check (default /health)")
    add.add_argument("--check-interval", default="1s", help="check interval (default 1s)")
    add.add_argument("--check-timeout", default="1s", help="check timeout (default 1s)")
    add.add_argument(
        "--ttl", type=int, default=0, help="etcd: register under a lease of this many seconds, kept alive until Ctrl-C"
    )

    for name, text in (
        ("del", "deregister an instance"),
        ("drain", "put an instance in maintenance"),
        ("undrain", "end maintenance"),
    ):
        p = with_config(cmds.add_parser(name, help=text))
        p.add_argument("service")
        p.add_argument("endpoint", metavar="HOST:PORT")
        if name == "del":
            p.add_argument("--force", action="store_true", help="remove even the last passing instance")
        if name == "drain":
            p.add_argument("--reason", default="drained with confpy upstream drain", help="maintenance reason")
            p.add_argument("--force", action="store_true", help="drain even the last passing instance")


@dataclass(frozen=True)
class AdminContext:
    """What the commands know: Consul's settings, and where nginx's members can be seen."""

    consul: ConsulConfig
    etcd: EtcdConfig | None = None
    destinations: tuple[Path, ...] = ()
    live_listen: str | None = None
    live_token_file: Path | None = None


def _context(args: argparse.Namespace, environ: Mapping[str, str]) -> AdminContext:
    path_text = getattr(args, "config", None) or environ.get("CONFPY_CONFIG")
    if path_text:
        config = load_config(Path(path_text), environ)
        live = config.nginx.live_listen if config.nginx.mode == "live" else None
        return AdminContext(
            config.consul,
            config.etcd,
            tuple(t.destination for t in config.templates),
            live,
            config.nginx.live_token_file,
        )
    return AdminContext(consul_from_env(environ))


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
        "Meta": _meta(args.meta),
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


async def _dispatch(client: ConsulClient, args: argparse.Namespace, context: AdminContext) -> int:
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


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run one `confpy upstream ...` command."""
    context = _context(args, environ)
    if context.etcd is not None:
        from confpy import admin_etcd

        try:
            return asyncio.run(admin_etcd.dispatch(context.etcd, args))
        except KeyboardInterrupt:
            return 0  # `add --ttl` ends here: the lease is no longer kept alive and expires
    return asyncio.run(_dispatch(ConsulClient(context.consul), args, context))
