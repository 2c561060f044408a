"""Speed: seconds per frame of each stage, real-time factor, peak memory, the ffmpeg floor."""

from __future__ import annotations

import platform
import resource
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dubtool.media.probe import probe_video
from dubtool.pipeline.diffuse import sampling_precision
from dubtool.training.loop import resolve_device


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
    peak_rss_mb: float
    runs: list[BenchRun]
    settings: dict

    def to_json(self) -> dict:
        return asdict(self)


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


def bench(clip: str | Path, speech: str | Path | None = None, *, model: object,
          steps: int | None = None, device: str = "auto", repeat: int = 1,
          batch_size: int = 1) -> BenchReport:
    """Dub ``clip`` (with ``speech``, else its own audio) into a scratch folder: once from an
    empty cache (cold) and ``repeat`` times with everything cached (warm)."""
    from dubtool import api

    clip = Path(clip)
    probe_video(clip)  # a clear error before any work for a clip that is not a video
    runs = []
    with tempfile.TemporaryDirectory(prefix="dubtool-bench-") as scratch:
        scratch = Path(scratch)
        for n in range(1 + repeat):
            result = api.dub(clip, speech or clip, scratch / "out.mp4", model=model, steps=steps,
                             batch_size=batch_size, device=device, cache_dir=scratch / "cache",
                             loop="cut")
            stages = {r.stage: r.seconds for r in result.stages}
            stages["blend"] = max(result.wall_seconds - sum(stages.values()), 0.0)
            runs.append(BenchRun("cold" if n == 0 else "warm", result.wall_seconds,
                                 result.real_time_factor, stages,
                                 {k: 1000 * v / result.frames for k, v in stages.items()},
                                 {r.stage: r.status for r in result.stages}))
            frames, seconds = result.frames, result.seconds_of_video
    return BenchReport(str(clip), frames, seconds, ffmpeg_floor(clip), peak_rss_mb(), runs,
                       {"steps": steps, "batch_size": batch_size, "device": device,
                        "precision": str(sampling_precision(resolve_device(device))), **machine()})
