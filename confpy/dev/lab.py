"""A loopback lab: dev-consul, nginx under a temporary prefix, backends and confpy, as real processes.

The demo, the tests and the benchmarks all build the same small world with these classes, on
127.0.0.1 only. Every wait here is bounded in time.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

LOOPBACK = "127.0.0.1"
LUA_MODULES_DIR = "/usr/lib/nginx/modules"
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")


def lua_available() -> bool:
    """Debian's Lua module for nginx (libnginx-mod-http-lua) with lua-resty-core and lua-cjson."""
    return (
        all(Path(LUA_MODULES_DIR, name).exists() for name in LUA_MODULES)
        and Path("/usr/share/lua/5.1/ngx/balancer.lua").exists()
        and any(
            Path(p, "cjson.so").exists()
            for p in (
                "/usr/lib/x86_64-linux-gnu/lua/5.1",
                "/usr/lib/aarch64-linux-gnu/lua/5.1",
                "/usr/local/lib/lua/5.1",
            )
        )
    )


class _PortBook:
    """Ports handed out by free_port in this process (never twice)."""

    given: ClassVar[set[int]] = set()
    rng: ClassVar[random.Random] = random.Random()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free now, below the kernel's ephemeral range, not handed out before.

    Below the ephemeral range, because a port chosen now is bound later (nginx starts after its
    configuration is written): meanwhile any outgoing connection, or a server binding port 0,
    could take a port from the ephemeral range.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = _ephemeral_start() - 1
    for _ in range(200):
        port = _PortBook.rng.randint(max(1024, high - 12000), high)
        if port in _PortBook.given:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _PortBook.given.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def nginx_binary() -> str:
    """The nginx executable (Debian puts it in /usr/sbin, outside many users' PATH)."""
    found = shutil.which("nginx") or shutil.which(
        "nginx", path="/usr/sbin:/usr/local/sbin:/usr/local/openresty/nginx/sbin"
    )
    if not found:
        raise FileNotFoundError("nginx is not installed; run `make nginx` (apt-get install nginx-light)")
    return found


def wait_until(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until true or `timeout` passes (for tests and the demo only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@dataclass(frozen=True)
class LabPKI:
    """A CA, a server certificate for 127.0.0.1 and `consul.test`, a client certificate, and a
    second CA that signed neither (for the wrong-CA case); PEM files made with Debian's openssl."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    @classmethod
    def make(cls, folder: Path) -> LabPKI:
        folder.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

        for ca in ("ca", "other-ca"):
            openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=confpy test {ca}",
                    "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
        for name, extension in (
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:consul.test,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                    "-out", f"{name}.csr")  # fmt: skip
            (folder / f"{name}.ext").write_text(extension + "\n")
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip
        return cls(
            folder / "ca.pem",
            folder / "server.pem",
            folder / "server.key",
            folder / "client.pem",
            folder / "client.key",
            folder / "other-ca.pem",
        )


class DevConsulProcess:
    """`confpy dev-consul` as a subprocess on a free port."""

    def __init__(
        self, port: int = 0, shuffle: bool = False, script_checks: bool = False, tls: tuple[str, ...] = ()
    ) -> None:
        self.port = port
        self.shuffle = shuffle
        self.script_checks = script_checks
        self.tls = tls  # dev-consul's TLS flags, e.g. ("--tls-cert", CERT, "--tls-key", KEY)
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> DevConsulProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "confpy",
                "dev-consul",
                "--http-addr",
                f"{LOOPBACK}:{self.port}",
                *(["--shuffle"] if self.shuffle else []),
                *(["--enable-script-checks"] if self.script_checks else []),
                *self.tls,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        ready = threading.Event()
        line: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            line.append(self.proc.stdout.readline())
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or "://" not in line[0]:
            self.stop()
            raise RuntimeError(f"dev-consul did not start: {line!r}")
        self.url = line[0].split(" on ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class ConsulAPI:
    """A few Consul HTTP calls, for tests, the demo and benchmarks.

    Each thread keeps its connection alive between calls, as py-consul's session and Consul's Go
    client do (a benchmark's clock starts before the write: a new connection per write would be
    counted as the registry's time). A connection the agent closed is replaced once.
    """

    def __init__(self, url: str, tls: ssl.SSLContext | None = None) -> None:
        self.url = url.rstrip("/")
        self.tls = tls
        parts = urllib.parse.urlsplit(self.url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._local = threading.local()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.tls is not None or self.url.startswith("https://"):
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self.tls)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        try:
            return self._exchange(method, path, data, timeout)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            if not self._local.reused:
                raise
            return self._exchange(method, path, data, timeout)  # the agent closed it (a restart): anew

    def _exchange(
        self, method: str, path: str, data: bytes | None, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self._connection(timeout)
        self._local.reused = conn.sock is not None  # per thread, as the connection
        try:
            conn.request(method, path, body=data)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            raise
        if response.will_close:
            conn.close()
        return response.status, dict(response.headers), payload

    def register(
        self,
        name: str,
        port: int,
        *,
        id: str | None = None,
        address: str = LOOPBACK,
        tags: Sequence[str] = ("nginx",),
        **extra: Any,
    ) -> None:
        body = {
            "Name": name,
            "ID": id or f"{name}-{port}",
            "Address": address,
            "Port": port,
            "Tags": list(tags),
            **extra,
        }
        code, _, text = self.request("PUT", "/v1/agent/service/register", body)
        if code != 200:
            raise RuntimeError(f"register failed: {code} {text!r}")

    def deregister(self, service_id: str) -> None:
        self.request("PUT", f"/v1/agent/service/deregister/{service_id}")

    def health(self, name: str, query: str = "passing") -> tuple[int, list[dict[str, Any]]]:
        _, headers, body = self.request("GET", f"/v1/health/service/{name}?{query}")
        return int(headers.get("X-Consul-Index", "0")), json.loads(body)


class _BackendHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BackendServer

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = self.server.payload
        self.send_response(self.server.status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        for name, value in self.server.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class BackendServer(ThreadingHTTPServer):
    """A tiny HTTP server giving one answer on every path: an app server ("App server 1"), or,
    with `status`, `headers` and raw bytes, a canned (broken, refusing, oversized) endpoint."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        body: str | bytes,
        port: int = 0,
        host: str = LOOPBACK,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.body = body
        self.payload = body if isinstance(body, bytes) else (body + "\n").encode()
        self.status = status
        self.headers = dict(headers or {})
        super().__init__((host, port), _BackendHandler)
        self.port = int(self.server_address[1])
        self.host = host
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    def start(self) -> BackendServer:
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def static_backends(ports: Sequence[int]) -> str:
    """nginx `server` blocks answering "App server N" on each loopback port (N from 1): backends
    nginx serves itself, for NginxInstance's `extra_http`."""
    return "\n".join(
        f'server {{ listen {LOOPBACK}:{port}; access_log off; location / {{ return 200 "App server {n}\\n"; }} }}'
        for n, port in enumerate(ports, start=1)
    )


class NginxInstance:
    """nginx under a temporary prefix, proxying one loopback port to an upstream."""

    def __init__(
        self,
        prefix: Path,
        upstream: str = "web",
        port: int | None = None,
        extra_http: str = "",
        workers: int = 1,
        lua: bool = False,
        debian: bool = False,
    ) -> None:
        """`debian`: Debian's layout under the prefix: etc/nginx/nginx.conf including
        conf.d/*.conf and sites-enabled/* (symlinks into sites-available), the destination in
        sites-enabled/. Otherwise conf/nginx.conf including conf/conf.d/*.conf."""
        self.prefix = prefix
        self.upstream = upstream
        self.port = port or free_port()
        self.binary = nginx_binary()
        self.debian = debian
        self.conf_root = prefix / ("etc/nginx" if debian else "conf")
        self.conf_d = self.conf_root / "conf.d"
        self.sites_enabled = self.conf_root / "sites-enabled"
        self.pid_file = prefix / "nginx.pid"
        self.error_log = prefix / "logs" / "error.log"
        for folder in (self.conf_d, prefix / "logs", prefix / "temp"):
            folder.mkdir(parents=True, exist_ok=True)
        includes = f"include {self.conf_d}/*.conf;"
        if debian:
            (self.conf_root / "sites-available").mkdir(exist_ok=True)
            self.sites_enabled.mkdir(exist_ok=True)
            (self.conf_root / "sites-available" / "default").write_text("# Debian's default site, disabled here\n")
            (self.sites_enabled / "default").symlink_to(self.conf_root / "sites-available" / "default")
            (self.conf_d / "gzip.conf").write_text("gzip off;\n")
            includes += f"\n    include {self.sites_enabled}/*;"
        modules = "".join(f"load_module {LUA_MODULES_DIR}/{name};\n" for name in LUA_MODULES) if lua else ""
        (self.conf_root / "nginx.conf").write_text(f"""
{modules}worker_processes {workers};
pid {self.pid_file};
error_log {self.error_log} notice;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/temp/body;
    proxy_temp_path {prefix}/temp/proxy;
    {includes}
    {extra_http}
    server {{
        listen {LOOPBACK}:{self.port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout;
        }}
        # /u/NAME/... goes to upstream NAME, found by name at request time (tests of new upstreams)
        location ~ ^/u/(?<up>[A-Za-z0-9_.-]+)/ {{
            proxy_pass http://$up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 1s;
        }}
    }}
}}
""")

    @property
    def destination(self) -> Path:
        return self.sites_enabled / "upstreams" if self.debian else self.conf_d / "upstreams.conf"

    @property
    def check_cmd(self) -> str:
        return f"{self.binary} -t -q -p {self.prefix} -c {self.conf_root}/nginx.conf"

    def start(self) -> NginxInstance:
        subprocess.run(
            [self.binary, "-p", str(self.prefix), "-c", f"{self.conf_root}/nginx.conf"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        if not wait_until(lambda: self.master_pid() is not None and self.workers(), 10):
            raise RuntimeError(f"nginx did not start: {self.error_log.read_text() if self.error_log.exists() else ''}")
        return self

    def master_pid(self) -> int | None:
        try:
            text = self.pid_file.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def workers(self) -> list[int]:
        import psutil

        pid = self.master_pid()
        if pid is None:
            return []
        try:
            return sorted(c.pid for c in psutil.Process(pid).children() if "worker" in " ".join(c.cmdline()))
        except psutil.NoSuchProcess:
            return []

    def reload_count(self) -> int:
        """How many reloads nginx logged ("... reconfiguring")."""
        if not self.error_log.exists():
            return 0
        text = self.error_log.read_text(errors="replace")
        return sum(
            1 for line in text.splitlines() if line.endswith("] reconfiguring") or line.endswith(": reconfiguring")
        )

    def stop(self) -> None:
        import psutil

        pid = self.master_pid()
        if pid is None:
            return
        try:
            if "nginx" not in psutil.Process(pid).name():
                return  # a test wrote another PID into the pid file: never signal it
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, psutil.NoSuchProcess):
            return
        wait_until(lambda: not _alive(pid), 10)

    def restart(self) -> None:
        """Stop nginx completely and start it again (a restart, not a reload)."""
        self.stop()
        self.start()

    def get(self, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace").strip()
        finally:
            conn.close()

    def bodies(self, count: int) -> list[str]:
        """The bodies of `count` sequential requests through the gateway (errors as 'HTTP nnn')."""
        out = []
        for _ in range(count):
            try:
                status, body = self.get()
            except OSError as exc:
                out.append(f"error {exc}")
                continue
            out.append(body if status == 200 else f"HTTP {status}")
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def write_config(
    path: Path,
    consul_url: str,
    nginx: NginxInstance,
    template: Path,
    *,
    extra: str = "",
    wait_min: str = "0s",
    wait_max: str = "1s",
    consul_wait: str = "60s",
    status: str = "",
    nginx_extra: str = "",
    etcd_endpoints: Sequence[str] = (),
) -> Path:
    """A confpy.toml for the lab: Consul at `consul_url`, or etcd at `etcd_endpoints` when given."""
    status_table = f'\n[status]\nlisten = "{status}"\n' if status else ""
    registry = (
        f'[etcd]\nendpoints = {json.dumps(list(etcd_endpoints))}\nwait = "{consul_wait}"\nmax_backoff = "1s"\ntimeout = "2s"\n'
        if etcd_endpoints
        else f'[consul]\naddress = "{consul_url}"\nwait = "{consul_wait}"\nmax_backoff = "2s"\ntimeout = "2s"\n'
    )
    path.write_text(f"""
{registry}
[nginx]
pid_file = "{nginx.pid_file}"
check_cmd = "{nginx.check_cmd}"
check_timeout = "10s"
{nginx_extra}

[wait]
min = "{wait_min}"
max = "{wait_max}"
{status_table}
[state]
dir = "{path.parent / "confpy-state"}"

[[template]]
source = "{template}"
destination = "{nginx.destination}"
{extra}
""")
    return path


class ConfpyProcess:
    """The confpy daemon (or any confpy command) as a subprocess."""

    def __init__(
        self, config: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None, log: Path | None = None
    ) -> None:
        self.config = config
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log = log or config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ConfpyProcess:
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "confpy", "-c", str(self.config), *self.args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()
        return self.proc.returncode


def admin_token(config: Path) -> str:
    """The live admin API's token confpy created for a lab configuration (its state folder)."""
    return (config.parent / "confpy-state" / "admin.token").read_text().strip()


class EtcdMember:
    """One etcd process of a loopback cluster."""

    def __init__(
        self, name: str, folder: Path, client_port: int, peer_port: int, cluster: str, tls: LabPKI | None = None
    ) -> None:
        self.name = name
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://{LOOPBACK}:{client_port}"
        self.peer = f"http://{LOOPBACK}:{peer_port}"
        self.folder = folder
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EtcdMember:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "etcd.log").open("ab")
        self.proc = subprocess.Popen(
            [
                shutil.which("etcd") or "/usr/bin/etcd",
                "--name", self.name,
                "--data-dir", str(self.folder / "data"),
                "--listen-client-urls", self.url,
                "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer,
                "--initial-advertise-peer-urls", self.peer,
                "--initial-cluster", self.cluster,
                "--initial-cluster-token", "confpy-lab",
                "--initial-cluster-state", "new",
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
                *(
                    ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
                    if self.tls else []
                ),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EtcdCluster:
    """A real etcd cluster (Debian's etcd-server) on loopback ports, data under `folder`."""

    def __init__(self, folder: Path, size: int = 3, tls: LabPKI | None = None) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        cluster = ",".join(f"m{n}=http://{LOOPBACK}:{peer}" for n, (_, peer) in enumerate(ports, start=1))
        self.members = [
            EtcdMember(f"m{n}", folder / f"m{n}", client, peer, cluster, tls)
            for n, (client, peer) in enumerate(ports, start=1)
        ]
        self.tls = tls
        self.api = EtcdAPI([m.url for m in self.members], tls)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for member in self.members:
            member.start()
        if not wait_until(self.healthy, timeout, interval=0.1):
            self.stop()
            raise RuntimeError("the etcd cluster did not become healthy")
        return self

    def healthy(self) -> bool:
        return self.leader() is not None

    def leader(self) -> EtcdMember | None:
        for member in self.members:
            if not member.running:
                continue
            try:
                status = EtcdAPI([member.url], self.tls).call("/v3/maintenance/status", {})
            except OSError:
                continue
            if status.get("leader") and status.get("leader") == status.get("header", {}).get("member_id"):
                return member
        return None

    def stop(self) -> None:
        for member in self.members:
            member.kill()


class EtcdAPI:
    """etcd's JSON gateway over urllib, for tests and the demo: put (with leases), delete, compact."""

    def __init__(self, endpoints: Sequence[str], tls: LabPKI | None = None) -> None:
        self.endpoints = list(endpoints)
        self.context: ssl.SSLContext | None = None
        self.token = ""
        if tls is not None:
            self.context = ssl.create_default_context(cafile=str(tls.ca))
            self.context.load_cert_chain(str(tls.client_cert), str(tls.client_key))

    def call(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        last: OSError | None = None
        for endpoint in self.endpoints:
            request = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(), method="POST")  # noqa: S310
            if self.token:
                request.add_header("Authorization", self.token)
            try:
                with urllib.request.urlopen(request, timeout=5, context=self.context) as response:  # noqa: S310
                    return dict(json.loads(response.read() or b"{}"))
            except OSError as exc:
                last = exc
        raise last or OSError("no endpoint")

    @staticmethod
    def _b64(text: str) -> str:
        import base64

        return base64.b64encode(text.encode()).decode()

    def put(self, key: str, value: str, lease: str = "") -> int:
        body = {"key": self._b64(key), "value": self._b64(value), **({"lease": lease} if lease else {})}
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> None:
        self.call("/v3/kv/deleterange", {"key": self._b64(key)})

    def grant(self, ttl: int) -> str:
        return str(self.call("/v3/lease/grant", {"TTL": str(ttl)})["ID"])

    def keepalive(self, lease: str) -> None:
        self.call("/v3/lease/keepalive", {"ID": lease})

    def revoke(self, lease: str) -> None:
        self.call("/v3/lease/revoke", {"ID": lease})

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    def register(self, service: str, port: int, lease: str = "", **metadata: Any) -> str:
        """etcd's naming convention: `<service>/<host:port>` = {"Addr": "host:port", "Metadata": ...}."""
        address = f"{LOOPBACK}:{port}"
        value: dict[str, Any] = {"Addr": address}
        if metadata:
            value["Metadata"] = metadata
        self.put(f"{service}/{address}", json.dumps(value), lease)
        return f"{service}/{address}"
