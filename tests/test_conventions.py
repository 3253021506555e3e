"""Consul's own conventions: the consul CLI's environment and precedence, TLS for real, namespaces,
partitions and consistency modes, against dev-consul over HTTPS."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from confpy.config import CONSUL_ENVIRONMENT, ConsulConfig, consul_from_env
from confpy.dev.lab import BackendServer, ConsulAPI, DevConsulProcess, LabPKI, NginxInstance, write_config
from confpy.errors import ConfigError

from .conftest import SHIPPED_TEMPLATE, run_confpy
from .tiers import starts_processes


@pytest.fixture(scope="module")
@starts_processes
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPKI:
    return LabPKI.make(tmp_path_factory.mktemp("pki"))


# --- precedence and the environment (no server) ------------------------------------------------


def test_a_key_in_the_file_beats_the_environment_even_when_it_says_the_default() -> None:
    env = {"CONSUL_HTTP_ADDR": "http://10.0.0.9:8500", "CONSUL_NAMESPACE": "team-a"}
    written = consul_from_env(env, {"address": "http://127.0.0.1:8500", "namespace": ""}, "c.toml")
    assert written.address == "http://127.0.0.1:8500" and written.namespace == ""
    assert consul_from_env(env, {}, "c.toml").address == "http://10.0.0.9:8500"  # absent: the environment
    assert consul_from_env({}, {}, "c.toml").address == "http://127.0.0.1:8500"  # neither: the default


def test_every_variable_of_the_consul_cli_is_read(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("ca.pem", "cert.pem", "key.pem", "token")}
    for path in files.values():
        path.write_text("x\n")
    (tmp_path / "cas").mkdir()
    env = {
        "CONSUL_HTTP_ADDR": "127.0.0.1:8501",
        "CONSUL_HTTP_SSL": "true",
        "CONSUL_CACERT": str(files["ca.pem"]),
        "CONSUL_CAPATH": str(tmp_path / "cas"),
        "CONSUL_CLIENT_CERT": str(files["cert.pem"]),
        "CONSUL_CLIENT_KEY": str(files["key.pem"]),
        "CONSUL_HTTP_SSL_VERIFY": "false",
        "CONSUL_TLS_SERVER_NAME": "consul.test",
        "CONSUL_HTTP_TOKEN_FILE": str(files["token"]),
        "CONSUL_NAMESPACE": "team-a",
        "CONSUL_PARTITION": "edge",
    }
    assert set(CONSUL_ENVIRONMENT.values()) <= set(env) | {"CONSUL_HTTP_TOKEN"}
    consul = consul_from_env(env)
    assert consul.address == "https://127.0.0.1:8501"
    assert (consul.ca_file, consul.ca_path) == (str(files["ca.pem"]), str(tmp_path / "cas"))
    assert (consul.cert_file, consul.key_file) == (str(files["cert.pem"]), str(files["key.pem"]))
    assert consul.verify is False and consul.tls_server_name == "consul.test"
    assert consul.token == "x" and (consul.namespace, consul.partition) == ("team-a", "edge")
    # The CLI's token order: CONSUL_HTTP_TOKEN before CONSUL_HTTP_TOKEN_FILE; the file's keys before both.
    assert consul_from_env({**env, "CONSUL_HTTP_TOKEN": "direct"}).token == "direct"
    assert consul_from_env({**env, "CONSUL_HTTP_TOKEN": "direct"}, {"token_file": str(files["token"])}).token == "x"


@pytest.mark.parametrize(
    ("env", "values", "words"),
    [
        ({"CONSUL_HTTP_SSL_VERIFY": "maybe"}, {}, "$CONSUL_HTTP_SSL_VERIFY: 'maybe' is not a boolean"),
        ({"CONSUL_CACERT": "/nonexistent/ca.pem"}, {}, "$CONSUL_CACERT: /nonexistent/ca.pem is not a readable file"),
        ({}, {"ca_file": "/nonexistent/ca.pem"}, "c.toml: [consul] ca_file: /nonexistent/ca.pem is not a readable"),
        ({"CONSUL_HTTP_TOKEN_FILE": "/nonexistent/t"}, {}, "$CONSUL_HTTP_TOKEN_FILE: cannot read the Consul token"),
        ({}, {"token": "a", "token_file": "/t"}, "set token or token_file, not both"),
        ({"CONSUL_HTTP_ADDR": "ftp://x"}, {}, "$CONSUL_HTTP_ADDR: Consul address 'ftp://x' is not http(s)"),
        ({}, {"use_cache": True, "consistency": "consistent"}, "the agent cache cannot answer consistent reads"),
    ],
)
def test_errors_name_where_the_value_came_from(env: dict[str, str], values: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        consul_from_env(env, values, "c.toml")
    assert words in str(caught.value)


def test_every_read_carries_namespace_partition_and_consistency() -> None:
    consul = ConsulConfig(namespace="team-a", partition="edge", consistency="stale", max_stale=90.0, use_cache=True)
    assert consul.query_params() == [
        ("ns", "team-a"),
        ("partition", "edge"),
        ("stale", ""),
        ("max_stale", "90s"),
        ("cached", ""),
    ]
    assert ConsulConfig().query_params() == []


# --- TLS for real, through dev-consul's HTTPS ----------------------------------------------------


@pytest.fixture
@starts_processes
def tls_consul(pki: LabPKI) -> Iterator[tuple[DevConsulProcess, ConsulAPI]]:
    """dev-consul over HTTPS that requires a client certificate (verify_incoming)."""
    agent = DevConsulProcess(
        tls=("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-ca", str(pki.ca))
    ).start()
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    try:
        yield agent, ConsulAPI(agent.url, tls=context)
    finally:
        agent.stop()


@pytest.fixture
@starts_processes
def backend() -> Iterator[BackendServer]:
    server = BackendServer("App server 1").start()
    try:
        yield server
    finally:
        server.stop()


def test_confpy_over_tls_from_the_file_and_from_the_environment(
    tls_consul: tuple[DevConsulProcess, ConsulAPI], pki: LabPKI, backend: BackendServer, tmp_path: Path
) -> None:
    agent, api = tls_consul
    assert agent.url.startswith("https://127.0.0.1:")
    api.register("web", backend.port, id="web-1")
    nginx = NginxInstance(tmp_path / "nginx")
    tls_keys = f'ca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
    config = write_config(tmp_path / "file.toml", agent.url, nginx, SHIPPED_TEMPLATE)
    config.write_text(config.read_text().replace("[consul]\n", "[consul]\n" + tls_keys, 1))
    done = run_confpy("-c", str(config), "--once", "--allow-no-reload")
    assert done.returncode == 0, done.stderr
    assert f"server 127.0.0.1:{backend.port} " in nginx.destination.read_text()

    nginx.destination.unlink()
    plain = write_config(tmp_path / "env.toml", agent.url, nginx, SHIPPED_TEMPLATE)
    plain.write_text(plain.read_text().replace(f'address = "{agent.url}"\n', ""))  # the address from the env
    env = {
        "CONSUL_HTTP_ADDR": agent.url,
        "CONSUL_CACERT": str(pki.ca),
        "CONSUL_CLIENT_CERT": str(pki.client_cert),
        "CONSUL_CLIENT_KEY": str(pki.client_key),
        "CONSUL_TLS_SERVER_NAME": "consul.test",
    }
    done = run_confpy("-c", str(plain), "--once", "--allow-no-reload", env=env)
    assert done.returncode == 0, done.stderr
    assert f"server 127.0.0.1:{backend.port} " in nginx.destination.read_text()

    for wrong, words in (
        ({"CONSUL_CACERT": str(pki.other_ca)}, "certificate verify failed"),
        ({"CONSUL_TLS_SERVER_NAME": "wrong.test"}, "wrong.test"),
        ({"CONSUL_CLIENT_CERT": "", "CONSUL_CLIENT_KEY": ""}, "TLS with Consul at"),
    ):
        done = run_confpy("-c", str(plain), "--once", "--allow-no-reload", env={**env, **wrong})
        assert done.returncode != 0 and words in done.stderr, (wrong, done.stderr)
        assert "TLS with Consul at" in done.stderr or "cannot reach Consul" in done.stderr


def test_namespace_and_partition_reach_consul_as_it_expects(
    tls_consul: tuple[DevConsulProcess, ConsulAPI], pki: LabPKI, backend: BackendServer, tmp_path: Path
) -> None:
    agent, api = tls_consul
    api.register("web", backend.port, id="web-1")
    # The community edition knows only `default`, and says so for any other: confpy passes that on.
    code, _, body = api.request("GET", "/v1/health/service/web?ns=team-a")
    assert (code, body) == (400, b'Invalid query parameter: "ns" - Namespaces are a Consul Enterprise feature')
    assert api.request("GET", "/v1/health/service/web?ns=default&partition=default")[0] == 200
    nginx = NginxInstance(tmp_path / "nginx")
    env = {
        "CONSUL_CACERT": str(pki.ca),
        "CONSUL_CLIENT_CERT": str(pki.client_cert),
        "CONSUL_CLIENT_KEY": str(pki.client_key),
    }
    config = write_config(tmp_path / "c.toml", agent.url, nginx, SHIPPED_TEMPLATE)
    for namespace, wanted in (("default", 0), ("team-a", 1)):
        env["CONSUL_NAMESPACE"] = namespace
        done = run_confpy("-c", str(config), "--once", "--allow-no-reload", env=env)
        assert done.returncode == wanted, done.stderr
    assert "Namespaces are a Consul Enterprise feature" in done.stderr


def test_consistency_modes_and_the_agent_cache_are_answered_as_consul_does(
    tls_consul: tuple[DevConsulProcess, ConsulAPI],
) -> None:
    _, api = tls_consul
    api.register("web", 8081, id="web-1")
    _, headers, _ = api.request("GET", "/v1/health/service/web?stale&max_stale=1m")
    assert headers["X-Consul-Effective-Consistency"] == "stale" and headers["X-Consul-LastContact"] == "0"
    _, headers, _ = api.request("GET", "/v1/health/service/web?consistent")
    assert headers["X-Consul-Effective-Consistency"] == "consistent"
    code, _, body = api.request("GET", "/v1/health/service/web?stale&consistent")
    assert code == 400 and b"conflicting semantics" in body
    first = api.request("GET", "/v1/health/service/web?cached")[1]
    again = api.request("GET", "/v1/health/service/web?cached")[1]
    assert (first["X-Cache"], again["X-Cache"]) == ("MISS", "HIT") and "Age" in again
    api.register("web", 8082, id="web-2")
    changed = api.request("GET", "/v1/health/service/web?cached")
    assert changed[1]["X-Cache"] == "MISS" and len(json.loads(changed[2])) == 2
