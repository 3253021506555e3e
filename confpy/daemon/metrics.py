"""Prometheus metrics, one registry per runner (no process-wide globals)."""

from __future__ import annotations

from collections.abc import Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest

from confpy import __version__


class Metrics:
    """The `confpy_*` metrics served on /metrics."""

    def __init__(self) -> None:
        # `*_created` series (one per counter) say nothing an operator needs: off, for this process.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds...
        Info("confpy_build", "confpy's version", registry=r).info({"version": __version__})
        self.renders = Counter("confpy_renders", "Template renders that produced output", ["template"], registry=r)
        self.render_errors = Counter("confpy_render_errors", "Template renders that failed", ["template"], registry=r)
        self.reloads = Counter("confpy_reloads", "nginx reloads performed", registry=r)
        self.reloads_skipped = Counter(
            "confpy_reloads_skipped", "Changes installed without reloading nginx, by reason", ["reason"], registry=r
        )
        self.check_failures = Counter(
            "confpy_check_failures", "nginx configuration checks that failed (rolled back)", registry=r
        )
        self.install_failures = Counter("confpy_install_failures", "Installs or reloads that failed", registry=r)
        self.sync_retries = Counter(
            "confpy_sync_retries", "Retries of a sync that failed (re-rendered from the current data)", registry=r
        )
        self.consul_errors = Counter("confpy_consul_errors", "Failed Consul requests", registry=r)
        self.consul_requests = Counter(
            "confpy_consul_requests", "Consul requests made by watchers (blocking queries)", registry=r
        )
        self.live_pushes = Counter(
            "confpy_live_pushes", "Upstream member lists pushed to nginx without a reload", registry=r
        )
        self.live_push_failures = Counter(
            "confpy_live_push_failures", "Failed pushes to the live admin API", registry=r
        )
        self.live_drift = Counter(
            "confpy_live_drift",
            "Upstreams found in nginx with members confpy did not push (then restored)",
            ["upstream"],
            registry=r,
        )
        self.live_member_unavailable = Gauge(
            "confpy_live_member_unavailable",
            "1 for a live member nginx's balancer paused after failures while the registry still says passing",
            ["upstream", "member"],
            registry=r,
        )
        self.consul_up = Gauge("confpy_consul_up", "1 when the last Consul request succeeded", registry=r)
        self.last_sync = Gauge(
            "confpy_last_successful_sync_timestamp_seconds", "Unix time of the last successful sync", registry=r
        )
        self.invalid_instances = Gauge(
            "confpy_invalid_instances",
            "Instances left out of the render because they are invalid",
            ["service"],
            registry=r,
        )
        self.change_to_reload = Histogram(
            "confpy_change_to_reload_seconds",
            "Time from a change seen in Consul to nginx reloaded with it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )

        # Series only for what has (or had) something to say: a thousand zero-valued series would
        # cost memory and scrape time for nothing.
        self._rejected_series: set[str] = set()
        self._unavailable_series: set[tuple[str, str]] = set()

    def count_rejected(self, service: str, rejected: int) -> None:
        """confpy_invalid_instances for `service` (a series once it has had a rejected instance)."""
        if rejected or service in self._rejected_series:
            self.invalid_instances.labels(service=service).set(rejected)
            self._rejected_series.add(service)

    def count_unavailable(self, paused: Mapping[str, Mapping[str, float]]) -> None:
        """confpy_live_member_unavailable: a series per paused member, removed when it is used again."""
        now = {(name, member) for name, members in paused.items() for member in members}
        for name, member in self._unavailable_series - now:
            self.live_member_unavailable.remove(name, member)
        for name, member in now:
            self.live_member_unavailable.labels(upstream=name, member=member).set(1)
        self._unavailable_series = now

    def render_text(self) -> bytes:
        return generate_latest(self.registry)
