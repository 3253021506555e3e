"""The churn benchmark's verdict: pooled error counts compared with the noise that counting alone has."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("confpy_bench_run", ROOT / "bench" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_the_interval_is_the_poisson_spread_of_a_ratio_of_two_counts(bench: ModuleType) -> None:
    low, high = bench.ratio_interval(900, 900)
    # log-ratio standard error sqrt(2/900) = 0.0471; 1.96 of them either side of 1.0
    assert low == pytest.approx(math.exp(-1.96 * math.sqrt(2 / 900)), rel=1e-9)
    assert high == pytest.approx(math.exp(1.96 * math.sqrt(2 / 900)), rel=1e-9)
    assert 0.90 < low < 0.92 and 1.09 < high < 1.11
    # four times the counts halve the spread
    low4, high4 = bench.ratio_interval(3600, 3600)
    assert math.log(high4) == pytest.approx(math.log(high) / 2, rel=1e-9)
    assert math.log(low4) == pytest.approx(math.log(low) / 2, rel=1e-9)
    assert bench.ratio_interval(0, 10) == (0.0, math.inf)


def test_the_verdict_tells_met_noise_and_real_excess_apart(bench: ModuleType) -> None:
    assert bench.churn_verdict(880, 900).endswith(": met")
    assert bench.churn_verdict(900, 900).endswith(": met")
    assert "within counting noise" in bench.churn_verdict(930, 900)
    # 20% more errors over thousands of them is no accident of counting
    assert "NOT met" in bench.churn_verdict(3 * 1440, 3 * 1200)
    # the same 20% over a handful is
    assert "within counting noise" in bench.churn_verdict(12, 10)
    assert bench.churn_verdict(5, 0).startswith("by hand had no errors")


def test_a_count_or_duration_of_zero_is_refused_by_name(bench: ModuleType) -> None:
    assert bench.at_least_one("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="0 is less than 1"):
        bench.at_least_one("0")
    with pytest.raises(argparse.ArgumentTypeError, match="'three' is not a whole number"):
        bench.at_least_one("three")


def _by_hand_ms() -> list[float]:
    return [0.017 + (i % 10) * 0.0005 for i in range(100)]  # 17-21.5 ms, ten of each


def test_the_propagation_interval_holds_the_ratio_and_is_the_same_each_time(bench: ModuleType) -> None:
    theirs = _by_hand_ms()
    ours = [theirs[(i * 37) % 100] * 1.15 for i in range(100)]  # the same figures 15% slower, pairs shuffled
    low, high = bench.median_ratio_interval(ours, theirs, paired=True)
    assert low < 1.15 < high
    assert high - low > 0.02  # two medians of a hundred do not pin a ratio down
    assert bench.median_ratio_interval(ours, theirs, paired=True) == (low, high)
    with pytest.raises(ValueError, match="same, non-zero length"):
        bench.median_ratio_interval(ours[:50], theirs, paired=True)
    with pytest.raises(ValueError, match=r"figures on both sides \(got 0 and 100\)"):
        bench.median_ratio_interval([], theirs, paired=False)


def test_pairs_resampled_together_keep_the_drift_both_share_out_of_the_interval(bench: ModuleType) -> None:
    # the machine slows down over the run; each confpy change is 10% slower than the by-hand change beside it
    theirs = [0.015 + i * 0.0001 for i in range(100)]
    ours = [t * 1.10 for t in theirs]
    assert bench.median_ratio_interval(ours, theirs, paired=True) == pytest.approx((1.10, 1.10))
    low, high = bench.median_ratio_interval(ours, theirs, paired=False)
    assert low < 1.05 and high > 1.15  # resampled apart, the drift looks like noise


def test_the_propagation_verdict_tells_margin_noise_and_real_excess_apart(bench: ModuleType) -> None:
    theirs = _by_hand_ms()

    def slower(factor: float) -> list[float]:
        return [theirs[(i * 37) % 100] * factor for i in range(100)]

    assert bench.propagation_verdict(slower(1.05), theirs, paired=True).endswith("): met")
    assert bench.propagation_verdict(slower(1.19), theirs, paired=True).endswith(
        "met as a figure; the interval reaches past the limit"
    )
    assert bench.propagation_verdict(slower(1.21), theirs, paired=True).endswith(
        "not met as a figure, but within sampling noise of the limit"
    )
    assert "NOT met" in bench.propagation_verdict(slower(1.40), theirs, paired=True)
    assert bench.propagation_verdict(slower(1.19), theirs, paired=True).startswith("1.19x (95% interval ")


def test_the_soak_verdict_judges_the_last_half_against_the_target_scaled_to_the_run(bench: ModuleType) -> None:
    def run(rss: list[int], fds: list[int], minutes: int) -> str:
        return bench.soak_verdict(
            [bench.SoakSample(m, m * 300, m * 299, r, 5, f) for m, (r, f) in enumerate(zip(rss, fds, strict=True))],
            minutes,
        )

    flat = run([35000] * 7, [13, 16, 15, 16, 15, 15, 15], 6)
    assert (
        "+0 KB over the last half" in flat
        and "target < 51 KB (256 KB per 30 minutes scaled to 6 minutes): PASS" in flat
    )
    assert "file descriptors flat" in flat, "a connection in flight at one sample is not growth"
    growing = run([35000 + 20 * m for m in range(31)], [13] * 15 + [14] * 16, 30)
    assert "+300 KB over the last half" in growing and "target < 256 KB: FAIL" in growing
    assert "file descriptors NOT flat" in growing and "threads flat" in growing
