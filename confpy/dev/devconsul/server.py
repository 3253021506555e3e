"""The dev agent's HTTP API: routes, query-parameter rules, headers and the `serve` entry point."""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import queue
import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from confpy.config import split_host_port
from confpy.dev.devconsul.bexpr import FilterError, compile_filter
from confpy.dev.devconsul.checks import CheckRunner
from confpy.dev.devconsul.register import (
    VALID_STATUSES,
    RegisterError,
    decode_agent_check,
    decode_catalog_register,
    decode_service,
)
from confpy.dev.devconsul.state import (
    ALL_VIEW,
    CRITICAL,
    DEFAULT_WAIT,
    PASSING,
    SERF_CHECK,
    WARNING,
    AgentState,
    CheckEntry,
    KVEntry,
    Read,
    ServiceEntry,
)
from confpy.durations import GO_FALSE, parse_go_bool, parse_go_duration
from confpy.errors import ConfigError

log = logging.getLogger(__name__)

MAX_KV_VALUE = 512 * 1024
# Go's net/http reads at most http.DefaultMaxHeaderBytes (plus 4 KB of slack) of a request's head
# and answers 431 beyond; Consul keeps that default. Here the header lines get that budget (the
# request line has http.server's own 64 KB bound).
MAX_HEADER_BYTES = (1 << 20) + 4096
RST_AVOIDANCE_DELAY = 0.5  # Go's rstAvoidanceDelay
GO_ERROR_HEADERS = b"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
AGENT_VERSION = "1.20.0"  # the Consul version whose API dev-consul follows


class HTTPError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def read_header_block(
    rfile: io.BufferedIOBase, message_class: type[http.client.HTTPMessage]
) -> http.client.HTTPMessage:
    """A request's header lines up to the blank line, as Go's net/textproto reads them: `Name:
    value`, the value trimmed. A line that is not one is a 400; more than MAX_HEADER_BYTES a 431."""
    headers = message_class()
    budget = MAX_HEADER_BYTES
    while True:
        line = rfile.readline(budget + 1)
        budget -= len(line)
        if budget < 0:
            raise HTTPError(431, "Request Header Fields Too Large")
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, colon, value = line.decode("iso-8859-1").partition(":")
        if not colon or not name or name != name.strip() or " " in name:
            raise HTTPError(400, f"malformed MIME header line: {line.rstrip().decode('iso-8859-1')}")
        headers[name] = value.strip()


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


# `?peer=` names a cluster peer; this agent has none, so as Consul for an unknown peer the
# answer is an empty list (not an error). `?merge-central-config` merges config entries, of which
# there are none here: the answer is the same as without it.


def check_enterprise(query: Query) -> None:
    """Namespaces and admin partitions are Consul Enterprise's; its community edition (which
    dev-consul follows) accepts only `default` and refuses any other, on every endpoint."""
    for key, feature in (("ns", "Namespaces"), ("partition", "Partitions")):
        if query.get(key) not in ("", "default"):
            raise HTTPError(400, f'Invalid query parameter: "{key}" - {feature} are a Consul Enterprise feature')


def check_datacenter(state: AgentState, query: Query) -> None:
    """`?dc=` naming another datacenter: this single-node agent has no path to it (Consul's 500)."""
    dc = query.get("dc")
    if dc and dc != state.datacenter:
        raise HTTPError(500, "No path to datacenter")


def enable_flag(query: Query) -> bool:
    """The maintenance endpoints' `enable`, with Consul's texts."""
    if not query.has("enable"):
        raise HTTPError(400, "Missing value for enable")
    raw = query.get("enable")
    try:
        return parse_go_bool(raw)
    except ValueError:
        raise HTTPError(400, f'Invalid value for enable: "{raw}"') from None


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


def _sample_service() -> ServiceEntry:
    return ServiceEntry("", "", [""], "", {"lan": {"Address": "", "Port": 0}}, {}, 0, {}, False, "", 0, 0)


def filtered(query: Query, items: list[Any], sample: Any) -> list[Any]:
    """`?filter=`: the items the expression holds for; a bad expression is Consul's 400."""
    expression = query.get("filter")
    if not expression:
        return items
    try:
        predicate = compile_filter(expression, sample)
    except FilterError as exc:
        raise HTTPError(400, str(exc)) from None
    return [item for item in items if predicate(item)]


LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
ORIGIN = {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05}


class Handler(BaseHTTPRequestHandler):
    """One request; routes by method and path prefix."""

    protocol_version = "HTTP/1.1"
    server: DevConsulServer
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's: what send_response/send_header queued

    def setup(self) -> None:
        self.tls_failed = False
        if isinstance(self.request, ssl.SSLSocket):
            # The handshake runs here, in the connection's own thread, bounded, not in accept().
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                log.info("TLS handshake with %s failed: %s", self.client_address, exc)
                self.tls_failed = True
            self.request.settimeout(None)
        super().setup()
        self._thread = threading.get_ident()
        self._unsent = b""
        # A streamed answer (/v1/agent/monitor) goes out in several writes: without TCP_NODELAY,
        # Nagle and the client's delayed ACK hold a piece back ~40 ms, which Consul (Go) never does.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        if not self.tls_failed:
            super().handle()

    def parse_request(self) -> bool:
        """http.server's, except that the header block is read by `read_header_block`, not by the
        email package's parser (a tenth of a millisecond per request on a busy machine, paid by
        every registration and by every blocking query that follows it)."""
        rfile = self.rfile
        self.rfile = io.BytesIO(b"\r\n")  # for the request line alone: the headers are read below
        try:
            if not super().parse_request():
                return False
        finally:
            self.rfile = rfile
        try:
            self.headers = read_header_block(rfile, self.MessageClass)
        except HTTPError as exc:
            # Go's server answers a request it cannot read with these very bytes (no Date, no
            # length: the connection closes), before any handler sees it.
            log.debug("%s: %s", self.address_string(), exc.text)
            public = f"{exc.status} {HTTPStatus(exc.status).phrase}".encode()
            self.wfile.write(b"HTTP/1.1 " + public + GO_ERROR_HEADERS + public)
            self.close_connection = True
            if exc.status == 431:
                # Go's closeWriteAndWait: the client may still be sending the rest, and closing
                # with unread bytes would reset the connection and lose this answer.
                self.connection.shutdown(socket.SHUT_WR)
                time.sleep(RST_AVOIDANCE_DELAY)
            return False
        # http.server's Connection and Expect rules, on the real headers.
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = self.headers.get("Expect", "").lower()
        if expect == "100-continue" and self.protocol_version >= "HTTP/1.1" and self.request_version >= "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):  # called for every request: format only when shown
            log.debug("%s %s", self.address_string(), format % args)

    # --- plumbing --------------------------------------------------------------------------

    def send_response(self, code: int, message: str | None = None) -> None:
        """The status line and Date, as Consul (Go's net/http) sends them: no Server header."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Accept-Encoding")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        # Headers and body in one write (one system call, and this thread keeps the interpreter
        # lock until it is out, instead of handing it over between the two).
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD":
            self._headers_buffer.append(body)
        data = b"".join(self._headers_buffer)
        self._headers_buffer = []
        self._write_out(data)

    def _write_out(self, data: bytes) -> None:
        if threading.get_ident() == self._thread:
            self.wfile.write(data)
            return
        # A write's thread answering this parked reader (see `_blocking`): it must never block on
        # a slow client, so it sends what the socket takes now and this connection's thread the rest.
        try:
            sent = self.connection.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close_connection = True  # the client is gone; its thread ends the connection
            sent = len(data)
        self._unsent = data[sent:]

    def _blocking(
        self, state: AgentState, read: Read, index: int, wait: float, answer: Callable[[int, Any], None]
    ) -> None:
        """A blocking read answered by `answer(index, data)`: on plain HTTP, by the write that moves
        the view, from its own thread (see `AgentState.blocking`); over TLS by this thread (an SSL
        socket has no non-blocking send, and a write must not wait on a reader's client)."""
        tls = isinstance(self.connection, ssl.SSLSocket)
        state.blocking(read, index, wait, lambda i, d: self._answer(answer, i, d), from_writer=not tls)
        if self._unsent:
            unsent, self._unsent = self._unsent, b""
            self.wfile.write(unsent)

    def _answer(self, answer: Callable[[int, Any], None], index: int, data: Any) -> None:
        try:
            answer(index, data)
        except HTTPError as exc:  # as `_dispatch` answers it, from whichever thread runs this
            self._text(exc.status, exc.text)

    def _json(self, status: int, data: Any, index: int | None = None, pretty: bool = False) -> None:
        headers = {}
        if index is not None:
            headers = {
                "X-Consul-Index": str(max(index, 1)),
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader",
            }
            headers.update(self._consistency_headers(index))
        text = json.dumps(data, indent=4 if pretty else None)
        self._send(status, text.encode(), "application/json", headers)

    def _filtered_json(self, query: Query, sample: Any) -> Callable[[int, Any], None]:
        """A listing's answer: its rows as `?filter=` keeps them, as JSON (`?pretty` honoured)."""
        return lambda new_index, data: self._json(200, filtered(query, data, sample), new_index, query.has("pretty"))

    def _consistency_headers(self, index: int) -> dict[str, str]:
        """`?stale`/`?consistent` and `?cached` as a single server that leads itself answers them.

        The leader is this agent, so LastContact is always 0; with `?cached` the agent cache reports
        a HIT while the view's index is the one it filled the entry at, with its Age in seconds.
        """
        query = self._query
        headers = {}
        if query.has("stale"):
            headers["X-Consul-Effective-Consistency"] = "stale"
        elif query.has("consistent"):
            headers["X-Consul-Effective-Consistency"] = "consistent"
        if query.has("cached"):
            key = (
                urlsplit(self.path).path
                + "?"
                + urlencode(sorted((k, v) for k in query.values if k not in ("index", "wait") for v in query.all(k)))
            )
            now = time.monotonic()
            filled = self.server.cache.get(key)
            if filled is not None and filled[0] == index:
                headers.update({"X-Cache": "HIT", "Age": str(int(now - filled[1]))})
            else:
                self.server.cache[key] = (index, now)
                headers.update({"X-Cache": "MISS", "Age": "0"})
        return headers

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
        self._query = Query("")
        try:
            self._read_body()
        except HTTPError as exc:
            self._text(exc.status, exc.text)
            return
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = self._query = Query(url.query)
        state = self.server.state
        try:
            check_enterprise(query)
            for prefix, methods, handler in self.server.routes:
                if path == prefix or (prefix.endswith("/") and prefix != "/" and path.startswith(prefix)):
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
        tags = query.all("tag")
        sample = {
            "Node": state.node_json(state.nodes[state.node]),
            "Service": state.service_json(_sample_service()),
            "Checks": [state.check_json(CheckEntry("", "", PASSING))],
        }
        filtered(query, [], sample)  # refuse a bad expression before blocking
        self._blocking(
            state,
            Read(
                f"health:{name}",
                lambda: state.health_index(name),
                lambda: state.services_table_index,
                lambda: [] if query.get("peer") else state.health_service(name, tags, passing),
            ),
            index,
            wait,
            self._filtered_json(query, sample),
        )

    def _read_all(self, state: AgentState, query: Query, view: str, body: Callable[[], Any], sample: Any) -> None:
        """A blocking read of a listing, filtered as `?filter=` says."""
        check_datacenter(state, query)
        index, wait = blocking_params(query)
        filtered(query, [], sample)
        self._blocking(
            state,
            state.view_read(view, body),
            index,
            wait,
            self._filtered_json(query, sample),
        )

    def health_checks(self, state: AgentState, name: str, query: Query) -> None:
        if not name:
            raise HTTPError(400, "Missing service name")
        sample = state.check_json(CheckEntry("", "", PASSING))
        self._read_all(state, query, f"health:{name}", lambda: state.health_checks(name), sample)

    def health_node(self, state: AgentState, node: str, query: Query) -> None:
        if not node:
            raise HTTPError(400, "Missing node name")
        sample = state.check_json(CheckEntry("", "", PASSING))
        self._read_all(state, query, ALL_VIEW, lambda: state.health_node(node), sample)

    def health_state(self, state: AgentState, wanted: str, query: Query) -> None:
        if not wanted:
            raise HTTPError(400, "Missing check state")
        if wanted not in ("any", PASSING, WARNING, CRITICAL):
            raise HTTPError(400, "Invalid check state")
        sample = state.check_json(CheckEntry("", "", PASSING))
        self._read_all(state, query, ALL_VIEW, lambda: state.health_state(wanted), sample)

    def catalog_nodes(self, state: AgentState, rest: str, query: Query) -> None:
        sample = state.node_json(state.nodes[state.node])
        self._read_all(state, query, ALL_VIEW, state.catalog_nodes, sample)

    def catalog_node(self, state: AgentState, node: str, query: Query) -> None:
        if not node:
            raise HTTPError(400, "Missing node name")
        check_datacenter(state, query)
        index, wait = blocking_params(query)
        sample = state.service_json(_sample_service())
        filtered(query, [], sample)

        def answer(new_index: int, data: Any) -> None:
            if data is not None and query.get("filter"):
                # The expression is evaluated against each entry of the Services map.
                data["Services"] = {sid: s for sid, s in data["Services"].items() if filtered(query, [s], sample)}
            self._json(200, data, new_index, query.has("pretty"))

        self._blocking(
            state,
            state.view_read(
                ALL_VIEW,
                lambda: state.catalog_node(node),
            ),
            index,
            wait,
            answer,
        )

    def catalog_datacenters(self, state: AgentState, rest: str, query: Query) -> None:
        self._json(200, [state.datacenter])

    def catalog_connect(self, state: AgentState, name: str, query: Query) -> None:
        if not name:
            raise HTTPError(400, "Missing service name")
        # No service here is Connect-capable (no proxies, no native Connect): always the empty list.
        sample = state.catalog_service_row_sample(_sample_service())
        self._read_all(state, query, f"catalog:{name}", list, sample)

    def catalog_register(self, state: AgentState, rest: str, query: Query) -> None:
        check_datacenter(state, query)
        node, service, checks = decode_catalog_register(self._json_body())
        if node["datacenter"] and node["datacenter"] != state.datacenter:
            raise HTTPError(500, "No path to datacenter")
        state.catalog_register(node, service, checks)
        self._json(200, True)

    def catalog_deregister(self, state: AgentState, rest: str, query: Query) -> None:
        check_datacenter(state, query)
        raw = self._json_body()
        if not isinstance(raw, dict):
            raise HTTPError(
                400, "Request decode failed: json: cannot unmarshal into Go value of type structs.DeregisterRequest"
            )
        data = {k.lower(): v for k, v in raw.items()}
        node = str(data.get("node") or "")
        if not node:
            raise HTTPError(400, "Must provide node")
        dc = str(data.get("datacenter") or "")
        if dc and dc != state.datacenter:
            raise HTTPError(500, "No path to datacenter")
        state.catalog_deregister(node, str(data.get("serviceid") or ""), str(data.get("checkid") or ""))
        self._json(200, True)

    def catalog_services(self, state: AgentState, rest: str, query: Query) -> None:
        check_datacenter(state, query)
        index, wait = blocking_params(query)
        sample = state.catalog_service_row_sample(_sample_service())
        filtered(query, [], sample)
        if query.get("filter"):
            # The expression sees each service instance; the answer groups the matching ones by name.

            def grouped(new_index: int, rows: Any) -> None:
                names: dict[str, set[str]] = {}
                for row in filtered(query, rows, sample):
                    names.setdefault(row["ServiceName"], set()).update(row["ServiceTags"])
                self._json(200, {n: sorted(t) for n, t in sorted(names.items())}, new_index, query.has("pretty"))

            self._blocking(
                state,
                state.view_read("catalog", state.catalog_service_rows),
                index,
                wait,
                grouped,
            )
            return
        self._blocking(
            state,
            state.view_read("catalog", state.catalog_services),
            index,
            wait,
            lambda new_index, data: self._json(200, data, new_index, query.has("pretty")),
        )

    def catalog_service(self, state: AgentState, name: str, query: Query) -> None:
        check_datacenter(state, query)
        if not name:
            raise HTTPError(400, "Missing service name")
        index, wait = blocking_params(query)
        tags = query.all("tag")
        sample = state.catalog_service_row_sample(_sample_service())
        filtered(query, [], sample)
        self._blocking(
            state,
            state.view_read(
                f"catalog:{name}",
                lambda: [] if query.get("peer") else state.catalog_service(name, tags),
            ),
            index,
            wait,
            self._filtered_json(query, sample),
        )

    # --- agent writes ----------------------------------------------------------------------

    def _json_body(self) -> Any:
        try:
            raw = json.loads(self._body() or b"null")
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
        if raw is None:
            raise HTTPError(400, "Request decode failed: EOF")
        return raw

    def register(self, state: AgentState, rest: str, query: Query) -> None:
        service, checks = decode_service(self._json_body(), self.server.script_checks)
        state.register(service, checks)
        self._text(200, "")

    def check_register(self, state: AgentState, rest: str, query: Query) -> None:
        check = decode_agent_check(self._json_body(), self.server.script_checks)
        try:
            state.register_check(check)
        except KeyError:
            raise HTTPError(404, f'ServiceID "{check["service_id"]}" does not exist') from None
        self._text(200, "")

    def check_deregister(self, state: AgentState, check_id: str, query: Query) -> None:
        if not state.deregister_check(check_id):
            raise HTTPError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        self._text(200, "")

    def agent_checks(self, state: AgentState, rest: str, query: Query) -> None:
        with state.cond:
            # serfHealth is the catalog's (the leader registers it), not the agent's local state.
            checks = [(cid, state.check_json(c, indexes=False)) for cid, c in state.checks.items() if cid != SERF_CHECK]
        sample = state.check_json(CheckEntry("", "", PASSING))
        keep = {id(c) for c in filtered(query, [c for _, c in checks], sample)}
        self._json(200, {cid: c for cid, c in checks if id(c) in keep})

    def node_maintenance(self, state: AgentState, rest: str, query: Query) -> None:
        enable = enable_flag(query)
        state.set_node_maintenance(enable, query.get("reason"))
        self._text(200, "")

    def agent_members(self, state: AgentState, rest: str, query: Query) -> None:
        self._json(200, [member_json(state, wan=query.has("wan") and query.get("wan") not in GO_FALSE)])

    def force_leave(self, state: AgentState, node: str, query: Query) -> None:
        if node not in (state.node, f"{state.node}.{state.datacenter}"):
            raise HTTPError(500, f"agent: No node found with name '{node}'")
        self._text(200, "")

    def agent_reload(self, state: AgentState, rest: str, query: Query) -> None:
        self._text(200, "")  # no configuration files to read again: the agent is its flags

    def partial_catalog(self, state: AgentState, rest: str, query: Query) -> None:
        """A test hook, not Consul's: `PUT /v1/confpy-dev/partial-catalog?keep=N&seconds=S` answers at most
        N instances of each service for S seconds (a restarting agent's half-synced catalog)."""
        try:
            keep, seconds = int(query.get("keep")), float(query.get("seconds"))
        except ValueError:
            raise HTTPError(400, "partial-catalog needs ?keep=N&seconds=S") from None
        if keep < 0 or not 0 < seconds <= 600:
            raise HTTPError(400, "partial-catalog: keep >= 0 and 0 < seconds <= 600")
        state.partial_catalog(keep, seconds)
        self._text(200, "")

    def agent_leave(self, state: AgentState, rest: str, query: Query) -> None:
        self._text(200, "")
        self.server.leave()

    def agent_metrics(self, state: AgentState, rest: str, query: Query) -> None:
        if query.get("format") == "prometheus":
            # As an agent without telemetry.prometheus_retention_time: 200, empty, and why.
            self._send(
                200,
                b"",
                "text/plain; version=0.0.4; charset=utf-8",
                {"X-Consul-Reason": "Prometheus is not enabled since its retention time is not positive"},
            )
            return
        with state.cond:
            services = sum(len(v) for v in state.node_services.values())
        stamp = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime(time.time() // 10 * 10))
        self._json(
            200,
            {
                "Timestamp": stamp,
                "Gauges": [
                    {"Name": "consul.catalog.services", "Value": float(services), "Labels": {}},
                    {"Name": "consul.runtime.num_goroutines", "Value": float(threading.active_count()), "Labels": {}},
                ],
                "Points": [],
                "Counters": [],
                "Samples": [],
            },
        )

    def agent_monitor(self, state: AgentState, rest: str, query: Query) -> None:
        level = query.get("loglevel", "info").lower() or "info"
        if level not in LOG_LEVELS:
            raise HTTPError(400, f"Unknown log level: {query.get('loglevel')}")
        # Stream the agent's log lines as they come, until the client goes away or the agent stops.
        lines: queue.Queue[str] = queue.Queue(maxsize=512)
        handler = _QueueHandler(lines)
        handler.setLevel(logging.DEBUG if level in ("trace", "debug") else getattr(logging, level.upper()))
        logging.getLogger("confpy.dev.devconsul").addHandler(handler)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            while not state.closing:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    break  # the client closed its end
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
                data = (line + "\n").encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
        except OSError:
            pass  # the client went away mid-write
        finally:
            logging.getLogger("confpy.dev.devconsul").removeHandler(handler)
            self.close_connection = True

    def deregister(self, state: AgentState, sid: str, query: Query) -> None:
        state.deregister(sid)
        self._text(200, "")

    def maintenance(self, state: AgentState, sid: str, query: Query) -> None:
        if not sid:
            raise HTTPError(400, "Missing service ID")
        enable = enable_flag(query)
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
            services = [(sid, state.agent_service_json(s)) for sid, s in state.services.items() if sid != "consul"]
        sample = {**state.agent_service_json(_sample_service()), "Kind": "", "TaggedAddresses": {}}
        keep = {id(s) for s in filtered(query, [s for _, s in services], sample)}
        self._json(200, {sid: s for sid, s in services if id(s) in keep})

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
                "Member": member_json(state, wan=False),
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
                "Coord": state.coordinates.get(state.node, dict(ORIGIN)),
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

    # --- network coordinates -----------------------------------------------------------------

    def coordinate_datacenters(self, state: AgentState, rest: str, query: Query) -> None:
        # The WAN pool's view: this one server, at the origin until an update says otherwise.
        coord = state.coordinates.get(state.node, dict(ORIGIN))
        self._json(
            200,
            [{"Datacenter": state.datacenter, "AreaID": "wan", "Coordinates": [{"Node": state.node, "Coord": coord}]}],
        )

    def coordinate_nodes(self, state: AgentState, rest: str, query: Query) -> None:
        self._read_all(state, query, "coordinates", state.coordinate_entries, None)

    def coordinate_node(self, state: AgentState, node: str, query: Query) -> None:
        check_datacenter(state, query)
        index, wait = blocking_params(query)

        def answer(new_index: int, data: Any) -> None:
            if not data:
                self._send(404, b"", "text/plain; charset=utf-8", {"X-Consul-Index": str(new_index)})
                return
            self._json(200, data, new_index, query.has("pretty"))

        self._blocking(
            state,
            state.view_read(
                "coordinates",
                lambda: state.coordinate_entries(node),
            ),
            index,
            wait,
            answer,
        )

    def coordinate_update(self, state: AgentState, rest: str, query: Query) -> None:
        check_datacenter(state, query)
        raw = self._json_body()
        data = {k.lower(): v for k, v in raw.items()} if isinstance(raw, dict) else {}
        coord = data.get("coord")
        if not isinstance(coord, dict):
            raise HTTPError(400, "Request decode failed: missing Coord")
        state.update_coordinate(str(data.get("node") or ""), coord)
        self._json(200, True)

    def root(self, state: AgentState, rest: str, query: Query) -> None:
        # As an agent with its UI enabled (as `consul agent -dev`): / sends browsers to /ui/.
        self._send(301, b"", "text/html; charset=utf-8", {"Location": "/ui/"})

    def ui(self, state: AgentState, rest: str, query: Query) -> None:
        page = (
            "<!doctype html><title>confpy dev-consul</title>"
            f"<p>confpy dev-consul {AGENT_VERSION} (node {state.node}) has no web UI; use the HTTP API under /v1/.</p>"
        )
        self._send(200, page.encode(), "text/html; charset=utf-8")

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
        self._blocking(
            state,
            Read(
                f"kvp:{key}" if prefix else f"kv:{key}",
                lambda: state.kv_index(key, prefix),
                lambda: state.kv_table_index,
                lambda: state.kv_entries(key, prefix),
            ),
            index,
            wait,
            lambda new_index, entries: self._kv_answer(key, query, new_index, entries),
        )

    def _kv_answer(self, key: str, query: Query, new_index: int, entries: list[KVEntry]) -> None:
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


class _QueueHandler(logging.Handler):
    """Log records for one /v1/agent/monitor stream (dropped when the reader falls behind)."""

    def __init__(self, lines: queue.Queue[str]) -> None:
        super().__init__()
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put_nowait(self.format(record))
        except queue.Full:
            pass


def member_json(state: AgentState, wan: bool) -> dict[str, Any]:
    """This agent as a serf member (LAN, or WAN where members are named node.dc)."""
    return {
        "Name": f"{state.node}.{state.datacenter}" if wan else state.node,
        "Addr": state.address,
        "Port": 8302 if wan else 8301,
        "Tags": {
            "acls": "0",
            "build": f"{AGENT_VERSION}:confpy-dev",
            "dc": state.datacenter,
            "id": state.node_id,
            "port": "8300",
            "raft_vsn": "3",
            "role": "consul",
            "segment": "",
            "vsn": "2",
            "vsn_max": "3",
            "vsn_min": "2",
            "wan_join_port": "8302",
        },
        "Status": 1,
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


ROUTES = [
    ("/v1/health/service/", {"GET", "HEAD"}, Handler.health_service),
    ("/v1/health/checks/", {"GET", "HEAD"}, Handler.health_checks),
    ("/v1/health/node/", {"GET", "HEAD"}, Handler.health_node),
    ("/v1/health/state/", {"GET", "HEAD"}, Handler.health_state),
    ("/v1/catalog/services", {"GET", "HEAD"}, Handler.catalog_services),
    ("/v1/catalog/service/", {"GET", "HEAD"}, Handler.catalog_service),
    ("/v1/catalog/connect/", {"GET", "HEAD"}, Handler.catalog_connect),
    ("/v1/catalog/nodes", {"GET", "HEAD"}, Handler.catalog_nodes),
    ("/v1/catalog/node/", {"GET", "HEAD"}, Handler.catalog_node),
    ("/v1/catalog/datacenters", {"GET", "HEAD"}, Handler.catalog_datacenters),
    ("/v1/catalog/register", {"PUT"}, Handler.catalog_register),
    ("/v1/catalog/deregister", {"PUT"}, Handler.catalog_deregister),
    ("/v1/agent/check/register", {"PUT"}, Handler.check_register),
    ("/v1/agent/check/deregister/", {"PUT"}, Handler.check_deregister),
    ("/v1/agent/checks", {"GET"}, Handler.agent_checks),
    ("/v1/agent/maintenance", {"PUT"}, Handler.node_maintenance),
    ("/v1/agent/members", {"GET"}, Handler.agent_members),
    ("/v1/agent/force-leave/", {"PUT"}, Handler.force_leave),
    ("/v1/agent/reload", {"PUT"}, Handler.agent_reload),
    ("/v1/agent/leave", {"PUT"}, Handler.agent_leave),
    ("/v1/agent/metrics", {"GET"}, Handler.agent_metrics),
    ("/v1/agent/monitor", {"GET"}, Handler.agent_monitor),
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
    ("/v1/confpy-dev/partial-catalog", {"PUT"}, Handler.partial_catalog),
    ("/v1/coordinate/datacenters", {"GET"}, Handler.coordinate_datacenters),
    ("/v1/coordinate/nodes", {"GET"}, Handler.coordinate_nodes),
    ("/v1/coordinate/node/", {"GET"}, Handler.coordinate_node),
    ("/v1/coordinate/update", {"PUT"}, Handler.coordinate_update),
    ("/ui/", {"GET", "HEAD"}, Handler.ui),
    ("/", {"GET", "HEAD"}, Handler.root),
]


class DevConsulServer(ThreadingHTTPServer):
    """The HTTP server, its state and its check runner."""

    daemon_threads = True
    allow_reuse_address = True
    # Consul's listener (Go's net.Listen) uses the kernel's somaxconn backlog; socketserver's
    # default of 5 would drop the SYNs of a client opening hundreds of watches at once.
    request_queue_size = 4096

    def __init__(
        self,
        host: str,
        port: int,
        node: str,
        shuffle: bool = False,
        script_checks: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.state = AgentState(node or socket.gethostname(), shuffle=shuffle)
        self.script_checks = script_checks
        # Set by PUT /v1/agent/leave (and by `serve`'s signal handlers): the agent stops.
        self.left = threading.Event()
        # The agent cache's entries for ?cached reads: (index, filled at) by path and query.
        self.cache: dict[str, tuple[int, float]] = {}
        self.tls = tls
        self.routes = ROUTES
        self.checks = CheckRunner(self.state)
        super().__init__((host, port), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def url(self) -> str:
        raw_host, port = self.server_address[:2]
        host = raw_host.decode() if isinstance(raw_host, bytes) else str(raw_host)
        host_text = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host_text}:{port}"

    def start(self) -> threading.Thread:
        self.checks.start()
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="dev-consul-http", daemon=True
        )
        thread.start()
        return thread

    def leave(self) -> None:
        self.left.set()

    def stop(self) -> None:
        self.state.close()
        self.checks.stop()
        self.shutdown()
        self.server_close()


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext | None:
    """HTTPS as Consul's `tls.https` (cert and key); a CA makes client certificates required, as
    Consul's `verify_incoming`. None without a certificate."""
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert and --tls-key go together: HTTPS needs the certificate and its key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(cafile=ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"--tls-cert/--tls-key/--tls-ca: cannot load {cert}, {key} or {ca or '(no CA)'}: {exc}"
        ) from None
    return context


def serve(
    http_addr: str,
    node: str,
    shuffle: bool = False,
    script_checks: bool = False,
    tls: ssl.SSLContext | None = None,
) -> int:
    """`confpy dev-consul`: serve until SIGTERM/SIGINT or PUT /v1/agent/leave, then exit 0."""
    try:
        host, port = split_host_port(http_addr)
    except ValueError as exc:
        raise ConfigError(f"--http-addr: {exc}") from None
    try:
        server = DevConsulServer(host, port, node, shuffle, script_checks, tls)
    except OSError as exc:
        raise ConfigError(f"--http-addr {http_addr}: cannot listen: {exc.strerror!s}") from None
    stop = server.left
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
