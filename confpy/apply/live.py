"""Live mode: members go to nginx through confpy's Lua admin API instead of a reload.

The rendered file names the upstreams; their members are written to a state file (atomically,
before every push, so a restarted nginx starts from them) and pushed to the admin API on
`[nginx] live_listen`. Only a change to the set of upstreams, or to the template, changes the
rendered bytes and so needs a reload.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import confpy
from confpy.apply.files import StateStore, atomic_write, read_bytes
from confpy.config import Config, split_host_port
from confpy.errors import ConfpyError
from confpy.render.environment import RenderResult
from confpy.render.values import ServiceInstance

log = logging.getLogger(__name__)

ADMIN_TIMEOUT = 5.0


class LivePushError(ConfpyError):
    """The admin API could not be reached or refused the members."""


def lua_dir() -> Path:
    """Where confpy's Lua module is installed (a template variable for lua_package_path)."""
    return Path(confpy.__file__).resolve().parent / "lua"


def resolve_ip(address: str) -> str:
    """The balancer needs an IP: resolve a host name (validated as resolvable when fetched)."""
    if ":" in address or address.replace(".", "").isdigit():
        return address
    try:
        return str(socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError):
        return address


@dataclass(frozen=True)
class LiveUpstream:
    """The members of one upstream, as pushed, and their version (a digest of the members)."""

    version: str
    members: tuple[tuple[str, int, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "members": [{"host": h, "port": p, "weight": w} for h, p, w in self.members]}


def live_upstream(instances: Sequence[ServiceInstance]) -> LiveUpstream:
    members = tuple(sorted({(resolve_ip(i.address), i.port, i.weight) for i in instances}))
    digest = hashlib.sha256(json.dumps(members).encode()).hexdigest()[:16]
    return LiveUpstream(digest, members)


class LiveAdmin:
    """A client for the Lua admin API (loopback HTTP, short timeouts)."""

    def __init__(self, listen: str) -> None:
        host, port = split_host_port(listen)
        self.host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        self.port = port
        self.listen = listen

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=ADMIN_TIMEOUT)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except OSError as exc:
            raise LivePushError(f"live admin API at {self.listen} is unreachable ({exc}); is the live template included in nginx?") from None
        finally:
            conn.close()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, {"error": text[:200]}

    def upstreams(self) -> dict[str, Any]:
        """GET /upstreams: every upstream nginx defines, with its version and members."""
        status, data = self._request("GET", "/upstreams")
        if status != 200 or not isinstance(data, dict):
            raise LivePushError(f"live admin API at {self.listen} answered GET /upstreams with {status}: {data}")
        return data

    def versions(self) -> dict[str, str | None]:
        """Each upstream nginx defines, with the version it serves."""
        return {name: (entry.get("version") if isinstance(entry, dict) else None) for name, entry in self.upstreams().items()}

    def put(self, name: str, upstream: LiveUpstream) -> None:
        """PUT /upstreams/NAME with the whole member list."""
        status, data = self._request("PUT", f"/upstreams/{name}", upstream.to_json())
        if status != 200:
            error = data.get("error") if isinstance(data, dict) else data
            raise LivePushError(f"live admin API refused the members of {name!r} ({status}): {error}")


class LiveSync:
    """Writes the live state files and pushes member changes to nginx."""

    def __init__(self, config: Config, state: StateStore) -> None:
        self.config = config
        self.state = state
        self.admin = LiveAdmin(config.nginx.live_listen)
        # What nginx is known to serve; None after a failure or when nginx may have restarted.
        self.known: dict[str, str | None] | None = None

    def state_path(self, destination: Path) -> Path:
        return self.state.live_path_for(destination)

    def desired(self, results: Sequence[RenderResult]) -> dict[str, LiveUpstream]:
        """The members every live upstream should have (upstreams with none keep what nginx has)."""
        wanted: dict[str, LiveUpstream] = {}
        for result in results:
            for name, instances in result.live.items():
                if instances:
                    wanted[name] = live_upstream(instances)
                else:
                    log.warning("%s: upstream %s has no member to push; nginx keeps its current members", result.template.destination, name)
        return wanted

    def state_bytes(self, result: RenderResult) -> bytes:
        upstreams = {name: live_upstream(instances).to_json() for name, instances in sorted(result.live.items()) if instances}
        return (json.dumps({"version": 1, "upstreams": upstreams}, sort_keys=True, separators=(",", ":")) + "\n").encode()

    def save(self, results: Sequence[RenderResult]) -> None:
        """Write each live template's state file (atomically) when its members changed."""
        for result in results:
            if not result.live:
                continue
            path = self.state_path(result.template.destination)
            data = self.state_bytes(result)
            if read_bytes(path) != data:
                atomic_write(path, data, 0o644)

    def forget(self) -> None:
        """nginx reloaded or restarted: ask it what it serves before the next push."""
        self.known = None

    def push(self, wanted: Mapping[str, LiveUpstream]) -> list[str]:
        """Push every upstream whose version in nginx differs; return the names pushed."""
        if not wanted:
            return []
        if self.known is None or any(name not in self.known for name in wanted):
            self.known = self.admin.versions()
        current = self.known
        pushed = []
        try:
            for name, upstream in sorted(wanted.items()):
                if name not in current:
                    continue  # not in nginx's configuration yet: it arrives with the reload, members from the state file
                if current[name] != upstream.version:
                    self.admin.put(name, upstream)
                    current[name] = upstream.version
                    pushed.append(name)
                    log.info("pushed %d members to upstream %s (version %s) without a reload", len(upstream.members), name, upstream.version)
        except LivePushError:
            self.known = None
            raise
        return pushed
