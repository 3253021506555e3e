"""Template functions beyond `service()`: KV, nodes, datacenters, the environment, JSON, and the
per-upstream settings the shipped templates read from KV.

Each registry function records a dependency (watched with blocking queries like `service()`).
While a dependency has no data yet the function returns an empty placeholder; that pass is
incomplete and its errors do not count (the resolve loop renders again once the data is in).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confpy import boundedjson
from confpy.errors import RenderError
from confpy.model import KVPair, NodeInfo, NodeServices, SafeStr, ServiceInstance, ServiceTags, nginx_time_seconds
from confpy.registry.base import (
    AnyDependency,
    CatalogDatacenters,
    CatalogNode,
    CatalogNodes,
    CatalogServiceTags,
    KVKey,
    KVTree,
)

Lookup = Callable[[AnyDependency], tuple[bool, object]]
SETTINGS_PREFIX = "confpy/upstreams/"
DEFAULT_KEEPALIVE = 16
_NGINX_VARIABLES = re.compile(r"^(\$[a-z_][a-z0-9_]*)+$")
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_SIMPLE_BALANCE = {"round_robin": "", "least_conn": "least_conn;", "ip_hash": "ip_hash;", "random": "random;"}


class Placeholder:
    """What a function hands out while its data has not arrived: indexing, attributes, calls and
    `| first` all give another placeholder, printing gives "", so the pass runs to the end and
    records every dependency it needs. Its output is never used (the render is incomplete)."""

    def __getattr__(self, name: str) -> Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __getitem__(self, key: object) -> Placeholder:
        return self

    def __call__(self, *args: object, **kwargs: object) -> Placeholder:
        return self

    def __str__(self) -> str:
        return ""

    def __int__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Iterator[Placeholder]:
        return iter(())

    def __len__(self) -> int:
        return 0


PLACEHOLDER = Placeholder()


class PlaceholderList(list[Any]):
    """A list for a pass without data: one placeholder (so `| first` and loops see one), and any `[n]`
    gives a placeholder too."""

    def __getitem__(self, index: Any) -> Any:
        return PLACEHOLDER


def pending() -> Any:
    """The placeholder list, typed as the real answer would be."""
    return PlaceholderList([PLACEHOLDER])


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise RenderError(f"{what} needs a non-empty string, got {value!r}")
    return value


def _folder(prefix: Any, what: str) -> str:
    """A KV prefix as a folder: `nginx/web` and `nginx/web/` both list what is under `nginx/web/`."""
    if prefix == "":
        return ""
    return _text(prefix, what).rstrip("/") + "/"


@dataclass(frozen=True)
class UpstreamSettings:
    """What KV says about one upstream, every value checked against a whitelist.

    `directives` are whole nginx lines (the balancing method); `server(instance)` is the
    instance's `server` arguments with the KV defaults for max_fails/fail_timeout (an instance's
    own meta wins) and `backup` for instances carrying `backup_tag`. With no keys set it is exactly
    `instance.server`, so the shipped templates render the same bytes as without KV.
    """

    balance: str = "round_robin"
    directives: tuple[SafeStr, ...] = ()
    hash_key: str | None = None
    consistent: bool = False
    keepalive: int = DEFAULT_KEEPALIVE
    max_fails: int | None = None
    fail_timeout: str | None = None
    backup_tag: str | None = None

    def balance_json(self) -> dict[str, Any] | None:
        """The balancing method as live mode's Lua balancer takes it; None for round-robin."""
        if self.balance == "round_robin":
            return None
        if self.balance == "hash":
            return {"method": "hash", "key": self.hash_key, "consistent": self.consistent}
        return {"method": self.balance}

    def server(self, instance: ServiceInstance) -> SafeStr:
        text = str(instance.server)
        if self.max_fails is not None and instance.max_fails is None:
            text += f" max_fails={self.max_fails}"
        if self.fail_timeout is not None and not instance.fail_timeout:
            text += f" fail_timeout={self.fail_timeout}"
        if self.backup_tag is not None and self.backup_tag in instance.tags and not instance.backup:
            text += " backup"
        return SafeStr(text)


def parse_upstream_settings(service: str, pairs: Mapping[str, str], prefix: str) -> tuple[UpstreamSettings, list[str]]:
    """Settings from `<prefix><service>/<key>` values; (settings, warnings for what was left out)."""
    warnings: list[str] = []
    values: dict[str, Any] = {}

    def refuse(key: str, value: str, why: str) -> None:
        shown = value if len(value) <= 60 else value[:60] + "..."
        warnings.append(f"KV {prefix}{service}/{key} = {shown!r} left out: {why}")

    for key, raw in sorted(pairs.items()):
        value = raw.strip()
        if key == "balance":
            words = value.split()
            if value in _SIMPLE_BALANCE:
                values["balance"] = value
                values["directives"] = (SafeStr(_SIMPLE_BALANCE[value]),) if _SIMPLE_BALANCE[value] else ()
            elif len(words) in (2, 3) and words[0] == "hash" and _NGINX_VARIABLES.match(words[1]):
                if len(words) == 3 and words[2] != "consistent":
                    refuse(key, value, "the only word allowed after the hash key is `consistent`")
                    continue
                values["balance"] = "hash"
                values["directives"] = (SafeStr(" ".join(words) + ";"),)
                values["hash_key"] = words[1]
                values["consistent"] = len(words) == 3
            else:
                refuse(
                    key, value, "balance is round_robin, least_conn, ip_hash, random or `hash $variable [consistent]`"
                )
        elif key in ("keepalive", "max_fails"):
            limit = 10000 if key == "keepalive" else 1000
            if value.isdigit() and int(value) <= limit and (key == "max_fails" or int(value) >= 1):
                values[key] = int(value)
            else:
                refuse(key, value, f"{key} is a whole number from {0 if key == 'max_fails' else 1} to {limit}")
        elif key == "fail_timeout":
            try:
                nginx_time_seconds(value)
            except ValueError:
                refuse(key, value, "fail_timeout is an nginx time such as 10s or 1m")
                continue
            values[key] = value
        elif key == "backup_tag":
            if _TAG.match(value):
                values[key] = value
            else:
                refuse(key, value, "backup_tag is one tag (letters, digits, . _ : -)")
        else:
            refuse(key, value, "not a setting (balance, keepalive, max_fails, fail_timeout, backup_tag)")
    if "backup_tag" in values and values.get("balance") in ("ip_hash", "hash", "random"):
        refuse(
            "backup_tag", values.pop("backup_tag"), f"nginx allows no backup servers with balance {values['balance']}"
        )
    return UpstreamSettings(**values), warnings


class RegistryFunctions:
    """The functions a render hands its template besides `service()` and `services()`."""

    def __init__(
        self, lookup: Lookup, warn: Callable[[str], None], environ: Mapping[str, str], registry: str = "Consul"
    ) -> None:
        self.lookup = lookup
        self.warn = warn
        self.environ = environ
        self.registry = registry
        self.kv_handed: list[tuple[KVPair, ...]] = []  # searched only to name a refused value's key

    def key_of(self, value: str) -> str | None:
        """The KV key whose value this render handed out as `value` (None when none did)."""
        for pairs in self.kv_handed:
            for pair in pairs:
                if pair.value is value or pair.value == value:
                    return pair.path
        return None

    def consul_only(self, what: str) -> None:
        """Nodes and datacenters are Consul's: another registry says so at render time."""
        if self.registry != "Consul":
            raise RenderError(
                f"{what} needs Consul; this configuration follows {self.registry}, which has no {what[:-2]}s"
            )

    def key(self, path: Any) -> str:
        found, value = self.lookup(KVKey(_text(path, "key()")))
        if not found:
            return ""
        if value is None:
            raise RenderError(
                f"key({path!r}): {self.registry}'s KV has no such key; use key_or_default() for an optional one"
            )
        assert isinstance(value, KVPair)
        self.kv_handed.append((value,))
        return value.value

    def key_or_default(self, path: Any, default: Any) -> Any:
        found, value = self.lookup(KVKey(_text(path, "key_or_default()")))
        if not found or value is None:
            return default
        assert isinstance(value, KVPair)
        self.kv_handed.append((value,))
        return value.value

    def _tree(self, prefix: Any, what: str) -> tuple[KVPair, ...] | None:
        found, value = self.lookup(KVTree(_folder(prefix, what)))
        if not found:
            return None
        assert isinstance(value, tuple)
        self.kv_handed.append(value)
        return value

    def ls(self, prefix: Any) -> list[KVPair]:
        """The keys directly under `prefix` (not in sub-folders), `.key` relative to it."""
        pairs = self._tree(prefix, "ls()")
        return pending() if pairs is None else [pair for pair in pairs if "/" not in pair.key]

    def tree(self, prefix: Any) -> list[KVPair]:
        """Every key under `prefix`, `.key` relative to it."""
        pairs = self._tree(prefix, "tree()")
        return pending() if pairs is None else list(pairs)

    def keys(self, prefix: Any) -> list[str]:
        """The whole names of every key under `prefix`."""
        pairs = self._tree(prefix, "keys()")
        return pending() if pairs is None else [pair.path for pair in pairs]

    def _listing(self, dep: AnyDependency) -> list[Any]:
        found, value = self.lookup(dep)
        return list(value) if found and isinstance(value, tuple) else pending()

    def nodes(self) -> list[NodeInfo]:
        self.consul_only("nodes()")
        return self._listing(CatalogNodes())

    def node(self, name: Any) -> NodeServices | None:
        self.consul_only("node()")
        found, value = self.lookup(CatalogNode(_text(name, "node()")))
        if not found:
            return PLACEHOLDER  # type: ignore[return-value]
        return value if isinstance(value, NodeServices) else None

    def datacenters(self) -> list[str]:
        self.consul_only("datacenters()")
        return self._listing(CatalogDatacenters())

    def services_detailed(self, tag: str | None) -> list[ServiceTags]:
        return self._listing(CatalogServiceTags(tag))

    def env(self, name: Any, default: Any = None) -> Any:
        """An environment variable as confpy read it at start-up (and on SIGHUP); `default`, else ""."""
        value = self.environ.get(_text(name, "env()"))
        if value is not None:
            return value
        return default if default is not None else ""

    def upstream_settings(self, service: Any, prefix: Any = SETTINGS_PREFIX) -> UpstreamSettings:
        """The KV settings of one upstream, from `<prefix><service>/`: one watch for all upstreams."""
        folder = _folder(prefix, "upstream_settings(prefix=...)")
        name = _text(service, "upstream_settings()")
        mine = {
            pair.key[len(name) + 1 :]: pair.value
            for pair in self._tree(folder, "upstream_settings()") or ()
            if pair.key.startswith(name + "/") and "/" not in pair.key[len(name) + 1 :]
        }
        if not mine:
            return UpstreamSettings()
        settings, warnings = parse_upstream_settings(name, mine, folder)
        for text in warnings:
            self.warn(text)
        return settings


def to_json(value: Any) -> str:
    """`| to_json`: compact JSON (KVPair, nodes and instances as their fields)."""

    def default(item: Any) -> Any:
        if isinstance(item, ServiceInstance):
            return item.to_json()
        if hasattr(item, "__dataclass_fields__"):
            return {name: getattr(item, name) for name in item.__dataclass_fields__}
        if isinstance(item, Mapping):
            return dict(item)
        raise TypeError(f"to_json cannot write a {type(item).__name__}")

    try:
        return json.dumps(value, default=default, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise RenderError(f"to_json: {exc}") from None


class RefusedValueError(RenderError):
    """A registry value a template function refuses (JSON nested too deep); `value` is that text,
    so the render can name the key it came from."""

    def __init__(self, message: str, value: str) -> None:
        super().__init__(message)
        self.value = value


def parse_json(text: Any) -> Any:
    """`| parse_json`: a JSON value (e.g. a KV value that holds JSON)."""
    if not isinstance(text, str):
        raise RenderError(f"parse_json needs a string, got {type(text).__name__}")
    try:
        return boundedjson.loads(text)
    except boundedjson.JSONTooDeep as exc:
        raise RefusedValueError(f"parse_json: refused: {exc} (the value starts {text[:40]!r})", text) from None
    except ValueError as exc:
        raise RenderError(f"parse_json: not valid JSON ({exc})") from None
