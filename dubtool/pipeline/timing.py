"""How long a stage took and how busy it kept the CPU: wall time, this process's CPU time
(its threads and the subprocesses it waited for, ffmpeg included) and each core's busy share
over the same span (Linux's /proc/stat; every process on the machine counts there)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_PROC_STAT = Path("/proc/stat")


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _core_ticks() -> list[tuple[int, int]]:
    """(busy, total) jiffies of each core since boot; [] where /proc/stat is not readable."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return []
    ticks = []
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]  # idle + iowait
            ticks.append((sum(numbers) - idle, sum(numbers)))
    return ticks


@dataclass(frozen=True)
class Span:
    seconds: float                 # wall
    cpu_seconds: float             # this process's and its finished subprocesses' CPU time
    core_busy: tuple[float, ...]   # per core, the busy share of the span (0-1); () if unknown


class Stopwatch:
    """Started when made; ``span()``: what passed since."""

    def __init__(self) -> None:
        self._wall, self._cpu, self._ticks = time.perf_counter(), _process_cpu(), _core_ticks()

    def span(self) -> Span:
        wall, cpu, ticks = time.perf_counter(), _process_cpu(), _core_ticks()
        busy = tuple(round((b1 - b0) / (t1 - t0), 3) if t1 > t0 else 0.0
                     for (b0, t0), (b1, t1) in zip(self._ticks, ticks, strict=False))
        return Span(wall - self._wall, cpu - self._cpu, busy if len(ticks) else ())
