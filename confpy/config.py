"""The configuration file: TOML in, frozen dataclasses out.

Each key is declared once, as a `setting(...)` field of its table's dataclass below (see
settings.py): its parser, its default as written in TOML, its environment variable, one line of
documentation. The parsing here, CONSUL_ENVIRONMENT and ETCD_ENVIRONMENT, the key tables of
docs/configuration.md and `confpy init`'s example (config_doc.py) are derived from them.

Every check names the file, the table and the key, and says what to fix. Unknown keys are errors
(a typo must never silently fall back to a default on a production gateway).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import os
import re
import shlex
import signal
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from confpy.builtin import BUILTIN_PREFIX, template_path
from confpy.durations import GO_TRUE, format_go_duration, parse_go_bool, parse_go_duration
from confpy.errors import ConfigError
from confpy.settings import Parser, Setting, all_settings, config_table, environment_map, setting

DEFAULT_CONFIG_PATH = Path("/etc/confpy/confpy.toml")
DEFAULT_CONSUL_ADDRESS = "http://127.0.0.1:8500"

OnEmpty = Literal["keep", "render"]
Consistency = Literal["default", "stale", "consistent"]
NginxMode = Literal["reload", "live"]
LogFormat = Literal["text", "json"]
SYSTEM_STATE_DIR = Path("/var/lib/confpy")

Choice = TypeVar("Choice", bound=str)

log = logging.getLogger(__name__)


# --- the checks of one value (each raises ConfigError starting with the key's label) ------------


def _expect(kind: type[Any], name: str) -> Callable[[object, str], Any]:
    def parse(value: object, label: str) -> Any:
        # bool is a subclass of int in Python, but `port = true` is a mistake, not a number.
        if isinstance(value, bool) and kind is int:
            raise ConfigError(f"{label}: expected {name}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{label}: expected {name}, got {type(value).__name__} {value!r}")
        return value

    return parse


_str: Parser[str] = _expect(str, "a string")
_bool: Parser[bool] = _expect(bool, "true or false")
_int: Parser[int] = _expect(int, "an integer")


def _path(value: object, label: str) -> Path:
    """A path as written; relative ones are resolved against the file's folder when it is read."""
    return Path(_str(value, label))


def _int_at_least(minimum: int, what: str) -> Parser[int]:
    def parse(value: object, label: str) -> int:
        number: int = _int(value, label)
        if number < minimum:
            raise ConfigError(f"{label}: must be {what}, got {number}")
        return number

    return parse


_byte_count = _int_at_least(1, "a positive number of bytes")
_byte_limit = _int_at_least(0, "a number of bytes (0 for no limit), not negative")
_positive_int = _int_at_least(1, "at least 1")


def _positive_count(value: object, label: str) -> int:
    count = _int(value, label)
    if count <= 0:
        raise ConfigError(f"{label}: must be a positive whole number")
    return count


def _duration(value: object, label: str) -> float:
    text = _str(value, label)
    try:
        seconds = parse_go_duration(text)
    except ValueError:
        raise ConfigError(
            f'{label}: invalid duration {text!r}; write a number with a unit, e.g. "250ms", "5s", "1m"'
        ) from None
    if seconds < 0:
        raise ConfigError(f"{label}: duration {text!r} must not be negative")
    return seconds


def _positive_duration(value: object, label: str) -> float:
    seconds = _duration(value, label)
    if seconds <= 0:
        raise ConfigError(f'{label}: must be a positive duration, e.g. "1s" or "1m"')
    return seconds


def _command(value: object, label: str) -> tuple[str, ...]:
    text = _str(value, label)
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"{label}: cannot split {text!r} into arguments ({exc}); check its quotes") from None


def _check_command(value: object, label: str) -> tuple[str, ...]:
    command = _command(value, label)
    if not command:
        raise ConfigError(f"{label}: must not be empty; confpy never installs a configuration nginx has not checked")
    return command


def _signal(value: object, label: str) -> signal.Signals:
    text = _str(value, label).upper()
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ConfigError(f'{label}: unknown signal {value!r}; use a name such as "SIGHUP"') from None


def _file_mode(value: object, label: str) -> int:
    text = _str(value, label)
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f'{label}: {text!r} is not an octal file mode; write it like "0644"') from None
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f'{label}: {text!r} is out of range for a file mode; write it like "0644"')
    return mode


def _choice(*choices: Choice) -> Parser[Choice]:
    def parse(value: object, label: str) -> Choice:
        text = _str(value, label)
        for choice in choices:
            if text == choice:
                return choice
        raise ConfigError(f"{label}: {text!r} is not one of {', '.join(repr(c) for c in choices)}")

    return parse


def _listen(value: object, label: str) -> str:
    text = _str(value, label)
    if text:
        try:
            split_host_port(text)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    return text


def _admin_listen(value: object, label: str) -> str:
    """`unix:/absolute/path` or HOST:PORT."""
    text = _str(value, label)
    if text.startswith("unix:"):
        if not text[5:].startswith("/"):
            raise ConfigError(
                f'{label}: {text!r}: a Unix socket needs an absolute path, e.g. "unix:/run/confpy/admin.sock"'
            )
        return text
    return _listen(text, label)


def _endpoints(value: object, label: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f'{label}: must be a non-empty list of URLs, e.g. ["http://127.0.0.1:2379"]')
    return tuple(items)


def _tags(value: object, label: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{label}: must be a list of tags, e.g. ["nginx"]')
    return tuple(value)


def _service_names(value: object, label: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{label}: must be a list of service names, e.g. ["auth.example.com"]')
    return frozenset(value)


def _go_bool_variable(raw: str, label: str) -> bool:
    try:
        return parse_go_bool(raw)
    except ValueError:
        raise ConfigError(f"{label}: {raw!r} is not a boolean (true or false)") from None


def _comma_list(raw: str, label: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def is_loopback_listen(listen: str) -> bool:
    """True for a Unix socket or a loopback address (127.0.0.0/8, ::1, localhost)."""
    if listen.startswith("unix:"):
        return True
    host = split_host_port(listen)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host_port(text: str) -> tuple[str, int]:
    """Split "127.0.0.1:9118" or "[::1]:9118" into host and port; ValueError when malformed."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f'{text!r} is not HOST:PORT (e.g. "127.0.0.1:8080")')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'{text!r}: write an IPv6 address in brackets, e.g. "[::1]:8080"')
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


# --- the tables and their keys: one declaration per key ----------------------------------------


@config_table
class ConsulConfig:
    """How to reach Consul and how to behave towards it."""

    address: str = setting(
        parse=_str,
        default=DEFAULT_CONSUL_ADDRESS,
        env="CONSUL_HTTP_ADDR",
        doc="the agent's HTTP address (`https://` for TLS; `$CONSUL_HTTP_SSL=true` makes an address without a scheme https)",
    )
    token: str = setting(
        parse=_str,
        default="",
        env="CONSUL_HTTP_TOKEN",
        secret=True,
        doc_default="the systemd credential `consul-token` (`$CREDENTIALS_DIRECTORY/consul-token`), else "
        "`$CONSUL_HTTP_TOKEN`, else the file `$CONSUL_HTTP_TOKEN_FILE` names, else none",
        doc="ACL token, sent as `X-Consul-Token`; never logged or shown in `/status`. One with a line break, a control "
        "character or a character outside Latin-1 (a token file with two lines, say) cannot be one HTTP header: it is "
        "refused at start-up, naming where it came from, without showing it",
    )
    token_file: str = setting(
        parse=_str,
        default="",
        env="CONSUL_HTTP_TOKEN_FILE",
        doc_default="see `token`",
        doc="a file holding the token (read at start-up and on SIGHUP); `token` and `token_file` together are an error",
    )
    datacenter: str = setting(
        parse=_str,
        default="",
        doc_default="the agent's",
        doc="`?dc=` for every query (`service(..., dc=...)` overrides it for one call)",
    )
    namespace: str = setting(
        parse=_str,
        default="",
        env="CONSUL_NAMESPACE",
        doc="`?ns=` on every query (Consul Enterprise; the community edition accepts only `default`)",
    )
    partition: str = setting(
        parse=_str,
        default="",
        env="CONSUL_PARTITION",
        doc="`?partition=` on every query (Consul Enterprise, as `namespace`)",
    )
    ca_file: str = setting(
        parse=_str,
        default="",
        env="CONSUL_CACERT",
        doc_default="`$CONSUL_CACERT`, else the system's CAs",
        doc="TLS: the CA bundle that verifies Consul",
    )
    ca_path: str = setting(
        parse=_str,
        default="",
        env="CONSUL_CAPATH",
        doc="TLS: a folder of CA certificates (hashed names, as `c_rehash` makes them)",
    )
    cert_file: str = setting(
        parse=_str,
        default="",
        env="CONSUL_CLIENT_CERT",
        doc="TLS: the client certificate (for Consul's `verify_incoming`)",
    )
    key_file: str = setting(
        parse=_str,
        default="",
        env="CONSUL_CLIENT_KEY",
        doc="TLS: the client certificate's key (needs `cert_file`)",
    )
    tls_server_name: str = setting(
        parse=_str,
        default="",
        env="CONSUL_TLS_SERVER_NAME",
        doc_default="`$CONSUL_TLS_SERVER_NAME`, else the address's host",
        doc="TLS: the name Consul's certificate must carry (SNI and verification), e.g. `server.dc1.consul`",
    )
    verify: bool = setting(
        parse=_bool,
        default=True,
        env="CONSUL_HTTP_SSL_VERIFY",
        env_parse=_go_bool_variable,
        doc="verify Consul's TLS certificate (the variable takes Go's booleans: `true`, `false`, `1`, `0`, ...)",
    )
    wait: float = setting(
        parse=_duration,
        default="60s",
        doc="blocking-query wait (Consul caps it at 10m and adds up to wait/16 jitter)",
    )
    timeout: float = setting(
        parse=_duration,
        default="10s",
        doc="connect/read timeout; a blocking query may take `wait + wait/16 + timeout`",
    )
    max_backoff: float = setting(
        parse=_duration,
        default="1m",
        doc="retries after a failure back off exponentially (with jitter) from 250 ms up to this",
    )
    max_response_bytes: int = setting(
        parse=_byte_count,
        default=32 * 1024 * 1024,
        doc="a larger answer from Consul is refused (protects against a broken or hostile endpoint)",
    )
    consistency: Consistency = setting(
        parse=_choice("default", "stale", "consistent"),
        default="default",
        doc='`"stale"` (any server answers: `?stale`) or `"consistent"` (`?consistent`) on every read; see '
        "[operations.md](operations.md#consistency-modes-for-big-fleets)",
    )
    max_stale: float = setting(
        parse=_duration,
        default="0s",
        doc_default="none",
        doc="with `stale`: `?max_stale=`, the most a stale answer may lag before the leader answers instead",
    )
    use_cache: bool = setting(
        parse=_bool,
        default=False,
        doc="`?cached`: the local agent's cache answers (one query to the servers per agent, not per gateway); "
        "not with `consistent`",
    )

    def query_params(self) -> list[tuple[str, str]]:
        """What every read sends besides its own parameters: dc, ns, partition, consistency, cache."""
        out: list[tuple[str, str]] = []
        for key, value in (("dc", self.datacenter), ("ns", self.namespace), ("partition", self.partition)):
            if value:
                out.append((key, value))
        if self.consistency != "default":
            out.append((self.consistency, ""))
        if self.max_stale:
            out.append(("max_stale", format_go_duration(self.max_stale)))
        if self.use_cache:
            out.append(("cached", ""))
        return out

    @property
    def scheme(self) -> str:
        return urlsplit(self.address).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.address).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parsed = urlsplit(self.address)
        return parsed.port or (443 if parsed.scheme == "https" else 8500)


@config_table
class EtcdConfig:
    """How to reach etcd (the alternative to Consul): its v3 JSON gateway on each endpoint."""

    endpoints: tuple[str, ...] = setting(
        parse=_endpoints,
        default=["http://127.0.0.1:2379"],
        env="ETCDCTL_ENDPOINTS",
        env_parse=_comma_list,
        doc_default='`$ETCDCTL_ENDPOINTS` (comma-separated), else `["http://127.0.0.1:2379"]`',
        doc="the cluster's client URLs, tried in order (failover)",
    )
    prefix: str = setting(
        parse=_str,
        default="",
        doc_default='`""`',
        doc="services are keys `<prefix><service>/<host:port>`",
    )
    # "nginx" by default, so the shipped templates (services tagged nginx) see every service under
    # the prefix, including etcd's plain `{"Addr": ...}` registrations.
    default_tags: tuple[str, ...] = setting(
        parse=_tags,
        default=["nginx"],
        doc="the tags of an instance whose value names none",
    )
    ca_file: str = setting(
        parse=_str,
        default="",
        env="ETCDCTL_CACERT",
        doc="TLS for `https://` endpoints: the CA bundle that verifies etcd",
    )
    cert_file: str = setting(parse=_str, default="", env="ETCDCTL_CERT", doc="TLS: the client certificate")
    key_file: str = setting(parse=_str, default="", env="ETCDCTL_KEY", doc="TLS: the client certificate's key")
    username: str = setting(
        parse=_str,
        default="",
        env="ETCDCTL_USER",
        doc_default="`$ETCDCTL_USER` (`name:password`), else none",
        doc="etcd's authentication: the user",
    )
    password: str = setting(
        parse=_str,
        default="",
        secret=True,
        doc_default="the password part of `$ETCDCTL_USER`, else none",
        doc="etcd's authentication: the password; `password` and `password_file` together are an error",
    )
    password_file: str = setting(parse=_str, default="", doc="a file holding the password")
    timeout: float = setting(parse=_duration, default="5s", doc="one call's bound (a watch is bounded by `wait`)")
    wait: float = setting(
        parse=_duration, default="60s", doc="how long one watch waits before confpy reads again anyway"
    )
    max_backoff: float = setting(
        parse=_duration, default="1m", doc="retries after a failure back off exponentially up to this"
    )


@config_table
class WaitConfig:
    """Quiescence: render after `min` of calm, but never later than `max` after the first change."""

    min: float = setting(
        parse=_duration, default="100ms", doc="render after this much calm; each new change pushes it back..."
    )
    max: float = setting(
        parse=_duration, default="1s", doc="...but never later than this after the first change of a burst"
    )


def _share(value: object, label: str) -> float:
    """A share written as a percentage, `"50%"`: more than 0, at most 100."""
    text = _str(value, label).strip()
    number = text[:-1].strip() if text.endswith("%") else ""
    try:
        share = float(number)
    except ValueError:
        raise ConfigError(
            f'{label}: {text!r} is not a percentage; write e.g. "50%" ("100%" switches the guard off)'
        ) from None
    if not 0 < share <= 100:
        raise ConfigError(f'{label}: {text!r} must be more than 0% and at most 100% ("100%" switches the guard off)')
    return share / 100


def _member_count(value: object, label: str) -> int:
    count = _int(value, label)
    if count < 1:
        raise ConfigError(f"{label}: must be a positive number of members, got {count}")
    return count


@config_table
class GuardConfig:
    """The shrink guard: a registry answer that removes most of an upstream at once is held, not believed."""

    max_drop: float = setting(
        parse=_share,
        default="50%",
        doc="one answer may remove at most this share of a service's members at once (50% of 5 is 2: removing 3 "
        'is held); a larger drop is held. `"100%"` switches the guard off',
    )
    hold: float = setting(
        parse=_positive_duration,
        default="30s",
        doc="a held drop applies, in one step, only if the registry still says so after this long; members added "
        "meanwhile apply at once, and an answer back within `max_drop` withdraws the hold (nothing is written)",
    )
    min_members: int = setting(
        parse=_member_count,
        default=4,
        doc="services with fewer members than this are not guarded (1 of 2 is 50%, and normal)",
    )

    @property
    def enabled(self) -> bool:
        return self.max_drop < 1.0


@config_table
class NginxConfig:
    """How to check and reload nginx."""

    pid_file: Path = setting(
        parse=_path,
        default="/run/nginx.pid",
        doc="nginx's master PID; confpy checks with psutil that it is a live nginx master before signalling it",
    )
    check_cmd: tuple[str, ...] = setting(
        parse=_check_command,
        default="nginx -t",
        doc="validates the whole configuration after the new files are in place; split with shell rules, never run "
        "through a shell; must not be empty",
    )
    reload_cmd: tuple[str, ...] = setting(
        parse=_command,
        default="",
        doc="when set, run instead of signalling (e.g. `systemctl reload nginx`)",
    )
    reload_signal: signal.Signals = setting(
        parse=_signal, default="SIGHUP", doc="sent to the master when `reload_cmd` is empty"
    )
    check_timeout: float = setting(
        parse=_duration, default="30s", doc="a check that takes longer is killed and counts as failed"
    )
    reload_timeout: float = setting(parse=_duration, default="30s", doc="for `reload_cmd`")
    mode: NginxMode = setting(
        parse=_choice("reload", "live"),
        default="reload",
        doc="`reload`: every change is rendered, checked with `nginx -t` and reloaded. `live`: member changes are "
        "pushed into nginx through confpy's Lua balancer with no reload; see [live-mode.md](live-mode.md)",
    )
    live_listen: str = setting(
        parse=_admin_listen,
        default="unix:/run/confpy/admin.sock",
        doc_default="`unix:$RUNTIME_DIRECTORY/admin.sock`, else `unix:/run/confpy/admin.sock` (root), else in the "
        "state directory",
        doc="live mode: where nginx serves confpy's admin API (the live template listens there, confpy pushes there): "
        "`unix:/absolute/path` or `HOST:PORT`; a non-loopback address is refused unless `live_token_file` and "
        "`live_allow_remote` are both set",
    )
    live_token_file: Path = setting(
        parse=_path,
        default="/var/lib/confpy/admin.token",
        doc_default="`STATE_DIR/admin.token` (created, mode 0600)",
        doc="the admin API's token: nginx's master reads it at start and reload, confpy sends it on every request. It "
        "must be one line of at least 32 printable ASCII characters without spaces (what confpy creates; nginx "
        "refuses a shorter one): any other is refused with a push error naming the file, not the token",
    )
    live_allow_remote: bool = setting(
        parse=_bool, default=False, doc="allow a non-loopback `live_listen` (with an explicit `live_token_file`)"
    )
    max_draining_generations: int = setting(
        parse=_positive_int,
        default=3,
        doc="the reload budget: a due reload waits while this many older generations of nginx workers still drain "
        "their connections; see [operations.md](operations.md#the-reload-budget)",
    )
    max_draining_memory_bytes: int = setting(
        parse=_byte_limit,
        default=0,
        doc_default="0 (off)",
        doc="the reload budget: a due reload also waits while nginx's draining workers hold this many bytes (their "
        "unique memory); an integer",
    )
    max_defer: float = setting(
        parse=_positive_duration,
        default="5m",
        doc="the reload budget: a reload that waited this long happens anyway, with a warning recommending nginx's "
        "`worker_shutdown_timeout`",
    )
    allow_no_reload: bool = setting(
        parse=_bool,
        default=False,
        doc="`--once`: exit 0 (not 3) when files were installed but nginx could not be reloaded; for bootstrapping, "
        "before nginx is first started (same as `--allow-no-reload`)",
    )


@config_table
class TemplateConfig:
    """One `[[template]]`: a Jinja2 source rendered to an nginx include file."""

    source: Path = setting(
        parse=_path,
        doc="the Jinja2 template (see [templates.md](templates.md)): a path, or `builtin:NAME` for a template shipped "
        "with confpy (`confpy templates` lists them, `confpy templates copy NAME FILE` gives you an editable copy)",
    )
    destination: Path = setting(parse=_path, doc="the file nginx includes; two templates may not share one")
    mode: int | None = setting(
        parse=_file_mode,
        default=None,
        example="0644",
        doc_default='the existing file\'s, else `"0644"`',
        doc='octal string, e.g. `"0640"`',
    )
    backup: bool = setting(
        parse=_bool,
        default=True,
        doc="keep the previous bytes in the state directory (`FLAT.bak`, never beside the destination, where nginx's "
        "`include` globs would read it); the backup it replaces keeps a hidden second name "
        "(`.FLAT.bak.XXXXXXXX.confpy-tmp`) until changes pause, when confpy removes it (a leftover from a killed "
        "confpy is removed at the next start)",
    )
    on_empty: OnEmpty = setting(
        parse=_choice("keep", "render"),
        default="keep",
        doc="a service with no passing instance: `keep` renders its last known members (remembered in a state file, "
        "written once changes pause for a second, at most 5 s after a change, and at once when confpy stops or "
        "reloads its configuration, so a restart remembers them too); `render` gives the template the empty list",
    )
    dotted_upstreams: frozenset[str] = setting(
        parse=_service_names,
        default=[],
        example='["auth.example.com"]',
        doc="services whose name keeps its dots as its upstream name, on purpose: a dotted upstream name takes the "
        "traffic the gateway's own config sends to that host (`proxy_pass http://auth.example.com;`), so by default a "
        "service with a dot in its name is left out with a warning (see [templates.md](templates.md))",
    )
    wait: WaitConfig | None = setting(
        nested=WaitConfig, default=None, doc_default="`[wait]`", doc="per-template quiescence (`min`, `max`)"
    )
    guard: GuardConfig | None = setting(
        nested=GuardConfig,
        default=None,
        doc_default="`[guard]`",
        doc="per-template shrink guard (`max_drop`, `hold`, `min_members`; keys left out come from `[guard]`); a "
        "service used by templates with different guards is guarded by the strictest of them (see "
        "[guard.md](guard.md))",
    )

    @property
    def name(self) -> str:
        return str(self.destination)


@config_table
class StatusConfig:
    """The opt-in HTTP status endpoint."""

    listen: str = setting(
        parse=_listen,
        default="",
        doc_default="empty (off)",
        doc="`HOST:PORT` for the status page (`/`), `/health`, `/status` and `/metrics`; keep it on loopback. On "
        "loopback, requests whose `Host` header names another host are refused (DNS rebinding); an address beyond "
        "loopback is accepted with a warning at start-up and on the page: anyone who reaches it reads the status",
    )
    max_connections: int = setting(
        parse=_positive_count,
        default=64,
        doc="open connections the status listener serves at once (event streams included); past it a new "
        "connection gets `503` and is closed, so local clients cannot exhaust confpy's file descriptors or loop",
    )
    max_subscribers: int = setting(
        parse=_positive_count,
        default=16,
        doc="open status pages (`/events` streams) at once; the next one gets `503`. Each costs one comparison per "
        "change, never a serialisation of the status",
    )


@config_table
class StateConfig:
    """Where confpy keeps its own files: backups, locks, remembered and live members."""

    dir: Path = setting(
        parse=_path,
        default=str(SYSTEM_STATE_DIR),
        doc_default="`$STATE_DIRECTORY` (systemd's `StateDirectory=confpy`), else `/var/lib/confpy` when it exists and "
        "is writable, else `$XDG_STATE_HOME/confpy`, else `~/.local/state/confpy`",
        doc="confpy's own files, per destination: its backup (`FLAT.bak`), its lock (`FLAT.lock`), the remembered "
        'members for `on_empty = "keep"` (`FLAT.json`) and in live mode the member state nginx loads '
        "(`FLAT.live.json`); FLAT is the destination's path with `/` turned into `_`. Only the destination itself "
        "(and, for an instant, the temporary file renamed onto it) is ever written in the destination's folder, so "
        "`include sites-enabled/*;` never reads a confpy file. Two confpy processes exclude each other per "
        "destination through the lock in this folder: give them the same `dir`. A corrupt state file is reported "
        "and ignored.",
    )


@config_table
class LogConfig:
    """How confpy logs."""

    format: LogFormat = setting(
        parse=_choice("text", "json"),
        default="text",
        doc="`text`: one line per action, with a timestamp unless stderr is the journal (`$JOURNAL_STREAM`), which "
        "adds its own; `json`: one object per line with the keys `time`, `level`, `logger`, `message` "
        "(`--log-format` overrides it)",
    )


@config_table
class SyncConfig:
    """How a sync that failed is retried."""

    max_backoff: float = setting(
        parse=_positive_duration,
        default="1m",
        doc="a sync that failed (disk full, destination read-only, `nginx -t` refusing) is retried, re-rendered "
        "from the current data, after 1 s, doubling (with jitter) up to this; a registry change or SIGHUP retries "
        "at once",
    )


# Every table of the file, by name, in the order the documentation and `confpy init` show them.
TABLES: dict[str, type] = {
    "consul": ConsulConfig,
    "etcd": EtcdConfig,
    "nginx": NginxConfig,
    "wait": WaitConfig,
    "guard": GuardConfig,
    "template": TemplateConfig,
    "state": StateConfig,
    "sync": SyncConfig,
    "log": LogConfig,
    "status": StatusConfig,
}
SETTINGS: dict[str, tuple[Setting, ...]] = all_settings(TABLES)
# The consul CLI's and etcdctl's environment variables, by the key each stands for.
CONSUL_ENVIRONMENT = environment_map(SETTINGS["consul"])
ETCD_ENVIRONMENT = environment_map(SETTINGS["etcd"])


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    path: Path
    consul: ConsulConfig
    nginx: NginxConfig
    wait: WaitConfig
    templates: tuple[TemplateConfig, ...]
    state: StateConfig = field(default_factory=StateConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    etcd: EtcdConfig | None = None  # set: etcd is the registry instead of Consul
    guard: GuardConfig = field(default_factory=GuardConfig)
    # The environment as read with the file (at start-up, again on SIGHUP): templates' env().
    environ: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def registry_name(self) -> str:
        return "etcd" if self.etcd is not None else "Consul"

    @property
    def registry_wait(self) -> float:
        return self.etcd.wait if self.etcd is not None else self.consul.wait

    @property
    def registry_max_backoff(self) -> float:
        return self.etcd.max_backoff if self.etcd is not None else self.consul.max_backoff

    def wait_for(self, template: TemplateConfig) -> WaitConfig:
        """The quiescence that applies to `template`: its own, else the global one."""
        return template.wait or self.wait

    def guard_for(self, template: TemplateConfig) -> GuardConfig:
        """The shrink guard that applies to `template`: its own, else the global one."""
        return template.guard or self.guard


# --- reading a table ------------------------------------------------------------------------


class _Where:
    """Formats 'FILE: [table] key' prefixes for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def key(self, table: str, key: str) -> str:
        return f"{self.path}: [{table}] {key}" if table else f"{self.path}: {key}"


class Problems:
    """Every problem found in one read of the configuration, reported together."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def check(self, parse: Callable[[], Any]) -> Any:
        """Run `parse`; a ConfigError is noted (None returned) instead of stopping the read."""
        try:
            return parse()
        except ConfigError as exc:
            self.messages.extend(exc.problems)
            return None

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError(self.messages)


def _check_keys(where: _Where, table: str, data: Mapping[str, Any], known: set[str], problems: Problems) -> None:
    for key in data:
        if key not in known:
            # A close spelling only (a typo), never a merely similar key with another meaning.
            hint = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(sorted(known))}"
            problems.add(f"{where.key(table, key)}: unknown key{suggestion}")


def _parse_table(where: _Where, table: str, data: Any, kind: str, problems: Problems) -> dict[str, Any]:
    """The valid values of `table` (a table of the `kind` declared in TABLES); every bad key or
    value is noted in `problems`. A nested table's value is passed through for its holder to check."""
    if not isinstance(data, dict):
        problems.add(f"{where.path}: [{table}] must be a table, got {type(data).__name__}")
        return {}
    settings = {item.key: item for item in SETTINGS[kind]}
    _check_keys(where, table, data, set(settings), problems)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in settings:
            continue
        try:
            values[key] = settings[key].parse(value, where.key(table, key))
        except ConfigError as exc:
            problems.messages.extend(exc.problems)
    return values


def _fill_from_environment(
    settings: tuple[Setting, ...],
    environ: Mapping[str, str],
    values: dict[str, Any],
    origin: dict[str, str],
    skip: set[str],
) -> None:
    """Each key the file leaves out takes its declared variable's value, when that is set."""
    for item in settings:
        if item.env and item.key not in values and item.key not in skip and environ.get(item.env):
            values[item.key] = item.from_env(environ[item.env])
            origin[item.key] = f"${item.env}"


def etcd_from_env(environ: Mapping[str, str], file_values: Mapping[str, Any], where: str, folder: Path) -> EtcdConfig:
    """[etcd] as etcdctl resolves it: a key in the file beats $ETCDCTL_* (ETCDCTL_ENDPOINTS is a
    comma-separated list; ETCDCTL_USER is `name:password`), which beats the default."""
    values = dict(file_values)
    origin = {key: f"{where}: [etcd] {key}" for key in values}
    # ETCDCTL_USER (`name:password`) stands for two keys: read below.
    _fill_from_environment(SETTINGS["etcd"], environ, values, origin, skip={"username"})
    user_variable = ETCD_ENVIRONMENT["username"]
    if "username" not in values and environ.get(user_variable):
        name, _, secret = environ[user_variable].partition(":")
        values["username"], values["password"] = name, secret
        origin["username"] = "$" + user_variable
    if values.get("password") and values.get("password_file"):
        raise ConfigError(f"{origin['password_file']}: set password or password_file, not both")
    if values.get("password_file"):
        values["password"] = _read_token_file(Path(values["password_file"]), origin["password_file"])
    for key in ("ca_file", "cert_file", "key_file"):
        if values.get(key):
            values[key] = str(_resolve(folder, values[key]))
            if not Path(values[key]).is_file():
                raise ConfigError(f"{origin[key]}: {values[key]} is not a readable file")
    endpoints = []
    for endpoint in values.get("endpoints", EtcdConfig.endpoints):
        url = endpoint if "://" in endpoint else f"http://{endpoint}"
        parsed = urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"{origin.get('endpoints', '[etcd] endpoints')}: {endpoint!r} is not http(s)://HOST:PORT")
        endpoints.append(url.rstrip("/"))
    values["endpoints"] = tuple(endpoints)
    return EtcdConfig(**values)


def consul_from_env(
    environ: Mapping[str, str], file_values: Mapping[str, Any] | None = None, where: str = ""
) -> ConsulConfig:
    """[consul] as the `consul` CLI resolves it: a key written in the file beats the environment
    (CONSUL_HTTP_ADDR, CONSUL_CACERT, ... see CONSUL_ENVIRONMENT), which beats the default, decided
    by whether the key is present, not by its value.

    The token, first found: the file's `token` or `token_file`; systemd's credential `consul-token`
    ($CREDENTIALS_DIRECTORY/consul-token); $CONSUL_HTTP_TOKEN; $CONSUL_HTTP_TOKEN_FILE (the CLI's
    order). CONSUL_HTTP_SSL=true makes an address without a scheme https. Every error names where
    the value came from (the variable or the file key).
    """
    values = dict(file_values or {})
    origin = {key: f"{where}: [consul] {key}" if where else f"[consul] {key}" for key in values}
    if "token" in values and "token_file" in values:
        raise ConfigError(f"{origin['token']}: set token or token_file, not both")
    file_token = "token" in values or "token_file" in values
    # The token's variables come after the systemd credential: read by _token_from_environment.
    _fill_from_environment(SETTINGS["consul"], environ, values, origin, skip={"token", "token_file"})
    if "address" in values and "://" not in values["address"] and environ.get("CONSUL_HTTP_SSL") in GO_TRUE:
        values["address"] = "https://" + values["address"]
    if not file_token:
        _token_from_environment(environ, values, origin)
    if values.get("token_file"):
        values["token"] = _read_token_file(Path(values["token_file"]), origin["token_file"])
        origin["token"] = f"{origin['token_file']} ({values['token_file']})"
    if values.get("token") and not _TOKEN_TEXT.fullmatch(values["token"]):
        raise ConfigError(
            f"{origin['token']}: the Consul token has a line break, a control character or a character "
            "outside Latin-1; it is sent as one HTTP header (a token is a UUID)"
        )
    for key in ("ca_file", "cert_file", "key_file"):
        if values.get(key) and not Path(values[key]).is_file():
            raise ConfigError(f"{origin[key]}: {values[key]} is not a readable file")
    if values.get("ca_path") and not Path(values["ca_path"]).is_dir():
        raise ConfigError(f"{origin['ca_path']}: {values['ca_path']} is not a folder of CA certificates")
    if values.get("key_file") and not values.get("cert_file"):
        raise ConfigError(f"{origin['key_file']}: a client key needs its certificate (cert_file / CONSUL_CLIENT_CERT)")
    if values.get("use_cache") and values.get("consistency") == "consistent":
        raise ConfigError(
            f'{origin["use_cache"]}: the agent cache cannot answer consistent reads; use consistency = "default" or "stale"'
        )
    consul = ConsulConfig(**values)
    return _with_checked_address(consul, origin.get("address", "the default address"))


# What an HTTP header value can carry (Latin-1 without control characters; tab allowed).
_TOKEN_TEXT = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f\u0100-\U0010ffff]*")


def _token_from_environment(environ: Mapping[str, str], values: dict[str, Any], origin: dict[str, str]) -> None:
    credentials = environ.get("CREDENTIALS_DIRECTORY", "")
    credential = Path(credentials, "consul-token") if credentials else None
    if credential is not None and credential.is_file():
        # An empty credential is the unit's default (SetCredential=consul-token:): no token given.
        token = _read_token_file(credential, "the systemd credential consul-token")
        if token:
            values["token"] = token
            origin["token"] = "the systemd credential consul-token"  # noqa: S105 (where it came from, not a secret)
            return
    token_variable, token_file_variable = CONSUL_ENVIRONMENT["token"], CONSUL_ENVIRONMENT["token_file"]
    if environ.get(token_variable):
        values["token"] = environ[token_variable]
        origin["token"] = "$" + token_variable
    elif environ.get(token_file_variable):
        values["token_file"] = environ[token_file_variable]
        origin["token_file"] = "$" + token_file_variable


def _read_token_file(path: Path, origin: str) -> str:
    try:
        if path.stat().st_mode & 0o004:
            log.warning(
                "%s: %s is readable by every user; the Consul token in it is not a secret any more: chmod 600 %s",
                origin,
                path,
                path,
            )
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{origin}: cannot read the Consul token from {path}: {reason}") from None


def _with_checked_address(consul: ConsulConfig, origin: str) -> ConsulConfig:
    address = consul.address if "://" in consul.address else f"http://{consul.address}"
    parsed = urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{origin}: Consul address {consul.address!r} is not http(s)://HOST:PORT")
    try:
        _ = parsed.port
    except ValueError:
        raise ConfigError(f"{origin}: Consul address {consul.address!r} has an invalid port") from None
    return dataclasses.replace(consul, address=address)


def _wait(where: _Where, table: str, data: Any, base: WaitConfig, problems: Problems) -> WaitConfig:
    values = _parse_table(where, table, data, "wait", problems)
    wait = WaitConfig(min=values.get("min", base.min), max=values.get("max", base.max))
    if wait.max < wait.min:
        problems.add(f"{where.key(table, 'max')}: max ({wait.max:g}s) must not be less than min ({wait.min:g}s)")
    return wait


def _guard(where: _Where, table: str, data: Any, base: GuardConfig, problems: Problems) -> GuardConfig:
    values = _parse_table(where, table, data, "guard", problems)
    return dataclasses.replace(base, **values)


def default_runtime_dir(environ: Mapping[str, str], state_dir: Path) -> Path:
    """Where the admin socket goes: systemd's RuntimeDirectory ($RUNTIME_DIRECTORY), else
    /run/confpy when this user may create it (root), else the state directory."""
    if environ.get("RUNTIME_DIRECTORY"):
        return Path(environ["RUNTIME_DIRECTORY"].split(":")[0])
    if os.access("/run", os.W_OK):
        return Path("/run/confpy")
    return state_dir


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """systemd's StateDirectory (/var/lib/confpy) when it exists and is writable, else
    $STATE_DIRECTORY, else $XDG_STATE_HOME/confpy, else ~/.local/state/confpy."""
    if environ.get("STATE_DIRECTORY"):
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    if SYSTEM_STATE_DIR.is_dir() and os.access(SYSTEM_STATE_DIR, os.W_OK):
        return SYSTEM_STATE_DIR
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "confpy"


def _resolve(base: Path, written: str | Path) -> Path:
    path = Path(written).expanduser()
    return path if path.is_absolute() else base / path


def _template(
    where: _Where, number: int, raw: Any, folder: Path, wait: WaitConfig, guard: GuardConfig, problems: Problems
) -> TemplateConfig | None:
    table = f"template #{number}"
    values = _parse_table(where, table, raw, "template", problems)
    if not isinstance(raw, dict):
        return None
    complete = True
    for required in ("source", "destination"):
        if required not in values or not raw[required]:
            problems.add(f"{where.key(table, required)}: missing; every [[template]] needs source and destination")
            complete = False
    if "wait" in values:
        values["wait"] = _wait(where, f"{table}.wait", values["wait"], wait, problems)
    if "guard" in values:
        values["guard"] = _guard(where, f"{table}.guard", values["guard"], guard, problems)
    if not complete:
        return None
    source_text: str = raw["source"]
    if source_text.startswith(BUILTIN_PREFIX):
        try:
            values["source"] = template_path(source_text[len(BUILTIN_PREFIX) :])
        except KeyError as exc:
            problems.add(f"{where.key(table, 'source')}: {exc.args[0]}")
            return None
    else:
        values["source"] = _resolve(folder, source_text)
        if not values["source"].is_file():
            problems.add(
                f"{where.key(table, 'source')}: template {values['source']} not found "
                f'(`confpy templates` lists the shipped ones, usable as "builtin:NAME")'
            )
    values["destination"] = _resolve(folder, values["destination"])
    return TemplateConfig(**values)


def parse_config(text: str, path: Path, environ: Mapping[str, str]) -> Config:
    """Parse configuration text; `path` locates relative paths and names the file in errors.

    Every problem is collected and reported together (ConfigError, exit 2).
    """
    where = _Where(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    problems = Problems()
    _check_keys(where, "", data, set(TABLES), problems)
    folder = path.resolve().parent

    consul_values = _parse_table(where, "consul", data.get("consul", {}), "consul", problems)
    consul = problems.check(lambda: consul_from_env(environ, consul_values, str(path))) or ConsulConfig()
    etcd: EtcdConfig | None = None
    if "etcd" in data:
        if "consul" in data:
            problems.add(f"{path}: [consul] and [etcd] are both set; confpy follows one registry: keep one of them")
        etcd_values = _parse_table(where, "etcd", data["etcd"], "etcd", problems)
        etcd = problems.check(lambda: etcd_from_env(environ, etcd_values, str(path), folder))

    nginx_values = _parse_table(where, "nginx", data.get("nginx", {}), "nginx", problems)
    if "pid_file" in nginx_values:
        nginx_values["pid_file"] = _resolve(folder, nginx_values["pid_file"])
    state_values = _parse_table(where, "state", data.get("state", {}), "state", problems)
    # `dir = ""` asks for the default, as leaving it out does.
    written_dir = "dir" in state_values and data["state"]["dir"]
    state_dir = _resolve(folder, state_values["dir"]) if written_dir else default_state_dir(environ)
    explicit_token = "live_token_file" in nginx_values
    if explicit_token:
        nginx_values["live_token_file"] = _resolve(folder, nginx_values["live_token_file"])
    else:
        nginx_values["live_token_file"] = state_dir / "admin.token"
    if "live_listen" not in nginx_values:
        nginx_values["live_listen"] = f"unix:{default_runtime_dir(environ, state_dir) / 'admin.sock'}"
    nginx = NginxConfig(**nginx_values)
    if nginx.mode == "live" and not is_loopback_listen(nginx.live_listen):
        if not (nginx.live_allow_remote and explicit_token):
            problems.add(
                f"{where.key('nginx', 'live_listen')}: {nginx.live_listen!r} is not a loopback address: anyone on that network "
                "could move production traffic through the admin API; use the default Unix socket, or, to insist, set both "
                "live_token_file (a secret file only confpy and nginx's master read) and live_allow_remote = true"
            )

    wait = _wait(where, "wait", data.get("wait", {}), WaitConfig(), problems)
    guard = _guard(where, "guard", data.get("guard", {}), GuardConfig(), problems)
    raw_templates = data.get("template", [])
    templates: list[TemplateConfig] = []
    if not isinstance(raw_templates, list) or not raw_templates:
        problems.add(f"{path}: no [[template]] table; add at least one with source and destination")
    else:
        for number, raw in enumerate(raw_templates, start=1):
            template = _template(where, number, raw, folder, wait, guard, problems)
            if template is not None:
                templates.append(template)
    destinations = [t.destination for t in templates]
    for dest in sorted(set(destinations)):
        if destinations.count(dest) > 1:
            problems.add(f"{path}: two [[template]] tables write the same destination {dest}")

    status = StatusConfig(**_parse_table(where, "status", data.get("status", {}), "status", problems))
    log_config = LogConfig(**_parse_table(where, "log", data.get("log", {}), "log", problems))
    sync = SyncConfig(**_parse_table(where, "sync", data.get("sync", {}), "sync", problems))
    problems.raise_if_any()
    return Config(
        path=path,
        consul=consul,
        nginx=nginx,
        wait=wait,
        templates=tuple(templates),
        state=StateConfig(state_dir),
        status=status,
        log=log_config,
        sync=sync,
        etcd=etcd,
        guard=guard,
        environ=dict(environ),
    )


def load_config(path: Path, environ: Mapping[str, str]) -> Config:
    """Read and check the configuration file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found; pass -c FILE or set CONFPY_CONFIG") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc}") from None
    return parse_config(text, path, environ)
