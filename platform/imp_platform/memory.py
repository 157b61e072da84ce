"""Process memory: the peak of this process and its descendants (a local Ray's raylet and
workers), sampled in a thread; and the allocator setting CPU training needs."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

import psutil

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>


def reuse_large_allocations(threshold_mb: int = 512) -> bool:
    """Keep freed blocks up to ``threshold_mb`` in the heap instead of returning them to the OS.

    glibc serves allocations above 32 MiB with a fresh ``mmap`` and unmaps them on free, so
    every training step pays a page fault per 4 KiB for each large tensor it allocates again:
    an MoE layer's weight gradients (E times a dense layer's; 38 MiB for 16 x 384 x 1536
    floats) cost 13 ms of faults per step on the 2-core machine, which made CPU MoE look
    slower than it is. Raising the mmap and trim thresholds (trim at twice mmap, as glibc's
    own dynamic rule) lets those blocks be reused (likely rather than certain for torch's
    aligned requests, which do not always fit a freed chunk). Returns False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    size = threshold_mb * 2**20
    return bool(mallopt(_M_MMAP_THRESHOLD, size)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * size))


class PeakMemory:
    """Samples the summed memory of this process and all its descendants (raylet, Ray workers) in a thread.

    RSS counts a page shared by several processes (torch's libraries, the object store) once per
    process, so its sum grows with the number of Ray workers alive; PSS splits shared pages
    between their users and sums to what the machine really holds. Both peaks are kept.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak_mb, self.peak_pss_mb = interval, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float]:
        """(summed RSS, summed PSS) in MiB now."""
        root = psutil.Process()
        rss = pss = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            rss, pss = rss + info.rss, pss + info.pss
        return rss / 2**20, pss / 2**20

    def _update(self) -> None:
        rss, pss = self.sample()
        self.peak_mb, self.peak_pss_mb = max(self.peak_mb, rss), max(self.peak_pss_mb, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._update()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
