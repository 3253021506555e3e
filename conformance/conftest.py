"""py-consul's own test suite against `confpy dev-consul` (the only change to the suite).

This file replaces py-consul's root conftest.py, which starts Consul in a Docker container, by one
that starts dev-consul on a free loopback port for each test, as that one starts a container.
The ACL fixtures are out of dev-consul's scope and skip.
"""

from __future__ import annotations

import collections
import os
import socket

import pytest
import requests

from confpy.dev.lab import DevConsulProcess

ConsulInstance = collections.namedtuple("ConsulInstance", ["container", "port", "version"])


@pytest.fixture(scope="session", autouse=True)
def _unset_consul_token() -> None:
    os.environ.pop("CONSUL_HTTP_TOKEN", None)


def _agent_port() -> int:
    """8500 when free: py-consul's checks probe http://localhost:8500, the agent itself inside its container."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", 8500))
        except OSError:
            return 0
    return 8500


@pytest.fixture
def consul_instance():  # type: ignore[no-untyped-def]
    # As py-consul's container, which is started with {"enable_script_checks": true}.
    agent = DevConsulProcess(port=_agent_port(), script_checks=True).start()
    try:
        version = requests.get(f"{agent.url}/v1/agent/self", timeout=10).json()["Config"]["Version"]
        yield ConsulInstance(agent, agent.port, version)
    finally:
        agent.stop()


@pytest.fixture
def acl_consul_instance():  # type: ignore[no-untyped-def]
    pytest.skip("ACLs are out of dev-consul's scope")


@pytest.fixture
def consul_port(consul_instance):  # type: ignore[no-untyped-def]
    return consul_instance.port, consul_instance.version
