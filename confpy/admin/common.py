"""What the member commands share, whichever registry they speak to: the endpoint and `--meta`
arguments, and what a command knows from the configuration."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from confpy.config import ConsulConfig, EtcdConfig, consul_from_env, load_config, split_host_port
from confpy.errors import ConfigError
from confpy.model import format_endpoint, normalize_address

NGINX_TAG = "nginx"


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


def parse_meta(items: list[str]) -> dict[str, str]:
    """`--meta KEY=VALUE` arguments as a mapping; ConfigError (exit 2) names the malformed one."""
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta {item!r}: write it as KEY=VALUE")
        meta[key] = value
    return meta


@dataclass(frozen=True)
class AdminContext:
    """What the commands know: the registry's settings, and where nginx's members can be seen."""

    consul: ConsulConfig
    etcd: EtcdConfig | None = None
    destinations: tuple[Path, ...] = ()
    live_listen: str | None = None
    live_token_file: Path | None = None


def load_context(args: argparse.Namespace, environ: Mapping[str, str]) -> AdminContext:
    """From `-c FILE` (else $CONFPY_CONFIG) when given, else Consul's settings from the environment."""
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
