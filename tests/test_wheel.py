"""A wheel installed (not editable) into a fresh virtualenv runs the documented configurations.

What an operator does: `pip install confpy-*.whl` into a plain venv, copy README's minimal
configuration and docs/live-mode.md's live example, and run them. Only what depends on this
machine is changed (Consul's address, nginx's pid file and check command, the destination, the
state directory); `source = "builtin:..."` stays exactly as documented.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confpy.dev.lab import BackendServer, NginxInstance, free_port, lua_available, wait_until

from .conftest import ROOT, ConsulUnderTest, register_backends
from .tiers import starts_processes


def documented_toml(path: Path, after: str) -> dict[str, Any]:
    """The first ```toml block after the line containing `after` in a Markdown file."""
    text = path.read_text()
    start = text.index(after)
    block = re.search(r"```toml\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no toml block after {after!r} in {path}"
    return tomllib.loads(block.group(1))


def as_toml(data: dict[str, Any]) -> str:
    lines = []
    for table, values in data.items():
        rows = values if isinstance(values, list) else [values]
        for row in rows:
            lines.append(f"[[{table}]]" if isinstance(values, list) else f"[{table}]")
            lines += [
                f"{key} = {value!r}".replace("'", '"') if isinstance(value, str) else f"{key} = {str(value).lower()}"
                for key, value in row.items()
            ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
@starts_processes
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """confpy built as a wheel and installed into a new virtualenv; its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    [wheel] = list((work / "dist").glob("confpy-*.whl"))
    venv.create(work / "venv", with_pip=True)
    bin_dir = work / "venv" / "bin"
    install = subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True, timeout=900, check=False
    )
    assert install.returncode == 0, install.stderr
    yield bin_dir


def run_installed(bin_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN")}
    # Run from a folder without the checkout, so nothing but the wheel can be imported.
    return subprocess.run(
        [str(bin_dir / "confpy"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=bin_dir,
        check=False,
    )


def localize(doc: dict[str, Any], consul_url: str, nginx: NginxInstance, state: Path) -> dict[str, Any]:
    doc.setdefault("consul", {})["address"] = consul_url
    doc.setdefault("nginx", {}).update({"pid_file": str(nginx.pid_file), "check_cmd": nginx.check_cmd})
    doc["state"] = {"dir": str(state)}
    for template in doc["template"]:
        assert template["source"].startswith("builtin:"), "the documented source must work after pip install"
        template["destination"] = str(nginx.destination)
    return doc


def bootstrap_then_follow_a_change(
    bin_dir: Path, config: Path, consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer]
) -> None:
    """One sync before nginx runs (the bootstrap case), then a registration reaches traffic."""
    register_backends(consul.api, backends[:1])
    out = run_installed(bin_dir, "-c", str(config), "--once", "--allow-no-reload")
    assert out.returncode == 0, out.stderr
    nginx.start()
    assert wait_until(lambda: set(nginx.bodies(3)) == {"App server 1"}, 10)
    consul.api.register("web", backends[1].port, id="web-2")
    out = run_installed(bin_dir, "-c", str(config), "--once")
    assert out.returncode == 0, out.stderr
    assert wait_until(lambda: set(nginx.bodies(6)) == {"App server 1", "App server 2"}, 10)


def test_readme_minimal_config_from_an_installed_wheel(
    installed: Path, consul: ConsulUnderTest, nginx: NginxInstance, backends: list[BackendServer], tmp_path: Path
) -> None:
    location = subprocess.run(
        [str(installed / "python"), "-c", "import confpy; print(confpy.__file__)"],
        capture_output=True,
        text=True,
        cwd=installed,
        check=True,
    ).stdout
    assert "site-packages" in location and str(ROOT) not in location  # the wheel, not the checkout
    doc = localize(
        documented_toml(ROOT / "README.md", "A minimal configuration"), consul.url, nginx, tmp_path / "state"
    )
    config = tmp_path / "confpy.toml"
    config.write_text(as_toml(doc))
    bootstrap_then_follow_a_change(installed, config, consul, nginx, backends)
    assert run_installed(installed, "-c", str(config), "--once", "--dry-run").returncode == 0
    listing = run_installed(installed, "templates")
    assert (
        "builtin:nginx-upstreams.conf.j2" in listing.stdout and "builtin:nginx-upstreams-live.conf.j2" in listing.stdout
    )
    example = run_installed(installed, "init")
    assert example.returncode == 0 and "builtin:nginx-upstreams.conf.j2" in example.stdout


@pytest.mark.skipif(not lua_available(), reason="nginx's Lua module is not installed (make nginx installs it)")
def test_live_mode_example_from_an_installed_wheel(
    installed: Path, consul: ConsulUnderTest, backends: list[BackendServer], tmp_path: Path
) -> None:
    nginx = NginxInstance(tmp_path / "nginx", lua=True)
    try:
        doc = localize(
            documented_toml(ROOT / "docs" / "live-mode.md", "confpy.toml:"), consul.url, nginx, tmp_path / "state"
        )
        doc["nginx"]["live_listen"] = f"127.0.0.1:{free_port()}"
        config = tmp_path / "confpy.toml"
        config.write_text(as_toml(doc))
        bootstrap_then_follow_a_change(installed, config, consul, nginx, backends)
    finally:
        nginx.stop()
