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
