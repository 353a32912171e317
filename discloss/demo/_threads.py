"""Choosing the CPU thread count while training: private to the demo, not part of discloss's API.

Kept because it earns its place on shared machines. Measured on 2 Intel
Xeon cores shared with other programs (load average 4.8 to 5.4),
2026-11-29: the demo's default training step (8 images of 128 x 128,
forward + backward + Adam), 4 alternating blocks of 6 steps per thread count
(first step of each block not timed), took a median 4.81 s (1.87-7.56 s)
with torch's default of 2 threads and 1.00 s (0.76-1.17 s) with 1 thread;
a second run, at load average 5.7 to 7.9, 6.38 s against 1.50 s.
With torch's default alone the demo's 420 s would buy less than a quarter
of the steps there; the chooser's contest costs a few steps at the slower
count every 90 s.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Optional, Sequence

import torch


class ThreadChooser:
    """Runs CPU training with whichever thread count is fastest now, re-checked every so often.

    Why: PyTorch's OpenMP threads wait for each other at every operation, so
    when other programs keep the cores busy one descheduled thread stalls the
    others (4.8 s against 1.0 s per demo step, measured above), while on idle
    cores more threads are faster. So the
    candidates take turns for a few (real, not wasted) training steps, the
    fastest median wins, and the contest is held again every
    ``recheck_seconds``.
    """

    def __init__(self, candidates: Sequence[int], recheck_seconds: float = 90.0, probe_steps: int = 3,
                 log=print) -> None:
        self.candidates = list(dict.fromkeys(candidates))
        self.recheck_seconds = recheck_seconds
        self.probe_steps = probe_steps
        self.log = log
        self.chosen: Optional[int] = None
        self._start_probe()

    def _start_probe(self) -> None:
        # The first step after a switch is not timed: it pays for the switch.
        self._plan = [threads for threads in self.candidates for _ in range(self.probe_steps + 1)]
        self._times = {threads: [] for threads in self.candidates}
        self._previous: Optional[int] = None

    def before_step(self) -> None:
        if self._plan:
            threads = self._plan[0]
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        elif time.perf_counter() >= self._recheck_at and len(self.candidates) > 1:
            self._start_probe()
            self.before_step()

    def settle(self) -> None:
        """Use the chosen thread count from now on (e.g. for evaluation), even if stopped mid-contest."""
        self._plan = []
        self._recheck_at = math.inf
        if self.chosen is not None:
            torch.set_num_threads(self.chosen)

    def after_step(self, seconds: float) -> None:
        if not self._plan:
            return
        threads = self._plan.pop(0)
        if self._previous == threads:
            self._times[threads].append(seconds)
        self._previous = threads
        if self._plan:
            return
        medians = {count: statistics.median(times) for count, times in self._times.items() if times}
        best = min(medians, key=medians.get)
        if best != self.chosen:
            timings = ", ".join(f"{count} thread{'s' if count > 1 else ''} {medians[count]:.2f} s"
                                for count in self.candidates if count in medians)
            self.log(f"using {best} CPU thread{'s' if best > 1 else ''} (median step time: {timings})")
        self.chosen = best
        torch.set_num_threads(best)
        self._recheck_at = time.perf_counter() + self.recheck_seconds
