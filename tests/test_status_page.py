"""The status page in a real browser: Debian's headless Chromium driven by Selenium (Debian's
chromedriver, nothing downloaded at run time), against the daemon, dev-consul and real nginx."""

from __future__ import annotations

import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from confpy.dev.lab import BackendServer, ConfpyProcess, NginxInstance, free_port, wait_until, write_config

from .conftest import SHIPPED_TEMPLATE, ConsulUnderTest, register_backends
from .tiers import starts_processes

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "status-page.png"


@pytest.fixture(scope="module")
@starts_processes
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Debian's chromium and chromium-driver are needed: `make test` installs them"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(argument)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


@dataclass(frozen=True)
class Site:
    """dev-consul, nginx, three app servers, a folder and the daemons a test starts."""

    consul: ConsulUnderTest
    nginx: NginxInstance
    backends: list[BackendServer]
    tmp_path: Path
    daemons: list[ConfpyProcess]


@pytest.fixture
def site(
    consul: ConsulUnderTest,
    nginx: NginxInstance,
    backends: list[BackendServer],
    tmp_path: Path,
    daemons: list[ConfpyProcess],
) -> Site:
    return Site(consul, nginx, backends, tmp_path, daemons)


def start(
    tmp_path: Path, consul: ConsulUnderTest, nginx: NginxInstance, template: Path, daemons: list[ConfpyProcess]
) -> tuple[str, ConfpyProcess]:
    port = free_port()
    config = write_config(tmp_path / "c.toml", consul.url, nginx, template, status=f"127.0.0.1:{port}")
    proc = ConfpyProcess(config).start()
    daemons.append(proc)
    assert wait_until(lambda: nginx.destination.exists(), 15), proc.output()
    nginx.start()
    return f"http://127.0.0.1:{port}/", proc


def text_of(browser: webdriver.Chrome, css: str) -> str:
    try:
        return str(browser.find_element(By.CSS_SELECTOR, css).text)
    except Exception:
        return ""


def test_the_page_follows_consul_live_without_reloading(site: Site, browser: webdriver.Chrome) -> None:
    consul, nginx, backends, tmp_path, daemons = site.consul, site.nginx, site.backends, site.tmp_path, site.daemons
    register_backends(consul.api, backends)
    url, proc = start(tmp_path, consul, nginx, SHIPPED_TEMPLATE, daemons)
    endpoints = [f"127.0.0.1:{b.port}" for b in backends]
    browser.get(url)
    assert wait_until(lambda: all(e in text_of(browser, "#upstreams") for e in endpoints), 10), proc.output()
    # Installed before nginx ran, the files count as served once confpy sees nginx start (a 5 s recheck).
    assert wait_until(lambda: text_of(browser, "#verdict") == "ok", 15), text_of(browser, "#reason")
    assert "serving" in text_of(browser, "#upstreams")
    assert browser.title == "confpy: ok"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))  # the README's picture: the demo's three members

    browser.execute_script("window.__sameDocument = 42;")
    started = time.monotonic()
    consul.api.deregister("web-2")
    assert wait_until(lambda: endpoints[1] not in text_of(browser, "#upstreams"), 10), proc.output()
    took = time.monotonic() - started
    print(f"a deregistered member left the open page {took * 1000:.0f} ms after the deregistration")
    assert browser.execute_script("return window.__sameDocument;") == 42  # swapped in place, never reloaded
    assert endpoints[0] in text_of(browser, "#upstreams") and endpoints[2] in text_of(browser, "#upstreams")
    assert "web-2" not in text_of(browser, "#upstreams") and "reload" in text_of(browser, "#timeline")
    # Members that are not passing are listed with why, and not served.
    code = consul.api.request("PUT", "/v1/agent/service/maintenance/web-1?enable=true&reason=kernel+upgrade")[0]
    assert code == 200
    assert wait_until(lambda: "maintenance kernel upgrade" in text_of(browser, "#upstreams"), 10)
    assert "workers started" in text_of(browser, "#nginx")


def test_a_failing_check_turns_the_header_red_with_nginxs_words(site: Site, browser: webdriver.Chrome) -> None:
    consul, nginx, backends, tmp_path, daemons = site.consul, site.nginx, site.backends, site.tmp_path, site.daemons
    template = tmp_path / "t.conf.j2"
    # Meta `extra` lands in the config unquoted-but-safe: a valid token that nginx still rejects.
    extra = "keepalive 16;{% for i in service(name, 'nginx') if i.meta.get('extra') %} {{ i.meta.extra }};{% endfor %}"
    template.write_text(SHIPPED_TEMPLATE.read_text().replace("keepalive {{ settings.keepalive }};", extra))
    register_backends(consul.api, backends[:2])
    url, proc = start(tmp_path, consul, nginx, template, daemons)
    browser.get(url)
    assert wait_until(lambda: text_of(browser, "#verdict") == "ok", 15), proc.output()
    consul.api.register("web", backends[2].port, id="web-3", Meta={"extra": "not_a_directive"})
    assert wait_until(lambda: text_of(browser, "#verdict") == "failing", 10), proc.output()
    header = browser.find_element(By.ID, "state")
    assert "failing" in str(header.get_attribute("class"))
    assert header.value_of_css_property("background-color") == "rgba(207, 34, 46, 1)"  # red
    assert 'unknown directive "not_a_directive"' in text_of(browser, "#reason")
    assert 'unknown directive "not_a_directive"' in text_of(browser, "#check-error")
    assert "check_failed" in text_of(browser, "#timeline")


def test_registry_values_render_as_text_never_as_markup(site: Site, browser: webdriver.Chrome) -> None:
    consul, nginx, backends, tmp_path, daemons = site.consul, site.nginx, site.backends, site.tmp_path, site.daemons
    hostile = "<script>window.__xss=1</script>"
    consul.api.register(hostile, backends[0].port, id="evil-1", Meta={"note": "<img src=x onerror=window.__xss=2>"})
    register_backends(consul.api, backends[1:2])  # the lab's nginx proxies to `web`
    url, proc = start(tmp_path, consul, nginx, SHIPPED_TEMPLATE, daemons)
    browser.get(url)
    assert wait_until(lambda: hostile in text_of(browser, "#upstreams"), 10), proc.output()
    assert "note=<img src=x onerror=window.__xss=2>" in text_of(browser, "#upstreams")
    assert browser.execute_script("return window.__xss === undefined;") is True
    assert not browser.find_elements(By.CSS_SELECTOR, "#upstreams script, #upstreams img")
    with urllib.request.urlopen(url, timeout=5) as response:
        policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy


def test_an_open_event_stream_does_not_hold_up_sigterm(site: Site) -> None:
    consul, nginx, backends, tmp_path, daemons = site.consul, site.nginx, site.backends, site.tmp_path, site.daemons
    register_backends(consul.api, backends[:1])
    url, proc = start(tmp_path, consul, nginx, SHIPPED_TEMPLATE, daemons)
    with urllib.request.urlopen(url + "events", timeout=10) as stream:
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert stream.readline().startswith(b"data: ")  # the page's first state
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(10) == 0
        assert stream.read() == b"\n"  # the stream ended with the daemon
