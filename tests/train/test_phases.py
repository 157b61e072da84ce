"""The driver's phase timer: what the demo prints and writes as its time breakdown."""

from __future__ import annotations

import time

import psutil

from imp_platform.train.phases import PhaseTimer


def test_phases_add_up_in_order_and_include_the_running_one():
    timer = PhaseTimer()
    with timer.phase("setup"):
        time.sleep(0.02)
    with timer.phase("training"):
        time.sleep(0.02)
        inside = timer.metrics()  # a report written inside a phase counts it up to now
    with timer.phase("setup"):  # entered again: adds to its first entry, keeps its place
        time.sleep(0.02)
    assert list(timer.seconds) == ["setup", "training"]
    assert timer.seconds["setup"] >= 0.04 and timer.seconds["training"] >= 0.02
    assert inside["time_training_s"] >= 0.0 and "time_total_s" in inside
    assert timer.metrics()["time_total_s"] == round(timer.total, 1)
    table = timer.table().splitlines()
    assert [line.split()[0] for line in table] == ["setup", "training", "total"]


def test_setup_counts_from_the_process_start():
    started = psutil.Process().create_time()
    timer = PhaseTimer(since_process_start=True)
    with timer.phase("setup"):
        pass
    with timer.phase("training"):
        pass
    assert timer.seconds["setup"] >= time.time() - started - 1.0  # the interpreter's start and imports
    assert timer.seconds["training"] < 1.0
