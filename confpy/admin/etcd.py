"""`confpy upstream list|add|del` when the configuration follows etcd.

etcd's naming convention is the source of truth: `add` writes `<prefix><service>/<host:port>` =
`{"Addr": ..., "Metadata": {...}}` (with `--ttl`, under a lease this command keeps alive in the
foreground until Ctrl-C, as an app server would), `del` deletes the key and keeps the last-member
rule. `drain`/`undrain` are Consul's maintenance mode: etcd has none, so they say so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from confpy.admin.common import NGINX_TAG, parse_endpoint, parse_meta
from confpy.config import EtcdConfig
from confpy.errors import ConfigError, ConfpyError
from confpy.registry.etcd import EtcdClient, EtcdRegistration


async def _members(client: EtcdClient, config: EtcdConfig, service: str) -> list[tuple[str, str]]:
    _, pairs = await client.range(f"{config.prefix}{service}/", prefix=True)
    return pairs


async def cmd_list(client: EtcdClient, config: EtcdConfig, args: argparse.Namespace) -> int:
    _, pairs = await client.range(config.prefix, prefix=True)
    services: dict[str, list[str]] = {}
    for key, value in pairs:
        name, sep, rest = key[len(config.prefix) :].partition("/")
        if not sep or (args.service and name != args.service):
            continue
        try:
            member = EtcdRegistration.decode(value, config.default_tags)
            line = f"  {member.host}:{member.port}  weight {member.weight}  tags {','.join(member.tags)}"
        except ValueError as exc:
            line = f"  {rest}  left out: {exc}"
        services.setdefault(name, []).append(line)
    if not services:
        print(
            f"no service under {config.prefix or 'the root'!r} in etcd"
            + (f" named {args.service!r}" if args.service else "")
        )
        return 0
    for name, lines in sorted(services.items()):
        print(f"{name} ({len(lines)} in etcd)")
        print("\n".join(lines))
    return 0


async def cmd_add(client: EtcdClient, config: EtcdConfig, args: argparse.Namespace) -> int:
    endpoint = parse_endpoint(args.endpoint)
    if args.weight < 1:
        raise ConfigError(f"--weight {args.weight}: must be a positive integer")
    tags = [NGINX_TAG] + [t for t in args.tag if t != NGINX_TAG]
    metadata: dict[str, Any] = {"weight": args.weight, "tags": tags}
    if args.meta:
        metadata["meta"] = parse_meta(args.meta)
    key = f"{config.prefix}{args.service}/{endpoint.text}"
    value = json.dumps({"Addr": endpoint.text, "Metadata": metadata})
    lease = await client.grant(args.ttl) if args.ttl else ""
    await client.put(key, value, lease)
    if not args.ttl:
        print(f"registered {key} in etcd: weight {args.weight}, tags {','.join(tags)}")
        return 0
    print(f"registered {key} in etcd under a {args.ttl}s lease, kept alive until Ctrl-C (then it expires)", flush=True)
    try:
        while True:
            await asyncio.sleep(max(1.0, args.ttl / 3))
            await client.keepalive(lease)
    except asyncio.CancelledError:
        return 0


async def cmd_del(client: EtcdClient, config: EtcdConfig, args: argparse.Namespace) -> int:
    endpoint = parse_endpoint(args.endpoint)
    key = f"{config.prefix}{args.service}/{endpoint.text}"
    members = await _members(client, config, args.service)
    if key not in {k for k, _ in members}:
        raise ConfpyError(f"{args.service} has no member {endpoint.text} in etcd (no key {key!r})")
    if len(members) == 1 and not args.force:
        raise ConfpyError(
            f"refusing to delete {key}: it is the last member of {args.service}, which would leave nginx with none; "
            "add another first, or use --force"
        )
    await client.delete(key)
    print(f"deleted {key} from etcd")
    return 0


async def dispatch(config: EtcdConfig, args: argparse.Namespace) -> int:
    """Run one `confpy upstream ...` command against the etcd cluster of `config`."""
    client = EtcdClient(config)
    try:
        if args.upstream_command == "list":
            return await cmd_list(client, config, args)
        if args.upstream_command == "add":
            return await cmd_add(client, config, args)
        if args.upstream_command == "del":
            return await cmd_del(client, config, args)
        raise ConfigError(
            f"confpy upstream {args.upstream_command}: maintenance mode is Consul's; with etcd, delete the member "
            "(`confpy upstream del`) or let its lease expire"
        )
    finally:
        await client.close()
