"""py-consul, wrapped once: address, token, TLS, timeouts, a response size cap and error mapping.

Every call is bounded: connecting and each read time out after `timeout`, and a blocking query
after its wait plus Consul's wait/16 jitter plus `timeout`, so a Consul that accepts a connection
and never answers is noticed. Errors come out as ConsulError subclasses whose messages say what
to check; the token never appears in them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import consul
import consul.base
import consul.std
import requests

from confpy.config import ConsulConfig
from confpy.durations import format_go_duration
from confpy.errors import ConsulBadResponse, ConsulError, ConsulUnreachable

_MAX_ERROR_BODY = 300


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_BODY else text[:_MAX_ERROR_BODY] + "..."


class ResponseTooLarge(ConsulBadResponse):
    """Consul's answer exceeded `max_response_bytes`."""


class _CappedHTTPClient(consul.std.HTTPClient):  # type: ignore[misc]
    """py-consul's std client, reading GET bodies in chunks up to a size cap."""

    def __init__(self, *args: Any, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_bytes = max_bytes
        # One long poll per watched dependency, all through this session: keep a connection for
        # each (connections are opened lazily) instead of urllib3's default pool of 10, which
        # would open and discard a connection per query on a large catalog.
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4096)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def get(self, callback: Any, path: str, params: Any = None, headers: Any = None, raw: bool = False) -> Any:
        uri = self.uri(path, params)
        with self.session.get(
            uri, headers=headers, verify=self.verify, cert=self.cert, timeout=self.timeout(params), stream=True
        ) as response:
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_content(chunk_size=65536):
                size += len(chunk)
                if size > self.max_bytes:
                    raise ResponseTooLarge(
                        f"Consul's answer to {path} is larger than max_response_bytes ({self.max_bytes} bytes); "
                        "raise [consul] max_response_bytes if this catalog is really that large"
                    )
                chunks.append(chunk)
            body = b"".join(chunks)
            text: str | bytes = body if raw else body.decode("utf-8", errors="replace")
            return callback(consul.base.Response(response.status_code, response.headers, text))


class _CappedConsul(consul.std.Consul):  # type: ignore[misc]
    def __init__(self, *args: Any, max_bytes: int, **kwargs: Any) -> None:
        self._max_bytes = max_bytes
        super().__init__(*args, **kwargs)

    def http_connect(self, host: str, port: int, scheme: str, verify: Any = True, cert: Any = None) -> Any:
        return _CappedHTTPClient(
            host, port, scheme, verify, cert, connections_timeout=self.connections_timeout, max_bytes=self._max_bytes
        )


def _parse_index(raw: Any, path: str) -> int:
    try:
        index = int(raw)
    except (TypeError, ValueError):
        raise ConsulBadResponse(f"Consul's answer to {path} has an invalid X-Consul-Index {str(raw)[:40]!r}") from None
    return index


class ConsulClient:
    """The Consul HTTP API as confpy uses it."""

    def __init__(self, config: ConsulConfig) -> None:
        self.config = config
        verify: bool | str = config.ca_file or config.verify
        cert: tuple[str, str] | str | None = None
        if config.cert_file:
            cert = (config.cert_file, config.key_file) if config.key_file else config.cert_file
        self._consul = _CappedConsul(
            host=config.host,
            port=config.port,
            scheme=config.scheme,
            token=config.token or None,
            dc=config.datacenter or None,
            verify=verify,
            cert=cert,
            connections_timeout=config.timeout,
            max_bytes=config.max_response_bytes,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override a token given in code; confpy's rule is the
        # reverse (the file wins, the environment fills a gap), and config already merged both.
        self._consul.token = config.token or None

    @property
    def address(self) -> str:
        return self.config.address

    def _call(self, what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConsulError:
            raise
        except requests.exceptions.Timeout:
            raise ConsulUnreachable(
                f"Consul at {self.address} did not answer {what} in time (timeout {self.config.timeout:g}s plus the query's wait)"
            ) from None
        except requests.exceptions.SSLError as exc:
            raise ConsulUnreachable(f"TLS with Consul at {self.address} failed for {what}: {_short(str(exc))}; check ca_file/cert_file") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            reason = "connection refused" if "Connection refused" in str(exc) else _short(str(exc.__class__.__name__))
            raise ConsulUnreachable(f"cannot reach Consul at {self.address} for {what}: {reason}") from None
        except requests.exceptions.RequestException as exc:
            raise ConsulUnreachable(f"request to Consul at {self.address} for {what} failed: {_short(str(exc))}") from None
        except consul.ACLPermissionDenied as exc:
            raise ConsulBadResponse(
                f"Consul refused {what} (403 {_short(str(exc))}): check the token (CONSUL_HTTP_TOKEN or [consul] token) and its ACL policy",
                status=403,
                body=str(exc),
            ) from None
        except consul.ACLDisabled as exc:
            raise ConsulBadResponse(f"Consul refused {what} (401 {_short(str(exc))}): check the token", status=401) from None
        except consul.ConsulException as exc:
            text = str(exc)
            if text.startswith("Failed to decode JSON"):
                raise ConsulBadResponse(f"Consul's answer to {what} is not valid JSON: {_short(text[22:])}") from None
            if text.startswith("Missing index header"):
                raise ConsulBadResponse(f"Consul's answer to {what} has no X-Consul-Index header; is {self.address} really Consul?") from None
            status_text, _, body = text.partition(" ")
            status = int(status_text) if status_text.isdigit() else None
            raise ConsulBadResponse(f"Consul answered {what} with {_short(text)}", status=status, body=body) from None

    def _blocking(self, index: int, wait: float | None) -> dict[str, Any]:
        if index <= 0:
            return {}
        return {"index": index, "wait": format_go_duration(wait if wait is not None else self.config.wait)}

    def health_service(
        self, name: str, *, tag: str | None = None, passing: bool = True, index: int = 0, wait: float | None = None
    ) -> tuple[int, Any]:
        """GET /v1/health/service/NAME (a blocking query when index > 0)."""
        raw_index, data = self._call(
            f"health of service {name!r}",
            self._consul.health.service,
            name,
            passing=passing,
            tag=tag,
            **self._blocking(index, wait),
        )
        return _parse_index(raw_index, f"/v1/health/service/{name}"), data

    def catalog_services(self, *, index: int = 0, wait: float | None = None) -> tuple[int, Any]:
        """GET /v1/catalog/services (a blocking query when index > 0)."""
        raw_index, data = self._call("the service catalog", self._consul.catalog.services, **self._blocking(index, wait))
        return _parse_index(raw_index, "/v1/catalog/services"), data

    def _put(self, what: str, path: str, params: list[tuple[str, str]] | None = None, body: str = "") -> str:
        """PUT to an agent endpoint; any status >= 400 raises with Consul's own error text."""

        def callback(response: consul.base.Response) -> str:
            text = response.body if isinstance(response.body, str) else response.body.decode("utf-8", "replace")
            if response.code >= 400:
                hint = ": check the token" if response.code == 403 else ""
                raise ConsulBadResponse(
                    f"Consul refused {what}: {response.code} {_short(text)}{hint}", status=response.code, body=text
                )
            return text

        return str(
            self._call(what, self._consul.http.put, callback, path, params=params, data=body, headers=self._consul.prepare_headers())
        )

    def register(self, definition: Mapping[str, Any]) -> None:
        """PUT /v1/agent/service/register with a full service definition (Consul's own keys)."""
        self._put(f"registering service {definition.get('Name')!r}", "/v1/agent/service/register", body=json.dumps(dict(definition)))

    def deregister(self, service_id: str) -> None:
        """PUT /v1/agent/service/deregister/ID."""
        self._put(f"deregistering {service_id!r}", f"/v1/agent/service/deregister/{service_id}")

    def maintenance(self, service_id: str, enable: bool, reason: str | None = None) -> None:
        """PUT /v1/agent/service/maintenance/ID?enable=...&reason=..."""
        params = [("enable", "true" if enable else "false")]
        if reason:
            params.append(("reason", reason))
        self._put(f"maintenance mode for {service_id!r}", f"/v1/agent/service/maintenance/{service_id}", params)
