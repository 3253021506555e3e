"""The opt-in status endpoint: GET /health, /status (JSON) and /metrics (Prometheus)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from confpy.config import split_host_port
from confpy.errors import ConfigError
from confpy.metrics import Metrics

log = logging.getLogger(__name__)

HealthFn = Callable[[], tuple[bool, str]]
StatusFn = Callable[[], dict[str, Any]]


class _Handler(BaseHTTPRequestHandler):
    server: StatusServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("status: %s", format % args)

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            ok, reason = self.server.health()
            self._send(200 if ok else 503, (reason + "\n").encode(), "text/plain; charset=utf-8")
        elif path == "/status":
            self._send(200, json.dumps(self.server.status(), indent=2, sort_keys=True).encode(), "application/json")
        elif path == "/metrics":
            self._send(200, self.server.metrics.render_text(), CONTENT_TYPE_LATEST)
        else:
            self._send(404, b"not found: try /health, /status or /metrics\n", "text/plain; charset=utf-8")


class StatusServer(ThreadingHTTPServer):
    """Serves the runner's health, status and metrics on `[status] listen`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: str, health: HealthFn, status: StatusFn, metrics: Metrics) -> None:
        host, port = split_host_port(listen)
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.health = health
        self.status = status
        self.metrics = metrics
        try:
            super().__init__((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"[status] listen = {listen!r}: cannot listen: {exc.strerror}") from None
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="status", daemon=True)

    def start(self) -> None:
        self.thread.start()
        log.info("status endpoint on http://%s:%d (/health, /status, /metrics)", *self.server_address[:2])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
