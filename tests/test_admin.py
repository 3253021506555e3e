"""`confpy upstream list|add|del|drain|undrain` against dev-consul (or a real agent)."""

from __future__ import annotations

import json
from pathlib import Path

from confpy.dev.lab import BackendServer, NginxInstance, wait_until

from .conftest import ConsulUnderTest, run_confpy


def upstream(consul: ConsulUnderTest, *args: str):  # type: ignore[no-untyped-def]
    return run_confpy("upstream", *args, env={"CONSUL_HTTP_ADDR": consul.url, "CONFPY_CONFIG": ""})


def instances(consul: ConsulUnderTest, name: str = "web") -> dict[str, dict[str, object]]:
    out = upstream(consul, "list", name, "--json")
    assert out.returncode == 0, out.stderr
    [svc] = json.loads(out.stdout)
    return {i["endpoint"]: i for i in svc["instances"]}


def test_add_registers_tagged_with_a_tcp_check_and_list_shows_health(
    consul: ConsulUnderTest, backends: list[BackendServer]
) -> None:
    ep = f"127.0.0.1:{backends[0].port}"
    out = upstream(consul, "add", "web", ep, "--weight", "3", "--tag", "blue", "--meta", "zone=eu")
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip()
        == f"registered web-127.0.0.1-{backends[0].port}: service web at {ep}, weight 3, tags nginx,blue, tcp check every 1s"
    )
    _, [entry] = consul.api.health("web", "")
    svc = entry["Service"]
    assert svc["Tags"] == ["nginx", "blue"] and svc["Meta"] == {"zone": "eu"} and svc["Weights"]["Passing"] == 3
    [check] = [c for c in entry["Checks"] if c["ServiceID"]]
    # Critical until its first run (which, staggered within the interval, may already have happened).
    assert check["Status"] == "critical" or check["ModifyIndex"] > check["CreateIndex"], check
    assert wait_until(lambda: instances(consul)[ep]["status"] == "passing", 10, interval=0.2)
    assert instances(consul)[ep]["in_nginx"] is None  # no -c: unknown
    text = upstream(consul, "list").stdout
    assert "web (upstream web)" in text and ep in text and "passing" in text


def test_http_check_and_custom_id(consul: ConsulUnderTest, backends: list[BackendServer]) -> None:
    ep = f"127.0.0.1:{backends[0].port}"
    out = upstream(consul, "add", "web", ep, "--id", "custom", "--check", "http", "--check-path", "/health")
    assert out.returncode == 0, out.stderr
    _, [entry] = consul.api.health("web", "")
    assert entry["Service"]["ID"] == "custom"
    assert wait_until(lambda: consul.api.health("web")[1] != [], 10, interval=0.2)
    [check] = [c for c in consul.api.health("web")[1][0]["Checks"] if c["ServiceID"]]
    assert check["Output"].startswith(f"HTTP GET http://{ep}/health: 200")


def test_del_refuses_the_last_passing_instance_unless_forced(consul: ConsulUnderTest) -> None:
    for port in (8081, 8082):
        assert upstream(consul, "add", "web", f"127.0.0.1:{port}", "--check", "none").returncode == 0
    out = upstream(consul, "del", "web", "127.0.0.1:8082")
    assert out.returncode == 0 and out.stdout.startswith("deregistered web-127.0.0.1-8082")
    out = upstream(consul, "del", "web", "127.0.0.1:8081")
    assert out.returncode == 1
    assert "refusing to remove 127.0.0.1:8081: it is the last passing instance of 'web'" in out.stderr
    assert list(instances(consul)) == ["127.0.0.1:8081"]
    out = upstream(consul, "del", "web", "127.0.0.1:8081", "--force")
    assert out.returncode == 0
    assert consul.api.health("web", "")[1] == []


def test_drain_and_undrain(consul: ConsulUnderTest) -> None:
    for port in (8081, 8082):
        upstream(consul, "add", "web", f"127.0.0.1:{port}", "--check", "none")
    out = upstream(consul, "drain", "web", "127.0.0.1:8081", "--reason", "deploy 42")
    assert out.returncode == 0, out.stderr
    assert instances(consul)["127.0.0.1:8081"]["status"] == "maintenance"
    assert [e["Service"]["Port"] for e in consul.api.health("web")[1]] == [8082]
    notes = [
        c["Notes"]
        for e in consul.api.health("web", "")[1]
        for c in e["Checks"]
        if c["CheckID"].startswith("_service_maintenance")
    ]
    assert notes == ["deploy 42"]
    assert upstream(consul, "undrain", "web", "127.0.0.1:8081").returncode == 0
    assert instances(consul)["127.0.0.1:8081"]["status"] == "passing"


def test_draining_the_last_passing_instance_is_refused_unless_forced(consul: ConsulUnderTest) -> None:
    for port in (8081, 8082):
        upstream(consul, "add", "web", f"127.0.0.1:{port}", "--check", "none")
    assert upstream(consul, "drain", "web", "127.0.0.1:8082").returncode == 0
    out = upstream(consul, "drain", "web", "127.0.0.1:8081")
    assert out.returncode == 1
    assert "refusing to drain 127.0.0.1:8081: it is the last passing instance of 'web'" in out.stderr
    assert instances(consul)["127.0.0.1:8081"]["status"] == "passing"  # nothing changed
    out = upstream(consul, "drain", "web", "127.0.0.1:8081", "--force")
    assert out.returncode == 0 and instances(consul)["127.0.0.1:8081"]["status"] == "maintenance"
    assert 'with on_empty = "keep" (the default) nginx keeps sending it traffic' in out.stderr


def test_list_says_whether_nginx_has_each_instance(
    consul: ConsulUnderTest, nginx: NginxInstance, config_file: Path
) -> None:
    upstream(consul, "add", "web", "127.0.0.1:8081", "--check", "none")
    assert run_confpy("-c", str(config_file), "--once", "--allow-no-reload").returncode == 0
    upstream(consul, "add", "web", "127.0.0.1:8082", "--check", "none")
    out = run_confpy("upstream", "list", "web", "--json", "-c", str(config_file))
    assert out.returncode == 0, out.stderr
    [svc] = json.loads(out.stdout)
    assert {i["endpoint"]: i["in_nginx"] for i in svc["instances"]} == {"127.0.0.1:8081": True, "127.0.0.1:8082": False}


def test_bad_input_unknown_service_and_consul_down(consul: ConsulUnderTest) -> None:
    for bad, message in (
        ("127.0.0.1", "is not HOST:PORT"),
        ("127.0.0.1:0", "is not a number from 1 to 65535"),
        ("::1:80", "write an IPv6 address in brackets"),
        ("bad host!:80", "neither an IP address nor a valid host name"),
    ):
        out = upstream(consul, "add", "web", bad)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1
    out = upstream(consul, "add", "web", "127.0.0.1:80", "--meta", "novalue")
    assert out.returncode == 2 and "write it as KEY=VALUE" in out.stderr
    out = upstream(consul, "add", "web", "127.0.0.1:80", "--meta", "consul-x=1", "--check", "none")
    assert out.returncode == 1 and "Invalid Service Meta" in out.stderr  # Consul's own text
    out = upstream(consul, "del", "nosuch", "127.0.0.1:80")
    assert out.returncode == 1 and "service 'nosuch' has no registered instance in Consul" in out.stderr
    upstream(consul, "add", "web", "127.0.0.1:8081", "--check", "none")
    out = upstream(consul, "drain", "web", "127.0.0.1:9999")
    assert out.returncode == 1 and "has no instance at 127.0.0.1:9999 (it has: 127.0.0.1:8081)" in out.stderr
    out = run_confpy("upstream", "list", env={"CONSUL_HTTP_ADDR": "http://127.0.0.1:1", "CONFPY_CONFIG": ""})
    assert (
        out.returncode == 1
        and "cannot reach Consul at http://127.0.0.1:1" in out.stderr
        and "connection refused" in out.stderr
    )
