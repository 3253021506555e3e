"""A small HTTP/1.1 client on asyncio streams, parsed by httptools: kept-alive connections, no threads.

Why not aiohttp (0.2 used it): confpy's watches are a thousand idle long polls to one host. Each
aiohttp connection cost ~19 KB (its protocol, parser, payload stream, timers) against ~8 KB for a
bare asyncio stream, and importing aiohttp cost 12 MB and 0.2 s (it loads the system CA store
twice at import). httptools (llhttp, Node.js's parser, in C) parses the answers (Content-Length,
chunked, keep-alive rules) and nothing else; this module writes the requests (a request line and
a few headers, checked for characters that would break their framing) and adds the sockets, the
pool and the timeouts. h11 parsed the answers before: in pure Python it cost ~100 us of CPU per
answer more, and every change's answer waits on that parse on its way to nginx.

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

import httptools

_READ_SIZE = 65536
MAX_HEAD_BYTES = 65536  # an answer's status line and headers (Consul's are well under 1 KB)
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
    except TransportError as exc:
        exc.host = exc.host or host
        raise
    except (ConnectionError, OSError) as exc:
        raise TransportError("closed", f"the connection failed: {exc or type(exc).__name__}", host) from None


class _Answer:
    """The answer being received on a connection, as llhttp (through httptools) parses it."""

    __slots__ = (
        "complete",
        "head_bytes",
        "head_done",
        "headers",
        "keep_alive",
        "messages",
        "parser",
        "pieces",
        "size",
        "status",
    )

    def __init__(self) -> None:
        # The parser refers back to this answer: `release` breaks the cycle once the answer is
        # read, so that each answer goes by reference counting, not by the cycle collector.
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # of the header lines so far
        self.pieces: list[bytes] = []
        self.size = 0  # bytes of body so far
        self.head_done = False
        self.complete = False
        self.keep_alive = False  # the server lets the connection carry another request
        self.messages = 0  # messages begun: more than one means bytes nobody asked for

    # httptools' callbacks
    def on_message_begin(self) -> None:
        self.messages += 1

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code() if self.parser is not None else 0
        if not 100 <= self.status < 200:
            self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.size += len(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = []
            self.messages -= 1
            return
        self.complete = True
        # Asked now: llhttp forgets once the next message starts.
        self.keep_alive = self.parser is not None and self.parser.should_keep_alive()

    def framed(self) -> bool:
        """True when the head gave the body's length (Content-Length or chunked), so that a close
        before its end is a failure; otherwise the body is whatever comes until the close."""
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length" or (lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return self.status in (204, 304)

    def release(self) -> None:
        self.parser = None

    def take_body(self) -> bytes:
        body = b"".join(self.pieces)
        self.pieces = []
        return body


class _Connection:
    """One socket and the answer being parsed on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.answer = _Answer()
        self.busy = False  # a request was sent and its whole answer has not been read
        self.reused = False
        self.received = 0  # bytes of the current answer so far
        self.closed = False  # the server closed its side

    def usable(self) -> bool:
        return not self.busy and not self.closed and not self.writer.is_closing() and not self.reader.at_eof()

    def abort(self) -> None:
        self.answer.release()
        self.writer.transport.abort()

    async def send(self, data: bytes) -> None:
        self.busy = True
        self.answer.release()
        self.answer = _Answer()
        self.received = 0
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bool:
        """Read and parse what arrives next; False when the server closed the connection."""
        data = await self.reader.read(_READ_SIZE)
        if not data:
            self.closed = True
            return False
        self.received += len(data)
        parser = self.answer.parser
        if parser is None:  # released: this connection is done with (aborted while a read was due)
            raise TransportError("closed", "the connection was closed")
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.answer.complete:
                raise TransportError("protocol", f"not a valid HTTP answer: {exc}") from None
            self.closed = True  # bytes after the answer that are not one: never reuse this connection
        too_long = self.answer.head_bytes if self.answer.head_done else self.received
        if too_long > MAX_HEAD_BYTES:
            raise TransportError("protocol", f"not a valid HTTP answer: its head is over {MAX_HEAD_BYTES} bytes")
        return True

    def finished(self) -> None:
        """The whole answer is read: the connection may carry the next request (or must close)."""
        self.busy = False
        self.answer.release()
        if self.answer.messages > 1 or not self.answer.keep_alive:
            self.closed = True


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
    ) -> bytes:
        """The request's bytes: request line, headers, body (ValueError for a value that would
        break its framing: a control character or a space where HTTP allows none)."""
        if params:
            target += ("&" if "?" in target else "?") + urlencode(list(params), quote_via=quote)
        fields = [(b"Host", self.authority.encode("latin-1")), *self.headers]
        fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        if body or method not in ("GET", "HEAD"):
            fields.append((b"Content-Length", str(len(body)).encode()))
        head = bytearray(
            b"%s %s HTTP/1.1\r\n" % (_checked(_TOKEN, method.encode("latin-1"), "method"), _target(target))
        )
        for name, value in fields:
            if not _FIELD_VALUE.fullmatch(value):  # the value is not shown: it may be a token
                raise ValueError(
                    f"cannot send the {name.decode('latin-1')} header over HTTP: its value has a line break "
                    "or another control character"
                )
            head += b"%s: %s\r\n" % (_checked(_TOKEN, name, "header name"), value)
        head += b"\r\n"
        return bytes(head) + body

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
        data = self._request(method, target, params, headers, body)
        while True:
            conn = await self._take()
            try:
                response = await self._exchange(conn, data, max_body, head_only=method == "HEAD")
            except TransportError as exc:
                conn.abort()
                if exc.kind == "closed" and conn.reused and method in ("GET", "HEAD"):
                    continue
                raise
            except BaseException:
                conn.abort()  # cancelled or failed mid-exchange: the connection's state is unknown
                raise
            if conn.usable():
                self._idle.append(conn)
            else:
                conn.abort()
            return response

    async def _exchange(self, conn: _Connection, data: bytes, max_body: int | None, head_only: bool) -> Response:
        with _wire_errors(self.host):
            await conn.send(data)
            answer = await self._head(conn)
            if head_only:  # no body follows, whatever Content-Length says; llhttp cannot be told so
                conn.closed = True
                conn.busy = False
                return Response(answer.status, Headers(answer.headers), b"")
            while True:
                if max_body is not None and answer.size > max_body:
                    raise TransportError("too_large", f"the answer is larger than {max_body} bytes", self.host)
                if answer.complete:
                    conn.finished()
                    return Response(answer.status, Headers(answer.headers), answer.take_body())
                if not await conn.receive():
                    if answer.framed():
                        raise TransportError("closed", "the server closed the connection mid-answer", self.host)
                    conn.busy = False  # its body was all it sent before closing
                    return Response(answer.status, Headers(answer.headers), answer.take_body())

    async def _head(self, conn: _Connection) -> _Answer:
        """Read until the final answer's head is in (interim 1xx answers are skipped)."""
        while not conn.answer.head_done:
            if not await conn.receive():
                if not conn.received:  # closed before a single byte of the answer
                    raise TransportError("closed", "the server closed the connection", self.host)
                raise TransportError("protocol", "not a valid HTTP answer: the connection closed inside its head")
        return conn.answer

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
                answer = await self._head(conn)
            yield StreamedResponse(answer.status, Headers(answer.headers), conn, self.host)
        finally:
            conn.abort()


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")  # any byte but control characters (tab is allowed)


def _checked(pattern: re.Pattern[bytes], value: bytes, what: str) -> bytes:
    if not pattern.fullmatch(value):
        raise ValueError(f"cannot send {what} {value!r} over HTTP: it has characters HTTP does not allow there")
    return value


def _target(target: str) -> bytes:
    encoded = target.encode("latin-1", "replace")  # a character beyond Latin-1 becomes "?", refused below
    if not encoded or encoded != target.encode("latin-1", "ignore") or any(b <= 0x20 or b == 0x7F for b in encoded):
        raise ValueError(
            f"cannot request {target!r} over HTTP: a space, control or non-Latin-1 character must be escaped"
        )
    return encoded


class StreamedResponse:
    """An answer whose body is read piece by piece."""

    def __init__(self, status: int, headers: Headers, conn: _Connection, host: str) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._host = host

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ends with the answer (or when the server closes the connection)."""
        with _wire_errors(self._host):
            answer = self._conn.answer
            while True:
                body = answer.take_body()
                if body:
                    yield body
                if answer.complete or not await self._conn.receive():
                    body = answer.take_body()
                    if body:
                        yield body
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
