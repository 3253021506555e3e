"""Live mode's admin API: no one but confpy may move traffic.

Through real nginx with the Lua module: by default the API is a Unix socket in a folder only
root may enter, every request needs the token, changes made behind confpy's back are audited by
nginx, noticed by confpy as drift and undone.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    NginxInstance,
    admin_token,
    free_port,
    lua_available,
    wait_until,
    write_config,
)

from .conftest import ROOT, ConsulUnderTest, http_get, run_confpy

pytestmark = pytest.mark.skipif(
    not lua_available(), reason="nginx's Lua module is not installed (make nginx installs it)"
)

LIVE_TEMPLATE = ROOT / "templates" / "nginx-upstreams-live.conf.j2"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.socket_path)


def admin(
    path: str,
    method: str = "GET",
    token: str | None = None,
    body: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    conn = UnixHTTPConnection(path)
    try:
        headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        conn.request(
            method,
            "/upstreams" if method == "GET" else "/upstreams/web",
            body=json.dumps(body) if body else None,
            headers=headers,
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_default_unix_socket_token_audit_and_drift(consul: ConsulUnderTest, tmp_path: Path) -> None:
    servers = [BackendServer(f"App server {n}").start() for n in (1, 2)]
    nginx = NginxInstance(tmp_path / "nginx", lua=True)
    status_port = free_port()
    config = write_config(
        tmp_path / "c.toml",
        consul.url,
        nginx,
        LIVE_TEMPLATE,
        status=f"127.0.0.1:{status_port}",
        nginx_extra='mode = "live"',
    )  # live_listen left to its default
    runtime = tmp_path / "run"
    env = {"RUNTIME_DIRECTORY": str(runtime)}
    sock = str(runtime / "admin.sock")
    for n, server in enumerate(servers, start=1):
        consul.api.register("web", server.port, id=f"web-{n}")
    bootstrap = run_confpy("-c", str(config), "--once", "--allow-no-reload", env=env)  # nginx is not running yet
    assert bootstrap.returncode == 0, bootstrap.stderr
    assert f"listen unix:{sock};" in nginx.destination.read_text()
    nginx.start()
    proc = ConfpyProcess(config, env=env).start()  # it finds nginx running: its workers are known from the start
    try:
        base = f"http://127.0.0.1:{status_port}"
        assert wait_until(lambda: http_get(base + "/health") == (200, "ok\n"), 15), proc.output()
        assert wait_until(lambda: set(nginx.bodies(4)) == {"App server 1", "App server 2"}, 15), proc.output()
        # The old default address is not served any more.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", 9119), timeout=2).close()
        # The socket: without the token 401, with it 200.
        assert admin(sock)[0] == 401
        assert admin(sock, token="0" * 64)[0] == 401
        token = admin_token(config)
        status, upstreams = admin(sock, token=token)
        assert status == 200 and set(upstreams) == {"web"}
        assert (runtime.stat().st_mode & 0o777) == 0o700 and (
            tmp_path / "confpy-state" / "admin.token"
        ).stat().st_mode & 0o077 == 0
        # Someone with the token moves traffic behind confpy's back: nginx audits it, confpy restores.
        status, _ = admin(sock, "PUT", token, {"members": [{"host": "127.0.0.1", "port": servers[0].port}]})
        assert status == 200
        assert "(not confpy's own push): 1 members" in nginx.error_log.read_text()
        assert wait_until(lambda: "drift: upstream web in nginx has version" in proc.output(), 15), proc.output()
        assert wait_until(lambda: set(nginx.bodies(4)) == {"App server 1", "App server 2"}, 10), proc.output()
        assert 'confpy_live_drift_total{upstream="web"} 1.0' in http_get(base + "/metrics")[1]
        assert "web" in json.loads(http_get(base + "/status")[1])["live"]["drift"]
        audit = [line for line in nginx.error_log.read_text().splitlines() if "not confpy's own push" in line]
        assert len(audit) == 1, audit  # confpy's own pushes are not audited as foreign
        # The same with the header confpy marks its pushes with, and confpy's own version: still in
        # nginx's log, and still drift (the members differ), restored.
        version = admin(sock, token=token)[1]["web"]["version"]
        forged = {"version": version, "members": [{"host": "127.0.0.1", "port": servers[0].port}]}
        assert admin(sock, "PUT", token, forged, headers={"X-Confpy-Push": "1"})[0] == 200
        marked = f"(marked as confpy's push): 1 members, version {version}"
        assert wait_until(lambda: marked in nginx.error_log.read_text(), 5)
        assert wait_until(lambda: "confpy's version" in proc.output() and "other members" in proc.output(), 15)
        assert wait_until(lambda: set(nginx.bodies(4)) == {"App server 1", "App server 2"}, 10), proc.output()
        # `confpy upstream list` reads nginx's members through the same socket and token.
        listing = run_confpy("upstream", "list", "web", "--json", "-c", str(config), env=env)
        assert listing.returncode == 0, listing.stderr
        assert all(i["in_nginx"] for i in json.loads(listing.stdout)[0]["instances"])
        # Another user cannot even reach the socket.
        probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
        other = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", probe, sock],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert other.returncode != 0 and "Permission denied" in other.stderr, other.stderr
    finally:
        proc.stop()
        nginx.stop()
        for server in servers:
            server.stop()


def test_a_non_loopback_admin_address_without_a_token_is_refused(nginx: NginxInstance, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        "http://127.0.0.1:1",
        nginx,
        LIVE_TEMPLATE,
        nginx_extra='mode = "live"\nlive_listen = "192.0.2.10:9119"',
    )
    proc = run_confpy("-c", str(config), "--once")
    assert proc.returncode == 2
    assert "'192.0.2.10:9119' is not a loopback address" in proc.stderr and "live_token_file" in proc.stderr
    token = tmp_path / "token"
    token.write_text("x" * 64)
    os.chmod(token, 0o600)
    insisted = config.read_text().replace(
        'live_listen = "192.0.2.10:9119"',
        f'live_listen = "192.0.2.10:9119"\nlive_token_file = "{token}"\nlive_allow_remote = true',
    )
    config.write_text(insisted)
    from confpy.config import load_config

    assert load_config(config, {}).nginx.live_allow_remote  # the operator insisted: accepted
