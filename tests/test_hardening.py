"""Issue 30, in-process: nothing the registry sends kills a watch, the status server is bounded,
and the smaller defences (symlinks, locks, modes, secrets, logs, drift, metrics) hold.

No nginx and no registry process here: fake registries, temporary folders and, for the status
server, loopback sockets opened by the test itself (tests/test_hardening_e2e.py has the real ones).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from confpy import boundedjson
from confpy.apply import command
from confpy.apply.files import DestinationLock, StateStore, atomic_write
from confpy.apply.installer import Change, Installer
from confpy.apply.live import (
    LivePushError,
    LiveSupervisor,
    LiveUpstream,
    ensure_admin_token,
    ensure_socket_dir,
    live_upstream,
)
from confpy.apply.nginx import NginxChecker, NginxReloader, run_command
from confpy.cli import TextFormatter
from confpy.config import ConsulConfig, EtcdConfig, NginxConfig, StatusConfig, TemplateConfig
from confpy.daemon.limits import FileBudget, raise_open_file_limit
from confpy.daemon.metrics import Metrics
from confpy.daemon.page import StatusPage
from confpy.daemon.snapshot import StatusSnapshot, TemplateStatus
from confpy.daemon.status import StatusServer
from confpy.errors import CheckError, InstallError, RenderError
from confpy.model import HealthView, ServiceInstance
from confpy.pipeline import SyncEngine
from confpy.registry.base import ServiceHealth
from confpy.registry.consul import ssl_context
from confpy.registry.etcd import EtcdRegistration
from confpy.render.functions import parse_json
from confpy.watch.watcher import RegistryHealth, Watcher, WatchFailures, WatchSettings
from tests.test_core_units import WEB, FakeClock, FakeDep, FakeRegistry, _daemon, _drain, _view, run, turns
from tests.tiers import starts_processes

DEEP = "[" * 100_000 + "]" * 100_000

# --- nesting and watches --------------------------------------------------------------------


def test_json_nested_past_the_bound_is_a_bad_input_naming_it_not_a_crash() -> None:
    with pytest.raises(RenderError, match=r"parse_json: refused: JSON nested too deep"):
        parse_json(DEEP)
    with pytest.raises(RenderError, match=r"nested deeper than 64 levels"):
        parse_json("[" * 65 + "]" * 65)
    assert parse_json('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    nested_meta = '{"Addr": "10.0.0.1:80", "Metadata": {"meta": ' + '{"x":' * 100_000 + "1" + "}" * 100_000 + "}}"
    with pytest.raises(ValueError, match=r"value is refused: JSON nested too deep"):
        EtcdRegistration.decode(nested_meta)
    assert boundedjson.depth_exceeds([[[]]], 2) and not boundedjson.depth_exceeds([[[]]], 3)


class ExplodingRegistry(FakeRegistry):
    """Raises something no registry client is meant to raise, `explode` times, then answers."""

    def __init__(self, explode: int) -> None:
        super().__init__()
        self.explode = explode

    async def fetch(self, dep: object, index: int, wait: float) -> tuple[int, object]:
        if self.explode:
            self.explode -= 1
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON object")
        return await super().fetch(dep, index, wait)  # type: ignore[arg-type]


def test_a_watch_that_fails_unexpectedly_is_logged_counted_backed_off_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        registry, dep, clock = ExplodingRegistry(explode=3), FakeDep("web"), FakeClock()
        sleeps: list[float] = []
        counted: list[str] = []
        changes: list[bool] = []
        failures = WatchFailures(
            on_failure=lambda d, exc: counted.append(d.describe()), on_change=lambda: changes.append(True)
        )
        seen: list[object] = []

        async def fake_sleep(seconds: float) -> None:
            sleeps.append(seconds)
            clock.now += seconds
            await asyncio.sleep(0)

        watcher = Watcher(
            dep,
            registry,
            WatchSettings(wait=60.0, max_backoff=4.0),
            RegistryHealth(clock),
            lambda d, value, index: seen.append(value),
            clock=clock,
            sleep=fake_sleep,
            failures=failures,
        )
        registry.set(dep, "v1")
        watcher.start()
        await turns(60)
        assert seen == ["v1"], "the watch restarted and delivered the value"
        assert counted == ["fake(web)"] * 3
        backoffs = [s for s in sleeps if s > 0.2]
        assert len(backoffs) == 3 and backoffs[-1] > backoffs[0], "backed off with the retry policy"
        assert not failures.failing and len(changes) == 2, "failing once, recovered once"
        registry.set(dep, "v2")
        await turns(20)
        assert seen == ["v1", "v2"], "and it keeps watching"
        watcher.stop()
        await watcher.wait_stopped()

    caplog.set_level(logging.INFO)
    run(scenario)
    assert caplog.text.count("the watch of fake(web) failed: RecursionError") == 3
    assert caplog.text.count("Traceback") == 1, "the traceback once, not on every retry"
    assert "the watch of fake(web) works again" in caplog.text


def test_health_is_not_ok_while_a_watch_is_failing_and_the_metric_counts(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry, clock = FakeRegistry(), FakeClock()
        daemon = _daemon(tmp_path, WEB, registry, clock)
        await daemon._start()
        registry.set(ServiceHealth("web"), _view(8080))
        await _drain(daemon)
        await daemon._run_due()
        daemon.watch_failures.failed(ServiceHealth("web"), RecursionError("too deep"), 1.0)
        daemon._publish()
        ok, reason = daemon.snapshot.health()
        assert not ok and reason.startswith("watch failing: service(web): RecursionError: too deep")
        assert daemon.snapshot.to_json()["failing_watches"].startswith("service(web)")
        assert "confpy_watch_failures_total 1.0" in daemon.metrics.render_text().decode()
        daemon.watch_failures.recovered(ServiceHealth("web"))
        daemon._publish()
        assert not daemon.snapshot.failing_watches
        await daemon._stop()

    run(scenario)


def test_a_template_recursing_too_deep_is_a_render_error_not_a_crash(tmp_path: Path) -> None:
    template = "{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}"

    async def scenario() -> None:
        daemon = _daemon(tmp_path, template, FakeRegistry(), FakeClock())
        await daemon._start()  # renders: the RecursionError becomes a RenderError, logged and kept
        state = next(iter(daemon.templates.values()))
        assert "RecursionError" in state.last_error and "t.conf.j2" in state.last_error
        await daemon._stop()

    run(scenario)


# --- commands that cannot start -------------------------------------------------------------


@starts_processes  # the script is started as a check command
def _no_shebang(tmp_path: Path) -> Path:
    script = tmp_path / "check.sh"
    script.write_text("exit 0\n")  # no #! line: exec fails with ENOEXEC
    script.chmod(0o755)
    return script


def test_a_check_command_that_cannot_start_is_a_failed_check_and_rolls_back(tmp_path: Path) -> None:
    script = _no_shebang(tmp_path)
    with pytest.raises(CheckError, match=r"check_cmd .*cannot start .*Exec format error"):
        run(lambda: run_command([str(script)], 5.0, "check_cmd", CheckError))
    destination = tmp_path / "out.conf"
    destination.write_text("old\n")
    nginx = NginxConfig(check_cmd=(str(script),), pid_file=tmp_path / "nginx.pid")
    template = TemplateConfig(source=tmp_path / "t.j2", destination=destination)
    installer = Installer(NginxChecker(nginx), NginxReloader(nginx), StateStore(tmp_path / "state"))
    with pytest.raises(CheckError):
        run(lambda: installer.apply([Change(template, b"new\n", b"old\n")]))
    assert destination.read_text() == "old\n", "rolled back"


@starts_processes  # a real child process
async def _child(argv: list[str]) -> tuple[int, str]:
    return await command.run(argv, 5.0)


def test_children_do_not_inherit_the_registry_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "s3cret-consul")
    monkeypatch.setenv("ETCDCTL_PASSWORD", "s3cret-etcd")
    monkeypatch.setenv("CONSUL_CLIENT_KEY", "/etc/key.pem")
    monkeypatch.setenv("KEEP_ME", "yes")
    status, output = run(lambda: _child(["env"]))
    assert status == 0 and "KEEP_ME=yes" in output
    assert "s3cret" not in output and "CONSUL_CLIENT_KEY" not in output


# --- the status server ----------------------------------------------------------------------


def _snapshot(services: int = 0, members: int = 0, destination: str = "") -> StatusSnapshot:
    views = {
        f"service(s{s})": HealthView.of(
            ServiceInstance(
                f"s{s}", f"i{j}", "n1", f"10.{s // 250}.{s % 250}.{j + 1}", 8000 + j, ("nginx",), {"z": "a"}
            )
            for j in range(members)
        )
        for s in range(services)
    }
    templates = (TemplateStatus("src", destination, "", None, None, "", ()),) if destination else ()
    return StatusSnapshot("127.0.0.1:8500", True, "", False, True, "", templates=templates, services=views)


@starts_processes  # a request over loopback TCP to a real status server
async def _get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n")
    writer.close()
    return int(head.split()[1]), head


def _port(server: StatusServer) -> int:
    assert server._server._server is not None
    return int(server._server._server.sockets[0].getsockname()[1])


def test_status_server_caps_connections_and_subscribers_and_checks_the_host() -> None:
    async def scenario() -> None:
        snapshot = _snapshot(3, 2)
        server = StatusServer(
            StatusConfig(listen="127.0.0.1:0", max_connections=3, max_subscribers=2), lambda: snapshot, Metrics()
        )
        await server.start()
        port = _port(server)
        streams = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert b" 200 " in await reader.readuntil(b"\r\n")
            streams.append(writer)
        await turns()
        assert server.subscribers == 2
        assert (await _get(port, "/events"))[0] == 503, "a third subscriber is refused"
        assert (await _get(port, "/health"))[0] == 200, "other requests still work"
        idle = [await asyncio.open_connection("127.0.0.1", port)]  # the third connection, idle
        await turns()
        status, _ = await _get(port, "/health")
        assert status == 503, "past max_connections: 503 before reading the request"
        assert server._server.refused >= 1
        idle[0][1].close()
        for writer in streams:
            writer.close()
        await asyncio.sleep(0.3)  # the streams notice within one poll
        assert server.subscribers == 0
        assert (await _get(port, "/health", host="localhost:9999"))[0] == 200
        assert (await _get(port, "/health", host=f"[::1]:{port}"))[0] == 200
        assert (await _get(port, "/status", host="rebind.attacker.example"))[0] == 421
        await server.stop()

    run(scenario)


def test_status_beyond_loopback_warns_on_the_page() -> None:
    exposed = StatusServer(StatusConfig(listen="0.0.0.0:9900"), lambda: _snapshot(), Metrics())
    assert "reachable beyond this host" in exposed.exposure and exposed._server.allowed_hosts is None
    assert 'id="exposed"' in exposed.page.render(_snapshot())
    local = StatusServer(StatusConfig(listen="127.0.0.1:9900"), lambda: _snapshot(), Metrics())
    assert not local.exposure and 'id="exposed"' not in local.page.render(_snapshot())


def test_the_fingerprint_is_computed_once_per_snapshot_however_many_subscribers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    original = StatusSnapshot.to_json

    def counting(self: StatusSnapshot) -> dict[str, object]:
        calls.append(1)
        return original(self)

    monkeypatch.setattr(StatusSnapshot, "to_json", counting)
    monkeypatch.setattr("confpy.daemon.status.EVENTS_POLL", 0.01)

    async def scenario() -> None:
        current = [_snapshot(5, 3)]
        server = StatusServer(StatusConfig(listen="127.0.0.1:0", max_subscribers=8), lambda: current[0], Metrics())
        streams = [server._event_stream() for _ in range(8)]
        for stream in streams:
            await anext(stream)
        for _ in range(5):  # ticks with nothing new: no serialisation at all
            await asyncio.sleep(0.02)
        assert len(calls) == 1, "eight subscribers, one snapshot: one to_json"
        current[0] = _snapshot(6, 3)
        for stream in streams:
            await anext(stream)
        assert len(calls) == 2
        for stream in streams:
            await stream.aclose()
        assert server.subscribers == 0

    run(scenario)


def test_the_page_costs_work_linear_in_members_not_members_times_file(tmp_path: Path) -> None:
    destination = tmp_path / "upstreams.conf"
    snapshot = _snapshot(200, 10, str(destination))
    destination.write_text(
        "".join(
            f"upstream s{s} {{\n"
            + "".join(f"    server {i.address}:{i.port} weight=1;\n" for i in view.instances)
            + "}\n"
            for s, view in enumerate(snapshot.services.values())
        )
    )
    page = StatusPage("0")
    html = page.render(snapshot)
    assert html.count('<span class="badge ok">serving</span>') == 2000
    assert page.served.searches == 1 and page.rows.built == 2000
    page.render(snapshot)
    assert page.served.searches == 1, "the installed file is searched again only when it changed"
    assert page.rows.built == 2000, "unchanged members are not escaped again"
    destination.write_text(destination.read_text().replace("server 10.0.0.1:8000 ", "server 10.9.9.9:8000 "))
    again = page.render(snapshot)
    assert page.served.searches == 2 and again.count('<span class="badge ok">serving</span>') == 1999


# --- limits ---------------------------------------------------------------------------------


def test_the_soft_file_limit_is_raised_to_the_hard_one_and_a_shortfall_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lower = min(1024, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    budget = FileBudget(1024)
    assert budget.check(900)
    assert not budget.check(1500) and not budget.check(1500)
    assert caplog.text.count("1500 watches need about 1564 open files but the limit is 1024") == 1


# --- smaller items --------------------------------------------------------------------------


def test_the_socket_folder_is_chmodded_only_when_confpy_creates_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = tmp_path / "run"
    shared.mkdir()
    shared.chmod(0o755)
    ensure_socket_dir(f"unix:{shared}/x.sock")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755, "a folder confpy did not create keeps its mode"
    assert "open to other users" in caplog.text
    own = shared / "confpy"
    ensure_socket_dir(f"unix:{own}/admin.sock")
    assert stat.S_IMODE(own.stat().st_mode) == 0o700


@starts_processes  # the installer runs `check` as nginx -t
def _installer_checking_with(check: str, tmp_path: Path) -> Installer:
    nginx = NginxConfig(check_cmd=(check,), pid_file=tmp_path / "nginx.pid")
    return Installer(NginxChecker(nginx), NginxReloader(nginx), StateStore(tmp_path / "state"))


def test_a_symlinked_destination_stays_a_symlink_on_install_and_rollback(tmp_path: Path) -> None:
    available, enabled = tmp_path / "sites-available", tmp_path / "sites-enabled"
    available.mkdir()
    enabled.mkdir()
    (available / "up.conf").write_text("old\n")
    link = enabled / "up.conf"
    link.symlink_to("../sites-available/up.conf")
    (tmp_path / "state").mkdir()
    atomic_write(link, b"direct\n")
    assert link.is_symlink() and (available / "up.conf").read_text() == "direct\n"
    template = TemplateConfig(source=tmp_path / "t.j2", destination=link)
    installer = _installer_checking_with("false", tmp_path)
    with pytest.raises(CheckError):
        run(lambda: installer.apply([Change(template, b"rejected\n", b"direct\n")]))
    assert link.is_symlink() and link.read_text() == "direct\n", "rolled back through the link"
    installer = _installer_checking_with("true", tmp_path)
    run(lambda: installer.apply([Change(template, b"new\n", b"direct\n")]))
    assert link.is_symlink() and (available / "up.conf").read_text() == "new\n"
    assert not [p for p in enabled.iterdir() if p.name != "up.conf"], "no temporary file beside the link"


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "state").mkdir()
    lock_path = tmp_path / "state" / "x.lock"
    lock_path.symlink_to(victim)
    with pytest.raises(InstallError, match="symbolic link; refusing to follow"):
        DestinationLock(tmp_path / "x", lock_path).try_acquire()
    assert victim.read_text() == "precious\n"


def test_state_folder_and_admin_token_modes_are_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(InstallError, match=r"writable by every user \(mode 0777\)"):
        StateStore(state).prepare()
    state.chmod(0o775)
    StateStore(state).prepare()
    assert "writable by its group" in caplog.text
    state.chmod(0o700)
    token = tmp_path / "admin.token"
    ensure_admin_token(token)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    ensure_admin_token(token)  # its own file passes
    token.chmod(0o644)
    with pytest.raises(LivePushError, match=r"readable or writable by other users \(mode 0644\)"):
        ensure_admin_token(token)


def test_reprs_hold_no_secrets_and_tls_without_verification_warns(caplog: pytest.LogCaptureFixture) -> None:
    assert "tok-123" not in repr(ConsulConfig(token="tok-123"))
    assert "pw-123" not in repr(EtcdConfig(password="pw-123"))
    ssl_context(ConsulConfig(address="https://127.0.0.1:8501", verify=False))
    assert "TLS verification of Consul at https://127.0.0.1:8501 is off" in caplog.text


def test_text_logs_escape_a_registry_names_line_breaks() -> None:
    record = logging.LogRecord("x", logging.WARNING, "f", 1, "left out: %s", ("web\nERROR forged\r\u2028",), None)
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING left out: web\\nERROR forged\\r\\u2028" and "\n" not in line


def test_drift_compares_members_not_only_the_version() -> None:
    wanted = live_upstream_of(("10.0.0.1", 80), ("10.0.0.2", 80))
    drifted: list[str] = []
    supervisor = SimpleNamespace(
        error="",
        retry_at=None,
        wanted={"web": wanted},
        drift_events={},
        clock_wall=lambda: 1.0,
        on_drift=drifted.append,
    )
    same = {"web": {"version": wanted.version, "members": [m.to_json() for m in wanted.members]}}
    assert LiveSupervisor.drift(supervisor, same) == []  # type: ignore[arg-type]
    forged = {"web": {"version": wanted.version, "members": [{"host": "10.6.6.6", "port": 80, "weight": 1}]}}
    assert LiveSupervisor.drift(supervisor, forged) == ["web"]  # type: ignore[arg-type]
    assert drifted == ["web"]


def live_upstream_of(*endpoints: tuple[str, int]) -> LiveUpstream:
    return live_upstream(tuple(ServiceInstance("web", f"{h}:{p}", "n1", h, p) for h, p in endpoints))


def test_invalid_instance_series_go_with_their_service() -> None:
    metrics = Metrics()
    metrics.count_rejected("service(web)", 2)
    assert 'confpy_invalid_instances{service="service(web)"} 2.0' in metrics.render_text().decode()
    metrics.forget_service("service(web)")
    assert "service(web)" not in metrics.render_text().decode()


@starts_processes  # its check_cmd (`false`) runs as a real child before any reload
def _engine_running_its_check(engine: SyncEngine) -> SyncEngine:
    return engine


def test_a_stale_file_is_checked_before_a_restart_reloads_it(tmp_path: Path) -> None:
    from confpy.config import parse_config

    config_path = tmp_path / "confpy.toml"
    config_path.write_text(f"""
[nginx]
pid_file = "{tmp_path / "nginx.pid"}"
check_cmd = "false"
[state]
dir = "{tmp_path / "state"}"
[[template]]
source = "{tmp_path / "t.j2"}"
destination = "{tmp_path / "out.conf"}"
""")
    (tmp_path / "t.j2").write_text("x\n")
    engine = _engine_running_its_check(SyncEngine(parse_config(config_path.read_text(), config_path, {})))
    reloads: list[bool] = []
    engine.reloader.is_stale = lambda destinations: True  # type: ignore[method-assign]

    async def no_reload() -> object:
        reloads.append(True)
        raise AssertionError("reloaded an unchecked file")

    engine.reloader.reload = no_reload  # type: ignore[method-assign,assignment]
    with pytest.raises(CheckError, match="installed but never reloaded, and nginx refuses it"):
        run(lambda: engine._reload_if_stale([tmp_path / "out.conf"]))
    assert not reloads


def test_a_consul_token_file_every_user_can_read_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from confpy.config import parse_config

    token = tmp_path / "consul.token"
    token.write_text("t0ken-value\n")
    token.chmod(0o644)
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        f'[consul]\ntoken_file = "{token}"\n[state]\ndir = "{tmp_path}"\n'
        f'[[template]]\nsource = "{tmp_path / "t.j2"}"\ndestination = "{tmp_path / "out.conf"}"\n'
    )
    (tmp_path / "t.j2").write_text("x\n")
    config = parse_config(config_path.read_text(), config_path, {})
    assert config.consul.token == "t0ken-value"
    assert f"{token} is readable by every user" in caplog.text and "t0ken-value" not in caplog.text
    caplog.clear()
    token.chmod(0o600)
    parse_config(config_path.read_text(), config_path, {})
    assert "readable by every user" not in caplog.text
