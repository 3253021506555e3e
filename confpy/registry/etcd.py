"""etcd v3 as confpy's registry, through etcd's JSON gateway (`/v3/...` on each client endpoint).

Services follow etcd's own gRPC naming convention (go.etcd.io/etcd/client/v3/naming/endpoints):
key `<prefix><service>/<host:port>`, value `{"Addr": "host:port", "Metadata": {...}}`; an instance
exists while its key does (apps register under a lease and keep it alive). `Metadata`, when an
object, gives `weight`, `tags` and `meta`.

A blocking read maps onto etcd's watch: with an index (a revision), `fetch` opens one watch on the
dependency's key range from the next revision and returns when an event arrives, when the watch
reports that revision compacted away, or after `wait`; then it reads the range again. Endpoints are
tried in order and the one that answered is kept (failover when a member goes away).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confpy import boundedjson
from confpy.config import EtcdConfig
from confpy.errors import RegistryError
from confpy.model import HealthView, Interner, KVPair, RejectedInstance, ServiceInstance, validated_instance
from confpy.registry.base import CatalogServices, Dependency, KVKey, KVTree, ServiceHealth
from confpy.registry.resolve import resolved_view
from confpy.wire.client import HTTPClient, TransportError

_CHUNK = 65536
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class EtcdError(RegistryError):
    """etcd could not be reached, or refused or garbled an answer."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _key_range(key: str, prefix: bool) -> dict[str, str]:
    """etcd's key and range_end for one key or a prefix; the empty prefix is every key ("\\0" to "\\0")."""
    if prefix and not key:
        zero = base64.b64encode(b"\0").decode()
        return {"key": zero, "range_end": zero}
    return {"key": _b64(key), **({"range_end": _range_end_b64(key)} if prefix else {})}


def _unb64(text: Any) -> str:
    return base64.b64decode(text).decode("utf-8", "replace") if isinstance(text, str) else ""


def _range_end_b64(prefix: str) -> str:
    """The end of the key range holding every key that starts with `prefix` (etcd's rule)."""
    data = bytearray(prefix.encode())
    while data:
        if data[-1] < 0xFF:
            data[-1] += 1
            return base64.b64encode(bytes(data)).decode()
        data.pop()
    return base64.b64encode(b"\0").decode()


class EtcdClient:
    """The few gateway calls confpy needs: range, watch, put, delete, leases, authentication."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._clients: dict[str, HTTPClient] = {}
        self._tls: ssl.SSLContext | None = None
        self._current = 0  # the endpoint that last answered
        self._token = ""

    @property
    def address(self) -> str:
        return ", ".join(self.config.endpoints)

    def _client(self, endpoint: str) -> HTTPClient:
        client = self._clients.get(endpoint)
        if client is None:
            if endpoint.startswith("https://") and self._tls is None:
                try:
                    self._tls = ssl.create_default_context(cafile=self.config.ca_file or None)
                    if self.config.cert_file:
                        self._tls.load_cert_chain(self.config.cert_file, self.config.key_file or None)
                except (OSError, ssl.SSLError) as exc:
                    self._tls = None
                    raise EtcdError(
                        f"cannot load the TLS files for etcd: {exc}; check ca_file/cert_file/key_file"
                    ) from None
            client = self._clients[endpoint] = HTTPClient(endpoint, tls=self._tls, connect_timeout=self.config.timeout)
        return client

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    async def _post(self, endpoint: str, path: str, body: Mapping[str, Any]) -> tuple[int, bytes]:
        """POST JSON to one endpoint within the timeout: (status, body)."""
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        async with asyncio.timeout(self.config.timeout):
            response = await self._client(endpoint).request(
                "POST", path, headers=headers, body=json.dumps(dict(body)).encode(), max_body=MAX_RESPONSE_BYTES
            )
        return response.status, response.body

    async def _authenticate(self, endpoint: str) -> None:
        if not self.config.username or self._token:
            return
        body = {"name": self.config.username, "password": self.config.password}
        status, raw = await self._post(endpoint, "/v3/auth/authenticate", body)
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            data = raw[:200].decode("utf-8", "replace")
        if status != 200 or not isinstance(data, Mapping) or not data.get("token"):
            raise EtcdError(f"etcd at {endpoint} refused user {self.config.username!r}: {_message(data)}")
        self._token = str(data["token"])

    async def call(self, path: str, body: Mapping[str, Any], what: str) -> Mapping[str, Any]:
        """POST one gateway call, failing over across the endpoints; the decoded answer."""
        endpoints = self.config.endpoints
        errors = []
        for step in range(len(endpoints)):
            number = (self._current + step) % len(endpoints)
            endpoint = endpoints[number]
            try:
                await self._authenticate(endpoint)
                status, raw = await self._post(endpoint, path, body)
            except (TransportError, TimeoutError) as exc:
                errors.append(f"{endpoint}: {type(exc).__name__} {exc}".strip())
                continue
            self._current = number
            try:
                data = boundedjson.loads(raw or b"{}", max_depth=None)
            except boundedjson.JSONTooDeep as exc:
                raise EtcdError(f"etcd's answer to {what} is refused: {exc}") from None
            except ValueError:
                raise EtcdError(f"etcd's answer to {what} is not JSON: {raw[:200]!r}") from None
            if status != 200:
                if status == 401 and self._token:
                    self._token = ""  # an expired token: authenticate again on the next call
                raise EtcdError(f"etcd refused {what}: {status} {_message(data)}")
            if not isinstance(data, Mapping):
                raise EtcdError(f"etcd's answer to {what} is not a JSON object")
            return data
        raise EtcdError(f"cannot reach etcd for {what}: {'; '.join(errors)}")

    async def range(self, key: str, prefix: bool) -> tuple[int, list[tuple[str, str]]]:
        """(revision, [(key, value)]) for one key, or every key under a prefix, sorted by key."""
        data = await self.call("/v3/kv/range", _key_range(key, prefix), f"keys {key!r}")
        revision = int(data.get("header", {}).get("revision", 0))
        pairs = [(_unb64(kv.get("key")), _unb64(kv.get("value"))) for kv in data.get("kvs") or []]
        return revision, sorted(pairs)

    async def watch(self, key: str, prefix: bool, start_revision: int, wait: float) -> str:
        """Wait for a change to the key (range) from `start_revision`: "changed", "compacted" or "timeout"."""
        create: dict[str, Any] = {**_key_range(key, prefix), "start_revision": str(start_revision)}
        endpoint = self.config.endpoints[self._current]
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        body = json.dumps({"create_request": create}).encode()
        try:
            async with asyncio.timeout(wait):
                async with self._client(endpoint).stream("POST", "/v3/watch", headers=headers, body=body) as response:
                    if response.status != 200:
                        raise EtcdError(f"etcd refused a watch on {key!r}: {response.status}")
                    async for line in response.lines():
                        if not line.strip():
                            continue
                        result = boundedjson.loads(line, max_depth=None).get("result") or {}
                        if result.get("compact_revision") not in (None, "0", 0):
                            return "compacted"
                        if result.get("canceled"):
                            return "compacted"
                        if result.get("events"):
                            return "changed"
                    return "closed"
        except TimeoutError:
            return "timeout"
        except (TransportError, ValueError) as exc:
            self._current = (self._current + 1) % len(self.config.endpoints)  # the next call tries another
            raise EtcdError(f"watch on etcd at {endpoint} failed: {type(exc).__name__} {exc}") from None

    async def put(self, key: str, value: str, lease: str = "") -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        await self.call("/v3/kv/put", body, f"writing {key!r}")

    async def delete(self, key: str) -> int:
        data = await self.call("/v3/kv/deleterange", {"key": _b64(key)}, f"deleting {key!r}")
        return int(data.get("deleted", 0))

    async def grant(self, ttl: int) -> str:
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl)}, "a lease")
        return str(data["ID"])

    async def keepalive(self, lease: str) -> None:
        await self.call("/v3/lease/keepalive", {"ID": lease}, f"keeping lease {lease} alive")


def _message(data: Any) -> str:
    if isinstance(data, Mapping):
        return str(data.get("message") or data.get("error") or data)[:300]
    return str(data)[:300]


@dataclass(frozen=True)
class EtcdRegistration:
    """One value under `<prefix><service>/`, in etcd's naming convention: `{"Addr": "host:port",
    "Metadata": {"weight": N, "tags": [...], "meta": {...}}}` (Metadata optional)."""

    host: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    weight: object = 1  # as written: validated when it becomes an instance

    @classmethod
    def decode(cls, value: str, default_tags: Sequence[str] = ("nginx",)) -> EtcdRegistration:
        """Read one registration; ValueError names what is wrong with the value."""
        try:
            data = boundedjson.loads(value)
        except boundedjson.JSONTooDeep as exc:
            raise ValueError(f'value is refused: {exc} (want {{"Addr": "host:port", "Metadata": {{...}}}})') from None
        except ValueError:
            raise ValueError('value is not JSON: want {"Addr": "host:port"}') from None
        if not isinstance(data, Mapping) or not isinstance(data.get("Addr"), str):
            raise ValueError('value has no "Addr": want {"Addr": "host:port"}')
        host, sep, port_text = data["Addr"].rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"Addr {data['Addr'][:80]!r} is not host:port")
        if not host.strip("[]"):
            raise ValueError(f"Addr {data['Addr'][:80]!r} has no host")
        raw_metadata = data.get("Metadata")
        metadata: Mapping[str, Any] = raw_metadata if isinstance(raw_metadata, Mapping) else {}
        raw_meta, raw_tags = metadata.get("meta"), metadata.get("tags")
        meta: Mapping[str, Any] = raw_meta if isinstance(raw_meta, Mapping) else {}
        tags: Sequence[Any] = raw_tags if isinstance(raw_tags, list) else default_tags
        return cls(
            host=host.strip("[]"),
            port=int(port_text),
            tags=tuple(str(t) for t in tags),
            meta={str(k): str(v) for k, v in meta.items()},
            weight=metadata.get("weight", 1),
        )

    def instance(self, service: str, key: str, intern: Interner | None = None) -> ServiceInstance:
        """This registration as a template sees it (node `etcd`, ID the key); ValueError says why not."""
        return validated_instance(
            name=service,
            id=key,
            node="etcd",
            address=self.host,
            port=self.port,
            tags=self.tags,
            meta=self.meta,
            weight=self.weight,
            intern=intern,
        )


class EtcdRegistry:
    """Answers confpy's query kinds from etcd (the Registry protocol)."""

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self.prefix = client.config.prefix
        self.default_tags = client.config.default_tags

    @property
    def address(self) -> str:
        return self.client.address

    async def close(self) -> None:
        await self.client.close()

    async def ping(self) -> None:
        await self.client.call("/v3/maintenance/status", {}, "the status")

    def _range(self, dep: Dependency) -> tuple[str, bool]:
        if isinstance(dep, ServiceHealth):
            return f"{self.prefix}{dep.service}/", True
        if isinstance(dep, CatalogServices):
            return self.prefix, True
        if isinstance(dep, KVKey):
            return dep.path, False
        if isinstance(dep, KVTree):
            return dep.prefix, True
        raise EtcdError(f"etcd cannot answer {dep.describe()}: it is a Consul-only query")

    async def fetch(self, dep: Dependency, index: int, wait: float) -> tuple[int, object]:
        key, prefix = self._range(dep)
        if index > 0:
            await self.client.watch(key, prefix, index + 1, wait)
        revision, pairs = await self.client.range(key, prefix)
        value = self._value(dep, key, pairs)
        if isinstance(value, HealthView):
            value = await resolved_view(value, self.client.config.timeout)
        return max(revision, 1), value

    def _value(self, dep: Dependency, key: str, pairs: Sequence[tuple[str, str]]) -> object:
        if isinstance(dep, ServiceHealth):
            return self._health(dep, key, pairs)
        if isinstance(dep, CatalogServices):
            names: set[str] = set()
            for path, value in pairs:
                name, sep, _ = path[len(key) :].partition("/")
                if not sep or not name:
                    continue
                if dep.tag is not None:
                    try:
                        tags = EtcdRegistration.decode(value, self.default_tags).tags
                    except ValueError:
                        continue
                    if dep.tag not in tags:
                        continue
                names.add(name)
            return tuple(sorted(names))
        if isinstance(dep, KVKey):
            return next((KVPair(path, path, value) for path, value in pairs if path == key), None)
        return tuple(KVPair(path[len(key) :], path, value) for path, value in pairs if not path.endswith("/"))

    def _health(self, dep: ServiceHealth, key: str, pairs: Sequence[tuple[str, str]]) -> HealthView:
        instances: list[ServiceInstance] = []
        rejected: list[RejectedInstance] = []
        intern = Interner()
        for path, value in pairs:
            if "/" in path[len(key) :]:
                continue  # a deeper key is not an instance of this service
            try:
                registration = EtcdRegistration.decode(value, self.default_tags)
                if dep.tag is None or dep.tag in registration.tags:
                    instances.append(registration.instance(dep.service, path, intern))
            except ValueError as exc:
                rejected.append(RejectedInstance(dep.service, path, str(exc)))
        return HealthView.of(instances, rejected)
