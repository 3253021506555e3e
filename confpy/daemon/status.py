"""The opt-in status endpoint on the daemon's own event loop: the status page (/, /events),
/health, /status (JSON), /metrics.

It reads one immutable `StatusSnapshot` that the daemon replaces as things happen, so a request
never sees a half-updated state and nothing is shared across threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from confpy import __version__
from confpy.apply.live import LiveStatus
from confpy.config import split_host_port
from confpy.daemon.metrics import Metrics
from confpy.daemon.page import CSP, SCRIPT, STYLE, StatusPage
from confpy.daemon.timeline import TimelineEvent
from confpy.errors import ConfigError
from confpy.model import HealthView, ServiceInstance
from confpy.wire.server import Handler, HTTPServer, Reply, Request

log = logging.getLogger(__name__)

EVENTS_POLL = 0.25  # how often an open page's event stream looks for a change
EVENTS_KEEPALIVE = 15.0
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _timestamp(value: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value)) if value else None


@dataclass(frozen=True)
class TemplateStatus:
    """One template, as /status shows it."""

    source: str
    destination: str
    checksum: str
    last_render: float | None
    last_reload: float | None
    last_error: str
    dependencies: tuple[str, ...]
    kept: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "kept": list(self.kept),
            "source": self.source,
            "destination": self.destination,
            "checksum": self.checksum,
            "last_render": _timestamp(self.last_render),
            "last_reload": _timestamp(self.last_reload),
            "last_error": self.last_error,
            "dependencies": list(self.dependencies),
        }


@dataclass(frozen=True)
class StatusSnapshot:
    """What the daemon knows at one moment; the values it refers to are immutable."""

    registry_address: str
    registry_reachable: bool
    registry_error: str
    waiting_for_first_answer: bool
    last_sync_ok: bool
    last_sync_error: str
    templates: tuple[TemplateStatus, ...] = ()
    services: Mapping[str, HealthView] = field(default_factory=dict)
    mode: str = "reload"
    live: LiveStatus | None = None
    pending: tuple[str, ...] = ()
    cycles: int = 0
    not_reloaded: str = ""
    timeline: tuple[TimelineEvent, ...] = ()
    pid_file: str = ""
    registry_down_since: float | None = None
    kept_members: Mapping[str, tuple[ServiceInstance, ...]] = field(default_factory=dict)

    def state(self) -> tuple[str, str]:
        """The page's header: ("ok" | "degraded" | "failing", why). Failing: nginx refused the last
        sync's files (or it failed otherwise); degraded: nginx still serves good files but something
        needs attention (Consul unreachable, a reload skipped, live pushes failing, still starting)."""
        ok, reason = self.health()
        if ok:
            return "ok", "all is well: nginx serves what Consul says"
        if not self.last_sync_ok and self.registry_reachable and not self.waiting_for_first_answer:
            return "failing", reason
        return "degraded", reason

    def health(self) -> tuple[bool, str]:
        """/health: OK when the last sync succeeded and the registry is reachable."""
        if not self.registry_reachable:
            return False, f"Consul unreachable: {self.registry_error}"
        if self.waiting_for_first_answer:
            return False, "starting: waiting for Consul's first answer"
        if not self.last_sync_ok:
            return False, f"last sync failed: {self.last_sync_error}"
        if self.not_reloaded:
            return False, f"files installed but nginx not reloaded: {self.not_reloaded}"
        if self.live is not None and self.live.last_error:
            return False, f"live push failing: {self.live.last_error}"
        return True, "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "consul": {
                "address": self.registry_address,
                "reachable": self.registry_reachable,
                "last_error": self.registry_error,
                "down_since": _timestamp(self.registry_down_since),
            },
            "last_sync_ok": self.last_sync_ok,
            "last_sync_error": "" if self.last_sync_ok else self.last_sync_error,
            "pending": list(self.pending),
            "not_reloaded": self.not_reloaded,
            "cycles": self.cycles,
            "templates": [t.to_json() for t in self.templates],
            "timeline": [event.to_json() for event in self.timeline],
            "services": {
                label: {
                    "instances": [
                        {"id": i.id, "address": i.address, "port": i.port, "weight": i.weight} for i in view.instances
                    ],
                    "rejected": [str(r) for r in view.rejected],
                    "not_passing": [m.to_json() for m in view.unhealthy],
                }
                for label, view in sorted(self.services.items())
            },
            "live": {
                "mode": self.mode,
                "last_error": self.live.last_error if self.live else "",
                "upstreams": {name: up.to_json() for name, up in self.live.upstreams.items()} if self.live else {},
                "unavailable": {name: dict(members) for name, members in self.live.unavailable.items()}
                if self.live
                else {},
                "drift": {name: _timestamp(when) for name, when in self.live.drift.items()} if self.live else {},
            },
        }


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
