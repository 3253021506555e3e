"""The configuration file: TOML in, frozen dataclasses out.

Every check names the file, the table and the key, and says what to fix. Unknown keys are errors
(a typo must never silently fall back to a default on a production gateway).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import shlex
import signal
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from confpy.builtin import BUILTIN_PREFIX, template_path
from confpy.durations import GO_TRUE, format_go_duration, parse_go_bool, parse_go_duration
from confpy.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/confpy/confpy.toml")
DEFAULT_CONSUL_ADDRESS = "http://127.0.0.1:8500"

OnEmpty = Literal["keep", "render"]
Consistency = Literal["default", "stale", "consistent"]
NginxMode = Literal["reload", "live"]
LogFormat = Literal["text", "json"]
SYSTEM_STATE_DIR = Path("/var/lib/confpy")


@dataclass(frozen=True)
class ConsulConfig:
    """How to reach Consul and how to behave towards it."""

    address: str = DEFAULT_CONSUL_ADDRESS
    token: str = ""
    token_file: str = ""
    datacenter: str = ""
    namespace: str = ""
    partition: str = ""
    ca_file: str = ""
    ca_path: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_server_name: str = ""
    verify: bool = True
    wait: float = 60.0
    timeout: float = 10.0
    max_backoff: float = 60.0
    max_response_bytes: int = 32 * 1024 * 1024
    consistency: Consistency = "default"
    max_stale: float = 0.0
    use_cache: bool = False

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


@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd (the alternative to Consul): its v3 JSON gateway on each endpoint."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = ""  # services live under <prefix><service>/<host:port>
    # Tags of an instance whose Metadata names none (etcd's plain `{"Addr": ...}` registrations):
    # "nginx", so the shipped templates (services tagged nginx) see every service under the prefix.
    default_tags: tuple[str, ...] = ("nginx",)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = ""
    password_file: str = ""
    timeout: float = 5.0
    wait: float = 60.0
    max_backoff: float = 60.0


@dataclass(frozen=True)
class WaitConfig:
    """Quiescence: render after `min` of calm, but never later than `max` after the first change."""

    min: float = 0.1
    max: float = 1.0


@dataclass(frozen=True)
class NginxConfig:
    """How to check and reload nginx."""

    pid_file: Path = Path("/run/nginx.pid")
    check_cmd: tuple[str, ...] = ("nginx", "-t")
    reload_cmd: tuple[str, ...] = ()
    reload_signal: signal.Signals = signal.SIGHUP
    check_timeout: float = 30.0
    reload_timeout: float = 30.0
    mode: NginxMode = "reload"
    # Live mode's admin API: a Unix socket in a folder only root may enter, by default.
    live_listen: str = "unix:/run/confpy/admin.sock"
    live_token_file: Path = Path("/var/lib/confpy/admin.token")
    live_allow_remote: bool = False
    allow_no_reload: bool = False


@dataclass(frozen=True)
class TemplateConfig:
    """One `[[template]]`: a Jinja2 source rendered to an nginx include file."""

    source: Path
    destination: Path
    mode: int | None = None
    backup: bool = True
    on_empty: OnEmpty = "keep"
    wait: WaitConfig | None = None

    @property
    def name(self) -> str:
        return str(self.destination)


@dataclass(frozen=True)
class StatusConfig:
    """The opt-in HTTP status endpoint."""

    listen: str = ""


@dataclass(frozen=True)
class StateConfig:
    """Where confpy keeps its own files: backups, locks, remembered and live members."""

    dir: Path = Path("/var/lib/confpy")


@dataclass(frozen=True)
class LogConfig:
    """How confpy logs."""

    format: LogFormat = "text"


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
    etcd: EtcdConfig | None = None  # set: etcd is the registry instead of Consul
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


# --- a small schema checker -----------------------------------------------------------------

Parser = Callable[[Any, str], Any]


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


def _expect(kind: type | tuple[type, ...], name: str) -> Parser:
    def parse(value: Any, label: str) -> Any:
        # bool is a subclass of int in Python, but `port = true` is a mistake, not a number.
        if isinstance(value, bool) and kind is int:
            raise ConfigError(f"{label}: expected {name}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{label}: expected {name}, got {type(value).__name__} {value!r}")
        return value

    return parse


_str = _expect(str, "a string")
_bool = _expect(bool, "true or false")
_int = _expect(int, "an integer")


def _duration(value: Any, label: str) -> float:
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


def _command(value: Any, label: str) -> tuple[str, ...]:
    text = _str(value, label)
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise ConfigError(f"{label}: cannot split {text!r} into arguments ({exc}); check its quotes") from None


def _signal(value: Any, label: str) -> signal.Signals:
    text = _str(value, label).upper()
    name = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise ConfigError(f'{label}: unknown signal {value!r}; use a name such as "SIGHUP"') from None


def _file_mode(value: Any, label: str) -> int:
    text = _str(value, label)
    try:
        mode = int(text, 8)
    except ValueError:
        raise ConfigError(f'{label}: {text!r} is not an octal file mode; write it like "0644"') from None
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f'{label}: {text!r} is out of range for a file mode; write it like "0644"')
    return mode


def _choice(*choices: str) -> Parser:
    def parse(value: Any, label: str) -> str:
        text: str = _str(value, label)
        if text not in choices:
            raise ConfigError(f"{label}: {text!r} is not one of {', '.join(repr(c) for c in choices)}")
        return text

    return parse


def _listen(value: Any, label: str) -> str:
    text: str = _str(value, label)
    if text:
        try:
            split_host_port(text)
        except ValueError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    return text


def _admin_listen(value: Any, label: str) -> str:
    """`unix:/absolute/path` or HOST:PORT."""
    text: str = _str(value, label)
    if text.startswith("unix:"):
        if not text[5:].startswith("/"):
            raise ConfigError(
                f'{label}: {text!r}: a Unix socket needs an absolute path, e.g. "unix:/run/confpy/admin.sock"'
            )
        return text
    return _listen(text, label)


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


def _parse_table(
    where: _Where, table: str, data: Any, spec: Mapping[str, Parser], problems: Problems
) -> dict[str, Any]:
    """The table's valid values; every bad key or value is noted in `problems`."""
    if not isinstance(data, dict):
        problems.add(f"{where.path}: [{table}] must be a table, got {type(data).__name__}")
        return {}
    _check_keys(where, table, data, set(spec), problems)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in spec:
            continue
        try:
            values[key] = spec[key](value, where.key(table, key))
        except ConfigError as exc:
            problems.messages.extend(exc.problems)
    return values


_CONSUL_SPEC: dict[str, Parser] = {
    "address": _str,
    "token": _str,
    "token_file": _str,
    "datacenter": _str,
    "namespace": _str,
    "partition": _str,
    "ca_file": _str,
    "ca_path": _str,
    "cert_file": _str,
    "key_file": _str,
    "tls_server_name": _str,
    "verify": _bool,
    "wait": _duration,
    "timeout": _duration,
    "max_backoff": _duration,
    "max_response_bytes": _int,
    "consistency": _choice("default", "stale", "consistent"),
    "max_stale": _duration,
    "use_cache": _bool,
}
# The consul CLI's environment variables, by the [consul] key each stands for.
CONSUL_ENVIRONMENT = {
    "address": "CONSUL_HTTP_ADDR",
    "token": "CONSUL_HTTP_TOKEN",
    "token_file": "CONSUL_HTTP_TOKEN_FILE",
    "ca_file": "CONSUL_CACERT",
    "ca_path": "CONSUL_CAPATH",
    "cert_file": "CONSUL_CLIENT_CERT",
    "key_file": "CONSUL_CLIENT_KEY",
    "verify": "CONSUL_HTTP_SSL_VERIFY",
    "tls_server_name": "CONSUL_TLS_SERVER_NAME",
    "namespace": "CONSUL_NAMESPACE",
    "partition": "CONSUL_PARTITION",
}
_NGINX_SPEC: dict[str, Parser] = {
    "pid_file": _str,
    "check_cmd": _command,
    "reload_cmd": _command,
    "reload_signal": _signal,
    "check_timeout": _duration,
    "reload_timeout": _duration,
    "mode": _choice("reload", "live"),
    "live_listen": _admin_listen,
    "live_token_file": _str,
    "live_allow_remote": _bool,
    "allow_no_reload": _bool,
}
_WAIT_SPEC: dict[str, Parser] = {"min": _duration, "max": _duration}
_TEMPLATE_SPEC: dict[str, Parser] = {
    "source": _str,
    "destination": _str,
    "mode": _file_mode,
    "backup": _bool,
    "on_empty": _choice("keep", "render"),
    "wait": lambda value, label: value,  # checked as a table below
}


_ETCD_SPEC: dict[str, Parser] = {
    "endpoints": lambda value, label: _str_list(value, label),
    "prefix": _str,
    "default_tags": lambda value, label: (
        tuple(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else _bad_tags(label)
    ),
    "ca_file": _str,
    "cert_file": _str,
    "key_file": _str,
    "username": _str,
    "password": _str,
    "password_file": _str,
    "timeout": _duration,
    "wait": _duration,
    "max_backoff": _duration,
}
# etcdctl's environment variables, by the [etcd] key each stands for.
ETCD_ENVIRONMENT = {
    "endpoints": "ETCDCTL_ENDPOINTS",
    "ca_file": "ETCDCTL_CACERT",
    "cert_file": "ETCDCTL_CERT",
    "key_file": "ETCDCTL_KEY",
}


def _bad_tags(label: str) -> tuple[str, ...]:
    raise ConfigError(f'{label}: must be a list of tags, e.g. ["nginx"]')


def _str_list(value: Any, label: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{label}: must be a non-empty list of URLs, e.g. ["http://127.0.0.1:2379"]')
    return tuple(value)


def etcd_from_env(environ: Mapping[str, str], file_values: Mapping[str, Any], where: str, folder: Path) -> EtcdConfig:
    """[etcd] as etcdctl resolves it: a key in the file beats $ETCDCTL_* (ETCDCTL_ENDPOINTS is a
    comma-separated list; ETCDCTL_USER is `name:password`), which beats the default."""
    values = dict(file_values)
    origin = {key: f"{where}: [etcd] {key}" for key in values}
    for key, variable in ETCD_ENVIRONMENT.items():
        if key not in values and environ.get(variable):
            raw = environ[variable]
            values[key] = tuple(e.strip() for e in raw.split(",") if e.strip()) if key == "endpoints" else raw
            origin[key] = f"${variable}"
    user_variable = "ETCDCTL_USER"
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
    for key, variable in CONSUL_ENVIRONMENT.items():
        if key in values or key in ("token", "token_file") or not environ.get(variable):
            continue
        raw = environ[variable]
        if key == "verify":
            try:
                values[key] = parse_go_bool(raw)
            except ValueError:
                raise ConfigError(f"${variable}: {raw!r} is not a boolean (true or false)") from None
        else:
            values[key] = raw
        origin[key] = f"${variable}"
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
    if environ.get("CONSUL_HTTP_TOKEN"):
        values["token"] = environ["CONSUL_HTTP_TOKEN"]
        origin["token"] = "$CONSUL_HTTP_TOKEN"  # noqa: S105 (where it came from, not a secret)
    elif environ.get("CONSUL_HTTP_TOKEN_FILE"):
        values["token_file"] = environ["CONSUL_HTTP_TOKEN_FILE"]
        origin["token_file"] = "$" + CONSUL_ENVIRONMENT["token_file"]


def _read_token_file(path: Path, origin: str) -> str:
    try:
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
    return ConsulConfig(**{**consul.__dict__, "address": address})


def _wait(where: _Where, table: str, data: Any, base: WaitConfig, problems: Problems) -> WaitConfig:
    values = _parse_table(where, table, data, _WAIT_SPEC, problems)
    wait = WaitConfig(min=values.get("min", base.min), max=values.get("max", base.max))
    if wait.max < wait.min:
        problems.add(f"{where.key(table, 'max')}: max ({wait.max:g}s) must not be less than min ({wait.min:g}s)")
    return wait


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


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _template(
    where: _Where, number: int, raw: Any, folder: Path, wait: WaitConfig, problems: Problems
) -> TemplateConfig | None:
    table = f"template #{number}"
    values = _parse_table(where, table, raw, _TEMPLATE_SPEC, problems)
    if not isinstance(raw, dict):
        return None
    complete = True
    for required in ("source", "destination"):
        if not values.get(required):
            problems.add(f"{where.key(table, required)}: missing; every [[template]] needs source and destination")
            complete = False
    if "wait" in values:
        values["wait"] = _wait(where, f"{table}.wait", values["wait"], wait, problems)
    if not complete:
        return None
    source_text = values["source"]
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
    _check_keys(where, "", data, {"consul", "etcd", "nginx", "wait", "template", "state", "status", "log"}, problems)
    folder = path.resolve().parent

    consul_values = _parse_table(where, "consul", data.get("consul", {}), _CONSUL_SPEC, problems)
    if consul_values.get("max_response_bytes", 1) <= 0:
        problems.add(f"{where.key('consul', 'max_response_bytes')}: must be a positive number of bytes")
        consul_values.pop("max_response_bytes")
    consul = problems.check(lambda: consul_from_env(environ, consul_values, str(path))) or ConsulConfig()
    etcd: EtcdConfig | None = None
    if "etcd" in data:
        if "consul" in data:
            problems.add(f"{path}: [consul] and [etcd] are both set; confpy follows one registry: keep one of them")
        etcd_values = _parse_table(where, "etcd", data["etcd"], _ETCD_SPEC, problems)
        etcd = problems.check(lambda: etcd_from_env(environ, etcd_values, str(path), folder))

    nginx_values = _parse_table(where, "nginx", data.get("nginx", {}), _NGINX_SPEC, problems)
    if "pid_file" in nginx_values:
        nginx_values["pid_file"] = _resolve(folder, nginx_values["pid_file"])
    state_values = _parse_table(where, "state", data.get("state", {}), {"dir": _str}, problems)
    state_dir = _resolve(folder, state_values["dir"]) if state_values.get("dir") else default_state_dir(environ)
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
    if not nginx.check_cmd:
        problems.add(
            f"{where.key('nginx', 'check_cmd')}: must not be empty; confpy never installs a configuration nginx has not checked"
        )

    wait = _wait(where, "wait", data.get("wait", {}), WaitConfig(), problems)
    raw_templates = data.get("template", [])
    templates: list[TemplateConfig] = []
    if not isinstance(raw_templates, list) or not raw_templates:
        problems.add(f"{path}: no [[template]] table; add at least one with source and destination")
    else:
        for number, raw in enumerate(raw_templates, start=1):
            template = _template(where, number, raw, folder, wait, problems)
            if template is not None:
                templates.append(template)
    destinations = [t.destination for t in templates]
    for dest in sorted(set(destinations)):
        if destinations.count(dest) > 1:
            problems.add(f"{path}: two [[template]] tables write the same destination {dest}")

    status = StatusConfig(**_parse_table(where, "status", data.get("status", {}), {"listen": _listen}, problems))
    log_config = LogConfig(
        **_parse_table(where, "log", data.get("log", {}), {"format": _choice("text", "json")}, problems)
    )
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
        etcd=etcd,
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
