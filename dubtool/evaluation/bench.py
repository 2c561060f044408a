"""Speed: seconds per frame of each stage and how many cores it kept busy, real-time factor,
peak memory, and each time beside ffmpeg's floor (decode + encode of the same clip).

The measuring pieces only; ``dubtool.api.bench`` runs the dubs (this module does not call the
API, so that the dependency runs one way).
"""

from __future__ import annotations

import platform
import resource
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dubtool.pipeline.cache import StageRecord


@dataclass
class BenchRun:
    kind: str                      # "cold" (empty cache) or "warm" (everything cached)
    wall_seconds: float
    real_time_factor: float        # processing seconds per second of video
    stage_seconds: dict[str, float]
    stage_ms_per_frame: dict[str, float]
    stage_status: dict[str, str]   # "ran" or "cached"
    # Cores the dub's process (and the ffmpeg it ran) kept busy on average in each stage,
    # and each core's busy share of the stage's span (every process on the machine counts).
    stage_cores: dict[str, float]
    stage_core_busy: dict[str, tuple[float, ...]]
    floor_ratio: float = 0.0       # wall time over the ffmpeg floor of the same clip


@dataclass
class BenchReport:
    clip: str
    frames: int
    video_seconds: float
    ffmpeg_floor_seconds: float    # decode + H.264 encode of the same clip
    # A fresh `dubtool dub` process on an empty cache, timed from outside: what a user waits
    # for, start-up (imports, model load) included.
    process_seconds: float
    peak_rss_mb: float
    runs: list[BenchRun]
    settings: dict

    @property
    def process_real_time_factor(self) -> float:
        return self.process_seconds / max(self.video_seconds, 1e-9)

    @property
    def process_floor_ratio(self) -> float:
        """The fresh process's time over the ffmpeg floor measured in the same run."""
        return self.process_seconds / max(self.ffmpeg_floor_seconds, 1e-9)

    def to_json(self) -> dict:
        return {**asdict(self), "process_real_time_factor": self.process_real_time_factor,
                "process_floor_ratio": self.process_floor_ratio}


def bench_run(kind: str, stages: Sequence[StageRecord], wall_seconds: float, frames: int,
              video_seconds: float, floor_seconds: float) -> BenchRun:
    """One dub's timings, stage by stage (the blend and encode included: the Dubber records
    them as the last stage)."""
    seconds = {r.stage: r.seconds for r in stages}
    return BenchRun(kind, wall_seconds, wall_seconds / max(video_seconds, 1e-9), seconds,
                    {k: 1000 * v / frames for k, v in seconds.items()},
                    {r.stage: r.status for r in stages},
                    {r.stage: round(r.cores, 2) for r in stages},
                    {r.stage: r.core_busy for r in stages},
                    wall_seconds / max(floor_seconds, 1e-9))


def process_seconds(command: list[str]) -> float:
    """Wall seconds of ``command`` run as a fresh process; RuntimeError if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def ffmpeg_floor(clip: Path) -> float:
    """Wall seconds of ffmpeg decoding the clip and encoding it as the dub's output is."""
    start = time.perf_counter()
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(clip), "-c:v", "libx264",
                    "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p", "-c:a", "aac",
                    "-f", "null", "-"], check=True)
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__}
