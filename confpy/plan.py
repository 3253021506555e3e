"""`confpy plan`: what a configuration will cost the registry, before it runs.

From one dry render (the dependencies the templates use and the instances each service has), the
arithmetic of docs/fleet.md for one gateway and for N: the long polls held, the requests an idle
minute costs (each long poll is re-asked when its `wait` runs out), and what one member change
costs (the changed service's watch answers and is asked again, and so does each catalog listing:
a registration anywhere moves it, though its names stay the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from confpy.model import HealthView
from confpy.registry.base import CatalogServices, CatalogServiceTags, Dependency

# Bytes of one instance in a Consul /v1/health/service answer (node, service and one check, as
# JSON; measured on dev-consul's answers: 900-1,300 bytes). An estimate: say so where printed.
BYTES_PER_INSTANCE = 1100
BYTES_PER_ANSWER = 200  # headers and the empty list
BYTES_PER_NAME = 30  # one service in /v1/catalog/services: its name and tags (estimate)
BYTES_PER_ETCD_KEY = 200  # one instance's key and value in an etcd range answer (estimate)


@dataclass(frozen=True)
class RegistryCost:
    """The cost of one configuration to the registry, per gateway and for `gateways` of them."""

    registry: str
    gateways: int
    watches: int  # long polls held by one gateway
    wait: float  # seconds a long poll is held before it is re-asked
    services: int
    instances: int
    largest_service: int  # instances of the largest service
    catalog_watches: int = 0  # services() listings: a registration anywhere wakes them too

    @property
    def idle_requests_per_minute(self) -> float:
        return self.watches * 60.0 / self.wait

    @property
    def requests_per_change(self) -> int:
        """The changed service's watch answers and is asked again; so does each catalog listing,
        whose index (Consul) or watched prefix (etcd) any registration moves, though its list
        of names stays the same."""
        return 1 + self.catalog_watches

    @property
    def catalog_bytes(self) -> int:
        """Estimated: one catalog answer (Consul: every name; etcd: the range of every instance)."""
        if self.registry == "etcd":
            return BYTES_PER_ANSWER + self.instances * BYTES_PER_ETCD_KEY
        return BYTES_PER_ANSWER + self.services * BYTES_PER_NAME

    @property
    def bytes_per_change(self) -> int:
        """Estimated: the largest service's whole member list, and each catalog listing."""
        return BYTES_PER_ANSWER + self.largest_service * BYTES_PER_INSTANCE + self.catalog_watches * self.catalog_bytes

    def fleet(self, per_gateway: float) -> float:
        return per_gateway * self.gateways

    def describe(self) -> str:
        n = self.gateways
        lines = [
            f"registry cost ({self.registry}; {self.services} services, {self.instances} instances):",
            f"  watches (long polls held):       {self.watches:>10} per gateway  {self.fleet(self.watches):>12,.0f} for {n}",
            f"  idle requests per minute:        {self.idle_requests_per_minute:>10,.1f} per gateway  "
            f"{self.fleet(self.idle_requests_per_minute):>12,.1f} for {n}  ({self.watches} x 60 s / wait {self.wait:g} s)",
            f"  requests per member change:      {self.requests_per_change:>10} per gateway  "
            f"{self.fleet(self.requests_per_change):>12,.0f} for {n}",
            f"  bytes per member change (est.):  {self.bytes_per_change:>10,} per gateway  "
            f"{self.fleet(self.bytes_per_change):>12,.0f} for {n}  "
            f"({BYTES_PER_ANSWER} + {self.largest_service} instances x ~{BYTES_PER_INSTANCE} bytes"
            + (
                f" + {self.catalog_watches} catalog answer(s) of ~{self.catalog_bytes:,} bytes)"
                if self.catalog_watches
                else ")"
            ),
        ]
        return "\n".join(lines) + "\n"


def registry_cost(registry: str, wait: float, values: Mapping[Dependency, object], gateways: int = 1) -> RegistryCost:
    """The cost of watching `values` (what a render fetched, dependency -> value)."""
    if gateways < 1:
        raise ValueError(f"gateways must be at least 1, got {gateways}")
    sizes = [len(v.instances) for v in values.values() if isinstance(v, HealthView)]
    return RegistryCost(
        registry=registry,
        gateways=gateways,
        watches=len(values),
        wait=wait,
        services=len(sizes),
        instances=sum(sizes),
        largest_service=max(sizes, default=0),
        catalog_watches=sum(1 for dep in values if isinstance(dep, (CatalogServices, CatalogServiceTags))),
    )
