"""The command line: a thin shell over the pipeline, the daemon and the admin commands.

Exit codes: 0 success, 1 the sync (or command) failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from confpy import __version__
from confpy.config import DEFAULT_CONFIG_PATH, Config, load_config
from confpy.errors import ConfigError, ConfpyError

if TYPE_CHECKING:
    from confpy.pipeline import SyncReport

log = logging.getLogger("confpy")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RELOADED = 3


def config_path(arg: str | None, environ: Mapping[str, str]) -> Path:
    """`-c FILE`, else $CONFPY_CONFIG, else /etc/confpy/confpy.toml."""
    return Path(arg or environ.get("CONFPY_CONFIG") or DEFAULT_CONFIG_PATH)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with stable keys: time, level, logger, message (and error)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}" + time.strftime("%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


# Control characters (and Unicode's line breaks) written as escapes: a registry name or value
# with a newline must not start a forged line in a text log (JSON logs escape them already).
_CONTROLS = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
    if code != 0x09  # a tab breaks no line
}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r"})


class TextFormatter(logging.Formatter):
    """One line per record: the message's control characters are escaped (a traceback, added
    after the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_CONTROLS)
        return super().formatMessage(record)


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """systemd sets $JOURNAL_STREAM to DEVICE:INODE of the journal socket it gave us as stderr."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return info.st_dev == int(device) and info.st_ino == int(inode)


def setup_logging(level: str, log_format: str = "text", environ: Mapping[str, str] | None = None) -> None:
    """Log to stderr: `text` (no timestamp when stderr is the journal, which adds its own) or `json`."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif stderr_is_journal(os.environ if environ is None else environ):
        handler.setFormatter(TextFormatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # Libraries' connection chatter at DEBUG is not what operators want to read.
    for noisy in ("urllib3", "watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="confpy",
        description="Keep nginx upstreams in step with the services registered in Consul.",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file (default: $CONFPY_CONFIG, else /etc/confpy/confpy.toml)",
    )
    parser.add_argument("--once", action="store_true", help="sync once and exit (default: run as a daemon)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --once: print a diff per template and ask nginx whether it would accept them; change nothing",
    )
    parser.add_argument(
        "--allow-no-reload",
        action="store_true",
        help="with --once: exit 0 even when nginx could not be reloaded (e.g. not started yet); default: exit 3",
    )
    parser.add_argument(
        "--no-guard",
        action="store_true",
        help="with --once: apply a drop of members the shrink guard would hold ([guard]); default: keep them, exit 1",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=None,
        help="text (default; no timestamps under journald) or json (one object per line); also [log] format",
    )
    parser.add_argument("--version", action="version", version=f"confpy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    templates = sub.add_parser("templates", help="list the templates shipped with confpy, or copy one out for editing")
    actions = templates.add_subparsers(dest="templates_command", metavar="ACTION")
    actions.add_parser("list", help="the shipped templates (the default)")
    copy = actions.add_parser("copy", help="copy a shipped template to a file you can edit")
    copy.add_argument("name")
    copy.add_argument("dest", metavar="FILE")
    copy.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    show = actions.add_parser("show", help="print a shipped template")
    show.add_argument("name")

    init = sub.add_parser("init", help="print an example configuration (save it as /etc/confpy/confpy.toml)")
    init.add_argument("--live", action="store_true", help="the live-mode example")

    dev = sub.add_parser("dev-consul", help="run the in-memory, Consul-compatible development agent")
    dev.add_argument(
        "--http-addr", default="127.0.0.1:8500", help="address to serve the HTTP API on (port 0: any free port)"
    )
    dev.add_argument("--node", default="", help="node name (default: this host's name)")
    dev.add_argument(
        "--shuffle",
        action="store_true",
        help="answer health entries in a new random order each time (Consul's order is stable): for testing clients",
    )
    dev.add_argument(
        "--enable-script-checks",
        action="store_true",
        help="run script checks (`Args`) registered through the API, as Consul's enable_script_checks; off by default",
    )
    dev.add_argument("--tls-cert", default="", help="serve HTTPS with this certificate (PEM)")
    dev.add_argument("--tls-key", default="", help="the certificate's private key (PEM)")
    dev.add_argument(
        "--tls-ca", default="", help="require client certificates signed by this CA (Consul's verify_incoming)"
    )

    from confpy.admin import command as admin

    admin.add_parser(sub)

    plan = sub.add_parser(
        "plan", help="print what this configuration will cost the registry (one dry render; nothing is changed)"
    )
    plan.add_argument(
        "--gateways", type=_gateways, default=1, help="also for N gateways following the same registry (default 1)"
    )
    demo = sub.add_parser("demo", help="run the end-to-end demo on loopback (dev-consul, backends, nginx, confpy)")
    demo.add_argument("--keep-running", action="store_true", help="leave everything up and print what to try by hand")
    demo.add_argument(
        "--registry", choices=["consul", "etcd"], default="consul", help="tell the story on dev-consul or a real etcd"
    )
    return parser


def _load(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    config = load_config(config_path(args.config, environ), environ)
    if args.log_format is None and config.log.format != "text":
        setup_logging(args.log_level, config.log.format, environ)
    return config


def run_templates(args: argparse.Namespace) -> int:
    """`confpy templates [list|show NAME|copy NAME FILE]`."""
    from confpy import builtin

    def path_of(name: str) -> Path:
        try:
            return builtin.template_path(name)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None

    if args.templates_command == "show":
        sys.stdout.write(path_of(args.name).read_text(encoding="utf-8"))
        return EXIT_OK
    if args.templates_command == "copy":
        source, dest = path_of(args.name), Path(args.dest)
        if dest.is_dir():
            dest = dest / args.name
        if dest.exists() and not args.force:
            raise ConfigError(f"{dest} exists; pass --force to overwrite it")
        try:
            dest.write_bytes(source.read_bytes())
        except OSError as exc:
            raise ConfigError(f"{dest}: cannot write: {exc.strerror}") from None
        print(f'copied {args.name} to {dest}; set source = "{dest.resolve()}" in [[template]] to use your copy')
        return EXIT_OK
    for name in builtin.template_names():
        print(f"builtin:{name:<34} {builtin.template_summary(name)}")
    return EXIT_OK


def _gateways(text: str) -> int:
    """argparse type for --gateways: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gateways needs a whole number of gateways, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--gateways needs at least 1 gateway, got {value}")
    return value


async def plan_cost(config: Config, gateways: int) -> str:
    """`confpy plan`: render once (fetching what the templates use, installing nothing) and
    print what watching it costs the registry."""
    from confpy.pipeline import SyncEngine
    from confpy.plan import registry_cost
    from confpy.registry.factory import open_registry
    from confpy.render.datasource import DataSource

    engine = SyncEngine(config)
    registry = open_registry(config)
    try:
        data = DataSource()
        await engine.resolve(registry, data, engine.load_memories())
    finally:
        await registry.close()
        await engine.close()
    return registry_cost(config.registry_name, config.registry_wait, data.snapshot(), gateways).describe()


async def sync_once(config: Config, dry_run: bool, guarded: bool = True) -> SyncReport:
    """`--once`: one sync through the same render and install steps the daemon uses."""
    from confpy.pipeline import SyncEngine
    from confpy.registry.factory import open_registry

    engine = SyncEngine(config)
    registry = open_registry(config)
    try:
        return await engine.sync_once(registry, dry_run=dry_run, guarded=guarded)
    finally:
        await registry.close()
        await engine.close()


def run_main_job(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """`confpy [--once] [--dry-run]`: the sync, once or as a daemon."""
    if args.dry_run and not args.once:
        raise ConfigError("--dry-run works with --once only (the daemon always applies)")
    if args.no_guard and not args.once:
        raise ConfigError('--no-guard works with --once only; for the daemon set [guard] max_drop = "100%"')
    config = _load(args, environ)
    if not args.once:
        from confpy.daemon.loop import run_daemon

        return run_daemon(config, config_path(args.config, environ), environ)
    report = asyncio.run(sync_once(config, args.dry_run, guarded=not args.no_guard))
    if args.dry_run:
        for held in report.held:
            sys.stdout.write(f"the shrink guard would hold: {held}\n")
        for template in config.templates:
            diff = report.diffs.get(template.destination)
            sys.stdout.write(diff if diff else f"{template.destination}: no change\n")
        for path, diff in report.diffs.items():
            if path not in {t.destination for t in config.templates}:
                sys.stdout.write(diff)
        sys.stdout.write(
            "nginx would accept these files (checked on a staged copy of its configuration; nothing was changed)\n"
        )
        return EXIT_OK
    if not report.changed:
        log.info("no change: %s", ", ".join(str(p) for p in report.unchanged))
    skipped = report.not_reloaded
    if skipped is not None and not (args.allow_no_reload or config.nginx.allow_no_reload):
        print(
            f"confpy: error: files installed but nginx was not reloaded: {skipped.detail} "
            "(exit 3; --allow-no-reload or [nginx] allow_no_reload = true accepts this, e.g. before nginx is first started)",
            file=sys.stderr,
        )
        return EXIT_NOT_RELOADED
    if report.held or report.quarantined:
        for held in report.held:
            print(f"confpy: error: drop not applied: {held}", file=sys.stderr)
        for left_out in report.quarantined:
            print(f"confpy: error: left out {left_out.describe()}", file=sys.stderr)
        if report.quarantined:
            print(
                f"confpy: error: nginx refused {len(report.quarantined)} upstream(s); everything else was installed "
                "(exit 1)",
                file=sys.stderr,
            )
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of the `confpy` console script."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format or "text", environ)
    try:
        if args.command == "templates":
            return run_templates(args)
        if args.command == "init":
            from confpy.config_doc import example_config

            sys.stdout.write(example_config(live=args.live))
            return EXIT_OK
        if args.command == "dev-consul":
            from confpy.dev.devconsul.server import serve, tls_context

            tls = tls_context(args.tls_cert, args.tls_key, args.tls_ca)
            return serve(args.http_addr, args.node, args.shuffle, args.enable_script_checks, tls)
        if args.command == "upstream":
            from confpy.admin import command as admin

            return admin.run(args, environ)
        if args.command == "plan":
            sys.stdout.write(asyncio.run(plan_cost(_load(args, environ), args.gateways)))
            return EXIT_OK
        if args.command == "demo":
            from confpy.dev.demo import run_demo

            return run_demo(keep_running=args.keep_running, registry=args.registry)
        return run_main_job(args, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"confpy: error: {problem}", file=sys.stderr)
        return exc.exit_code
    except ConfpyError as exc:
        print(f"confpy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_FAILED
