"""The opt-in status endpoint on the daemon's own event loop: the status page (/, /events),
/health, /status (JSON), /metrics.

It reads one immutable `StatusSnapshot` (snapshot.py) that the daemon replaces as things happen,
so a request never sees a half-updated state and nothing is shared across threads.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncGenerator, Callable

from prometheus_client import CONTENT_TYPE_LATEST

from confpy import __version__
from confpy.config import StatusConfig, is_loopback_listen, split_host_port
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

    def __init__(self, listen: str | StatusConfig, snapshot: Callable[[], StatusSnapshot], metrics: Metrics) -> None:
        config = listen if isinstance(listen, StatusConfig) else StatusConfig(listen=listen)
        self.listen = config.listen
        self.snapshot = snapshot
        self.metrics = metrics
        self.max_subscribers = config.max_subscribers
        self.subscribers = 0
        self.loopback = is_loopback_listen(self.listen)
        self.exposure = (
            ""
            if self.loopback
            else f"the status listener {self.listen} is reachable beyond this host: anyone who reaches it reads "
            "every service, member and error confpy knows; bind [status] listen to 127.0.0.1 or ::1"
        )
        self.page = StatusPage(__version__, warning=self.exposure)
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
        self._server = HTTPServer(
            routes,
            self._not_found,
            f"confpy/{__version__}",
            max_connections=config.max_connections,
            allowed_hosts=self._host_allowed if self.loopback else None,
        )

    def _host_allowed(self, host: str) -> bool:
        """On loopback, only this host's own names: a browser sent here by a rebound DNS name sends
        that name, and is refused (it must not read /status from a page on another site)."""
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        if name in ("localhost", split_host_port(self.listen)[0].strip("[]").lower()) or name.endswith(".localhost"):
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        try:
            await self._server.start(host, port)
        except OSError as exc:
            raise ConfigError(f"[status] listen = {self.listen!r}: cannot listen: {exc.strerror}") from None
        log.info("status page on http://%s/ (and /health, /status, /metrics)", self.listen)
        if self.exposure:
            log.warning("%s", self.exposure)

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
        if self.subscribers >= self.max_subscribers:
            return Reply(
                503,
                f"busy: {self.max_subscribers} status pages are open already ([status] max_subscribers)\n".encode(),
                headers={"Retry-After": "30", **SECURITY_HEADERS},
            )
        return Reply(
            content_type="text/event-stream",
            headers={"Cache-Control": "no-store", **SECURITY_HEADERS},
            stream=self._event_stream(request.gone),
        )

    async def _event_stream(self, gone: Callable[[], bool] = lambda: False) -> AsyncGenerator[bytes, None]:
        # Counted from here (the answer's head is sent) until the stream ends, however it ends.
        self.subscribers += 1
        try:
            last, quiet = "", 0.0
            while not self.closing.is_set() and not gone():
                # One fingerprint per snapshot, shared by every subscriber: cached on the value.
                fingerprint = self.snapshot().fingerprint
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
        finally:
            self.subscribers -= 1

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
