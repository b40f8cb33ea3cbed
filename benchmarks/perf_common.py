"""Shared helpers for the performance benchmarks: side-by-side timing, machine description, Markdown tables.

Every figure the benchmarks report is a ratio of two timings taken in the same run: the variants are interleaved
(one repetition of each in turn) so a burst of load from other processes hits all of them alike, and each variant's
time is the median over repetitions after warm-up.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

__all__ = ["Timings", "machine_line", "markdown_table", "set_threads", "time_side_by_side"]


def set_threads(threads: int) -> None:
    """Use `threads` intra-op threads (and one inter-op thread)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def machine_line() -> str:
    """One line naming the date, CPU, core count, load, torch version and thread count of this run."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"{datetime.datetime.now().isoformat(timespec='seconds')} | {_cpu_model()}, {os.cpu_count()} cores (shared) | "
        f"load avg {load} | torch {torch.__version__} | torch threads {torch.get_num_threads()}"
    )


class Timings:
    """Per-repetition seconds per call of each variant, from [`time_side_by_side`]."""

    def __init__(self, samples: dict[object, list[float]]) -> None:
        self.samples = samples

    def __getitem__(self, name: object) -> float:
        """Median seconds per call of variant `name`."""
        return statistics.median(self.samples[name])

    def speedup(self, baseline: object, name: object) -> float:
        """Median over repetitions of ``time(baseline) / time(name)``, each pair timed back to back."""
        pairs = zip(self.samples[baseline], self.samples[name], strict=True)
        return statistics.median(base / other for base, other in pairs)


def time_side_by_side(
    variants: dict[object, Callable[[], object]], repeats: int = 7, warmup: int = 1, min_time: float = 0.02
) -> Timings:
    """Time each variant, interleaved repetition by repetition (medians and paired ratios via [`Timings`]).

    Args:
        variants (`dict[str, Callable]`): Name -> zero-argument callable to time.
        repeats (`int`, *optional*): Timed repetitions per variant (the median is reported).
        warmup (`int`, *optional*): Untimed calls per variant before timing.
        min_time (`float`, *optional*): Each repetition loops a call until it lasts at least this long (the loop
            count is fixed per variant during warm-up), so sub-millisecond calls are not timer noise.
    """
    loops = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-7)
        loops[name] = max(1, int(min_time / once) + (once < min_time))
    samples: dict[object, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(loops[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / loops[name])
    return Timings(samples)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub Markdown table (floats formatted by the caller)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
