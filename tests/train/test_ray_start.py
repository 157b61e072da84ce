"""A failed local Ray start leaves nothing running: ``kill_new_children`` stops what the attempt started."""

from __future__ import annotations

import subprocess
import sys

from imp_platform.train.trainer import child_pids, kill_new_children


def test_only_the_processes_started_after_the_snapshot_are_killed():
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    older = subprocess.Popen(sleep)
    try:
        before = child_pids()
        assert older.pid in before
        newer = subprocess.Popen(sleep)  # stands in for the GCS / dashboard a timed-out ray.init left behind
        kill_new_children(before)
        assert newer.wait(timeout=10) != 0  # killed
        assert older.poll() is None  # still running
    finally:
        older.kill()
        older.wait()
