"""A small HTTP/1.1 client on asyncio streams, framed by h11: kept-alive connections, no threads.

Why not aiohttp (0.2 used it): confpy's watches are a thousand idle long polls to one host. Each
aiohttp connection cost ~19 KB (its protocol, parser, payload stream, timers) against ~8 KB for a
bare asyncio stream, and importing aiohttp cost 12 MB and 0.2 s (it loads the system CA store
twice at import). h11 does the HTTP framing (Content-Length, chunked, keep-alive rules) and nothing
else; this module adds the sockets, the pool and the timeouts.

Every failure to get a complete answer is a `TransportError` saying what happened (refused, name
not resolved, TLS, closed); timeouts are the caller's `asyncio.timeout` and surface as TimeoutError.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from urllib.parse import quote, urlencode, urlsplit

import h11

_READ_SIZE = 65536
_ERRNO = re.compile(r"\[Errno (\d+)\]")


class TransportError(Exception):
    """No complete answer: `kind` is "dns", "connect", "tls", "closed", "protocol" or "too_large"."""

    def __init__(self, kind: str, reason: str, host: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.host = host


class Headers(Mapping[str, str]):
    """A response's headers, looked up without regard to case (a repeated header: its last value)."""

    def __init__(self, raw: Sequence[tuple[bytes, bytes]]) -> None:
        self._items = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw}

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Response:
    status: int
    headers: Headers
    body: bytes


def _connect_reason(exc: OSError) -> str:
    """An OSError from connect(), as a few words ("connection refused")."""
    if exc.errno:
        return os.strerror(exc.errno).lower()
    # asyncio tried several addresses (localhost: ::1 and 127.0.0.1) and lists every failure.
    numbers = set(_ERRNO.findall(str(exc)))
    if len(numbers) == 1:
        return os.strerror(int(numbers.pop())).lower()
    return str(exc) or type(exc).__name__


@contextmanager
def _wire_errors(host: str) -> Iterator[None]:
    """Failures while talking on an open connection, as TransportErrors."""
    try:
        yield
    except ssl.SSLError as exc:
        raise TransportError("tls", str(exc), host) from None
    except h11.RemoteProtocolError as exc:
        raise TransportError("protocol", f"not a valid HTTP answer: {exc}", host) from None
    except (ConnectionError, OSError) as exc:
        raise TransportError("closed", f"the connection failed: {exc or type(exc).__name__}", host) from None


class _Connection:
    """One socket and its h11 state machine."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False
        self.received = 0  # bytes of the current answer so far

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof() and self.h11.our_state is h11.IDLE

    def abort(self) -> None:
        self.writer.transport.abort()

    async def send(self, events: Sequence[h11.Event]) -> None:
        for event in events:
            data = self.h11.send(event)
            if data:
                self.writer.write(data)
        await self.writer.drain()

    async def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(_READ_SIZE)
            self.received += len(data)
            self.h11.receive_data(data)


class HTTPClient:
    """Requests to one server (`base_url`, or a Unix socket), over a pool of kept-alive connections."""

    def __init__(
        self,
        base_url: str,
        *,
        unix_path: str | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        connect_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme or "http"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        self.authority = parts.netloc or self.host
        self.unix_path = unix_path
        self.tls = tls if self.scheme == "https" else None
        if self.scheme == "https" and self.tls is None:
            self.tls = ssl.create_default_context()
        self.server_hostname = server_hostname or None
        self.connect_timeout = connect_timeout
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.unix_path:
                    reader, writer = await asyncio.open_unix_connection(self.unix_path, limit=_READ_SIZE)
                else:
                    reader, writer = await asyncio.open_connection(
                        self.host,
                        self.port,
                        ssl=self.tls,
                        server_hostname=(self.server_hostname or self.host) if self.tls else None,
                        limit=_READ_SIZE,
                    )
        except socket.gaierror as exc:
            raise TransportError("dns", exc.strerror or str(exc) or "name resolution failed", self.host) from None
        except ssl.SSLError as exc:
            raise TransportError("tls", str(exc), self.host) from None
        except OSError as exc:
            raise TransportError("connect", _connect_reason(exc), self.host) from None
        if not self.unix_path:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def _take(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                conn.reused = True
                return conn
            conn.abort()
        return await self._connect()

    def _request(
        self,
        method: str,
        target: str,
        params: Sequence[tuple[str, str]],
        headers: Mapping[str, str] | None,
        body: bytes,
    ) -> list[h11.Event]:
        if params:
            target += ("&" if "?" in target else "?") + urlencode(list(params), quote_via=quote)
        fields = [(b"Host", self.authority.encode("latin-1")), *self.headers]
        fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        if body or method not in ("GET", "HEAD"):
            fields.append((b"Content-Length", str(len(body)).encode()))
        events: list[h11.Event] = [h11.Request(method=method, target=target, headers=fields)]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        return events

    async def request(
        self,
        method: str,
        target: str,
        *,
        params: Sequence[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        max_body: int | None = None,
    ) -> Response:
        """One request and its whole answer (bounded by `max_body` bytes when given).

        A kept-alive connection the server closed while idle is noticed on use; a GET on it is
        sent again once on a new connection, as browsers and aiohttp do.
        """
        events = self._request(method, target, params, headers, body)
        while True:
            conn = await self._take()
            try:
                response = await self._exchange(conn, events, max_body)
            except TransportError as exc:
                conn.abort()
                if exc.kind == "closed" and conn.reused and method in ("GET", "HEAD"):
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled or failed mid-exchange: the connection's state is unknown
                raise
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                conn.received = 0
                self._idle.append(conn)
            else:
                conn.abort()
            return response

    async def _exchange(self, conn: _Connection, events: Sequence[h11.Event], max_body: int | None) -> Response:
        with _wire_errors(self.host):
            await conn.send(events)
            head = await self._head(conn)
            chunks: list[bytes] = []
            size = 0
            while True:
                event = await conn.next_event()
                if isinstance(event, h11.Data):
                    size += len(event.data)
                    if max_body is not None and size > max_body:
                        raise TransportError("too_large", f"the answer is larger than {max_body} bytes", self.host)
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return Response(head.status_code, Headers(head.headers), b"".join(chunks))
                elif isinstance(event, h11.ConnectionClosed):
                    raise TransportError("closed", "the server closed the connection mid-answer", self.host)

    async def _head(self, conn: _Connection) -> h11.Response:
        while True:
            try:
                event = await conn.next_event()
            except h11.RemoteProtocolError:
                if not conn.received:  # closed before a single byte of the answer
                    raise TransportError("closed", "the server closed the connection", self.host) from None
                raise
            if isinstance(event, h11.Response):
                return event
            if isinstance(event, h11.ConnectionClosed):
                raise TransportError("closed", "the server closed the connection", self.host)
            # an InformationalResponse (100 Continue): the real one follows

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        target: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> AsyncIterator[StreamedResponse]:
        """A request whose answer is read as it arrives (a watch): on its own connection, closed after."""
        conn = await self._connect()
        try:
            with _wire_errors(self.host):
                await conn.send(self._request(method, target, (), headers, body))
                head = await self._head(conn)
            yield StreamedResponse(head.status_code, Headers(head.headers), conn, self.host)
        finally:
            conn.abort()


class StreamedResponse:
    """An answer whose body is read piece by piece."""

    def __init__(self, status: int, headers: Headers, conn: _Connection, host: str) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._host = host

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ends with the answer."""
        with _wire_errors(self._host):
            while True:
                event = await self._conn.next_event()
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return

    async def lines(self) -> AsyncIterator[bytes]:
        """The body split at newlines (a stream of JSON documents, one per line)."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield line
        if pending:
            yield pending
