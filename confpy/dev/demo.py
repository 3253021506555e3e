"""`confpy demo` / `make demo`: the whole story on loopback, narrated and proved with real requests.

dev-consul, three app servers, nginx as the gateway and the confpy daemon start; then each
operator action runs as the real `confpy upstream ...` command and the demo shows, with requests
through the gateway, when the change reached traffic.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from confpy.builtin import template_path
from confpy.dev.lab import (
    BackendServer,
    ConfpyProcess,
    DevConsulProcess,
    EtcdCluster,
    NginxInstance,
    free_port,
    wait_until,
    write_config,
)

STEP_TIMEOUT = 20.0
ROUND = 6


class Demo:
    """The demo's world and its narration."""

    def __init__(self, workdir: Path, out: Callable[[str], None] = print) -> None:
        self.workdir = workdir
        self.out = out
        self.consul = DevConsulProcess()
        self.backends: dict[int, BackendServer] = {}
        self.nginx = NginxInstance(workdir / "nginx")
        self.status_port = free_port()
        self.confpy: ConfpyProcess | None = None
        self.timings: list[tuple[str, float]] = []

    # --- helpers -----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONSUL_HTTP_ADDR": self.consul.url}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a real `confpy ...` command and show it with its output."""
        cmd = [sys.executable, "-m", "confpy", *args]
        self.out(f"  $ confpy {shlex.join(args)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=60, check=False)
        for line in (proc.stdout + proc.stderr).strip().splitlines():
            self.out(f"    {line}")
        return proc

    def endpoint(self, number: int) -> str:
        return f"127.0.0.1:{self.backends[number].port}"

    def show_traffic(self, count: int = ROUND) -> list[str]:
        bodies = self.nginx.bodies(count)
        self.out(f"  gateway http://127.0.0.1:{self.nginx.port}/ answered: {' | '.join(bodies)}")
        return bodies

    def expect(self, label: str, members: set[int], started: float, since: str = "the command returned") -> None:
        """Wait until a whole round of requests hits exactly `members`; record how long it took."""
        expected = {f"App server {n}" for n in members}

        def settled() -> bool:
            return set(self.nginx.bodies(ROUND)) == expected

        if not wait_until(settled, STEP_TIMEOUT, interval=0.01):
            raise RuntimeError(f"{label}: traffic did not settle on {sorted(expected)}; saw {self.nginx.bodies(ROUND)}")
        took = time.monotonic() - started
        self.timings.append((label, took))
        self.show_traffic()
        self.out(f"  -> reached traffic {took * 1000:.0f} ms after {since}")

    # --- the story -----------------------------------------------------------------------------

    def _backends_and_config(self, etcd_endpoints: list[str] | None = None) -> Path:
        for n in (1, 2, 3):
            self.backends[n] = BackendServer(f"App server {n}").start()
            self.out(f"  App server {n} at http://{self.endpoint(n)}/")
        config = write_config(
            self.workdir / "confpy.toml",
            self.consul.url,
            self.nginx,
            template_path("nginx-upstreams.conf.j2"),
            wait_min="50ms",
            wait_max="1s",
            status=f"127.0.0.1:{self.status_port}",
            etcd_endpoints=etcd_endpoints or (),
        )
        self.out(f"  confpy configuration: {config}")
        return config

    def _start_gateway(self, config: Path) -> None:
        self.confpy = ConfpyProcess(config, env={"CONSUL_HTTP_ADDR": self.consul.url}).start()
        if not wait_until(lambda: self.nginx.destination.exists(), STEP_TIMEOUT):
            raise RuntimeError(f"confpy did not render {self.nginx.destination}:\n{self.confpy.output()}")
        self.nginx.start()
        self.out(f"  nginx gateway on http://127.0.0.1:{self.nginx.port}/ (includes {self.nginx.destination})")
        self.out(f"  confpy daemon running, status page on http://127.0.0.1:{self.status_port}/")

    def setup(self) -> None:
        self.out("== Setting up on loopback: dev-consul, three app servers, nginx, confpy")
        self.consul.start()
        self.out(f"  dev-consul (in-memory Consul agent) at {self.consul.url}")
        config = self._backends_and_config()
        for n in (1, 2, 3):
            self.run("upstream", "add", "web", self.endpoint(n))
        self._start_gateway(config)

    def story(self) -> None:
        started = time.monotonic()
        self.out("\n== 1. The gateway round-robins over App server 1, 2 and 3 (each passed its TCP check)")
        self.expect("three servers registered", {1, 2, 3}, started)

        self.out("\n== 2. Take App server 3 out: traffic stays on 1 and 2")
        self.run("upstream", "del", "web", self.endpoint(3))
        started = time.monotonic()
        self.expect("server 3 deleted", {1, 2}, started)

        self.out("\n== 3. An upstream never loses its last server")
        self.run("upstream", "del", "web", self.endpoint(2))
        started = time.monotonic()
        self.expect("server 2 deleted", {1}, started)
        refused = self.run("upstream", "del", "web", self.endpoint(1))
        if refused.returncode != 1:
            raise RuntimeError("deleting the last server was not refused")
        self.out("  -> refused (exit 1); App server 1 still serves:")
        self.show_traffic(3)

        self.out("\n== 4. Put App server 2 and 3 back: they take traffic again")
        self.run("upstream", "add", "web", self.endpoint(2))
        self.run("upstream", "add", "web", self.endpoint(3))
        started = time.monotonic()
        self.expect("servers 2 and 3 added", {1, 2, 3}, started)
        self.run("upstream", "list", "web", "-c", str(self.workdir / "confpy.toml"))

        self.out("\n== 5. Drain App server 2 (Consul maintenance mode), then undrain it")
        self.run("upstream", "drain", "web", self.endpoint(2), "--reason", "deploying v2")
        started = time.monotonic()
        self.expect("server 2 drained", {1, 3}, started)
        self.run("upstream", "undrain", "web", self.endpoint(2))
        started = time.monotonic()
        self.expect("server 2 undrained", {1, 2, 3}, started)

        self.out("\n== 6. App server 2 dies: its health check fails and the gateway stops using it, no command needed")
        started = time.monotonic()
        port = self.backends[2].port
        self.backends[2].stop()
        self.out(f"  (stopped the process listening on 127.0.0.1:{port})")
        self.expect("server 2 failed its check", {1, 3}, started, since="the process stopped")
        self.out("  App server 2 comes back:")
        started = time.monotonic()
        self.backends[2] = BackendServer("App server 2", port=port).start()
        self.expect("server 2 recovered", {1, 2, 3}, started, since="the process started again")

    def summary(self) -> None:
        self.out(
            "\n== How long each change took to reach traffic (from the command's return, or the failure, to a full round of requests"
        )
        self.out(
            "   served accordingly; a failing or recovering server waits for its next 1 s health check, an added one for its first)"
        )
        for label, took in self.timings[1:]:
            self.out(f"  {label:<32} {took * 1000:7.0f} ms")
        self.out(
            f"  nginx reloads: {self.nginx.reload_count()} (each new configuration was checked with nginx -t first)"
        )

    def keep_running(self) -> None:
        config = self.workdir / "confpy.toml"
        self.out("\n== Everything stays up. Try it by hand (Ctrl-C to stop):")
        self.out(f"  export CONSUL_HTTP_ADDR={self.consul.url}")
        self.out(f"  curl http://127.0.0.1:{self.nginx.port}/")
        self.out(f"  confpy upstream list -c {config}")
        self.out(f"  confpy upstream drain web {self.endpoint(1)}")
        self.out(f"  open http://127.0.0.1:{self.status_port}/ in a browser: the status page, live")
        self.out(f"  curl http://127.0.0.1:{self.status_port}/status")
        self.out(f"  cat {self.nginx.destination}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.out("\nstopping")

    def teardown(self) -> None:
        if self.confpy is not None:
            self.confpy.stop()
        self.nginx.stop()
        for backend in self.backends.values():
            try:
                backend.stop()
            except OSError:
                pass
        if self.consul.proc is not None:
            self.consul.stop()


class EtcdDemo(Demo):
    """The same story with etcd as the registry: a real single-member etcd under the demo's folder,
    registrations in etcd's naming convention, and a dead app server leaving with its lease."""

    def __init__(self, workdir: Path, out: Callable[[str], None] = print) -> None:
        super().__init__(workdir, out)
        self.etcd = EtcdCluster(workdir / "etcd", size=1)
        self.keepers: list[subprocess.Popen[str]] = []

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def setup(self) -> None:
        self.out("== Setting up on loopback: etcd (etcd-server), three app servers, nginx, confpy")
        self.etcd.start()
        self.out(f"  etcd at {self.etcd.endpoints[0]} (data in {self.workdir / 'etcd'})")
        config = self._backends_and_config(self.etcd.endpoints)
        for n in (1, 2, 3):
            self.run("upstream", "add", "-c", str(config), "web", self.endpoint(n))
        self._start_gateway(config)

    def story(self) -> None:
        config = str(self.workdir / "confpy.toml")
        started = time.monotonic()
        self.out("\n== 1. The gateway round-robins over App server 1, 2 and 3 (keys web/127.0.0.1:PORT in etcd)")
        self.expect("three servers registered", {1, 2, 3}, started)

        self.out("\n== 2. Take App server 3 out: traffic stays on 1 and 2")
        self.run("upstream", "del", "-c", config, "web", self.endpoint(3))
        self.expect("server 3 deleted", {1, 2}, time.monotonic())

        self.out("\n== 3. An upstream never loses its last server")
        self.run("upstream", "del", "-c", config, "web", self.endpoint(2))
        self.expect("server 2 deleted", {1}, time.monotonic())
        if self.run("upstream", "del", "-c", config, "web", self.endpoint(1)).returncode != 1:
            raise RuntimeError("deleting the last server was not refused")
        self.out("  -> refused (exit 1); App server 1 still serves:")
        self.show_traffic(3)

        self.out("\n== 4. App server 2 and 3 come back, each under a 2 s lease it keeps alive (as an app would)")
        for n in (2, 3):
            self.out(f"  $ confpy upstream add -c {config} web {self.endpoint(n)} --ttl 2   (in the background)")
            keeper = subprocess.Popen(
                [sys.executable, "-m", "confpy", "upstream", "add", "-c", config, "web", self.endpoint(n), "--ttl", "2"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            self.keepers.append(keeper)
        self.expect("servers 2 and 3 added", {1, 2, 3}, time.monotonic())

        self.out(
            "\n== 5. App server 2's keep-alive dies (as with a crashed app): its lease expires, the gateway stops using it"
        )
        started = time.monotonic()
        self.keepers[0].kill()
        self.expect("server 2's lease expired", {1, 3}, started, since="its keep-alive died")

    def teardown(self) -> None:
        for keeper in self.keepers:
            keeper.kill()
            keeper.wait(5)
        super().teardown()
        self.etcd.stop()


def run_demo(keep_running: bool = False, registry: str = "consul") -> int:
    """Run the demo; exit 0 when every step was proved with real requests."""
    with tempfile.TemporaryDirectory(prefix="confpy-demo-") as tmp:
        demo = EtcdDemo(Path(tmp)) if registry == "etcd" else Demo(Path(tmp))
        try:
            demo.setup()
            demo.story()
            demo.summary()
            if keep_running:
                demo.keep_running()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"\ndemo failed: {exc}", file=sys.stderr)
            if demo.confpy is not None:
                print("confpy's log:\n" + demo.confpy.output()[-4000:], file=sys.stderr)
            return 1
        finally:
            demo.teardown()
        print(
            "\ndemo finished: every step above was checked with real requests through nginx; everything it started is stopped"
        )
        return 0
