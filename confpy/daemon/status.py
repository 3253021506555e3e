"""The opt-in status endpoint on the daemon's own event loop: the status page (/, /events),
/health, /status (JSON), /metrics.

It reads one immutable `StatusSnapshot` (snapshot.py) that the daemon replaces as things happen,
so a request never sees a half-updated state and nothing is shared across threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncGenerator, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from confpy import __version__
from confpy.config import split_host_port
from confpy.daemon.metrics import Metrics
from confpy.daemon.page import CSP, SCRIPT, STYLE, StatusPage
from confpy.daemon.snapshot import StatusSnapshot
from confpy.errors import ConfigError
from confpy.wire.server import Handler, HTTPServer, Reply, Request

log = logging.getLogger(__name__)

EVENTS_POLL = 0.25  # how often an open page's event stream looks for a change
EVENTS_KEEPALIVE = 15.0
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class StatusServer:
    """Serves the daemon's snapshot and metrics on `[status] listen`, on the running loop."""

    def __init__(self, listen: str, snapshot: Callable[[], StatusSnapshot], metrics: Metrics) -> None:
        self.listen = listen
        self.snapshot = snapshot
        self.metrics = metrics
        self.page = StatusPage(__version__)
        self.closing = asyncio.Event()
        routes: dict[str, Handler] = {
            "/": self._page,
            "/events": self._events,
            "/static/status.js": self._script,
            "/static/status.css": self._style,
            "/health": self._health,
            "/status": self._status,
            "/metrics": self._metrics,
        }
        self._server = HTTPServer(routes, self._not_found, f"confpy/{__version__}")

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            await self._server.start(host, port)
        except OSError as exc:
            raise ConfigError(f"[status] listen = {self.listen!r}: cannot listen: {exc.strerror}") from None
        log.info("status page on http://%s/ (and /health, /status, /metrics)", self.listen)

    async def stop(self) -> None:
        self.closing.set()  # event streams end within one poll, so the server stops at once
        await self._server.stop()

    async def _page(self, request: Request) -> Reply:
        return Reply(
            body=self.page.render(self.snapshot()).encode(),
            content_type="text/html; charset=utf-8",
            headers={**SECURITY_HEADERS, "Content-Security-Policy": CSP},
        )

    async def _events(self, request: Request) -> Reply:
        """Server-Sent Events: `data: <fingerprint>` whenever what the page shows changed."""
        return Reply(
            content_type="text/event-stream",
            headers={"Cache-Control": "no-store", **SECURITY_HEADERS},
            stream=self._event_stream(),
        )

    async def _event_stream(self) -> AsyncGenerator[bytes, None]:
        last, quiet = "", 0.0
        while not self.closing.is_set():
            fingerprint = hashlib.sha256(json.dumps(self.snapshot().to_json(), sort_keys=True).encode()).hexdigest()[
                :16
            ]
            if fingerprint != last:
                yield f"data: {fingerprint}\n\n".encode()
                last, quiet = fingerprint, 0.0
            elif quiet >= EVENTS_KEEPALIVE:
                yield b": still here\n\n"  # proxies drop silent connections
                quiet = 0.0
            try:
                await asyncio.wait_for(self.closing.wait(), EVENTS_POLL)
            except TimeoutError:
                quiet += EVENTS_POLL

    async def _script(self, request: Request) -> Reply:
        return Reply(body=SCRIPT.encode(), content_type="text/javascript; charset=utf-8", headers=SECURITY_HEADERS)

    async def _style(self, request: Request) -> Reply:
        return Reply(body=STYLE.encode(), content_type="text/css; charset=utf-8", headers=SECURITY_HEADERS)

    async def _health(self, request: Request) -> Reply:
        ok, reason = self.snapshot().health()
        return Reply(200 if ok else 503, (reason + "\n").encode())

    async def _status(self, request: Request) -> Reply:
        body = json.dumps(self.snapshot().to_json(), indent=2, sort_keys=True)
        return Reply(body=body.encode(), content_type="application/json; charset=utf-8")

    async def _metrics(self, request: Request) -> Reply:
        return Reply(body=self.metrics.render_text(), content_type=CONTENT_TYPE_LATEST)

    async def _not_found(self, request: Request) -> Reply:
        return Reply(404, b"not found: try /, /health, /status or /metrics\n")
