"""Speed: seconds per frame of each stage, real-time factor, peak memory, the ffmpeg floor.

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

    def to_json(self) -> dict:
        return {**asdict(self), "process_real_time_factor": self.process_real_time_factor}


def bench_run(kind: str, stages: Sequence[StageRecord], wall_seconds: float, frames: int,
              video_seconds: float) -> BenchRun:
    """One dub's timings; what the stages do not account for is the blend (and encode)."""
    seconds = {r.stage: r.seconds for r in stages}
    seconds["blend"] = max(wall_seconds - sum(seconds.values()), 0.0)
    return BenchRun(kind, wall_seconds, wall_seconds / max(video_seconds, 1e-9), seconds,
                    {k: 1000 * v / frames for k, v in seconds.items()},
                    {r.stage: r.status for r in stages})


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
