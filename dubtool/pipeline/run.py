"""The stages in order, each through the run cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dubtool.face.detect import make_detector
from dubtool.media.probe import check_readable
from dubtool.pipeline import extract as extract_stage
from dubtool.pipeline import landmarks as landmarks_stage
from dubtool.pipeline.cache import RunCache, default_cache_dir, file_digest, fingerprint
from dubtool.pipeline.extract import Extracted
from dubtool.pipeline.landmarks import FaceTrack

# progress(stage, done, total): called as a stage advances.
StageProgress = Callable[[str, int, int], None]


@dataclass
class Inputs:
    """The user's files, checked, with their content digests."""

    video: Path
    speech: Path | None
    video_digest: str
    speech_digest: str | None

    @classmethod
    def of(cls, video: str | Path, speech: str | Path | None = None) -> Inputs:
        video = check_readable(video)
        speech = check_readable(speech) if speech is not None else None
        return cls(video, speech, file_digest(video),
                   file_digest(speech) if speech is not None else None)

    def open_cache(self, cache_dir: str | Path | None = None,
                   lock_timeout: float = 0.0) -> RunCache:
        key = fingerprint("run", self.video_digest, self.speech_digest)
        description = {"video": str(self.video), "speech": str(self.speech or "")}
        return RunCache(cache_dir or default_cache_dir(), key, description, lock_timeout)


@dataclass
class FrontResult:
    extracted: Extracted
    track: FaceTrack


def run_front(cache: RunCache, inputs: Inputs, *, loop: str = "pingpong",
              detector: str = "mediapipe", force: bool = False,
              progress: StageProgress | None = None) -> FrontResult:
    """Stages ``extract`` and ``landmarks``: what every command needs before the models."""
    extract_fp = fingerprint("extract", extract_stage.VERSION, inputs.video_digest,
                             inputs.speech_digest, loop)
    folder = cache.run_stage(
        "extract", extract_fp,
        lambda out: extract_stage.extract(inputs.video, inputs.speech, loop).save(out),
        force=force)
    extracted = Extracted.load(folder)

    def detect(out: Path) -> None:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress("landmarks", done, total)

        track = landmarks_stage.track_faces(extracted.video, make_detector(detector), step)
        track.save(out)

    # The face track depends on the video alone: a new speech or loop mode keeps it.
    landmarks_fp = fingerprint("landmarks", landmarks_stage.VERSION, inputs.video_digest, detector)
    folder = cache.run_stage("landmarks", landmarks_fp, detect, force=force)
    return FrontResult(extracted, FaceTrack.load(folder))
