"""The one retry policy: exponential backoff with jitter, and the bookkeeping of one retried thing.

Every retry in confpy goes through this module: a watch's blocking query, the registry probe
during an outage, a failed live push, a failed sync or state save, a reload owed to nginx. Each
uses a `RetryPolicy` (initial delay, factor, cap, jitter) and, where one thing is retried at a
time, a `Backoff` that counts the failures in a row and resets on success.

Pure logic: nothing sleeps here; callers turn a delay into a deadline on their own clock, so the
schedule is tested with numbers. tenacity was measured and dropped (docs/architecture.md): a
watch keeps only an integer of failures and asks the policy for the delay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from confpy.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """Delays of `initial * factor**(n-1)` seconds after the n-th failure in a row, capped at
    `maximum`, plus up to `jitter` seconds drawn at random so that many retriers (a thousand
    watches, a fleet of gateways) do not retry in step."""

    initial: float
    maximum: float
    factor: float = 2.0
    jitter: float | None = None  # None: up to `initial`

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.maximum > 0 and self.factor >= 1.0):
            raise ConfigError(
                f"a retry policy needs initial > 0, maximum > 0 and factor >= 1 "
                f"(got initial {self.initial}, maximum {self.maximum}, factor {self.factor})"
            )

    def base_delay(self, failures: int) -> float:
        """The delay after `failures` failures in a row, without jitter (0 for none)."""
        if failures <= 0:
            return 0.0
        exponent = min(failures - 1, 64)  # past the cap anyway; keeps the float finite
        return min(self.initial * self.factor**exponent, self.maximum)

    def delay(self, failures: int, rng: random.Random) -> float:
        """The delay after `failures` failures in a row, jitter included."""
        spread = self.initial if self.jitter is None else self.jitter
        return self.base_delay(failures) + (rng.uniform(0, spread) if spread > 0 else 0.0)


class Backoff:
    """One retried thing: how many failures in a row, when to try again, reset on success."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self.failures = 0
        self.first_failure: float | None = None

    def failed(self, now: float) -> float:
        """Count a failure at `now`; return the deadline of the next attempt."""
        if self.failures == 0:
            self.first_failure = now
        self.failures += 1
        return now + self.policy.delay(self.failures, self.rng)

    def succeeded(self) -> None:
        self.failures = 0
        self.first_failure = None

    @property
    def failing(self) -> bool:
        return self.failures > 0


class FailureLog:
    """Says a repeated failure once, then once per `every` seconds with a count: never a flood.

    `should_log(error, now)` answers whether this occurrence is worth a log line: the first one,
    one whose text differs from the last, or the first after `every` seconds of the same."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last_text = ""
        self.last_logged: float | None = None

    def should_log(self, text: str, now: float) -> bool:
        if text != self.last_text or self.last_logged is None or now - self.last_logged >= self.every:
            self.last_text, self.last_logged = text, now
            return True
        return False

    def reset(self) -> None:
        self.last_text, self.last_logged = "", None
