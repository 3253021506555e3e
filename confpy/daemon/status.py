"""The opt-in status endpoint on the daemon's own event loop: /health, /status (JSON), /metrics.

It reads one immutable `StatusSnapshot` that the daemon replaces as things happen, so a request
never sees a half-updated state and nothing is shared across threads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from confpy.apply.live import LiveStatus
from confpy.config import split_host_port
from confpy.daemon.metrics import Metrics
from confpy.errors import ConfigError
from confpy.model import HealthView

log = logging.getLogger(__name__)


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

    def to_json(self) -> dict[str, Any]:
        return {
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
            },
            "last_sync_ok": self.last_sync_ok,
            "last_sync_error": "" if self.last_sync_ok else self.last_sync_error,
            "pending": list(self.pending),
            "not_reloaded": self.not_reloaded,
            "cycles": self.cycles,
            "templates": [t.to_json() for t in self.templates],
            "services": {
                label: {
                    "instances": [
                        {"id": i.id, "address": i.address, "port": i.port, "weight": i.weight} for i in view.instances
                    ],
                    "rejected": [str(r) for r in view.rejected],
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
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, shutdown_timeout=0.2)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"[status] listen = {self.listen!r}: cannot listen: {exc.strerror}") from None
        log.info("status endpoint on http://%s (/health, /status, /metrics)", self.listen)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        ok, reason = self.snapshot().health()
        return web.Response(status=200 if ok else 503, text=reason + "\n", content_type="text/plain", charset="utf-8")

    async def _status(self, request: web.Request) -> web.Response:
        body = json.dumps(self.snapshot().to_json(), indent=2, sort_keys=True)
        return web.Response(text=body, content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render_text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="not found: try /health, /status or /metrics\n", content_type="text/plain")
