"""The renderers' interface: what a renderer is given (``RenderJob``) and what it returns
(``LowerFaces``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dubtool.media.probe import VideoInfo
from dubtool.pipeline.cache import RunCache
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.progress import StageProgress


class LowerFaces(Protocol):
    def lower_face(self, o: int, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Output frame ``o``'s new lower face in the face box of its source frame, whose
        pixels are ``original`` ((B, B, 3) uint8 RGB, at the box's own size B): (S, S, 3)
        uint8 RGB and its mask (S, S) float32 in [0, 1], any S (the paste scales them to the
        box). Called in increasing ``o``, for the frames with a face only."""
        ...


@dataclass
class RenderJob:
    """What a renderer is given: the dub's inputs after ``complete``."""

    cache: RunCache
    video: VideoInfo
    track: FaceTrack
    plan: np.ndarray            # (O,) source frame of each output frame
    target: np.ndarray          # (O, 131, 2) target landmarks in each source frame's crop box
    closing: np.ndarray         # (O,) 1 where the mouth is closed for a pause (complete)
    upstream: str               # fingerprint of everything the targets depend on
    track_fp: str               # fingerprint of the face track (what crops depend on)
    reference_frame: int        # the dub's reference (forced, or its typical frame): the
                                # only one, or the preferred one of several
    forced: bool                # whether --reference-frame forced it
    exclude_frames: int         # references at least this far from the frame they serve
    force: bool = False
    progress: StageProgress | None = None


class Renderer(Protocol):
    name: str

    def render(self, job: RenderJob) -> LowerFaces:
        """Run the renderer's stages through the job's cache."""
        ...


@dataclass(frozen=True)
class DiffusionSettings:
    """How the lower faces are sampled. ``batch_size`` chunks are denoised together: the video
    is diffused as that many contiguous streams side by side, each starting without motion
    frames (1: one stream, temporal context carried through the whole video)."""

    steps: int
    eta: float = 0.0
    seed: int = 0
    strength: float = 1.0
    batch_size: int = 1
