"""The agent's check runners: TTL expiry, HTTP and TCP checks at their interval, and the reaper.

As in Consul: script checks (when enabled) pass on exit 0 and warn on exit 1; an interval below 1 s is raised to 1 s, the first run of a check is staggered
randomly within its interval, HTTP 2xx is passing, 429 warning and anything else critical, a TCP
connect is passing, and services critical past DeregisterCriticalServiceAfter (at least 1 min)
are removed by a reaper that runs every 30 s.
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from confpy.dev.devconsul.state import CRITICAL, PASSING, WARNING, AgentState, CheckEntry

MIN_INTERVAL = 1.0
DEFAULT_TIMEOUT = 10.0
REAP_INTERVAL = 30.0
MAX_OUTPUT = 4096


def run_http_check(check: CheckEntry) -> tuple[str, str]:
    """Run one HTTP check; return (status, output) the way Consul words them."""
    timeout = check.timeout or DEFAULT_TIMEOUT
    request = urllib.request.Request(check.http, method=check.method or "GET")  # noqa: S310 - the check definition names the URL
    for name, values in check.header.items():
        for value in values:
            request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            code = response.status
            body = response.read(MAX_OUTPUT).decode("utf-8", "replace")
            reason = response.reason
    except urllib.error.HTTPError as exc:
        code = exc.code
        body = exc.read(MAX_OUTPUT).decode("utf-8", "replace") if exc.fp else ""
        reason = exc.reason
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason_text = getattr(exc, "reason", exc)
        return CRITICAL, f'Get "{check.http}": {reason_text}'
    output = f"HTTP {check.method or 'GET'} {check.http}: {code} {reason} Output: {body}"
    if 200 <= code < 300:
        return PASSING, output
    if code == 429:
        return WARNING, output
    return CRITICAL, output


def run_tcp_check(check: CheckEntry) -> tuple[str, str]:
    """Run one TCP check: a successful connect is passing."""
    host, _, port = check.tcp.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=check.timeout or DEFAULT_TIMEOUT):
            return PASSING, f"TCP connect {check.tcp}: Success"
    except (OSError, ValueError) as exc:
        return CRITICAL, f"dial tcp {check.tcp}: {getattr(exc, 'strerror', None) or exc}"


def run_script_check(check: CheckEntry) -> tuple[str, str]:
    """Run a script check (only registered with --enable-script-checks): exit 0 passing, 1 warning."""
    try:
        # The operator enabled script checks; the arguments run without a shell.
        done = subprocess.run(check.args, capture_output=True, timeout=check.timeout or 30.0, check=False)
    except subprocess.TimeoutExpired:
        return CRITICAL, f"Timed out ({check.timeout or 30.0}s) running check"
    except OSError as exc:
        return CRITICAL, f"Failed to exec: {exc.strerror}"
    output = (done.stdout + done.stderr)[:MAX_OUTPUT].decode("utf-8", "replace")
    if done.returncode == 0:
        return PASSING, output
    if done.returncode == 1:
        return WARNING, output
    return CRITICAL, output


RUNNERS = {"http": run_http_check, "tcp": run_tcp_check, "script": run_script_check}


class CheckRunner:
    """One scheduler thread plus a small pool that runs HTTP/TCP checks."""

    def __init__(self, state: AgentState, reap_interval: float = REAP_INTERVAL) -> None:
        self.state = state
        self.reap_interval = reap_interval
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="check")
        self.next_run: dict[tuple[str, int], float] = {}
        self.thread = threading.Thread(target=self._loop, name="check-scheduler", daemon=True)
        state.listeners.append(self.wake.set)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, check: CheckEntry) -> None:
        status, output = RUNNERS[check.type](check)
        with self.state.cond:
            current = self.state.checks.get(check.check_id)
            same = current is not None and current.create_index == check.create_index
        if same and not self.stop_event.is_set():
            self.state.update_check(check.check_id, status, output)

    def _loop(self) -> None:
        next_reap = self.state.clock() + self.reap_interval
        while not self.stop_event.is_set():
            now = self.state.clock()
            deadlines = [next_reap]
            ttl_next = self.state.expire_ttls()
            if ttl_next is not None:
                deadlines.append(ttl_next)
            if now >= next_reap:
                self.state.reap_critical()
                next_reap = now + self.reap_interval
            live = set()
            for check in self.state.checks_for_runner():
                key = (check.check_id, check.create_index)
                live.add(key)
                interval = max(check.interval, MIN_INTERVAL)
                due = self.next_run.setdefault(key, now + random.uniform(0, interval))
                if due <= now:
                    self.next_run[key] = now + interval
                    try:
                        self.pool.submit(self._run, check)
                    except RuntimeError:
                        return  # the pool is shut down: the agent is stopping
                deadlines.append(self.next_run[key])
            for key in set(self.next_run) - live:
                del self.next_run[key]
            self.wake.wait(max(0.0, min(deadlines) - self.state.clock()))
            self.wake.clear()
