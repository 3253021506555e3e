"""KV and the new template functions end to end: dev-consul, real nginx, real requests, the daemon."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from confpy.dev.lab import BackendServer, ConfpyProcess, NginxInstance, free_port, wait_until, write_config

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, http_get, register_backends, run_confpy

SETTINGS = "/v1/kv/confpy/upstreams/web/"


def nginx_dump(nginx: NginxInstance) -> str:
    """`nginx -T`: the whole configuration as nginx reads it."""
    command = nginx.check_cmd.replace(" -t ", " -T ", 1).split()
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_kv_settings_reach_nginx_and_an_injection_is_refused(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], config_file: Path
) -> None:
    register_backends(consul.api, backends[:2])
    plain = run_confpy("-c", str(config_file), "--once", "--allow-no-reload")
    assert plain.returncode == 0, plain.stderr
    without = nginx.destination.read_bytes()
    nginx.start()
    for key, value in (("balance", b"least_conn"), ("keepalive", b"32")):
        assert consul.api.request("PUT", SETTINGS + key, value)[0] == 200
    done = run_confpy("-c", str(config_file), "--once")
    assert done.returncode == 0, done.stderr
    dump = nginx_dump(nginx)
    assert "upstream web {\n    least_conn;\n" in dump and "keepalive 32;" in dump
    assert set(nginx.bodies(8)) == {"App server 1", "App server 2"}

    attack = b"least_conn; } server 10.6.6.6:80; upstream evil {"
    assert consul.api.request("PUT", SETTINGS + "balance", attack)[0] == 200
    done = run_confpy("-c", str(config_file), "--once")
    assert done.returncode == 0, done.stderr
    assert "KV confpy/upstreams/web/balance = 'least_conn; } server 10.6.6.6:80; upstream evil {' left out" in (
        done.stderr
    )
    dump = nginx_dump(nginx)
    assert "10.6.6.6" not in dump and "evil" not in dump and "least_conn" not in dump and "keepalive 32;" in dump
    assert set(nginx.bodies(8)) == {"App server 1", "App server 2"}  # traffic keeps flowing

    for key in ("balance", "keepalive"):
        consul.api.request("DELETE", SETTINGS + key)
    done = run_confpy("-c", str(config_file), "--once")
    assert done.returncode == 0 and nginx.destination.read_bytes() == without  # no keys: the same bytes


def test_a_kv_write_reaches_nginx_with_one_reload_and_an_unrelated_one_with_none(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> None:
    template = tmp_path / "site.conf.j2"
    template.write_text(
        (SHIPPED_TEMPLATE.read_text())
        + 'map $uri $confpy_banner { default {{ key_or_default("site/banner", "none") | nginx_quote }}; }\n'
    )
    status_port = free_port()
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template, status=f"127.0.0.1:{status_port}")
    register_backends(consul.api, backends[:1])
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    assert wait_until(lambda: nginx.destination.exists(), 15), proc.output()
    nginx.start()

    def status() -> dict[str, object]:
        return dict(json.loads(http_get(f"http://127.0.0.1:{status_port}/status")[1]))

    assert wait_until(lambda: status()["pending"] == [], 10)
    cycles, reloads = int(str(status()["cycles"])), nginx.reload_count()
    assert consul.api.request("PUT", "/v1/kv/unrelated/key", b"x")[0] == 200  # nothing watches it
    assert consul.api.request("PUT", "/v1/kv/site/banner", b"hello")[0] == 200
    assert wait_until(lambda: '"hello"' in nginx.destination.read_text(), 15), proc.output()
    assert wait_until(lambda: status()["pending"] == [], 10)
    assert wait_until(lambda: nginx.reload_count() == reloads + 1, 5)
    assert status()["cycles"] == cycles + 1 and nginx.reload_count() == reloads + 1
    assert "unrelated" not in proc.output()
    assert "key(site/banner) changed" in proc.output()


def test_another_datacenter_is_asked_for_not_answered_empty(
    consul: ConsulUnderTest, nginx: NginxInstance, tmp_path: Path
) -> None:
    template = tmp_path / "dc.conf.j2"
    template.write_text('{% for i in service("web@dc2") %}server {{ i.endpoint }};{% endfor %}\n')
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template)
    done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
    assert done.returncode != 0 and "No path to datacenter" in done.stderr, done.stderr


def test_every_template_function_against_dev_consul(
    consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    """One `--once` render through the real client: KV (present, missing, prefixes), nodes, a node,
    datacenters, env, JSON, detailed services and the first pass's [0] / | first, all answered by
    dev-consul's HTTP API."""
    api = consul.api
    register_backends(api, backends[:2], tags=["nginx", "blue"])
    for key, value in (("app/name", b"shop"), ("app/limits/rate", b"10r/s"), ("app/limits/burst", b"20"),
                       ("app/limits/deep/x", b"1"), ("app/json", b'{"zone": "eu"}')):  # fmt: skip
        assert api.request("PUT", f"/v1/kv/{key}", value)[0] == 200
    assert api.request("PUT", "/v1/catalog/register", {"Node": "edge-1", "Address": "10.9.0.1",
                       "Service": {"Service": "cache", "ID": "cache-1", "Port": 6379}})[0] == 200  # fmt: skip
    template = tmp_path / "all.j2"
    template.write_text(
        "# {{ service('web')[0].port > 0 }} {{ (service('web') | first).name }}\n"
        "# {{ key('app/name') }} {{ key_or_default('app/missing', 'dflt') }}\n"
        "# ls {% for p in ls('app/limits') %}{{ p.key }}={{ p.value }} {% endfor %}|\n"
        "# tree {{ tree('app/limits') | map(attribute='key') | join(',') }}\n"
        "# keys {{ keys('app/limits/') | join(',') }}\n"
        "# nodes {{ nodes() | map(attribute='name') | select('equalto', 'edge-1') | list | length }}\n"
        "# node {% for s in node('edge-1').services %}{{ s.id }}:{{ s.port }}{% endfor %} {{ node('nope') is none }}\n"
        "# dc {{ datacenters() | join(',') }} env {{ env('CONFPY_TEST_REGION', 'none') }}\n"
        "# json {{ (key('app/json') | parse_json).zone }}\n"
        "# detailed {% for s in services(detailed=True) %}{{ s.name }}[{{ s.tags | join('+') }}] {% endfor %}|\n"
        "upstream web { server 127.0.0.1:9 down; }\n"  # what the lab's nginx.conf proxies to
    )
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template)
    done = run_confpy("-c", str(config), "--once", "--allow-no-reload", env={"CONFPY_TEST_REGION": "eu-1"})
    assert done.returncode == 0, done.stderr
    assert nginx.destination.read_text().splitlines() == [
        "# on web",
        "# shop dflt",
        "# ls burst=20 rate=10r/s |",
        "# tree burst,deep/x,rate",
        "# keys app/limits/burst,app/limits/deep/x,app/limits/rate",
        "# nodes 1",
        "# node cache-1:6379 on",
        "# dc dc1 env eu-1",
        "# json eu",
        "# detailed cache[] web[blue+nginx] |",
        "upstream web { server 127.0.0.1:9 down; }",
    ]
    template.write_text("{{ key('app/missing') }}\n")
    missing = run_confpy("-c", str(config), "--once", "--allow-no-reload")
    assert missing.returncode == 1 and "key('app/missing'): Consul's KV has no such key" in missing.stderr
