"""confpy/wire: the client (httptools) and the server (h11) on asyncio streams, against each other and raw sockets."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest

from confpy.dev.lab import free_port
from confpy.wire.client import HTTPClient, TransportError, _Answer
from confpy.wire.server import HTTPServer, Reply, Request

# Client and server talk over loopback TCP: every test here is end-to-end.
pytestmark = [pytest.mark.asyncio, pytest.mark.e2e]


async def _not_found(request: Request) -> Reply:
    return Reply(404, b"not found\n")


async def serving(routes: dict[str, Callable[[Request], Awaitable[Reply]]]) -> tuple[HTTPServer, int]:
    server = HTTPServer(routes, _not_found, "test")
    port = free_port()
    await server.start("127.0.0.1", port)
    return server, port


async def test_kept_alive_connections_are_reused_and_bodies_arrive_whole() -> None:
    peers: list[tuple[str, int]] = []
    big = b"0123456789" * 300_000  # larger than any socket buffer: several writes and reads

    async def echo(request: Request) -> Reply:
        return Reply(body=big if request.query == "big" else request.query.encode(), headers={"X-Index": "7"})

    server, port = await serving({"/echo": echo})
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        first = await client.request("GET", "/echo", params=[("a", "b c"), ("recurse", "")])
        assert (first.status, first.body, first.headers["x-index"], first.headers.get("X-INDEX")) == (
            200,
            b"a=b%20c&recurse=",
            "7",
            "7",
        )
        peers.append(client._idle[0].writer.get_extra_info("sockname"))
        third = await client.request("GET", "/echo?big")
        assert third.body == big
        peers.append(client._idle[0].writer.get_extra_info("sockname"))
        assert peers[0] == peers[1], "the second request did not reuse the kept-alive connection"
        missing = await client.request("POST", "/nowhere", body=b"x")
        assert (missing.status, missing.body) == (404, b"not found\n")
        refused = await client.request("POST", "/echo", body=b"x")
        assert refused.status == 405 and refused.headers["allow"] == "GET, HEAD"
    finally:
        await client.close()
        await server.stop()


async def test_an_answer_over_max_body_is_refused() -> None:
    async def large(request: Request) -> Reply:
        return Reply(body=b"x" * 5000)

    server, port = await serving({"/large": large})
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(TransportError) as caught:
            await client.request("GET", "/large", max_body=4096)
        assert caught.value.kind == "too_large" and "4096" in caught.value.reason
        assert (await client.request("GET", "/large", max_body=5000)).body == b"x" * 5000
    finally:
        await client.close()
        await server.stop()


async def test_a_connection_the_server_closed_while_idle_is_replaced_for_a_get() -> None:
    """A kept-alive connection the server dropped is noticed on use; a GET is sent again once."""
    answers = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answers
        await reader.readuntil(b"\r\n\r\n")
        answers += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if answers == 1:
            await asyncio.sleep(0.05)
            writer.close()  # keep-alive promised, then closed while idle

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        assert (await client.request("GET", "/")).body == b"ok"
        await asyncio.sleep(0.2)
        assert (await client.request("GET", "/")).body == b"ok"
        assert answers == 2
    finally:
        await client.close()
        server.close()


async def test_transport_failures_say_what_happened() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]  # bound, not listening: refused
        client = HTTPClient(f"http://127.0.0.1:{port}")
        with pytest.raises(TransportError) as refused:
            await client.request("GET", "/")
    assert (refused.value.kind, refused.value.reason) == ("connect", "connection refused")

    client = HTTPClient("http://confpy-test.invalid:8500")
    with pytest.raises(TransportError) as unresolved:
        await client.request("GET", "/")
    assert unresolved.value.kind == "dns" and unresolved.value.host == "confpy-test.invalid"

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    client = HTTPClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(TransportError) as bad:
            await client.request("GET", "/")
        assert bad.value.kind == "protocol"
    finally:
        server.close()


async def test_a_cancelled_request_leaves_no_connection_behind() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Reply:
        await release.wait()
        return Reply(body=b"late")

    server, port = await serving({"/slow": slow})
    client = HTTPClient(f"http://127.0.0.1:{port}")
    try:
        task = asyncio.create_task(client.request("GET", "/slow"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client._idle == []  # a half-used connection is never handed out again
        release.set()
        assert (await client.request("GET", "/slow")).body == b"late"
    finally:
        await client.close()
        await server.stop()


async def test_a_streamed_answer_arrives_piece_by_piece_and_ends_when_the_server_stops() -> None:
    closing = asyncio.Event()

    async def lines() -> AsyncGenerator[bytes, None]:
        yield b'{"n": 1}\n{"n"'
        yield b": 2}\n"
        await closing.wait()

    async def events(request: Request) -> Reply:
        return Reply(content_type="text/event-stream", stream=lines())

    server, port = await serving({"/events": events})
    client = HTTPClient(f"http://127.0.0.1:{port}")
    received: list[bytes] = []
    async with client.stream("GET", "/events") as response:
        assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
        async for line in response.lines():
            received.append(line)
            if len(received) == 2:
                closing.set()
                await server.stop()
    assert received == [b'{"n": 1}', b'{"n": 2}']


async def test_the_server_answers_a_malformed_request_with_400_and_closes() -> None:
    async def ok(request: Request) -> Reply:
        return Reply(body=b"ok")

    server, port = await serving({"/": ok})
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and b"bad request" in answer
    finally:
        await server.stop()


class Scripted:
    """A raw server that answers each request it reads with the next of `answers` (bytes, sent as
    they are; None: close without answering) and notes which connection each request came on."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.connections: list[int] = []  # per request, the number of the connection it came on
        self.opened = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        number = self.opened
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                self.connections.append(number)
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> HTTPClient:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.client = HTTPClient(f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}")
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()
        self.server.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_chunked_and_interim_answers_arrive_whole_on_one_connection() -> None:
    scripted = Scripted(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Consul-Index: 9\r\n\r\n"
            b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            OK,
        ]
    )
    async with scripted as client:
        chunked = await client.request("GET", "/a")
        assert (chunked.status, chunked.body, chunked.headers["x-consul-index"]) == (200, b"hello, world", "9")
        created = await client.request("PUT", "/b", body=b"x")
        assert (created.status, created.body) == (201, b"done")
        assert (await client.request("DELETE", "/c")).status == 204
        assert (await client.request("GET", "/d")).body == b"ok"
    assert scripted.connections == [1, 1, 1, 1], "every answer kept the connection for the next request"
    assert scripted.requests[1].startswith(b"PUT /b HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nContent-Length: 1\r\n" in scripted.requests[1]
    assert b"Content-Length" not in scripted.requests[0], "a GET without a body says nothing of one"


async def test_a_read_answer_leaves_no_cycle_for_the_collector() -> None:
    """Each answer goes by reference counting: the daemon reads thousands (a long poll per
    service), and garbage left to the cycle collector piles up between its passes."""
    async with Scripted([OK] * 20) as client:
        gc.collect()
        gc.disable()
        try:
            for _ in range(20):
                assert (await client.request("GET", "/")).body == b"ok"
            answers = [o for o in gc.get_objects() if isinstance(o, _Answer)]
        finally:
            gc.enable()
    assert len(answers) <= 1, f"{len(answers)} answers wait for the cycle collector"


async def test_answers_that_end_the_connection_are_not_reused() -> None:
    scripted = Scripted(
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nfirst",
            b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
            OK + b"HTTP/1.1 200 OK\r\n",  # bytes after the answer that nobody asked for
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfifth",
        ]
    )
    async with scripted as client:
        bodies = [(await client.request("GET", f"/{n}")).body for n in range(4)]
    assert bodies == [b"first", b"second", b"ok", b"fifth"]
    assert scripted.connections == [1, 2, 3, 4]


async def test_a_body_without_a_length_ends_when_the_server_closes() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")
        writer.close()

    server = await asyncio.start_server(until_close, "127.0.0.1", 0)
    client = HTTPClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        assert (await client.request("GET", "/")).body == b"all of it"
        assert client._idle == []
    finally:
        await client.close()
        server.close()


async def test_cut_or_oversized_answers_are_transport_errors() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b" /body " in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly5")
        elif b" /head " in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"x" * 70_000 + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    client = HTTPClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        failures = {}
        for path in ("/body", "/head", "/huge"):
            with pytest.raises(TransportError) as caught:
                await client.request("GET", path)
            failures[path] = (caught.value.kind, caught.value.reason)
        assert failures["/body"] == ("closed", "the server closed the connection mid-answer")
        assert failures["/head"] == ("protocol", "not a valid HTTP answer: the connection closed inside its head")
        assert failures["/huge"] == ("protocol", "not a valid HTTP answer: its head is over 65536 bytes")
    finally:
        await client.close()
        server.close()


async def test_a_head_request_reads_no_body_and_requests_that_would_break_framing_are_refused() -> None:
    scripted = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Consul-Index: 3\r\n\r\n", OK])
    async with scripted as client:
        head = await asyncio.wait_for(client.request("HEAD", "/v1/catalog/services"), 5)
        assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "1234")
        assert (await client.request("GET", "/")).body == b"ok"
        with pytest.raises(ValueError, match="the X-Consul-Token header over HTTP: its value has a line break") as bad:
            await client.request("GET", "/", headers={"X-Consul-Token": "secret\r\nX-Evil: 1"})
        assert "secret" not in str(bad.value)
        for target in ("/v1/kv/a key", "/v1/kv/\u4e00"):
            with pytest.raises(ValueError, match="must be escaped"):
                await client.request("GET", target)
    assert len(scripted.requests) == 2, "nothing was sent for the refused requests"
