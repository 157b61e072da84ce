"""Peak memory of this process and all its descendants (a local Ray's raylet and workers), sampled in a thread."""

from __future__ import annotations

import threading

import psutil


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
