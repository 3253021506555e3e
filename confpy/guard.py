"""The shrink guard: an answer that removes most of a service's members at once is not believed at once.

A Consul agent restarting with a half-synced catalog, a partition failing most health checks, an
etcd lease storm or a deploy tool deregistering a whole service look, to confpy, like one answer
with most members gone. The guard sits between a service query's answer and the data templates
read (`admit`), so every template and both modes (reload and live) get it:

- a drop of at most `max_drop` of the members, an upstream smaller than `min_members`, and every
  added member apply at once (the guard never delays capacity);
- a larger drop is *held*: templates keep seeing the members the registry dropped, beside what
  it answers now, until `hold` has passed; then the registry's latest answer applies in one step;
- an answer back within `max_drop` of the previous members during the hold withdraws it: the data
  templates read is what it was, so nothing is written, reloaded or pushed;
- an operator's release (`confpy upstream release SERVICE`, a key in the registry every confpy
  holding a drop watches: `release_dependency`) applies a held drop at once.

Before a service's first answer (a start, a SIGHUP), what templates saw is what the last sync
installed, remembered in the state files (`remembered_view`): `--once` and a daemon starting on a
half-synced catalog (a host reboot) compare with that.

`decide` is the pure decision; `ShrinkGuard` keeps the held drops and is a timer (`timer.py`) on
an injected clock. A service used by templates with different `[[template]] guard` settings is
guarded by the strictest of them (`strictest`): one gateway has one view of a service.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confpy.config import Config, EtcdConfig, GuardConfig
from confpy.model import HealthView, KVPair, Memory, ServiceInstance, memory_key
from confpy.registry.base import KVKey, ServiceHealth

log = logging.getLogger(__name__)

# Where `confpy upstream release` writes, and every daemon watches: one key whose value is a JSON
# object {service: stamp}; a service whose stamp changes is released.
CONSUL_RELEASE_KEY = "confpy/guard/release"
# Under etcd's prefix, a key with no `/` after its name: never a service nor a member of one.
ETCD_RELEASE_NAME = ".confpy-guard-release"
# Share arithmetic: 0.5 * 10 must be 5, not 4.999...
_EPSILON = 1e-9


def release_key(etcd: EtcdConfig | None) -> str:
    """The registry key of the release channel: Consul's, or the one under etcd's prefix."""
    return f"{etcd.prefix}{ETCD_RELEASE_NAME}" if etcd is not None else CONSUL_RELEASE_KEY


def release_dependency(config: Config) -> KVKey:
    return KVKey(release_key(config.etcd))


def with_release(current: KVPair | None, service: str, stamp: str) -> str:
    """The release key's new value: what it holds (when readable) with `service` stamped anew."""
    releases = parse_release(current)
    releases[service] = stamp
    return json.dumps(releases, sort_keys=True)


def parse_release(value: object) -> dict[str, str]:
    """The release key's value as {service: stamp}; a missing, empty or malformed key is no release."""
    if not isinstance(value, KVPair) or not value.value.strip():
        return {}
    try:
        data = json.loads(value.value)
    except ValueError:
        log.warning("release key %s is not JSON; ignored (write it with `confpy upstream release`)", value.path)
        return {}
    if not isinstance(data, dict):
        log.warning("release key %s is not a JSON object; ignored", value.path)
        return {}
    return {str(service): str(stamp) for service, stamp in data.items()}


def strictest(guards: Iterable[GuardConfig]) -> GuardConfig | None:
    """The guard that protects most of several: the smallest `max_drop`, the longest `hold`, the
    smallest `min_members`. None when `guards` is empty."""
    listed = list(guards)
    if not listed:
        return None
    return GuardConfig(
        max_drop=min(g.max_drop for g in listed),
        hold=max(g.hold for g in listed),
        min_members=min(g.min_members for g in listed),
    )


def allowed_drop(members: int, guard: GuardConfig) -> int:
    """How many of `members` one answer may remove at once: all of them when the guard is off or
    the upstream is smaller than `min_members`, else `max_drop` of them rounded down (50% of 5 is 2)."""
    if not guard.enabled or members < guard.min_members:
        return members
    return math.floor(members * guard.max_drop + _EPSILON)


def percent(share: float) -> str:
    return f"{share * 100:g}%"


def service_label(dep: ServiceHealth) -> str:
    """`service web`, with its tag / datacenter when the query names one."""
    extra = [f"tag {dep.tag}"] if dep.tag else []
    extra += [f"dc {dep.dc}"] if dep.dc else []
    extra += [] if dep.passing else ["passing or not"]
    return f"service {dep.service}" + (f" ({', '.join(extra)})" if extra else "")


@dataclass(frozen=True)
class Decision:
    """What templates see of an answer (`view`), and the members kept although the registry dropped
    them (`kept`; empty when the answer applies as it is)."""

    view: HealthView
    kept: tuple[ServiceInstance, ...] = ()
    previous: int = 0  # how many members templates saw before the answer

    @property
    def held(self) -> bool:
        return bool(self.kept)


def decide(previous: HealthView | None, answer: HealthView, guard: GuardConfig) -> Decision:
    """The guard's decision on one answer, given what templates saw before (None: nothing yet).

    Members are told apart by endpoint (what nginx serves): a member whose weight or tags changed
    is not removed. A held answer's view is the answer plus the previous members it dropped, so
    added members and changed ones apply at once."""
    if previous is None:
        return Decision(answer)
    now = {i.endpoint for i in answer.instances}
    dropped = tuple(i for i in previous.instances if i.endpoint not in now)
    if len(dropped) <= allowed_drop(len(previous.instances), guard):
        return Decision(answer, previous=len(previous.instances))
    view = HealthView.of((*answer.instances, *dropped), answer.rejected, answer.unhealthy)
    return Decision(view, dropped, len(previous.instances))


def remembered_view(dep: ServiceHealth, memories: Iterable[Memory]) -> HealthView | None:
    """The members of `dep` a previous sync rendered (the state files), for `--once`; None when none."""
    key = memory_key(dep.service, dep.tag, dep.dc, dep.passing)
    for memory in memories:
        members = memory.members.get(key)
        if members:
            return HealthView.of(members)
    return None


@dataclass
class HeldDrop:
    """One service whose drop is held: since when, until when, what it would lose, and the
    registry's latest answer (what applies when the hold ends)."""

    dep: ServiceHealth
    guard: GuardConfig
    since: float
    until: float
    previous: int
    answer: HealthView
    losing: tuple[ServiceInstance, ...]

    def describe(self) -> str:
        return (
            f"{service_label(self.dep)}: the registry dropped {len(self.losing)} of {self.previous} members at once "
            f"(guard max_drop {percent(self.guard.max_drop)})"
        )

    def to_json(self, now: float, wall_now: float) -> dict[str, Any]:
        return {
            "service": self.dep.describe(),
            "previous": self.previous,
            "registry_answer": len(self.answer.instances),
            "losing": [i.endpoint for i in self.losing],
            "max_drop": percent(self.guard.max_drop),
            "applies_in": max(0.0, round(self.until - now, 1)),
            "applies_at": wall_now + max(0.0, self.until - now),
        }


@dataclass(frozen=True)
class GuardHooks:
    """What the daemon hears: a hold ended (`applied`, `withdrawn`), how many are held now."""

    outcome: Callable[[str], None] = lambda outcome: None
    held: Callable[[int], None] = lambda count: None


@dataclass
class ShrinkGuard:
    """The held drops of a daemon; a timer whose turn applies the drops whose hold has passed.

    `apply(dep, answer, reason)` stores an answer for templates to see (the daemon's cycles)."""

    guard_for: Callable[[ServiceHealth], GuardConfig]
    apply: Callable[[ServiceHealth, HealthView, str], None]
    clock: Callable[[], float]
    hooks: GuardHooks = field(default_factory=GuardHooks)
    held: dict[ServiceHealth, HeldDrop] = field(default_factory=dict)
    releases: dict[str, str] | None = None  # the release key's last value (None: not read yet)

    def admit(self, dep: ServiceHealth, previous: HealthView | None, answer: HealthView) -> HealthView:
        """What templates see of `answer`, `previous` being what they saw (the guarded view while held)."""
        now = self.clock()
        holding = self.held.get(dep)
        guard = holding.guard if holding is not None else self.guard_for(dep)
        decision = decide(previous, answer, guard)
        if not decision.held:
            if holding is not None:
                del self.held[dep]
                log.warning(
                    "%s: the registry answers %d members again within the hold; the held drop is withdrawn "
                    "(nothing was removed)",
                    service_label(dep),
                    len(answer.instances),
                )
                self._ended("withdrawn")
            return decision.view
        if holding is None:
            holding = HeldDrop(dep, guard, now, now + guard.hold, decision.previous, answer, decision.kept)
            self.held[dep] = holding
            log.warning(
                "%s: registry dropped %d of %d members at once; holding the previous %d for %g s (guard max_drop %s)",
                service_label(dep),
                len(decision.kept),
                decision.previous,
                decision.previous,
                guard.hold,
                percent(guard.max_drop),
            )
            self.hooks.held(len(self.held))
        else:
            # Still a large drop: the hold keeps its deadline (a trickle must not postpone it forever).
            holding.answer, holding.losing, holding.previous = answer, decision.kept, decision.previous
        return decision.view

    def forget(self, dep: ServiceHealth) -> None:
        """No template uses `dep` any more: its hold ends unapplied and unlogged."""
        if self.held.pop(dep, None) is not None:
            self.hooks.held(len(self.held))

    def next_deadline(self) -> float | None:
        return min((h.until for h in self.held.values()), default=None)

    async def on_timer(self, now: float) -> None:
        for holding in list(self.held.values()):
            if holding.until <= now:
                self._apply(holding, f"the registry still says so after {holding.guard.hold:g} s")

    def on_release(self, value: object) -> None:
        """The release key changed: every service whose stamp changed has its held drop applied at once."""
        releases = parse_release(value)
        before, self.releases = self.releases, releases
        if before is None:
            return  # the first read: what was written before this daemon started releases nothing
        for service, stamp in sorted(releases.items()):
            if before.get(service) == stamp:
                continue
            path = value.path if isinstance(value, KVPair) else "the release key"
            holds = [h for h in self.held.values() if h.dep.service == service]
            if not holds:
                log.info("release key %s names service %s (%s): no drop of it is held here", path, service, stamp)
            for holding in holds:
                self._apply(holding, f"released by the release key {path} ({stamp})")

    def _apply(self, holding: HeldDrop, why: str) -> None:
        del self.held[holding.dep]
        log.warning(
            "%s: %s; applying the held drop of %d of %d members in one step: %d remain",
            service_label(holding.dep),
            why,
            len(holding.losing),
            holding.previous,
            len(holding.answer.instances),
        )
        self._ended("applied")
        self.apply(holding.dep, holding.answer, f"held drop of {service_label(holding.dep)} applied")

    def _ended(self, outcome: str) -> None:
        self.hooks.outcome(outcome)
        self.hooks.held(len(self.held))

    def status(self, now: float, wall_now: float) -> tuple[Mapping[str, Any], ...]:
        return tuple(h.to_json(now, wall_now) for h in sorted(self.held.values(), key=lambda h: h.dep.describe()))
