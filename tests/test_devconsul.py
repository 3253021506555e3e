"""Conformance of `confpy dev-consul` with Consul's HTTP API, through py-consul and raw HTTP.

With CONFPY_TEST_CONSUL=http://host:port the same tests run against a real agent; only those
that need dev-consul's internals (a fake clock) are skipped there.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode

import consul as pyconsul
import pytest
from consul.check import Check

from confpy.dev.devconsul.register import RegisterError, decode_service
from confpy.dev.devconsul.server import DevConsulServer, Handler
from confpy.dev.devconsul.state import CRITICAL, WRITER_ANSWERS, AgentState, Read
from confpy.dev.lab import BackendServer, ConsulAPI, DevConsulProcess, wait_until

from .conftest import ConsulUnderTest, dev_consul_only


def client(c: ConsulUnderTest) -> pyconsul.Consul:
    host, port = c.url.rsplit("//", 1)[1].rsplit(":", 1)
    return pyconsul.Consul(host=host, port=int(port))


def passing_ids(api: ConsulAPI, name: str, query: str = "passing") -> list[str]:
    return sorted(e["Service"]["ID"] for e in api.health(name, query)[1])


def blocking_get(api: ConsulAPI, path: str, index: int, wait: str, out: dict[str, Any]) -> None:
    started = time.monotonic()
    code, headers, body = api.request(
        "GET", f"{path}{'&' if '?' in path else '?'}index={index}&wait={wait}", timeout=30
    )
    out.update(
        code=code,
        index=int(headers.get("X-Consul-Index", "0")),
        body=json.loads(body or b"null"),
        took=time.monotonic() - started,
        returned=time.monotonic(),
    )


def test_register_and_read_through_py_consul(consul: ConsulUnderTest) -> None:
    c = client(consul)
    c.agent.service.register(
        "web",
        service_id="web-1",
        address="127.0.0.1",
        port=8081,
        tags=["nginx"],
        meta={"zone": "a"},
        weights={"passing": 3, "warning": 1},
    )
    index, entries = c.health.service("web", passing=True)
    assert int(index) >= 1
    [entry] = entries
    assert set(entry) == {"Node", "Service", "Checks"}
    for key in ("ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta", "CreateIndex", "ModifyIndex"):
        assert key in entry["Node"]
    service = entry["Service"]
    assert (service["ID"], service["Service"], service["Port"], service["Tags"], service["Meta"]) == (
        "web-1",
        "web",
        8081,
        ["nginx"],
        {"zone": "a"},
    )
    assert service["Weights"] == {"Passing": 3, "Warning": 1}
    for key in ("Address", "TaggedAddresses", "EnableTagOverride", "CreateIndex", "ModifyIndex"):
        assert key in service
    check_keys = {
        "CheckID",
        "Name",
        "Status",
        "Notes",
        "Output",
        "ServiceID",
        "ServiceName",
        "ServiceTags",
        "Type",
        "CreateIndex",
        "ModifyIndex",
    }
    assert all(check_keys <= set(check) for check in entry["Checks"])
    assert [ch["CheckID"] for ch in entry["Checks"]] == ["serfHealth"]
    _, services = c.catalog.services()
    assert services["web"] == ["nginx"] and "consul" in services
    _, nodes = c.catalog.service("web")
    assert (
        nodes[0]["ServiceID"] == "web-1"
        and nodes[0]["ServicePort"] == 8081
        and nodes[0]["ServiceWeights"] == {"Passing": 3, "Warning": 1}
    )


def test_blocking_query_returns_on_a_relevant_change_only(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="web-1")
    api.register("api", 9001, id="api-1")
    index, _ = api.health("web")
    # A change to another service must not wake a watcher of web: it times out with the same index.
    unrelated: dict[str, Any] = {}
    t = threading.Thread(target=blocking_get, args=(api, "/v1/health/service/web?passing", index, "1s", unrelated))
    t.start()
    time.sleep(0.2)
    api.register("api", 9002, id="api-2")
    t.join(10)
    assert unrelated["code"] == 200 and unrelated["index"] == index and unrelated["took"] >= 0.9
    # A change to web wakes it at once (well before its 10 s wait).
    relevant: dict[str, Any] = {}
    t = threading.Thread(target=blocking_get, args=(api, "/v1/health/service/web?passing", index, "10s", relevant))
    t.start()
    time.sleep(0.2)
    changed_at = time.monotonic()
    api.register("web", 8082, id="web-2")
    t.join(15)
    latency = relevant["returned"] - changed_at
    assert relevant["index"] > index and len(relevant["body"]) == 2
    assert latency < 2.0, f"blocking query returned {latency:.3f}s after the change"


def test_timeout_returns_same_body_and_index_and_index_is_never_zero(consul: ConsulUnderTest) -> None:
    api = consul.api
    index, body = api.health("ghost")
    assert index >= 1 and body == []
    out: dict[str, Any] = {}
    blocking_get(api, "/v1/health/service/ghost", index, "500ms", out)
    assert out["index"] == index and out["body"] == [] and 0.45 <= out["took"] < 5
    code, headers, _ = api.request("GET", "/v1/catalog/services?index=0")
    assert code == 200 and int(headers["X-Consul-Index"]) >= 1
    assert headers["X-Consul-KnownLeader"] == "true" and "X-Consul-LastContact" in headers
    assert "Date" in headers and "Server" not in headers  # Go's net/http names no server software


@pytest.mark.parametrize(
    ("path", "status", "text"),
    [
        ("/v1/health/service/web?index=1&wait=zz", 400, "Invalid wait time"),
        ("/v1/health/service/web?index=abc", 400, "Invalid index"),
        ("/v1/health/service/web?passing=maybe", 400, "Invalid value for ?passing"),
        ("/v1/health/service/", 400, "Missing service name"),
        (
            "/v1/catalog/services?stale&consistent",
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ),
    ],
)
def test_query_parameter_errors(consul: ConsulUnderTest, path: str, status: int, text: str) -> None:
    code, _, body = consul.api.request("GET", path)
    assert (code, body.decode().strip()) == (status, text)


@pytest.mark.parametrize("value", ["", "1", "t", "TRUE", "true", "True"])
def test_passing_accepts_go_parsebool_truths(consul: ConsulUnderTest, value: str) -> None:
    consul.api.register("web", 8081, id="web-ok")
    consul.api.register("web", 8082, id="web-bad", Check={"TTL": "60s"})  # critical until it passes
    assert passing_ids(consul.api, "web", f"passing={value}" if value else "passing") == ["web-ok"]
    assert passing_ids(consul.api, "web", "passing=false") == ["web-bad", "web-ok"]


def test_passing_drops_warning_maintenance_and_tag_filters_all_must_match(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="w1", tags=["nginx", "v1"], Check={"TTL": "60s", "Status": "passing"})
    api.register("web", 8082, id="w2", tags=["nginx", "v2"], Check={"TTL": "60s", "Status": "passing"})
    api.register("web", 8083, id="w3", tags=["nginx"])
    assert passing_ids(api, "web") == ["w1", "w2", "w3"]
    assert passing_ids(api, "web", "passing&tag=nginx&tag=v2") == ["w2"]
    api.request("PUT", "/v1/agent/check/warn/service:w1?note=slow")
    assert passing_ids(api, "web") == ["w2", "w3"]
    code, _, _ = api.request("PUT", "/v1/agent/service/maintenance/w2?enable=true")
    assert code == 200
    assert passing_ids(api, "web") == ["w3"]
    [entry] = [e for e in api.health("web", "")[1] if e["Service"]["ID"] == "w2"]
    maint = next(c for c in entry["Checks"] if c["CheckID"] == "_service_maintenance:w2")
    assert maint["Status"] == "critical" and maint["Name"] == "Service Maintenance Mode"
    assert maint["Notes"].startswith("Maintenance mode is enabled for this service, but no reason was provided.")
    api.request("PUT", "/v1/agent/service/maintenance/w2?enable=false")
    api.request("PUT", "/v1/agent/check/pass/service:w1")
    assert passing_ids(api, "web") == ["w1", "w2", "w3"]
    c = client(consul)
    c.agent.service.maintenance("w3", "true", reason="deploying")  # py-consul's own form
    [entry] = [e for e in api.health("web", "")[1] if e["Service"]["ID"] == "w3"]
    assert [ch["Notes"] for ch in entry["Checks"] if ch["CheckID"] == "_service_maintenance:w3"] == ["deploying"]


def test_maintenance_errors(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="w1")
    assert api.request("PUT", "/v1/agent/service/maintenance/w1")[::2] == (400, b"Missing value for enable")
    assert api.request("PUT", "/v1/agent/service/maintenance/w1?enable=x")[::2] == (
        400,
        b'Invalid value for enable: "x"',
    )
    code, _, body = api.request("PUT", "/v1/agent/service/maintenance/nope?enable=true")
    assert code == 404 and body.decode().startswith('No service registered with ID "nope"')


def test_register_decoding_rules(consul: ConsulUnderTest) -> None:
    api = consul.api
    # Keys in any case, snake_case, and the consul CLI's explicit nulls.
    body = {
        "name": "web",
        "PORT": 8081,
        "address": "127.0.0.1",
        "enable_tag_override": True,
        "Check": None,
        "Checks": None,
        "Meta": {"Mixed_Case": "kept"},
    }
    assert api.request("PUT", "/v1/agent/service/register", body)[0] == 200
    [entry] = api.health("web", "")[1]
    assert entry["Service"]["ID"] == "web" and entry["Service"]["EnableTagOverride"] is True
    assert entry["Service"]["Meta"] == {"Mixed_Case": "kept"}
    # Checks: default IDs and names, critical until told otherwise.
    api.register("api", 9000, id="api-1", Checks=[{"TTL": "30s"}, {"TTL": "30s", "Status": "passing"}])
    [entry] = api.health("api", "")[1]
    checks = {c["CheckID"]: c for c in entry["Checks"] if c["ServiceID"]}
    assert set(checks) == {"service:api-1:1", "service:api-1:2"}
    assert checks["service:api-1:1"]["Status"] == "critical" and checks["service:api-1:2"]["Status"] == "passing"
    assert checks["service:api-1:1"]["Name"] == "Service 'api' check"
    api.register("one", 9001, id="one-1", Check={"TTL": "30s"})
    assert [c["CheckID"] for c in api.health("one", "")[1][0]["Checks"] if c["ServiceID"]] == ["service:one-1"]
    # Re-registering an ID replaces it.
    api.register("one", 9002, id="one-1")
    assert [e["Service"]["Port"] for e in api.health("one", "")[1]] == [9002]
    # Deregistering an unknown ID is a 200, as in Consul.
    assert api.request("PUT", "/v1/agent/service/deregister/never-was")[0] == 200


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({"Port": 80}, "Missing service name"),
        (
            {"Name": "web", "Port": "80"},
            "Request decode failed: json: cannot unmarshal string into Go struct field ServiceDefinition.Port of type int",
        ),
        (
            {"Name": "web", "Tags": "nginx"},
            "Request decode failed: json: cannot unmarshal string into Go struct field ServiceDefinition.Tags",
        ),
        ({"Name": "web", "Address": "0.0.0.0"}, "Invalid service address"),
        ({"Name": "web", "Address": "::"}, "Invalid service address"),
        ({"Name": "web", "Weights": {"Passing": 0, "Warning": 1}}, "Invalid Weights: Passing must be greater than 0"),
        (
            {"Name": "web", "Meta": {"consul-x": "1"}},
            "Invalid Service Meta: Key prefix 'consul-' is reserved for internal use",
        ),
        ({"Name": "web", "Meta": {"a b": "1"}}, "Invalid Service Meta: Key contains invalid characters"),
        ({"Name": "web", "Meta": {"k": "v" * 513}}, "Invalid Service Meta: Value is too long (limit: 512 characters)"),
        (
            {"Name": "web", "Meta": {f"k{i}": "v" for i in range(65)}},
            "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs",
        ),
        ({"Name": "web", "Check": {"HTTP": "http://127.0.0.1/"}}, "Invalid check: Interval must be > 0"),
        (
            {"Name": "web", "Check": {"TTL": "10s", "Interval": "10s"}},
            "Invalid check: Interval and TTL cannot both be specified",
        ),
        (
            {"Name": "web", "Check": {"TTL": "10s", "Status": "up"}},
            "Status for checks must 'passing', 'warning', 'critical'",
        ),
    ],
)
def test_register_errors_use_consul_texts(consul: ConsulUnderTest, body: dict[str, Any], text: str) -> None:
    code, _, answer = consul.api.request("PUT", "/v1/agent/service/register", body)
    assert code == 400
    assert answer.decode().startswith(text)


def test_register_rejects_bad_json(consul: ConsulUnderTest) -> None:
    code, _, answer = consul.api.request("PUT", "/v1/agent/service/register", b"{not json")
    assert code == 400 and answer.decode().startswith("Request decode failed")


def test_ttl_updates_and_errors(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="w1", Check={"TTL": "30s"})
    api.register("web", 8082, id="w2", Check={"TCP": "127.0.0.1:1", "Interval": "10s"})
    assert api.request("PUT", "/v1/agent/check/pass/service:w1?note=all%20good")[0] == 200
    [check] = [c for e in api.health("web", "")[1] for c in e["Checks"] if c["CheckID"] == "service:w1"]
    assert check["Status"] == "passing" and check["Output"] == "all good"
    assert api.request("PUT", "/v1/agent/check/update/service:w1", {"Status": "warning", "Output": "slow"})[0] == 200
    [check] = [c for e in api.health("web", "")[1] for c in e["Checks"] if c["CheckID"] == "service:w1"]
    assert (check["Status"], check["Output"]) == ("warning", "slow")
    for target in ("service:w2", "nope"):
        code, _, body = api.request("PUT", f"/v1/agent/check/fail/{target}")
        assert (code, body.decode()) == (500, f'CheckID "{target}" does not have associated TTL')


def test_ttl_expiry_turns_critical(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="w1", Check={"TTL": "1s", "Status": "passing"})
    assert passing_ids(api, "web") == ["w1"]
    assert wait_until(lambda: passing_ids(api, "web") == [], 10, interval=0.1)
    [check] = [c for e in api.health("web", "")[1] for c in e["Checks"] if c["CheckID"] == "service:w1"]
    assert check["Status"] == "critical" and "TTL expired" in check["Output"]


def test_http_and_tcp_checks_follow_the_backend(consul: ConsulUnderTest) -> None:
    backend = BackendServer("App").start()
    port = backend.port
    api = consul.api
    api.register("web", port, id="tcp", Check={"TCP": f"127.0.0.1:{port}", "Interval": "1s", "Timeout": "1s"})
    api.register(
        "web", port, id="http", Check={"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "1s", "Timeout": "1s"}
    )
    assert wait_until(lambda: passing_ids(api, "web") == ["http", "tcp"], 10, interval=0.1)
    [check] = [c for e in api.health("web", "")[1] for c in e["Checks"] if c["CheckID"] == "service:http"]
    assert check["Output"].startswith(f"HTTP GET http://127.0.0.1:{port}/health: 200 OK Output: App")
    backend.stop()
    assert wait_until(lambda: passing_ids(api, "web") == [], 10, interval=0.1)


def test_kv(consul: ConsulUnderTest) -> None:
    api = consul.api
    code, headers, _ = api.request("GET", "/v1/kv/confpy-test/missing")
    assert code == 404 and int(headers["X-Consul-Index"]) >= 1
    assert api.request("PUT", "/v1/kv/confpy-test/a?flags=42", b"hello")[2] == b"true"
    assert api.request("PUT", "/v1/kv/confpy-test/dir/b", b"x")[2] == b"true"
    _, _, body = api.request("GET", "/v1/kv/confpy-test/a")
    [item] = json.loads(body)
    assert item["Key"] == "confpy-test/a" and base64.b64decode(item["Value"]) == b"hello" and item["Flags"] == 42
    assert api.request("GET", "/v1/kv/confpy-test/a?raw")[2] == b"hello"
    assert json.loads(api.request("GET", "/v1/kv/confpy-test/?keys&separator=/")[2]) == [
        "confpy-test/a",
        "confpy-test/dir/",
    ]
    assert len(json.loads(api.request("GET", "/v1/kv/confpy-test/?recurse")[2])) == 2
    assert api.request("PUT", "/v1/kv/confpy-test/a?cas=0", b"no")[2] == b"false"
    assert api.request("PUT", f"/v1/kv/confpy-test/a?cas={item['ModifyIndex']}", b"yes")[2] == b"true"
    assert api.request("DELETE", "/v1/kv/confpy-test/?recurse")[2] == b"true"
    assert api.request("GET", "/v1/kv/confpy-test/a")[0] == 404


def test_status_and_self(consul: ConsulUnderTest) -> None:
    code, _, body = consul.api.request("GET", "/v1/status/leader")
    assert code == 200 and ":" in json.loads(body)
    code, _, body = consul.api.request("GET", "/v1/agent/self")
    assert code == 200 and "Datacenter" in json.loads(body)["Config"]


@dev_consul_only
def test_deregister_critical_service_after_has_a_one_minute_floor() -> None:
    now = [1000.0]
    state = AgentState("n1", clock=lambda: now[0])
    service, checks = decode_service(
        {"Name": "web", "ID": "w1", "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "5s"}}
    )
    assert checks[0]["deregister_after"] == 60.0
    state.register(service, checks)
    assert state.checks["service:w1"].status == CRITICAL
    now[0] += 59
    assert state.reap_critical() == [] and "w1" in state.services
    now[0] += 2
    assert state.reap_critical() == ["w1"] and "w1" not in state.services and "service:w1" not in state.checks


@dev_consul_only
def test_unsupported_check_kinds_are_refused_clearly() -> None:
    with pytest.raises(RegisterError, match="supports script, TTL, HTTP and TCP checks, not grpc"):
        decode_service({"Name": "web", "Check": {"GRPC": "127.0.0.1:1", "Interval": "1s"}})


@dev_consul_only
def test_dev_consul_exits_cleanly_on_sigterm() -> None:

    proc = DevConsulProcess().start()
    assert proc.proc is not None
    proc.stop()
    assert proc.proc.returncode == 0


def test_an_answer_before_the_body_is_read_does_not_break_the_connection(consul: ConsulUnderTest) -> None:
    """A 404 for an unknown route with a JSON body, then a valid request on the same connection."""
    import http.client

    host, port = consul.url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        body = json.dumps({"Name": "web", "Port": 80}).encode()
        conn.request("PUT", "/v1/agent/no/such/route", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 404 and response.read() == b"404 page not found"
        conn.request("GET", "/v1/catalog/services")
        response = conn.getresponse()
        assert response.status == 200 and isinstance(json.loads(response.read()), dict)
    finally:
        conn.close()


@dev_consul_only
def test_health_order_is_stable_unless_shuffled(consul: ConsulUnderTest) -> None:
    stable = DevConsulProcess().start()
    try:
        api = ConsulAPI(stable.url)
        for n in (5, 3, 9, 1, 7):
            api.register("web", 8000 + n, id=f"web-{n}")
        orders = {tuple(e["Service"]["ID"] for e in api.health("web")[1]) for _ in range(5)}
        assert orders == {("web-1", "web-3", "web-5", "web-7", "web-9")}  # Consul's order: by ID, every time
    finally:
        stable.stop()
    for n in (5, 3, 9, 1, 7):  # the suite's agent runs with --shuffle
        consul.api.register("web", 8000 + n, id=f"web-{n}")
    shuffled = {tuple(e["Service"]["ID"] for e in consul.api.health("web")[1]) for _ in range(20)}
    assert len(shuffled) > 1


def test_parameters_consul_would_refuse_are_refused(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="web-1")
    for path in ("/v1/health/service/web?dc=dc2", "/v1/catalog/services?dc=dc2", "/v1/kv/a?dc=dc2"):
        code, _, body = api.request("GET", path)
        assert (code, body) == (500, b"No path to datacenter"), path
    assert api.request("GET", "/v1/health/service/web?dc=dc1")[0] == 200  # its own datacenter is fine
    code, _, body = api.request("GET", "/v1/kv/")  # an empty key: a watch on it must not block forever
    assert (code, body) == (400, b"Missing key name")
    assert api.request("PUT", "/v1/kv/", b"x")[:3:2] == (400, b"Missing key name")
    assert api.request("GET", "/v1/kv/?recurse")[0] in (200, 404)  # listing the root is allowed
    code, _, body = api.request("PUT", "/v1/kv/lock?acquire=3f9b2c1e-0000-4000-8000-000000000000", b"x")
    assert (code, body) == (500, b'invalid session "3f9b2c1e-0000-4000-8000-000000000000"')
    code, _, body = api.request("PUT", "/v1/kv/lock?cas=0&release=s", b"x")
    assert code == 400 and body.startswith(b"Conflicting flags: ")
    assert api.request("GET", "/v1/kv/lock")[0] == 404  # nothing was written


def test_filter_expressions_select_as_consul_and_bad_ones_are_400(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="web-1", tags=["nginx", "blue"], Meta={"version": "2"})
    api.register("web", 8082, id="web-2", tags=["nginx"], Meta={"version": "1"})
    cases = {
        '"blue" in Service.Tags': ["web-1"],
        'Service.Meta.version == "1"': ["web-2"],
        "Service.Meta.version != `1` and Service.Port == 8081": ["web-1"],
        'Checks.Status == "passing"': ["web-1", "web-2"],
        'not ("blue" in Service.Tags) or Service.ID matches "^web-1$"': ["web-1", "web-2"],
        "Service.Meta.zone is empty": ["web-1", "web-2"],
    }
    for expression, wanted in cases.items():
        code, _, body = api.request("GET", "/v1/health/service/web?" + urlencode({"filter": expression}))
        assert code == 200 and sorted(e["Service"]["ID"] for e in json.loads(body)) == wanted, expression
    code, _, body = api.request("GET", "/v1/health/service/web?" + urlencode({"filter": "Service.Nope == 1"}))
    assert (code, body) == (400, b'Failed to create evaluator for expression: Selector "Service.Nope" is not valid')
    code, _, body = api.request("GET", "/v1/catalog/nodes?" + urlencode({"filter": "not a valid expression(("}))
    assert code == 400 and body.startswith(b"Failed to create evaluator for expression: ")
    code, _, body = api.request("GET", "/v1/agent/services?" + urlencode({"filter": '"blue" in Tags'}))
    assert code == 200 and list(json.loads(body)) == ["web-1"]


def test_unknown_peer_answers_empty_as_consul_does(consul: ConsulUnderTest) -> None:
    api = consul.api
    api.register("web", 8081, id="web-1")
    for path in ("/v1/health/service/web?peer=nobody", "/v1/catalog/service/web?peer=nobody"):
        code, headers, body = api.request("GET", path)
        assert (code, json.loads(body)) == (200, []) and int(headers["X-Consul-Index"]) >= 1, path
    assert len(json.loads(api.request("GET", "/v1/health/service/web")[2])) == 1


def test_catalog_nodes_register_and_deregister(consul: ConsulUnderTest) -> None:
    c = client(consul)
    own = c.agent.self()["Config"]["NodeName"]
    assert c.catalog.register("n1", "10.1.10.11", service={"service": "s1", "port": 80}, check={"name": "c1"})
    assert c.catalog.register("n2", "10.1.10.12", service={"service": "s1", "tags": ["primary"]})
    assert [n["Node"] for n in c.catalog.nodes()[1]] == sorted([own, "n1", "n2"])
    node = c.catalog.node("n1")[1]
    assert node["Node"]["Address"] == "10.1.10.11" and set(node["Services"]) == {"s1"}
    assert c.catalog.node("nowhere")[1] is None
    # A catalog check with no status is critical, as Consul stores it: n1's instance is not passing.
    assert [e["Node"]["Node"] for e in c.health.service("s1", passing=True)[1]] == ["n2"]
    assert {x["Node"] for x in c.catalog.service("s1", tag="primary")[1]} == {"n2"}
    assert c.catalog.deregister("n1", check_id="c1")
    assert sorted(e["Node"]["Node"] for e in c.health.service("s1", passing=True)[1]) == ["n1", "n2"]
    assert c.catalog.deregister("n2")
    assert [n["Node"] for n in c.catalog.nodes()[1]] == sorted([own, "n1"])
    with pytest.raises(pyconsul.ConsulException, match="No path to datacenter"):
        c.catalog.register("n3", "10.1.10.13", dc="dc2")


def test_agent_checks_node_maintenance_and_health_state(consul: ConsulUnderTest) -> None:
    c = client(consul)
    c.agent.service.register("web", service_id="web-1", port=8081)
    assert c.agent.check.register("web-ttl", Check.ttl("30s"), service_id="web-1")
    assert set(c.agent.checks()) == {"web-ttl"}  # serfHealth is the catalog's, not the agent's
    assert c.health.service("web", passing=True)[1] == []  # a new check starts critical
    c.agent.check.ttl_pass("web-ttl")
    assert [e["Service"]["ID"] for e in c.health.service("web", passing=True)[1]] == ["web-1"]
    assert {ch["CheckID"] for ch in c.health.state("passing")[1]} == {"serfHealth", "web-ttl"}
    c.agent.maintenance("true", "kernel upgrade")
    assert c.agent.checks()["_node_maintenance"]["Notes"] == "kernel upgrade"
    assert c.health.service("web", passing=True)[1] == []  # a node check takes every service out
    c.agent.maintenance("false")
    assert [e["Service"]["ID"] for e in c.health.service("web", passing=True)[1]] == ["web-1"]
    assert c.agent.check.deregister("web-ttl") and set(c.agent.checks()) == set()
    code, _, body = consul.api.request("PUT", "/v1/agent/check/deregister/web-ttl")
    assert code == 404 and body.startswith(b'Unknown check ID "web-ttl"')
    code, _, body = consul.api.request(
        "PUT", "/v1/agent/check/register", json.dumps({"Name": "x", "TTL": "10s", "ServiceID": "nope"}).encode()
    )
    assert (code, body) == (404, b'ServiceID "nope" does not exist')
    code, _, body = consul.api.request("GET", "/v1/health/state/sleepy")
    assert (code, body) == (400, b"Invalid check state")


def test_script_checks_only_when_enabled(consul: ConsulUnderTest) -> None:
    body = json.dumps({"Name": "s", "Args": ["/bin/true"], "Interval": "1s"}).encode()
    code, _, text = consul.api.request("PUT", "/v1/agent/check/register", body)
    assert code == 500 and b"Scripts are disabled on this agent" in text
    agent = DevConsulProcess(script_checks=True).start()
    try:
        api = ConsulAPI(agent.url)
        assert api.request("PUT", "/v1/agent/check/register", body)[0] == 200
        failing = json.dumps({"Name": "f", "Args": ["/bin/sh", "-c", "exit 1"], "Interval": "1s"}).encode()
        assert api.request("PUT", "/v1/agent/check/register", failing)[0] == 200

        def statuses() -> dict[str, str]:
            checks = json.loads(api.request("GET", "/v1/agent/checks")[2])
            return {cid: ch["Status"] for cid, ch in checks.items()}

        assert wait_until(lambda: statuses() == {"s": "passing", "f": "warning"}, 10), statuses()
    finally:
        agent.stop()


@dev_consul_only
def test_agent_leave_stops_the_agent() -> None:
    agent = DevConsulProcess().start()
    assert agent.proc is not None
    assert ConsulAPI(agent.url).request("PUT", "/v1/agent/leave")[0] == 200
    assert agent.proc.wait(10) == 0


def test_tagged_addresses_are_written_back_in_consuls_case(consul: ConsulUnderTest) -> None:
    c = client(consul)
    c.agent.service.register("tagged", tagged_addresses={"lan": {"address": "10.0.0.1", "port": 8080}})
    assert c.agent.services()["tagged"]["TaggedAddresses"] == {"lan": {"Address": "10.0.0.1", "Port": 8080}}
    assert set(c.agent.services()["tagged"]) == {
        "ID", "Service", "Tags", "Meta", "Port", "Address", "TaggedAddresses", "Weights", "EnableTagOverride",
        "Datacenter",
    }  # fmt: skip


def _blocked_reader(state: AgentState, view: str, wait: float, answers: list[tuple[int, Any, int]]) -> threading.Thread:
    """A thread blocked on `view` of `state` past its current index; each answer is noted with the
    thread that ran it."""
    index = state.health_index("web")

    def answer(new_index: int, data: Any) -> None:
        answers.append((new_index, data, threading.get_ident()))

    read = Read(view, lambda: state.health_index("web"), lambda: 1, lambda: state.health_service("web", [], False))
    thread = threading.Thread(target=state.blocking, args=(read, index, wait, answer))
    thread.start()
    assert wait_until(lambda: view in state.parked, 5)  # parked: its answer waits for a write
    return thread


@dev_consul_only
def test_a_write_answers_its_blocked_readers_from_its_own_thread() -> None:
    state = AgentState("n1")
    state.register(decode_service({"Name": "web", "ID": "w1", "Port": 80})[0], [])
    answers: list[tuple[int, Any, int]] = []
    reader = _blocked_reader(state, "health:web", 60, answers)
    state.register(decode_service({"Name": "web", "ID": "w2", "Port": 81})[0], [])
    # answered before the write returned, in the writer's thread, with the new members and index
    assert [(i, [e["Service"]["ID"] for e in d], t) for i, d, t in answers] == [
        (state.health_index("web"), ["w1", "w2"], threading.get_ident())
    ]
    reader.join(5)
    assert not reader.is_alive() and len(answers) == 1 and state.parked == {}
    state.register(decode_service({"Name": "web", "ID": "w3", "Port": 82})[0], [])
    assert len(answers) == 1  # answered once: a later write finds no parked reader


@dev_consul_only
def test_a_reader_whose_wait_ends_answers_itself_once() -> None:
    state = AgentState("n1")
    state.register(decode_service({"Name": "web", "ID": "w1", "Port": 80})[0], [])
    index = state.health_index("web")
    answers: list[tuple[int, Any, int]] = []
    reader = _blocked_reader(state, "health:web", 0.2, answers)
    reader.join(5)
    assert [(i, t) for i, _, t in answers] == [(index, reader.ident)] and state.parked == {}
    state.register(decode_service({"Name": "web", "ID": "w2", "Port": 81})[0], [])
    assert len(answers) == 1


@dev_consul_only
def test_an_answer_that_fails_in_the_writers_thread_is_left_to_the_readers_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = AgentState("n1")
    state.register(decode_service({"Name": "web", "ID": "w1", "Port": 80})[0], [])
    answers: list[tuple[int, Any, int]] = []
    reader = _blocked_reader(state, "health:web", 60, answers)
    writer = threading.get_ident()

    def fail_in_the_writer(new_index: int, data: Any) -> None:
        if threading.get_ident() == writer:
            raise ValueError("a bug in one reader's answer")
        answers.append((new_index, data, threading.get_ident()))

    state.parked["health:web"][0].answer = fail_in_the_writer
    state.register(decode_service({"Name": "web", "ID": "w2", "Port": 81})[0], [])  # the write succeeds
    reader.join(5)
    assert [(i, len(d), t) for i, d, t in answers] == [(state.health_index("web"), 2, reader.ident)]
    assert "answering a blocked query on health:web from the writer's thread failed" in caplog.text


@dev_consul_only
def test_a_client_that_does_not_read_never_holds_up_a_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A blocked KV read whose answer (~5.6 MB) is more than its socket takes while the client
    reads nothing: the write that answers it sends what fits and returns; the reader's own thread
    sends the rest, and the client gets the whole answer."""
    left_for_the_reader: list[int] = []
    write_out = Handler._write_out

    def noting_write_out(handler: Handler, data: bytes) -> None:
        write_out(handler, data)
        if threading.get_ident() != handler._thread:
            left_for_the_reader.append(len(handler._unsent))

    monkeypatch.setattr(Handler, "_write_out", noting_write_out)
    setup = Handler.setup

    def small_send_buffer(handler: Handler) -> None:
        # A fixed send buffer (no autotuning up to tcp_wmem's maximum, which differs between
        # hosts): far less than the answer can wait in the kernel, whatever the host.
        setup(handler)
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)

    monkeypatch.setattr(Handler, "setup", small_send_buffer)
    server = DevConsulServer("127.0.0.1", 0, "n1")
    server.start()
    try:
        api = ConsulAPI(server.url)
        value = bytes(range(256)) * 2048  # 512 KB, the largest value Consul takes
        for n in range(7):
            api.request("PUT", f"/v1/kv/big/{n}", value)
        index = int(api.request("GET", "/v1/kv/big/?recurse")[1]["X-Consul-Index"])
        idle = socket.create_connection(("127.0.0.1", server.server_address[1]))
        idle.sendall(f"GET /v1/kv/big/?recurse&index={index}&wait=30s HTTP/1.1\r\nHost: consul\r\n\r\n".encode())
        assert wait_until(lambda: "kvp:big/" in server.state.parked, 5)
        written: list[bytes] = []
        writer = threading.Thread(target=lambda: written.append(api.request("PUT", "/v1/kv/big/7", value)[2]))
        writer.start()
        writer.join(20)
        assert written == [b"true"]  # the write did not wait for the idle client
        assert server.state.parked == {} and len(left_for_the_reader) == 1 and left_for_the_reader[0] > 0
        idle.settimeout(20)
        raw = b""
        while b"\r\n\r\n" not in raw:
            raw += idle.recv(65536)
        head, body = raw.split(b"\r\n\r\n", 1)
        length = re.search(rb"Content-Length: (\d+)", head)
        assert head.startswith(b"HTTP/1.1 200") and length is not None
        while len(body) < int(length.group(1)):
            body += idle.recv(1 << 20)
        idle.close()
        entries = json.loads(body)
        assert len(body) == int(length.group(1)) and len(entries) == 8
        assert all(base64.b64decode(entry["Value"]) == value for entry in entries)
    finally:
        server.stop()


@dev_consul_only
def test_a_write_answers_a_crowd_of_readers_only_in_part_and_each_reader_once() -> None:
    state = AgentState("n1")
    state.register(decode_service({"Name": "web", "ID": "w1", "Port": 80})[0], [])
    answers: list[tuple[int, Any, int]] = []
    crowd = WRITER_ANSWERS + 4
    readers = [_blocked_reader(state, "health:web", 60, answers) for _ in range(crowd)]
    assert wait_until(lambda: len(state.parked["health:web"]) == crowd, 5)
    state.register(decode_service({"Name": "web", "ID": "w2", "Port": 81})[0], [])
    for reader in readers:
        reader.join(5)
    writer = threading.get_ident()
    assert len(answers) == crowd and {i for i, _, _ in answers} == {state.health_index("web")}
    themselves = [t for _, _, t in answers if t != writer]  # the rest woke and answered themselves
    assert len(themselves) == 4 and set(themselves) <= {r.ident for r in readers} and len(set(themselves)) == 4


def _raw_exchange(url: str, request: bytes) -> bytes:
    """Send `request` as bytes on a new connection; everything the server answers until it closes it."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_request_headers_are_read_as_go_reads_them(consul: ConsulUnderTest) -> None:
    ok = _raw_exchange(
        consul.url, b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\nX-Any:  spaced \r\nConnection: close\r\n\r\n"
    )
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"}")
    go_error = b"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
    bad = _raw_exchange(consul.url, b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
    assert bad == b"HTTP/1.1 400 Bad Request" + go_error + b"400 Bad Request"
    huge = b"X-Big: " + b"a" * (2 << 20) + b"\r\n"  # more than Go's default MaxHeaderBytes (1 MB)
    large = _raw_exchange(consul.url, b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\n" + huge + b"\r\n")
    assert large == b"HTTP/1.1 431 Request Header Fields Too Large" + go_error + b"431 Request Header Fields Too Large"
    crowd = b"".join(b"X-H%d: v\r\n" % n for n in range(200))  # many small ones are fine, as in Go
    many = _raw_exchange(
        consul.url, b"GET /v1/catalog/services HTTP/1.1\r\nHost: x\r\n" + crowd + b"Connection: close\r\n\r\n"
    )
    assert many.startswith(b"HTTP/1.1 200")
    body = b'{"Name": "expecting", "Port": 80}'
    expect = _raw_exchange(
        consul.url,
        b"PUT /v1/agent/service/register HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert expect.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), expect
    assert "expecting" in consul.api.request("GET", "/v1/agent/services")[2].decode()
