"""The benchmarks' throughput clock: start-up counts end to end but not in the steady rate."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from imp_platform.bench.common import Throughput


def _slow_start(startup_s: float, outputs: int, per_output: int) -> Iterator[int]:
    time.sleep(startup_s)  # the generator body runs inside the clock, as a pool or dataset start does
    for _ in range(outputs):
        time.sleep(0.01)
        yield per_output


def test_steady_rate_excludes_start_up_and_first_output() -> None:
    timed = Throughput.measure(_slow_start(0.3, outputs=5, per_output=10))
    assert timed.items == 50 and timed.first_items == 10
    assert timed.first_output_s >= 0.3
    assert timed.rate == pytest.approx(50 / timed.seconds)
    assert timed.steady_rate == pytest.approx(40 / (timed.seconds - timed.first_output_s))
    assert timed.steady_rate > 2 * timed.rate
    assert timed.summary()["samples"] == 50


def test_a_single_output_has_only_an_end_to_end_rate() -> None:
    timed = Throughput.measure(iter([7]))
    assert timed.steady_rate == timed.rate and timed.items == 7
