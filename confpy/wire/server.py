"""A small HTTP/1.1 server on asyncio streams, framed by h11: GET/HEAD routes, kept-alive
connections, streamed answers (Server-Sent Events). Enough for the status endpoint, nothing more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import h11

from confpy.wire.client import Headers

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0  # a request's head and body must arrive within this (slow clients are dropped)
KEEPALIVE_TIMEOUT = 75.0  # an idle kept-alive connection is closed after this (nginx's default)
MAX_REQUEST_BYTES = 65536
_READ_SIZE = 65536


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers
    # True once the client closed its end: a long answer (an event stream) ends then, instead of
    # holding its slot until its next write fails.
    gone: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class Reply:
    """A whole answer; `stream`, when given, is sent as it is produced (chunked) instead of `body`."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: AsyncGenerator[bytes, None] | None = None


Handler = Callable[[Request], Awaitable[Reply]]


class HTTPServer:
    """Serves `routes` (exact paths, GET and HEAD); anything else goes to `fallback`."""

    def __init__(
        self,
        routes: Mapping[str, Handler],
        fallback: Handler,
        server_name: str,
        *,
        max_connections: int | None = None,
        allowed_hosts: Callable[[str], bool] | None = None,
    ) -> None:
        self.routes = dict(routes)
        self.fallback = fallback
        self.server_name = server_name.encode()
        # Bounds against a local client: connections past `max_connections` get a 503 and are
        # closed at once; a request whose Host header `allowed_hosts` refuses gets a 421 (a page
        # on another site that made the browser's DNS point its name at this listener).
        self.max_connections = max_connections
        self.allowed_hosts = allowed_hosts
        self.refused = 0
        self._server: asyncio.Server | None = None
        # Every connection's task, and those in the middle of an answer (which stop() lets finish).
        self._open: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}
        self._busy: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen (OSError when the address cannot be bound)."""
        self._server = await asyncio.start_server(self._serve, host or None, port, reuse_address=True)

    async def stop(self, grace: float = 0.5) -> None:
        """Stop listening; idle connections close at once, answers in progress get `grace` seconds
        to end properly (an event stream ends when its producer sees the server closing)."""
        if self._server is not None:
            self._server.close()
        for writer in [w for w in self._open if w not in self._busy]:
            writer.transport.abort()
        busy = [self._open[w] for w in self._busy if w in self._open]
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for writer in list(self._open):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        if self.max_connections is not None and len(self._open) >= self.max_connections:
            self.refused += 1
            # Answered before reading the request (h11 cannot answer one it has not read): a
            # raw response, and the connection closed.
            body = f"busy: {self.max_connections} connections open already; try again later\n".encode()
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Connection: close\r\nRetry-After: 5\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            writer.close()
            return
        self._open[writer] = task
        try:
            while True:
                try:
                    request = await self._next_request(conn, reader, writer)
                except TimeoutError:
                    return
                if request is None:
                    return
                self._busy.add(writer)
                reply = await self._answer(request)
                await self._send(conn, writer, request, reply)
                self._busy.discard(writer)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._send_plain(conn, writer, exc.error_status_hint, f"bad request: {exc}\n")
        except (ConnectionError, OSError):
            pass  # the client went away
        finally:
            self._open.pop(writer, None)
            self._busy.discard(writer)
            writer.close()  # sends what is still buffered, then closes

    async def _next_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Request | None:
        """The next request on this connection (its body read and ignored), or None at its end.

        TimeoutError when the connection idles past KEEPALIVE_TIMEOUT or a started request takes
        longer than REQUEST_TIMEOUT to arrive."""
        head: h11.Request | None = None
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                limit = KEEPALIVE_TIMEOUT if deadline is None else max(0.0, deadline - loop.time())
                data = await asyncio.wait_for(reader.read(_READ_SIZE), limit)
                if deadline is None and data:
                    deadline = loop.time() + REQUEST_TIMEOUT
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                target = head.target.decode("latin-1")
                path, _, query = target.partition("?")
                return Request(
                    head.method.decode("ascii", "replace"),
                    path,
                    query,
                    Headers(head.headers),
                    lambda: reader.at_eof() or writer.transport.is_closing(),
                )
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _answer(self, request: Request) -> Reply:
        host = request.headers.get("host")
        if self.allowed_hosts is not None and host is not None and not self.allowed_hosts(host):
            return Reply(421, f"misdirected request: Host {host[:100]!r} is not this listener\n".encode())
        handler = self.routes.get(request.path)
        if handler is None:
            return await self.fallback(request)
        if request.method not in ("GET", "HEAD"):
            return Reply(405, b"method not allowed: use GET\n", headers={"Allow": "GET, HEAD"})
        try:
            return await handler(request)
        except Exception:
            log.exception("status endpoint: %s %s failed", request.method, request.path)
            return Reply(500, b"internal error; see confpy's log\n")

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request, reply: Reply) -> None:
        headers = [(b"Server", self.server_name), (b"Content-Type", reply.content_type.encode("latin-1"))]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
        if reply.stream is None:
            headers.append((b"Content-Length", str(len(reply.body)).encode()))
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers)) or b"")
        if request.method == "HEAD":
            if reply.stream is not None:
                await reply.stream.aclose()
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return
        if reply.stream is None:
            if reply.body:
                writer.write(conn.send(h11.Data(data=reply.body)) or b"")
        else:
            async for piece in reply.stream:
                writer.write(conn.send(h11.Data(data=piece)) or b"")
                await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    async def _send_plain(self, conn: h11.Connection, writer: asyncio.StreamWriter, status: int, text: str) -> None:
        body = text.encode()
        headers = [
            (b"Server", self.server_name),
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ]
        try:
            writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
        except (h11.LocalProtocolError, ConnectionError, OSError):
            pass
