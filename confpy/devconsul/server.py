"""The dev agent's HTTP API: routes, query-parameter rules, headers and the `serve` entry point."""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from confpy.config import split_host_port
from confpy.devconsul.checks import CheckRunner
from confpy.devconsul.register import VALID_STATUSES, RegisterError, decode_service
from confpy.devconsul.state import CRITICAL, DEFAULT_WAIT, PASSING, WARNING, AgentState
from confpy.durations import parse_go_duration
from confpy.errors import ConfigError

log = logging.getLogger(__name__)

MAX_KV_VALUE = 512 * 1024
AGENT_VERSION = "1.20.0"  # the Consul version whose API dev-consul follows
_GO_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_GO_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


class HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def parse_go_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ValueError(text)


class Query:
    """Go-like access to a query string: present-but-empty is distinct from absent."""

    def __init__(self, raw: str) -> None:
        self.values = parse_qs(raw, keep_blank_values=True)

    def has(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: str = "") -> str:
        return self.values.get(key, [default])[0]

    def all(self, key: str) -> list[str]:
        return self.values.get(key, [])


def check_datacenter(state: AgentState, query: Query) -> None:
    """`?dc=` naming another datacenter: this single-node agent has no path to it (Consul's 500)."""
    dc = query.get("dc")
    if dc and dc != state.datacenter:
        raise HTTPError(500, "No path to datacenter")


def blocking_params(query: Query) -> tuple[int, float]:
    """`index` and `wait` with Consul's rules and error texts."""
    index = 0
    if query.has("index"):
        raw = query.get("index")
        if not raw.isdigit():
            raise HTTPError(400, "Invalid index")
        index = int(raw)
    wait = DEFAULT_WAIT
    if query.has("wait"):
        try:
            wait = parse_go_duration(query.get("wait"))
        except ValueError:
            raise HTTPError(400, "Invalid wait time") from None
        if wait <= 0:
            wait = DEFAULT_WAIT
    if query.has("stale") and query.has("consistent"):
        raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
    return index, wait


class Handler(BaseHTTPRequestHandler):
    """One request; routes by method and path prefix."""

    protocol_version = "HTTP/1.1"
    server: DevConsulServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without TCP_NODELAY, Nagle and the client's
        # delayed ACK hold the body back ~40 ms, which a real Consul (Go) never does.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # --- plumbing --------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Accept-Encoding")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, index: int | None = None, pretty: bool = False) -> None:
        headers = {}
        if index is not None:
            headers = {
                "X-Consul-Index": str(max(index, 1)),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader",
            }
        text = json.dumps(data, indent=4 if pretty else None)
        self._send(status, text.encode(), "application/json", headers)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8")

    def _body(self) -> bytes:
        return self._request_body

    def _read_body(self) -> None:
        """Read the whole request body before answering, whatever the answer.

        An answer sent before its request's body was read (a 404 for an unknown route, an error)
        would leave the body on a kept-alive connection, to be parsed as the next request.
        """
        self._request_body = b""
        raw = self.headers.get("Content-Length") or "0"
        length = int(raw) if raw.isdigit() else 0
        if length > MAX_KV_VALUE + 1024 * 1024:
            self.close_connection = True  # too large to read: answer, then drop the connection
            raise HTTPError(413, f"Request body({length} bytes) too large, max size: {MAX_KV_VALUE} bytes.")
        if length:
            self._request_body = self.rfile.read(length)

    def _dispatch(self) -> None:
        try:
            self._read_body()
        except HTTPError as exc:
            self._text(exc.status, exc.text)
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = Query(url.query)
        state = self.server.state
        try:
            for prefix, methods, handler in self.server.routes:
                if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                    if self.command not in methods:
                        raise HTTPError(405, f"method {self.command} not allowed")
                    handler(self, state, path[len(prefix) :], query)
                    return
            raise HTTPError(404, "404 page not found")
        except HTTPError as exc:
            self._text(exc.status, exc.text)
        except RegisterError as exc:
            self._text(exc.status, exc.text)

    do_GET = do_PUT = do_DELETE = do_POST = do_HEAD = _dispatch

    # --- health and catalog ----------------------------------------------------------------

    def health_service(self, state: AgentState, name: str, query: Query) -> None:
        if not name:
            raise HTTPError(400, "Missing service name")
        check_datacenter(state, query)
        index, wait = blocking_params(query)
        passing = False
        if query.has("passing"):
            raw = query.get("passing")
            try:
                passing = True if raw == "" else parse_go_bool(raw)
            except ValueError:
                raise HTTPError(400, "Invalid value for ?passing") from None
        if query.get("filter"):
            raise HTTPError(
                400, "Failed to create evaluator for expression: confpy dev-consul does not support ?filter"
            )
        tags = query.all("tag")
        new_index, data = state.blocking(
            f"health:{name}",
            lambda: state.health_index(name),
            lambda: state.services_table_index,
            lambda: state.health_service(name, tags, passing),
            index,
            wait,
        )
        self._json(200, data, new_index, query.has("pretty"))

    def catalog_services(self, state: AgentState, rest: str, query: Query) -> None:
        check_datacenter(state, query)
        index, wait = blocking_params(query)
        new_index, data = state.blocking(
            "catalog",
            lambda: state.view_index.get("catalog", 0),
            lambda: state.services_table_index,
            state.catalog_services,
            index,
            wait,
        )
        self._json(200, data, new_index, query.has("pretty"))

    def catalog_service(self, state: AgentState, name: str, query: Query) -> None:
        check_datacenter(state, query)
        if not name:
            raise HTTPError(400, "Missing service name")
        index, wait = blocking_params(query)
        tags = query.all("tag")
        new_index, data = state.blocking(
            f"catalog:{name}",
            lambda: state.view_index.get(f"catalog:{name}", 0),
            lambda: state.services_table_index,
            lambda: state.catalog_service(name, tags),
            index,
            wait,
        )
        self._json(200, data, new_index, query.has("pretty"))

    # --- agent writes ----------------------------------------------------------------------

    def register(self, state: AgentState, rest: str, query: Query) -> None:
        body = self._body()
        try:
            raw = json.loads(body or b"null")
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
        if raw is None:
            raise HTTPError(400, "Request decode failed: EOF")
        service, checks = decode_service(raw)
        state.register(service, checks)
        self._text(200, "")

    def deregister(self, state: AgentState, sid: str, query: Query) -> None:
        state.deregister(sid)
        self._text(200, "")

    def maintenance(self, state: AgentState, sid: str, query: Query) -> None:
        if not sid:
            raise HTTPError(400, "Missing service ID")
        if not query.has("enable"):
            raise HTTPError(400, "Missing value for enable")
        raw = query.get("enable")
        try:
            enable = parse_go_bool(raw)
        except ValueError:
            raise HTTPError(400, f'Invalid value for enable: "{raw}"') from None
        if not state.set_maintenance(sid, enable, query.get("reason")):
            raise HTTPError(404, f'No service registered with ID "{sid}"')
        self._text(200, "")

    def _ttl(self, state: AgentState, check_id: str, status: str, output: str) -> None:
        with state.cond:
            check = state.checks.get(check_id)
            is_ttl = check is not None and check.type == "ttl"
        if not is_ttl:
            raise HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
        state.update_check(check_id, status, output[:4096])
        self._text(200, "")

    def check_pass(self, state: AgentState, check_id: str, query: Query) -> None:
        self._ttl(state, check_id, PASSING, query.get("note"))

    def check_warn(self, state: AgentState, check_id: str, query: Query) -> None:
        self._ttl(state, check_id, WARNING, query.get("note"))

    def check_fail(self, state: AgentState, check_id: str, query: Query) -> None:
        self._ttl(state, check_id, CRITICAL, query.get("note"))

    def check_update(self, state: AgentState, check_id: str, query: Query) -> None:
        try:
            data = json.loads(self._body() or b"{}")
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
        data = {k.lower(): v for k, v in data.items()} if isinstance(data, dict) else {}
        status = data.get("status", "")
        if status not in VALID_STATUSES:
            raise HTTPError(400, f"Invalid check status: '{status}'")
        self._ttl(state, check_id, status, str(data.get("output", "")))

    def agent_services(self, state: AgentState, rest: str, query: Query) -> None:
        with state.cond:
            data = {
                sid: {**state._service_json(s), "Datacenter": state.datacenter}
                for sid, s in state.services.items()
                if sid != "consul"
            }
        self._json(200, data)

    def agent_self(self, state: AgentState, rest: str, query: Query) -> None:
        self._json(
            200,
            {
                "Config": {
                    "Datacenter": state.datacenter,
                    "NodeName": state.node,
                    "NodeID": state.node_id,
                    "Server": True,
                    "Version": AGENT_VERSION,
                    "Revision": "confpy-dev",
                },
                "Member": {"Name": state.node, "Addr": state.address, "Port": 8301, "Status": 1},
                "Meta": {"consul-network-segment": ""},
                # What `consul agent -dev` reports besides; a single server that leads itself.
                "Stats": {
                    "agent": {
                        "check_monitors": "0",
                        "check_ttls": "0",
                        "checks": str(len(state.checks)),
                        "services": str(len(state.services)),
                    },
                    "build": {
                        "prerelease": "",
                        "revision": "confpy-dev",
                        "version": AGENT_VERSION,
                        "version_metadata": "",
                    },
                    "consul": {
                        "acl": "disabled",
                        "bootstrap": "true",
                        "known_datacenters": "1",
                        "leader": "true",
                        "leader_addr": f"{state.address}:8300",
                        "server": "true",
                    },
                    "runtime": {"arch": "amd64", "cpu_count": str(os.cpu_count() or 1), "os": "linux"},
                },
                "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
                "DebugConfig": {
                    "Datacenter": state.datacenter,
                    "NodeName": state.node,
                    "ServerMode": True,
                    "DevMode": True,
                    "ACLsEnabled": False,
                },
                "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"TLS": -1, "Plaintext": -1}},
            },
        )

    def status_leader(self, state: AgentState, rest: str, query: Query) -> None:
        self._json(200, f"{state.address}:8300")

    def status_peers(self, state: AgentState, rest: str, query: Query) -> None:
        self._json(200, [f"{state.address}:8300"])

    # --- KV --------------------------------------------------------------------------------

    def kv(self, state: AgentState, key: str, query: Query) -> None:
        check_datacenter(state, query)
        # As Consul's KVS endpoint: a key is required but to list (`recurse`, `keys`) or delete a tree.
        listing = self.command == "GET" and (query.has("recurse") or query.has("keys"))
        if not key and not listing and not (self.command == "DELETE" and query.has("recurse")):
            raise HTTPError(400, "Missing key name")
        if self.command == "PUT":
            exclusive = [flag for flag in ("cas", "acquire", "release") if query.has(flag)]
            if len(exclusive) > 1:
                raise HTTPError(
                    400, "Conflicting flags: " + urlencode(sorted((k, v) for k in query.values for v in query.all(k)))
                )
            for flag in ("acquire", "release"):
                if query.has(flag):  # no sessions in this agent: every session is unknown, as Consul says
                    raise HTTPError(500, f'invalid session "{query.get(flag)}"')
        if self.command == "GET":
            self._kv_get(state, key, query)
        elif self.command == "PUT":
            value = self._body()
            if len(value) > MAX_KV_VALUE:
                raise HTTPError(413, f"Value exceeds {MAX_KV_VALUE} byte limit")
            flags = int(query.get("flags") or 0) if query.get("flags", "0").isdigit() else None
            if flags is None:
                raise HTTPError(400, "Invalid flags")
            cas = self._cas(query)
            self._json(200, state.kv_put(key, value, flags, cas))
        else:
            self._json(200, state.kv_delete(key, query.has("recurse"), self._cas(query)))

    @staticmethod
    def _cas(query: Query) -> int | None:
        if not query.has("cas"):
            return None
        raw = query.get("cas")
        if not raw.isdigit():
            raise HTTPError(400, "Invalid cas index")
        return int(raw)

    def _kv_get(self, state: AgentState, key: str, query: Query) -> None:
        index, wait = blocking_params(query)
        prefix = query.has("recurse") or query.has("keys")
        new_index, entries = state.blocking(
            f"kvp:{key}" if prefix else f"kv:{key}",
            lambda: state.kv_index(key, prefix),
            lambda: state.kv_table_index,
            lambda: state.kv_entries(key, prefix),
            index,
            wait,
        )
        if not entries:
            self._send(
                404,
                b"",
                "text/plain; charset=utf-8",
                {"X-Consul-Index": str(new_index), "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"},
            )
            return
        if query.has("keys"):
            separator = query.get("separator")
            names: list[str] = []
            for entry in entries:
                name = entry.key
                if separator:
                    cut = name.find(separator, len(key))
                    if cut >= 0:
                        name = name[: cut + len(separator)]
                if name not in names:
                    names.append(name)
            self._json(200, names, new_index)
            return
        if query.has("raw"):
            self._send(200, entries[0].value, "application/octet-stream", {"X-Consul-Index": str(new_index)})
            return
        self._json(
            200,
            [
                {
                    "LockIndex": e.lock_index,
                    "Key": e.key,
                    "Flags": e.flags,
                    "Value": base64.b64encode(e.value).decode() if e.value else None,
                    "CreateIndex": e.create_index,
                    "ModifyIndex": e.modify_index,
                }
                for e in entries
            ],
            new_index,
            query.has("pretty"),
        )


ROUTES = [
    ("/v1/health/service/", {"GET", "HEAD"}, Handler.health_service),
    ("/v1/catalog/services", {"GET", "HEAD"}, Handler.catalog_services),
    ("/v1/catalog/service/", {"GET", "HEAD"}, Handler.catalog_service),
    ("/v1/agent/service/register", {"PUT"}, Handler.register),
    ("/v1/agent/service/deregister/", {"PUT"}, Handler.deregister),
    ("/v1/agent/service/maintenance/", {"PUT"}, Handler.maintenance),
    ("/v1/agent/check/pass/", {"PUT"}, Handler.check_pass),
    ("/v1/agent/check/warn/", {"PUT"}, Handler.check_warn),
    ("/v1/agent/check/fail/", {"PUT"}, Handler.check_fail),
    ("/v1/agent/check/update/", {"PUT"}, Handler.check_update),
    ("/v1/agent/services", {"GET"}, Handler.agent_services),
    ("/v1/agent/self", {"GET"}, Handler.agent_self),
    ("/v1/status/leader", {"GET"}, Handler.status_leader),
    ("/v1/status/peers", {"GET"}, Handler.status_peers),
    ("/v1/kv/", {"GET", "PUT", "DELETE"}, Handler.kv),
]


class DevConsulServer(ThreadingHTTPServer):
    """The HTTP server, its state and its check runner."""

    daemon_threads = True
    allow_reuse_address = True
    # Consul's listener (Go's net.Listen) uses the kernel's somaxconn backlog; socketserver's
    # default of 5 would drop the SYNs of a client opening hundreds of watches at once.
    request_queue_size = 4096

    def __init__(self, host: str, port: int, node: str, shuffle: bool = False) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.state = AgentState(node or socket.gethostname(), shuffle=shuffle)
        self.routes = ROUTES
        self.checks = CheckRunner(self.state)
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        raw_host, port = self.server_address[:2]
        host = raw_host.decode() if isinstance(raw_host, bytes) else str(raw_host)
        host_text = f"[{host}]" if ":" in host else host
        return f"http://{host_text}:{port}"

    def start(self) -> threading.Thread:
        self.checks.start()
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="dev-consul-http", daemon=True
        )
        thread.start()
        return thread

    def stop(self) -> None:
        self.state.close()
        self.checks.stop()
        self.shutdown()
        self.server_close()


def serve(http_addr: str, node: str, shuffle: bool = False) -> int:
    """`confpy dev-consul`: serve until SIGTERM/SIGINT, then exit 0."""
    try:
        host, port = split_host_port(http_addr)
    except ValueError as exc:
        raise ConfigError(f"--http-addr: {exc}") from None
    try:
        server = DevConsulServer(host, port, node, shuffle)
    except OSError as exc:
        raise ConfigError(f"--http-addr {http_addr}: cannot listen: {exc.strerror!s}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"confpy dev-consul: serving the Consul HTTP API on {server.url} (node {server.state.node})", flush=True)
    print(
        "confpy dev-consul: in-memory, for development and tests only: no ACLs, no persistence, no raft",
        file=sys.stderr,
        flush=True,
    )
    while not stop.wait(3600):
        pass
    server.stop()
    return 0
