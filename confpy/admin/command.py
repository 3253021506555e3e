"""The `confpy upstream ...` command line: its arguments, and which registry runs a command."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from typing import Any

from confpy.admin import consul, etcd
from confpy.admin.common import load_context
from confpy.admin.release import release


def add_parser(sub: Any) -> None:
    """Attach `upstream ...` to the main parser's subcommands."""
    upstream = sub.add_parser(
        "upstream", help="list, add, delete or drain upstream members (via the registry), or release a held drop"
    )
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

    rel = with_config(
        cmds.add_parser(
            "release",
            help="apply at once, on every confpy, a drop of SERVICE's members the shrink guard holds ([guard])",
        )
    )
    rel.add_argument("service")

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


def run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """Run one `confpy upstream ...` command."""
    context = load_context(args, environ)
    if args.upstream_command == "release":
        return asyncio.run(release(context, args.service))
    if context.etcd is not None:
        try:
            return asyncio.run(etcd.dispatch(context.etcd, args))
        except KeyboardInterrupt:
            return 0  # `add --ttl` ends here: the lease is no longer kept alive and expires
    return asyncio.run(consul.dispatch(context, args))
