"""PeakMemory (imp_platform.memory): it sees a child process's memory, both as RSS and as PSS."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child that touches 300 MiB of private memory, holds it briefly and exits.
CHILD = "import time; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1.5)"


# Measured in a process of its own: in the suite this process's other children (a local Ray's
# workers) start and exit meanwhile, which moves the sums by more than the child's 300 MiB.
MEASURE = f"""
import json, subprocess, sys
from imp_platform.memory import PeakMemory

idle_rss, idle_pss = PeakMemory().sample()
with PeakMemory(interval=0.05) as peak:
    subprocess.run([sys.executable, "-c", {CHILD!r}], check=True)
print(json.dumps(dict(idle_rss=idle_rss, idle_pss=idle_pss, rss=peak.peak_mb, pss=peak.peak_pss_mb,
                      by_process=peak.peak_pss_by_process, top=peak.top_processes())))
"""


def test_peak_memory_includes_children_and_splits_shared_pages() -> None:
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", MEASURE], check=True, capture_output=True,
                                    text=True).stdout)
    assert out["rss"] - out["idle_rss"] > 250  # the child's private pages count in full
    assert out["pss"] - out["idle_pss"] > 250
    assert out["pss"] <= out["rss"]  # shared pages are split, never counted more than once
    # the peak's breakdown by process title sums to the peak and names the child as the largest
    assert sum(out["by_process"].values()) == pytest.approx(out["pss"])
    assert max(out["by_process"].values()) > 250 and "MiB" in out["top"]


# A child that mallocs, touches and frees 64 MiB three times and prints each round's minor page
# faults. With glibc's defaults the block is mmapped afresh every round; with the thresholds raised
# the freed block stays in the heap and the later rounds fault nothing. (Plain malloc, not a
# tensor: torch's posix_memalign requests do not always fit the freed chunk exactly, which makes
# reuse likely but not certain there; bench moe measures the effect on a real layer.)
REUSE_CHILD = """
import ctypes, resource, sys
from imp_platform.memory import reuse_large_allocations
if sys.argv[1] == "tuned":
    assert reuse_large_allocations()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def test_reuse_large_allocations_stops_page_faults_on_repeated_large_blocks() -> None:
    def faults(mode: str) -> list[int]:
        out = subprocess.run([sys.executable, "-c", REUSE_CHILD, mode], check=True, capture_output=True, text=True)
        return [int(n) for n in out.stdout.split()]

    pages = 64 * 2**20 // 4096
    assert all(n > pages // 2 for n in faults("default"))  # mmapped afresh: every page faults every round
    first, *later = faults("tuned")
    assert first > pages // 2 and all(n < pages // 20 for n in later)  # the freed block is reused


# A child with the thresholds raised frees a touched 64 MiB block (kept in its heap) and prints its
# anonymous RSS (MiB) before and after ``release_free_heap``.
RELEASE_CHILD = """
import ctypes
from imp_platform.memory import release_free_heap, reuse_large_allocations
def anon_mb():
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))
assert reuse_large_allocations()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
block = libc.malloc(64 * 2**20)
ctypes.memset(block, 1, 64 * 2**20)
libc.free(block)
before = anon_mb()
assert release_free_heap()
print(before, anon_mb())
"""


def test_release_free_heap_returns_kept_blocks_to_the_os() -> None:
    out = subprocess.run([sys.executable, "-c", RELEASE_CHILD], check=True, capture_output=True, text=True)
    before, after = (int(n) for n in out.stdout.split())
    assert before - after > 48  # the freed 64 MiB block was resident until the trim, not after
