"""The ``native`` renderer: lower faces drawn from the video's own frames at the face's own
size in the frame. Per output frame the source frame whose mouth shape is nearest its target
landmarks, the reference frame preferred (``pipeline.sources``; ``sources`` 1: the
reference frame alone), bent onto the target landmarks by the thin-plate spline and resampled
bicubically, colour-matched to the frame. Nothing is scaled up from a small image; a source
softer than the video's typical frame (motion blur, focus) is sharpened to the typical detail
(``match_detail``). The source choice's costs and the crops' size and detail are the
model's settings (``SourceSettings`` and ``NativeSettings``, the ``inference.sources``
and ``inference.native`` sections of its config.json), each part of its stage's fingerprint.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import cv2
import numpy as np

from dubtool.arrays import BlockRows
from dubtool.face.indices import CONTENT_SLICE
from dubtool.face.mask import MASK_TOP, lower_face_mask, match_colour
from dubtool.face.warp import warp_face
from dubtool.hashing import code_digest, fingerprint
from dubtool.media.frames import read_frames
from dubtool.media.probe import VideoInfo
from dubtool.nets.config import NativeSettings, SourceSettings
from dubtool.pipeline import sources as sources_stage
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.renderers.base import LowerFaces, RenderJob
from dubtool.pipeline.sources import SourcePlan

# Bicubic: a smooth sub-pixel warp of a 512 px face keeps 0.89 of its sharpness (bilinear 0.59,
# Lanczos 0.93 at four times the time).
NATIVE_INTERPOLATION = cv2.INTER_CUBIC


class NativeRenderer:
    """``sources``: how many of the video's frames the lower faces may be drawn from (1:
    the reference frame alone; more: per output frame, the nearest mouth among that many, the
    reference frame preferred). ``choice`` and ``crops``: the model's settings of the
    ``sources`` and ``source-crops`` stages."""

    name = "native"

    def __init__(self, sources: int, choice: SourceSettings,
                 crops: NativeSettings) -> None:
        self.sources, self.choice, self.crops = sources, choice, crops

    def render(self, job: RenderJob) -> LowerFaces:
        track, cache = job.track, job.cache
        fp = fingerprint("sources", code_digest(sources_stage), job.upstream,
                         job.exclude_frames, job.reference_frame, job.forced, self.sources,
                         dataclasses.asdict(self.choice))
        folder = cache.run_stage("sources", fp, lambda out: sources_stage.choose_sources(
            track.points, track.detected, job.target, job.plan,
            exclude_frames=job.exclude_frames, anchor=job.reference_frame,
            forced=job.reference_frame if job.forced else None,
            pool_size=self.sources, settings=self.choice, closing=job.closing).save(out),
            force=job.force)
        sources = SourcePlan.load(folder)
        crops_fp = fingerprint("source-crops", code_digest(sys.modules[__name__]), fp,
                               dataclasses.asdict(self.crops))
        folder = cache.run_stage(
            "source-crops", crops_fp,
            lambda out: write_source_crops(job.video, track, sources.used, out, self.crops),
            force=job.force)
        return NativeFaces(track, job.target, job.plan, sources,
                           load_source_crops(folder), self.crops.max_size)


def native_size(box_size: int, max_size: int) -> int:
    """The side a face box of ``box_size`` is drawn at: its own, at most ``max_size``."""
    return max(2, min(box_size, max_size))


def mouth_detail(face: np.ndarray, points: np.ndarray) -> float:
    """The variance of the Laplacian (grey) of a face crop (S, S, 3) inside the box of its 57
    lip/jaw ``points`` (131, 2; crop units): how much fine detail the part a dub redraws
    holds (what ``evaluation.metrics.sharpness`` compares)."""
    size = len(face)
    content = points[CONTENT_SLICE] * size
    x0, y0 = np.clip(np.floor(content.min(axis=0)).astype(int), 0, size - 1)
    x1, y1 = np.clip(np.ceil(content.max(axis=0)).astype(int), x0 + 1, size)
    grey = cv2.cvtColor(np.ascontiguousarray(face[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def match_detail(face: np.ndarray, points: np.ndarray, detail: float,
                 settings: NativeSettings) -> np.ndarray:
    """``face`` (S, S, 3) uint8 sharpened by an unsharp mask (Gaussian of 1 px) of the
    smallest amount, up to ``settings.max_sharpening``, that brings its ``mouth_detail`` to
    ``detail``; unchanged when it holds ``settings.detail_tolerance`` of that already."""
    if mouth_detail(face, points) >= settings.detail_tolerance * detail:
        return face
    blurred = cv2.GaussianBlur(face, (0, 0), 1.0)

    def sharpened(amount: float) -> np.ndarray:
        return cv2.addWeighted(face, 1 + amount, blurred, -amount, 0.0)

    def short(amount: float) -> bool:
        return mouth_detail(sharpened(amount), points) < detail

    low, high = 0.0, settings.max_sharpening
    if short(high):
        return sharpened(high)
    for _ in range(8):  # the detail grows with the amount: bisect
        middle = (low + high) / 2
        low, high = (middle, high) if short(middle) else (low, middle)
    return sharpened(high)


def write_source_crops(video: VideoInfo, track: FaceTrack, frames: np.ndarray,
                       folder: Path, settings: NativeSettings) -> None:
    """The face crop of each of ``frames`` at its own size (at most ``settings.max_size``),
    its detail matched (``match_detail``) to the median over ``settings.detail_samples``
    frames with a face spread evenly over the video's first ``settings.detail_frames``.
    Those and the sources are read in one pass of ffmpeg that converts and pipes only them
    (``read_frames(select=)``): a source far into a long video costs its decoding only."""
    wanted = {int(f) for f in frames if track.detected[int(f)]}
    if not wanted:
        np.savez(folder / "source_crops.npz")
        return
    first = min(settings.detail_frames, track.frames)
    spread = np.linspace(0, first - 1, min(first, settings.detail_samples))
    measured = {int(i) for i in np.round(spread) if track.detected[int(i)]}
    picks = sorted(wanted | measured)
    crops, details = {}, []
    for i, frame in zip(picks, read_frames(video, select=picks), strict=True):
        box = track.box(i)
        face = box.crop(frame, native_size(box.size, settings.max_size))
        if i in measured:
            details.append(mouth_detail(face, track.crop_points(i)))
        if i in wanted:
            crops[i] = face
    typical = float(np.median(details)) if details else 0.0
    np.savez(folder / "source_crops.npz", **{
        f"frame{i}": match_detail(face, track.crop_points(i), typical, settings)
        for i, face in crops.items()})


def load_source_crops(folder: Path) -> dict[int, np.ndarray]:
    with np.load(folder / "source_crops.npz", allow_pickle=False) as data:
        return {int(k.removeprefix("frame")): data[k] for k in data.files}


class NativeFaces:
    """The native renderer's lower faces, made as the blend asks for them, at the faces' own
    size up to ``max_size``."""

    def __init__(self, track: FaceTrack, target: np.ndarray, plan: np.ndarray,
                 sources: SourcePlan, crops: dict[int, np.ndarray],
                 max_size: int) -> None:
        # The points of a frame at a time, read by blocks (track and targets on disk).
        self.track = dataclasses.replace(track, points=BlockRows(track.points))
        self.target, self.plan = BlockRows(target), plan
        self.sources, self.crops, self.max_size = sources, crops, max_size
        self.crop_points = {r: track.crop_points(r) for r in crops}

    def _warped(self, source: int, o: int, size: int, from_row: int) -> np.ndarray:
        return warp_face(self.crops[source], self.crop_points[source], self.target[o],
                         size, NATIVE_INTERPOLATION, from_row)

    def lower_face(self, o: int, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source = int(self.plan[o])
        size = native_size(len(original), self.max_size)
        if size != len(original):  # a box larger than max_size: drawn at that size
            original = cv2.resize(original, (size, size), interpolation=cv2.INTER_AREA)
        # Only the rows the mask reaches are drawn; above them the frame stays.
        top = max(0, int(MASK_TOP * size) - 1)
        refs = self.sources
        lower = self._warped(int(refs.source[o]), o, size, top)
        fading = float(refs.outgoing_weight[o])
        if fading > 0:
            lower = cv2.addWeighted(lower, 1 - fading,
                                    self._warped(int(refs.outgoing[o]), o, size, top), fading,
                                    0.0)
        face = original.copy()
        face[top:] = lower
        mask = lower_face_mask([self.track.crop_points(source), self.target[o]], size)
        return match_colour(face, original, mask), mask
