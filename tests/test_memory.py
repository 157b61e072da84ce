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


# A child that allocates and frees a 64 MiB tensor-sized buffer twice and prints the minor page
# faults of the second round; with glibc's default the block is mmapped anew and faults again.
REUSE_CHILD = """
import resource, sys, torch
from imp_platform.memory import reuse_large_allocations
if sys.argv[1] == "tuned":
    assert reuse_large_allocations()
def touch():
    torch.ones(16 * 2**20)  # 64 MiB, freed at once
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_reuse_large_allocations_stops_page_faults_on_repeated_large_tensors() -> None:
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", REUSE_CHILD, mode], check=True, capture_output=True, text=True)
        return int(out.stdout.strip())

    pages = 64 * 2**20 // 4096
    assert faults("default") > pages // 2  # glibc mmaps the block afresh: every page faults again
    assert faults("tuned") < pages // 20  # the freed block is reused from the heap
