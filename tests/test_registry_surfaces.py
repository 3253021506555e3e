"""What operators see names the registry the configuration follows: etcd with its endpoints in
etcd mode (never Consul or :8500), Consul in Consul mode (its 0.x `/status` key still there).

The first tests are in-process (values, the page, metrics); the last runs the daemon on a real
single-member etcd and reads every surface over HTTP, through an outage too.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from confpy.apply.files import StateStore
from confpy.apply.live import LivePushError, LiveSupervisor
from confpy.apply.nginx import NginxReloader
from confpy.config import Config, parse_config
from confpy.daemon.metrics import Metrics
from confpy.daemon.page import StatusPage
from confpy.daemon.snapshot import StatusSnapshot
from confpy.dev.lab import BackendServer, ConfpyProcess, EtcdCluster, NginxInstance, free_port, wait_until, write_config
from confpy.model import HealthView
from confpy.registry.etcd import EtcdRegistration
from confpy.registry.view import RegistryKind, RegistryView, registry_view

from .conftest import SHIPPED_TEMPLATE, http_get

ETCD_ONLY = ("Consul", ":8500")  # what no etcd-mode surface may say
DEPRECATED_SERIES = ("confpy_consul_errors_total", "confpy_consul_requests_total", "confpy_consul_up")


def _config(tmp_path: Path, registry: str) -> Config:
    table = (
        '[etcd]\nendpoints = ["http://127.0.0.1:2379", "https://user:pw@127.0.0.2:2379"]\n'
        'timeout = "3s"\nwait = "20s"\nmax_backoff = "7s"\n'
        if registry == "etcd"
        else '[consul]\naddress = "http://127.0.0.1:8500"\nwait = "30s"\nmax_backoff = "9s"\n'
    )
    text = f'{table}\n[[template]]\nsource = "{SHIPPED_TEMPLATE}"\ndestination = "{tmp_path / "out.conf"}"\n'
    return parse_config(text, tmp_path / "c.toml", {})


ADDRESSES = {"consul": "http://127.0.0.1:8500", "etcd": "http://127.0.0.1:2379, http://127.0.0.2:2379"}
ALL_WELL = StatusSnapshot("", True, "", False, True, "")  # reachable, answered, last sync ok


def _snapshot(kind: RegistryKind, **changes: Any) -> StatusSnapshot:
    return dataclasses.replace(ALL_WELL, registry_kind=kind, registry_address=ADDRESSES[kind], **changes)


def test_one_view_of_the_registry_is_built_from_either_table(tmp_path: Path) -> None:
    etcd = registry_view(_config(tmp_path, "etcd"))
    assert etcd == RegistryView("etcd", ("http://127.0.0.1:2379", "https://127.0.0.2:2379"), 20.0, 3.0, 7.0)
    assert etcd.name == "etcd" and etcd.address == "http://127.0.0.1:2379, https://127.0.0.2:2379"
    consul = registry_view(_config(tmp_path, "consul"))
    assert consul == RegistryView("consul", ("http://127.0.0.1:8500",), 30.0, 10.0, 9.0)
    assert consul.name == "Consul"


def test_status_has_a_registry_section_and_the_consul_alias_only_in_consul_mode() -> None:
    down = {"registry_reachable": False, "registry_error": "refused", "registry_down_since": 1_700_000_000.0}
    consul = _snapshot("consul", **down).to_json()
    assert consul["registry"] == {
        "kind": "consul",
        "address": "http://127.0.0.1:8500",
        "reachable": False,
        "error": "refused",
        "down_since": "2023-11-14T22:13:20Z",
    }
    assert consul["consul"] == {  # the 0.x key, deprecated: as it was
        "address": "http://127.0.0.1:8500",
        "reachable": False,
        "last_error": "refused",
        "down_since": "2023-11-14T22:13:20Z",
    }
    etcd = _snapshot("etcd", **down).to_json()
    assert "consul" not in etcd and etcd["registry"]["kind"] == "etcd"
    assert etcd["registry"]["address"] == "http://127.0.0.1:2379, http://127.0.0.2:2379"


def test_health_and_the_verdict_name_the_registry_by_kind() -> None:
    assert _snapshot("consul", registry_reachable=False, registry_error="refused").health() == (
        False,
        "Consul unreachable: refused",
    )
    assert _snapshot("etcd", registry_reachable=False, registry_error="refused").health() == (
        False,
        "etcd unreachable: refused",
    )
    assert _snapshot("etcd", waiting_for_first_answer=True).health()[1] == "starting: waiting for etcd's first answer"
    assert _snapshot("etcd").state() == ("ok", "all is well: nginx serves what etcd says")
    assert _snapshot("consul").state() == ("ok", "all is well: nginx serves what Consul says")


def test_the_page_names_etcd_and_its_endpoints_in_etcd_mode() -> None:
    page = StatusPage("0").render(
        _snapshot("etcd", services={"service(web)": HealthView(())}, registry_reachable=False, registry_error="x")
    )
    assert "<h2>etcd</h2>" in page and "http://127.0.0.1:2379, http://127.0.0.2:2379" in page
    assert not [word for word in ETCD_ONLY if word in page]
    assert "<h2>Consul</h2>" in StatusPage("0").render(_snapshot("consul"))


def test_registry_metrics_are_labelled_by_kind_and_the_consul_series_follow_them() -> None:
    metrics = Metrics()
    metrics.follow("etcd")
    metrics.registry_request()
    metrics.registry_request()
    metrics.registry_error()
    text = metrics.render_text().decode()
    assert 'confpy_registry_requests_total{registry="etcd"} 2.0' in text
    assert 'confpy_registry_errors_total{registry="etcd"} 1.0' in text
    assert 'confpy_registry_up{registry="etcd"} 0.0' in text
    assert "confpy_consul_requests_total 2.0" in text and "confpy_consul_up 0.0" in text
    metrics.follow("consul")  # a SIGHUP onto another registry: the other's series go
    metrics.set_registry_up(True)
    text = metrics.render_text().decode()
    assert 'registry="etcd"' not in text and 'confpy_registry_up{registry="consul"} 1.0' in text


def test_live_retries_back_off_on_the_registrys_max_backoff(tmp_path: Path) -> None:
    config = _config(tmp_path, "etcd")  # [etcd] max_backoff 7s; [consul]'s default is 60s
    now = [100.0]
    live = LiveSupervisor(config, StateStore(tmp_path / "state"), NginxReloader(config.nginx), clock=lambda: now[0])
    for _ in range(12):
        live.failed(LivePushError("refused"))
    assert live.retry_at is not None and 107.0 <= live.retry_at <= 107.25  # the cap, plus the policy's jitter


def test_etcd_registrations_decode_to_instances_without_consul_shapes() -> None:
    registration = EtcdRegistration.decode(
        '{"Addr": "[2001:db8::1]:8080", "Metadata": {"weight": 3, "meta": {"z": 1}}}'
    )
    assert registration == EtcdRegistration("2001:db8::1", 8080, ("nginx",), {"z": "1"}, 3)
    instance = registration.instance("web", "web/[2001:db8::1]:8080")
    assert (instance.node, instance.id, str(instance.endpoint), instance.weight) == (
        "etcd",
        "web/[2001:db8::1]:8080",
        "[2001:db8::1]:8080",
        3,
    )
    for value, words in (
        ("not json", "value is not JSON"),
        ('{"Addr": ":80"}', "has no host"),
        ('{"Addr": "h"}', "is not host:port"),
    ):
        with pytest.raises(ValueError, match=words):
            EtcdRegistration.decode(value)
    with pytest.raises(ValueError, match="weight 0 is not a positive integer"):
        EtcdRegistration.decode('{"Addr": "10.0.0.1:80", "Metadata": {"weight": 0}}').instance("web", "k")


def _first_event(url: str) -> str:
    """The first Server-Sent Event of the page's stream (what the page's script listens to)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.readline().decode() + response.readline().decode()


def _promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make promtool` installs Debian's prometheus package"
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def _surfaces(base: str) -> dict[str, str]:
    """Every operator surface of the status listener: the page and all it fetches, /status, /health, /metrics."""
    texts = {path: http_get(base + path)[1] for path in ("/", "/static/status.js", "/static/status.css")}
    texts["/events"] = _first_event(base + "/events")
    for path in ("/status", "/health", "/metrics"):
        texts[path] = http_get(base + path)[1]
    return texts


def _series_name(line: str) -> str:
    """The series a line of the exposition format is about: `# HELP name ...`, `# TYPE name ...`, `name{...} value`."""
    return line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]


def _assert_names_etcd_only(texts: dict[str, str]) -> None:
    for path, text in texts.items():
        assert not [word for word in ETCD_ONLY if word in text], (path, text)
        if path == "/metrics":  # only the deprecated series' names (docs/operations.md) say consul
            named = {_series_name(line) for line in text.splitlines() if "consul" in line.lower()}
            assert named <= set(DEPRECATED_SERIES), named
        else:
            assert "consul" not in text.lower(), (path, text)


def test_a_daemon_on_etcd_names_etcd_and_its_endpoint_on_every_surface(
    nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path, daemons: list[ConfpyProcess]
) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", size=1).start()
    try:
        [endpoint] = cluster.endpoints
        cluster.api.register("web", backends[0].port)
        status_port = free_port()
        config = write_config(
            tmp_path / "c.toml",
            "",
            nginx,
            SHIPPED_TEMPLATE,
            status=f"127.0.0.1:{status_port}",
            etcd_endpoints=cluster.endpoints,
        )
        proc = ConfpyProcess(config).start()
        daemons.append(proc)
        assert wait_until(nginx.destination.exists, 15), proc.output()
        nginx.start()
        base = f"http://127.0.0.1:{status_port}"
        assert wait_until(lambda: http_get(base + "/health") == (200, "ok\n"), 15), proc.output()

        texts = _surfaces(base)
        status = json.loads(texts["/status"])
        assert status["registry"] == {
            "kind": "etcd",
            "address": endpoint,
            "reachable": True,
            "error": "",
            "down_since": None,
        }
        assert "consul" not in status
        assert "<h2>etcd</h2>" in texts["/"] and f"{endpoint}:" in texts["/"]
        assert f"127.0.0.1:{backends[0].port}" in texts["/"]
        for series in ("confpy_registry_up", "confpy_registry_requests_total", "confpy_registry_errors_total"):
            assert f'{series}{{registry="etcd"}}' in texts["/metrics"], series
        assert 'confpy_registry_up{registry="etcd"} 1.0' in texts["/metrics"]
        _assert_names_etcd_only(texts)
        _promtool_check(texts["/metrics"])

        cluster.stop()  # an outage: its texts name etcd too
        assert wait_until(lambda: http_get(base + "/health")[0] == 503, 15), proc.output()
        texts = _surfaces(base)
        assert texts["/health"].startswith("etcd unreachable: "), texts["/health"]
        assert "etcd_down" in texts["/"] and "etcd unreachable" in texts["/"]
        assert 'confpy_registry_up{registry="etcd"} 0.0' in texts["/metrics"]
        assert json.loads(texts["/status"])["registry"]["reachable"] is False
        _assert_names_etcd_only(texts)
        assert "etcd unavailable since" in proc.output() and "Consul" not in proc.output()
    finally:
        cluster.stop()
