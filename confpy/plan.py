"""`confpy plan`: what a configuration will cost the registry, before it runs.

From one dry render (the dependencies the templates use and the instances each service has), the
arithmetic of docs/fleet.md for one gateway and for N: the long polls held, the requests an idle
minute costs (each long poll is re-asked when its `wait` runs out), and what one member change
costs (the changed service's one watch answers and is asked again; nothing else wakes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from confpy.model import HealthView
from confpy.registry.base import Dependency

# Bytes of one instance in a Consul /v1/health/service answer (node, service and one check, as
# JSON; measured on dev-consul's answers: 900-1,300 bytes). An estimate: say so where printed.
BYTES_PER_INSTANCE = 1100
BYTES_PER_ANSWER = 200  # headers and the empty list


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

    @property
    def idle_requests_per_minute(self) -> float:
        return self.watches * 60.0 / self.wait

    @property
    def requests_per_change(self) -> int:
        return 1  # the changed service's watch answers and is asked again

    @property
    def bytes_per_change(self) -> int:
        """Estimated: the answer for the largest service (a change returns its whole member list)."""
        return BYTES_PER_ANSWER + self.largest_service * BYTES_PER_INSTANCE

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
            f"({BYTES_PER_ANSWER} + {self.largest_service} instances x ~{BYTES_PER_INSTANCE} bytes)",
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
    )
