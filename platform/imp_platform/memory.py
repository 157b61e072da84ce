"""Process memory: the peak of this process and its descendants (a local Ray's raylet and
workers), sampled in a thread; and the allocator settings CPU training needs."""

from __future__ import annotations

import collections
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


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); False where there is no glibc.

    ``reuse_large_allocations`` keeps freed blocks in the heap, and AGD's tasks free blocks of
    different sizes from step to step, so a training worker's heap ends up holding the free
    space of its largest steps: measured in a single-process demo loop, ~200 MiB of a worker's
    ~550 MiB of anonymous memory after the curriculum brings in the audio tasks. The loop calls
    this at each log interval: the blocks fault in again once per interval rather than every
    step (10-40 ms per call on the 2-core machine, against ~150 ms per step).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others
        return False
    trim(0)
    return True


class PeakMemory:
    """Samples the summed memory of this process and all its descendants (raylet, Ray workers) in a thread.

    RSS counts a page shared by several processes (torch's libraries, the object store) once per
    process, so its sum grows with the number of Ray workers alive; PSS splits shared pages
    between their users and sums to what the machine really holds. Both peaks are kept, and
    ``peak_pss_by_process``: what each process title (``ray::TrainController``, ``raylet``, ...)
    held at the PSS peak, so a peak over budget says which processes to cut.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak_mb, self.peak_pss_mb = interval, 0.0, 0.0
        self.peak_pss_by_process: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[float, float]:
        """(summed RSS, summed PSS) in MiB now."""
        rss, by_process = self._sample()
        return rss, sum(by_process.values())

    def _sample(self) -> tuple[float, dict[str, float]]:
        """(summed RSS, PSS per process title) in MiB now."""
        root = psutil.Process()
        rss, by_process = 0, collections.Counter()
        for proc in [root, *root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
                by_process[_title(proc)] += info.pss / 2**20
            except psutil.Error:
                continue
            rss += info.rss
        return rss / 2**20, dict(by_process)

    def _update(self) -> None:
        rss, by_process = self._sample()
        pss = sum(by_process.values())
        if pss > self.peak_pss_mb:
            self.peak_pss_mb, self.peak_pss_by_process = pss, by_process
        self.peak_mb = max(self.peak_mb, rss)

    def top_processes(self, count: int = 6) -> str:
        """The ``count`` process titles holding the most PSS at the peak, as ``title N MiB`` pairs."""
        top = sorted(self.peak_pss_by_process.items(), key=lambda kv: -kv[1])[:count]
        return ", ".join(f"{title} {mb:.0f} MiB" for title, mb in top)

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


def _title(proc: psutil.Process) -> str:
    """A process's title: a Ray worker's ``ray::Class`` (from its argv[0]), else its script or program name."""
    args = proc.cmdline()
    if args and args[0].startswith("ray::"):
        return args[0].split(".")[0][:40]
    script = "" if "-c" in args else next((a for a in args[1:] if not a.startswith("-")), "")
    return (script.rsplit("/", 1)[-1] or proc.name())[:40]
