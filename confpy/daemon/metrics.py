"""Prometheus metrics, one registry per runner (no process-wide globals).

The registry's series are `confpy_registry_*{registry="consul"|"etcd"}`. The `confpy_consul_*`
series they replace are kept, updated alongside, for dashboards built on them: deprecated, to go
in the next release (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest

from confpy import __version__
from confpy.guard import GuardHooks
from confpy.registry.view import RegistryKind


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
        self.registry_errors = Counter(
            "confpy_registry_errors", "Failed requests to the registry", ["registry"], registry=r
        )
        self.registry_requests = Counter(
            "confpy_registry_requests",
            "Registry requests made by watchers (blocking queries)",
            ["registry"],
            registry=r,
        )
        self.registry_up = Gauge(
            "confpy_registry_up", "1 when the last request to the registry succeeded", ["registry"], registry=r
        )
        # Deprecated duplicates of the three above (whichever the registry), for this release only.
        self.consul_errors = Counter("confpy_consul_errors", "Deprecated: see confpy_registry_errors_total", registry=r)
        self.consul_requests = Counter(
            "confpy_consul_requests", "Deprecated: see confpy_registry_requests_total", registry=r
        )
        self.consul_up = Gauge("confpy_consul_up", "Deprecated: see confpy_registry_up", registry=r)
        self.registry_kind: RegistryKind = "consul"
        self._followed: set[RegistryKind] = set()
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
        self.guard_held = Gauge(
            "confpy_guard_held_upstreams", "Services whose drop of members the shrink guard holds now", registry=r
        )
        self.guard_holds = Counter(
            "confpy_guard_holds",
            "Held drops ended: applied (the hold passed, or a release) or withdrawn (the registry answered back)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("applied", "withdrawn"):
            self.guard_holds.labels(outcome=outcome)  # both series exist from the start, at 0
        self.watch_failures = Counter(
            "confpy_watch_failures",
            "Watches that failed with an unexpected error (each is restarted after a backoff)",
            registry=r,
        )
        self.last_sync = Gauge(
            "confpy_last_successful_sync_timestamp_seconds", "Unix time of the last successful sync", registry=r
        )
        self.invalid_instances = Gauge(
            "confpy_invalid_instances",
            "Instances left out of the render because they are invalid",
            ["service"],
            registry=r,
        )
        self.quarantined_upstreams = Gauge(
            "confpy_quarantined_upstreams",
            "Services left out because nginx refused their upstream (retried when their data changes)",
            registry=r,
        )
        self.skipped_services = Gauge(
            "confpy_skipped_services",
            "Services the last render left out for their name (a dot, no valid upstream name, a clash)",
            registry=r,
        )
        self.change_to_reload = Histogram(
            "confpy_change_to_reload_seconds",
            "Time from a change seen in the registry to nginx reloaded with it",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        # The reload budget (daemon/budget.py): a deferral is not a skip (not a reason of reloads_skipped).
        self.draining_generations = Gauge(
            "confpy_nginx_draining_generations",
            "Generations of nginx workers still draining connections after a reload (at the last look)",
            registry=r,
        )
        self.draining_memory = Gauge(
            "confpy_nginx_draining_memory_bytes",
            "Memory held by nginx's draining workers (sum of their unique set sizes, at the last look)",
            registry=r,
        )
        self.reloads_deferred = Counter(
            "confpy_reloads_deferred", "Due reloads deferred by the reload budget (applied later)", registry=r
        )
        self.reloads_forced = Counter(
            "confpy_reloads_forced",
            "Deferred reloads applied anyway after max_defer although the budget was still exhausted",
            registry=r,
        )
        self.reload_defer = Histogram(
            "confpy_reload_defer_seconds",
            "How long a deferred reload waited for the reload budget",
            buckets=(1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
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

    def forget_service(self, service: str) -> None:
        """`service` is no longer watched: its confpy_invalid_instances series goes."""
        if service in self._rejected_series:
            self._rejected_series.discard(service)
            self.invalid_instances.remove(service)

    def count_unavailable(self, paused: Mapping[str, Mapping[str, float]]) -> None:
        """confpy_live_member_unavailable: a series per paused member, removed when it is used again."""
        now = {(name, member) for name, members in paused.items() for member in members}
        for name, member in self._unavailable_series - now:
            self.live_member_unavailable.remove(name, member)
        for name, member in now:
            self.live_member_unavailable.labels(upstream=name, member=member).set(1)
        self._unavailable_series = now

    def follow(self, kind: RegistryKind) -> None:
        """The registry the next requests go to: its series exist from now on, at zero (a SIGHUP that
        changes registries drops the other one's, so no stale `up` stays behind)."""
        if kind != self.registry_kind and self.registry_kind in self._followed:
            for series in (self.registry_errors, self.registry_requests, self.registry_up):
                series.remove(self.registry_kind)
        self.registry_kind = kind
        self._followed.add(kind)
        self.registry_errors.labels(registry=kind)
        self.registry_requests.labels(registry=kind)
        self.registry_up.labels(registry=kind)

    def registry_request(self) -> None:
        self.registry_requests.labels(registry=self.registry_kind).inc()
        self.consul_requests.inc()

    def registry_error(self) -> None:
        self.registry_errors.labels(registry=self.registry_kind).inc()
        self.consul_errors.inc()
        self.set_registry_up(False)

    def set_registry_up(self, up: bool) -> None:
        self.registry_up.labels(registry=self.registry_kind).set(1 if up else 0)
        self.consul_up.set(1 if up else 0)

    def guard_hooks(self) -> GuardHooks:
        """What the shrink guard reports: confpy_guard_holds_total{outcome}, confpy_guard_held_upstreams."""
        return GuardHooks(
            outcome=lambda outcome: self.guard_holds.labels(outcome=outcome).inc(), held=self.guard_held.set
        )

    def render_text(self) -> bytes:
        return generate_latest(self.registry)
