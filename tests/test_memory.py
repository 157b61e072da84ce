"""PeakMemory (imp_platform.memory): it sees a child process's memory, both as RSS and as PSS."""

from __future__ import annotations

import subprocess
import sys

from imp_platform.memory import PeakMemory

# A child that touches 300 MiB of private memory, holds it briefly and exits.
CHILD = "import time; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1.5)"


def test_peak_memory_includes_children_and_splits_shared_pages() -> None:
    idle_rss, idle_pss = PeakMemory().sample()
    with PeakMemory(interval=0.05) as peak:
        subprocess.run([sys.executable, "-c", CHILD], check=True)
    assert peak.peak_mb - idle_rss > 250  # the child's private pages count in full
    assert peak.peak_pss_mb - idle_pss > 250
    assert peak.peak_pss_mb <= peak.peak_mb  # shared pages are split, never counted more than once
