"""Wall-clock time, CPU time and peak memory of a block: CUDA allocator peak on GPU, sampled RSS on CPU.

CPU time is this process's (all its threads'). On a shared CPU machine it does not grow with the
other processes' load the way wall-clock time does, so cells run under different loads compare
by it (at one thread per process it is about the wall-clock time the block takes alone)."""
from __future__ import annotations

import os
import threading
import time

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class measure:
    """``with measure(device) as m: ...`` then ``m.seconds``, ``m.cpu_seconds`` and ``m.peak_mb`` (peak
    above the start)."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.peak_mb = 0.0

    def __enter__(self):
        self._stop = threading.Event()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_bytes()
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.seconds = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0
        self.peak_mb = max(0, peak - self._base) / 2**20
        return False
