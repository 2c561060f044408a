"""The stages in order, each through the run cache."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dubtool.errors import InvalidMedia
from dubtool.face.detect import make_detector
from dubtool.face.indices import mouth_opening
from dubtool.media.probe import check_readable
from dubtool.options import FaceChoice
from dubtool.pipeline import extract as extract_stage
from dubtool.pipeline import landmarks as landmarks_stage
from dubtool.pipeline.cache import (
    RunCache,
    code_digest,
    default_cache_dir,
    file_digest,
    fingerprint,
    load_chunk,
)
from dubtool.pipeline.extract import Extracted
from dubtool.pipeline.landmarks import FaceTrack

if TYPE_CHECKING:  # the model stages need torch: `dubtool landmarks` runs without it
    import torch

    from dubtool.nets.io import LoadedModel
    from dubtool.pipeline.complete import Completion
    from dubtool.pipeline.diffuse import DiffusionSettings

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
    extract_fp: str
    landmarks_fp: str


def run_front(cache: RunCache, inputs: Inputs, *, loop: str = "pingpong",
              detector: str = "mediapipe", face: FaceChoice = "largest", force: bool = False,
              progress: StageProgress | None = None) -> FrontResult:
    """Stages ``extract`` and ``landmarks``: what every command needs before the models."""
    extract_fp = fingerprint("extract", code_digest(extract_stage), inputs.video_digest,
                             inputs.speech_digest, loop)
    folder = cache.run_stage(
        "extract", extract_fp,
        lambda out: extract_stage.extract(inputs.video, inputs.speech, loop, out), force=force)
    extracted = Extracted.load(folder)

    # Only the source frames the plan uses are tracked (and cropped): a short speech over a
    # long video reads its first seconds alone.
    used = int(extracted.plan.max()) + 1

    def detect(out: Path) -> None:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress("landmarks", done, total)

        track = landmarks_stage.track_faces(extracted.video, make_detector(detector), face, step,
                                            used)
        track.save(out)

    # The face track depends on the video and how much of it is used: a new speech as long as
    # the video or longer, or another loop mode, keeps it.
    landmarks_fp = fingerprint("landmarks", code_digest(landmarks_stage), inputs.video_digest,
                               detector, face, used)
    folder = cache.run_stage("landmarks", landmarks_fp, detect, force=force)
    track = FaceTrack.load(folder)
    if isinstance(face, int) and face >= track.faces_seen:
        # Otherwise the whole video would pass through undubbed, as if all went well.
        raise InvalidMedia(f"--face {face}: no frame has {face + 1} faces (found at most "
                           f"{track.faces_seen} in a frame; 0 is the leftmost)", inputs.video)
    return FrontResult(extracted, track, extract_fp, landmarks_fp)


@dataclass
class DubStages:
    front: FrontResult
    completion: Completion
    crops: np.ndarray
    generated_dir: Path
    reference_frame: int


def pick_reference_frame(track: FaceTrack) -> int:
    """A source frame with a face and a typical mouth: the median lip opening."""
    faces = np.nonzero(track.detected)[0]
    if len(faces) == 0:
        return 0
    opening = mouth_opening(track.points[faces])
    return int(faces[np.argsort(opening)[len(faces) // 2]])


def run_dub_stages(cache: RunCache, inputs: Inputs, model: LoadedModel, model_digest: str,
                   settings: DiffusionSettings, *, loop: str = "pingpong",
                   face: FaceChoice = "largest", reference_frame: int | None = None,
                   device: torch.device | None = None, force: bool = False,
                   progress: StageProgress | None = None) -> DubStages:
    """extract, landmarks, crops, complete and diffuse, each through the cache."""
    import torch

    from dubtool.devices import sampling_precision
    from dubtool.pipeline import complete as complete_stage
    from dubtool.pipeline import diffuse as diffuse_stage
    from dubtool.pipeline.complete import Completion

    device = device or torch.device("cpu")
    front = run_front(cache, inputs, loop=loop, face=face, force=force, progress=progress)
    video, track, plan = front.extracted.video, front.track, front.extracted.plan
    size = model.config.crop_size
    crops_fp = fingerprint("crops", code_digest(diffuse_stage), front.landmarks_fp, size)
    folder = cache.run_stage("crops", crops_fp,
                             lambda out: diffuse_stage.write_crops(video, track, size, out),
                             force=force)
    crops = diffuse_stage.load_crops(folder)

    complete_fp = fingerprint("complete", code_digest(complete_stage), front.extract_fp,
                              front.landmarks_fp, model_digest)
    folder = cache.run_stage(
        "complete", complete_fp,
        lambda out: complete_stage.complete(model.dubber.completion, track, plan,
                                            front.extracted.mel, video.fps, out, device),
        force=force)
    completion = Completion.load(folder)

    if reference_frame is None:
        reference_frame = pick_reference_frame(track)
    elif not 0 <= reference_frame < track.frames:
        # Within the video (api.dub checked that) but past the frames this speech uses.
        raise InvalidMedia(f"--reference-frame {reference_frame} is outside the "
                           f"{track.frames} frames of the video that the speech uses",
                           video.path)
    precision = sampling_precision(device)
    diffuse_fp = fingerprint("diffuse", code_digest(diffuse_stage), complete_fp, crops_fp,
                             model_digest, settings.steps, settings.eta, settings.seed,
                             settings.strength, settings.batch_size, reference_frame,
                             str(precision))
    chunk_frames = model.config.completion.frames
    done = [0]

    @functools.cache  # built on first use: a warm run never needs it
    def generator() -> diffuse_stage.LowerFaceGenerator:
        return diffuse_stage.LowerFaceGenerator(
            model, crops, plan, completion.target, track.detected, reference_frame,
            track.crop_points()[reference_frame], settings, device, precision)

    def chunks(ks: list[int], previous: list[dict | None]) -> list[dict]:
        results = generator().generate(ks, previous)
        done[0] += len(ks)
        if progress is not None:
            progress("diffuse", min(done[0] * chunk_frames, len(plan)), len(plan))
        return results

    folder = cache.run_chunked_stage("diffuse", diffuse_fp,
                                     diffuse_stage.chunk_count(len(plan), chunk_frames), chunks,
                                     force=force, streams=settings.batch_size)
    return DubStages(front, completion, crops, folder, reference_frame)


def generated_crops(folder: Path, chunks: int) -> Iterator[np.ndarray]:
    """The diffuse stage's crops, one per output frame, read chunk by chunk."""
    for k in range(chunks):
        yield from load_chunk(folder, k)["crops"]
