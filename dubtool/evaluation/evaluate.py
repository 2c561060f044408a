"""The reconstruction protocol: dub each clip with its own speech and compare with the original.

Three variants of every clip are measured the same way:
  model     the dub (lower face regenerated from the clip's own speech)
  original  the clip itself (the upper bound: sync and stability of real footage)
  static    the reference frame's lower face on every frame, bent to follow the head but
            with its own still mouth, and encoded like the dub (a mouth that never moves)
A model that does not beat ``static`` on LMD and sync is not working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dubtool.evaluation import metrics
from dubtool.evaluation.identity import IDENTITY_FRAMES, IdentityModel, identity_distance
from dubtool.face.crop import CropBox
from dubtool.face.detect import FaceMeshDetector
from dubtool.face.indices import (
    CONTENT_SLICE,
    JAW_SLICE,
    LIPS_SLICE,
    POSE_SLICE,
    inner_lip_opening,
    mouth_opening,
    select_points,
)
from dubtool.face.warp import warp_face
from dubtool.media.audio import load_speech, mel_spectrogram, pauses, voice_activity
from dubtool.media.frames import VideoWriter, read_frames
from dubtool.media.probe import probe_video
from dubtool.pipeline.blend import lower_face_mask
from dubtool.pipeline.complete import PAUSE_SECONDS
from dubtool.pipeline.landmarks import FaceTrack

VARIANTS = ("model", "original", "static")
METRICS = ("opening_correlation", "articulation", "completion_opening_correlation",
           "completion_articulation", "lmd", "lmd_lips", "lmd_jaw", "psnr", "ssim",
           "sharpness", "psnr_native", "ssim_native",
           "sync_offset", "sync_confidence", "stability")
OPTIONAL_METRICS = ("identity",)  # only with the optional extra installed
EVAL_CROP = 128


@dataclass
class ClipEvaluation:
    clip: str
    frames: int
    reference_frame: int
    fps: float
    metrics: dict[str, dict[str, float]]   # variant -> metric -> value
    strip: np.ndarray | None = field(default=None, repr=False)
    # (F,) per frame, for the plot: variant -> inner-lip opening; "energy" and "paused".
    series: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    scored_frames: int = 0  # frames far enough from every reference to be scored


def detect_points(frames: np.ndarray, track: FaceTrack | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """FaceMesh on each frame: (F, 131, 2) pixel points (NaN where none) and (F,) found. With
    ``track``, of the faces found in a frame the one nearest the track's (the dubbed face),
    not FaceMesh's first."""
    points = np.full((len(frames), 131, 2), np.nan, np.float32)
    found = np.zeros(len(frames), bool)
    with FaceMeshDetector() as detector:
        for i, frame in enumerate(frames):
            faces = [select_points(mesh)[:, :2] for mesh in detector.detect_all(frame)]
            if not faces:
                continue
            if track is not None and len(faces) > 1:
                centre = track.points[i].mean(axis=0)
                faces.sort(key=lambda f: float(np.linalg.norm(f.mean(axis=0) - centre)))
            points[i] = faces[0]
            found[i] = True
    return points, found


def encoded(frames: np.ndarray, fps: float, folder: Path) -> np.ndarray:
    """The frames after the H.264 encode every dub goes through (the writer's settings), so
    that a reference variant is measured like the model's output."""
    path = folder / ".encoded.mp4"
    height, width = frames.shape[1:3]
    with VideoWriter(path, width, height, Fraction(fps).limit_denominator(1001)) as writer:
        for frame in frames:
            writer.write(frame)
    decoded = np.stack([f.copy() for f in read_frames(probe_video(path))])[:len(frames)]
    path.unlink()
    return decoded[:, :height, :width]


def still_mouth_points(reference: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """(131, 2) the frame's pose points with the reference's lip/jaw points carried along by
    the similarity (scale, rotation, shift) that takes the reference's pose to the frame's:
    the reference's mouth, following the head."""
    source, target = reference[POSE_SLICE].astype(np.float64), frame[POSE_SLICE]
    matrix, _ = cv2.estimateAffinePartial2D(source, target.astype(np.float64))
    out = frame.astype(np.float64).copy()
    content = reference[CONTENT_SLICE].astype(np.float64)
    out[CONTENT_SLICE] = content @ matrix[:, :2].T + matrix[:, 2]
    return out.astype(np.float32)


def static_mouth(frames: np.ndarray, track: FaceTrack, reference_frame: int,
                 reference_image: np.ndarray) -> np.ndarray:
    """Every frame with the reference frame's lower face, bent to follow the frame's head pose
    (the same thin-plate warp the dub starts from) but with the reference's still mouth: the
    no-motion baseline."""
    size = EVAL_CROP
    reference_crop = track.box(reference_frame).crop(reference_image, size)
    crop_points = track.crop_points()
    reference_points = crop_points[reference_frame]
    out = frames.copy()
    for i in range(len(frames)):
        if track.detected[i]:
            target = still_mouth_points(reference_points, crop_points[i])
            face = warp_face(reference_crop, reference_points, target)
            mask = lower_face_mask([crop_points[i], target], size)
            out[i] = track.box(i).paste(frames[i], face, mask)
    return out


def _lower_halves(frames: np.ndarray, track: FaceTrack) -> np.ndarray:
    return np.stack([track.box(i).crop(f, EVAL_CROP)[EVAL_CROP // 2:]
                     for i, f in enumerate(frames)])


def _mouths(frames: np.ndarray, track: FaceTrack) -> np.ndarray:
    c = EVAL_CROP
    return np.stack([track.box(i).crop(f, c)[c // 2 + c // 8:c - c // 8, c // 4:3 * c // 4]
                     for i, f in enumerate(frames)])


def mouth_boxes(track: FaceTrack, frames: int, width: int, height: int) -> np.ndarray:
    """(F, 4) x0, y0, x1, y1: the box of each frame's 57 lip/jaw track points in pixels,
    inside the frame (empty where the box would be)."""
    content = track.points[:frames, CONTENT_SLICE]
    lo = np.floor(content.min(axis=1)).astype(int)
    hi = np.ceil(content.max(axis=1)).astype(int)
    x0, y0 = np.clip(lo[:, 0], 0, width), np.clip(lo[:, 1], 0, height)
    x1, y1 = np.clip(hi[:, 0], 0, width), np.clip(hi[:, 1], 0, height)
    return np.stack([x0, y0, x1, y1], axis=1)


def _native_scores(video: np.ndarray, original: np.ndarray, boxes: np.ndarray,
                   faces: np.ndarray) -> dict[str, float]:
    """sharpness, psnr_native, ssim_native over the frames with a face and a box of at least
    8 x 8 pixels (NaN when there is none)."""
    scores: dict[str, list[float]] = {"sharpness": [], "psnr_native": [], "ssim_native": []}
    for i in np.nonzero(faces)[0]:
        x0, y0, x1, y1 = boxes[i]
        if x1 - x0 < 8 or y1 - y0 < 8:
            continue
        a, b = video[i, y0:y1, x0:x1], original[i, y0:y1, x0:x1]
        scores["sharpness"].append(metrics.sharpness(a, b))
        scores["psnr_native"].append(metrics.psnr(a, b))
        scores["ssim_native"].append(metrics.ssim(a, b))
    return {k: float(np.mean(v)) if v else math.nan for k, v in scores.items()}


def scored_frames(frames: int, reference_frame: int, gap_frames: int) -> np.ndarray:
    """(frames,) bool: the frames at least ``gap_frames`` from the reference frame. The dub's
    references obey the same rule frame by frame and always include this reference, so no
    scored frame of any variant is drawn from its own ground truth or a frame near it."""
    return np.abs(np.arange(frames) - reference_frame) >= gap_frames


def measure(variants: dict[str, np.ndarray], original: np.ndarray, track: FaceTrack,
            speech: np.ndarray, fps: float, landmarks: np.ndarray | None = None,
            identity: IdentityModel | None = None,
            series: dict[str, np.ndarray] | None = None,
            scored: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Every metric for every variant (F frames each, aligned with ``original``); the
    identity distance too when ``identity`` is given. ``landmarks`` (F, 131, 2): the
    completion's target landmarks of the "model" variant (any frame of reference), for the
    completion_* metrics. ``series``, when given, receives each variant's inner-lip opening
    over time."""
    frames = len(original)
    envelope = metrics.speech_envelope(speech, fps, frames)
    original_points, original_found = detect_points(original, track)
    original_halves, original_mouths = _lower_halves(original, track), _mouths(original, track)
    boxes = mouth_boxes(track, frames, original.shape[2], original.shape[1])
    faces = track.detected[:frames] & (True if scored is None else scored)
    original_ids = None
    face_frames = np.nonzero(faces)[0]
    if identity is not None and len(face_frames):
        picks = face_frames[np.linspace(0, len(face_frames) - 1,
                                        min(IDENTITY_FRAMES, len(face_frames))).astype(int)]
        original_ids = identity.descriptors(original, track.points, picks)
    results = {}
    for name, video in variants.items():
        points, found = ((original_points, original_found) if video is original
                         else detect_points(video, track))
        both = found & original_found & faces
        halves = _lower_halves(video, track)
        offset, _, confidence = metrics.sync_score(mouth_opening(points), envelope, fps)
        opening = np.where(found & faces, inner_lip_opening(points), np.nan)
        real_opening = np.where(original_found & faces, inner_lip_opening(original_points),
                                np.nan)
        if series is not None:
            series[name] = opening
        completion = {"completion_opening_correlation": math.nan,
                      "completion_articulation": math.nan}
        if name == "model" and landmarks is not None:
            predicted = np.where(faces, inner_lip_opening(landmarks[:frames]), np.nan)
            completion = {
                "completion_opening_correlation": metrics.opening_correlation(predicted,
                                                                              real_opening),
                "completion_articulation": metrics.articulation(predicted, real_opening)}
        results[name] = {
            "opening_correlation": metrics.opening_correlation(opening, real_opening),
            "articulation": metrics.articulation(opening, real_opening),
            **completion,
            "lmd_lips": (metrics.lmd(points[both], original_points[both], LIPS_SLICE)
                         if both.any() else math.nan),
            "lmd_jaw": (metrics.lmd(points[both], original_points[both], JAW_SLICE)
                        if both.any() else math.nan),
            "psnr": float(np.mean([metrics.psnr(a, b) for a, b in
                                   zip(halves[faces], original_halves[faces], strict=True)])),
            "ssim": float(np.mean([metrics.ssim(a, b) for a, b in
                                   zip(halves[faces], original_halves[faces], strict=True)])),
            "lmd": metrics.lmd(points[both], original_points[both]) if both.any() else math.nan,
            "sync_offset": float(offset),
            "sync_confidence": confidence,
            "stability": metrics.stability(_mouths(video, track)[faces], original_mouths[faces]),
            **_native_scores(video, original, boxes, faces),
        }
        if original_ids is not None:
            ids = (original_ids if video is original
                   else identity.descriptors(video, track.points, picks))
            results[name]["identity"] = identity_distance(ids, original_ids)
    return results


def strip_image(variants: dict[str, np.ndarray], track: FaceTrack, count: int = 4,
                scored: np.ndarray | None = None) -> np.ndarray:
    """Rows original | model | static of ``count`` evenly spaced (scored) frames: the mouth
    and jaw at the video's own resolution, not scaled (a square around the lip/jaw points,
    the same size in every tile)."""
    frames = len(next(iter(variants.values())))
    chosen = np.nonzero(scored)[0] if scored is not None and scored.any() else np.arange(frames)
    picks = chosen[np.linspace(0, len(chosen) - 1, count).round().astype(int)]
    content = track.points[picks][:, CONTENT_SLICE]
    side = int(np.ceil(1.2 * (content.max(axis=1) - content.min(axis=1)).max()))
    side = max(side, 32)
    rows = []
    for name in ("original", "model", "static"):
        tiles = []
        for i, points in zip(picks, content, strict=True):
            cx, cy = (points.min(axis=0) + points.max(axis=0)) / 2
            tiles.append(CropBox.from_centre(cx, cy, side).crop(variants[name][i], side))
        row = np.concatenate(tiles, axis=1)
        cv2.putText(row, name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1,
                    cv2.LINE_AA)
        rows.append(row)
    return np.concatenate(rows, axis=0)


def evaluate_clip(clip: str | Path, dubbed: str | Path, track: FaceTrack,
                  reference_frame: int, landmarks: np.ndarray | None = None,
                  identity: IdentityModel | None = None, speech: str | Path | None = None,
                  reference_gap: float = 0.0) -> ClipEvaluation:
    """Measure a clip's dub (made from the clip's own ``speech``, default the clip's, with
    loop 'cut') and the two reference variants over the dub's frames. ``track`` is the
    clip's face track, ``reference_frame`` the dub's, ``landmarks`` the dub's target
    landmarks (for the completion_* metrics). Frames within ``reference_gap`` seconds of the
    reference frame are not scored (see ``scored_frames``)."""
    info = probe_video(clip)
    dub_info = probe_video(dubbed)
    frames = min(info.frame_count, dub_info.frame_count)
    original = np.stack([f.copy() for f, _ in zip(read_frames(info), range(frames),
                                                  strict=False)])
    generated = np.stack([f.copy() for f, _ in zip(read_frames(dub_info), range(frames),
                                                   strict=False)])
    if generated.shape != original.shape:
        raise ValueError(f"{dubbed}: frames of {generated.shape[1:]} differ from the clip's "
                         f"{original.shape[1:]}")
    # The reference frame may lie past the frames compared: then read it from the clip again.
    reference_image = (original[reference_frame] if reference_frame < frames else
                       next(f.copy() for i, f in enumerate(read_frames(info))
                            if i == reference_frame))
    static = encoded(static_mouth(original, track, reference_frame, reference_image),
                     float(info.fps), Path(dubbed).parent)
    variants = {"model": generated, "original": original, "static": static}
    samples = load_speech(speech if speech is not None else clip)
    series: dict[str, np.ndarray] = {}
    scored = scored_frames(frames, reference_frame, round(reference_gap * float(info.fps)))
    results = measure(variants, original, track, samples, float(info.fps), landmarks,
                      identity, series, scored)
    mel = mel_spectrogram(samples)
    series["energy"] = mel.mean(axis=0)
    series["paused"] = pauses(voice_activity(mel, info.fps, frames), info.fps, PAUSE_SECONDS)
    return ClipEvaluation(Path(clip).name, frames, reference_frame, float(info.fps), results,
                          strip_image(variants, track, scored=scored), series,
                          int(scored.sum()))


def summarise(clips: list[ClipEvaluation]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> metric -> {mean, ci95} over clips (ci95: half-width of the 95% interval of
    the mean, normal approximation; 0 with one clip)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    measured = [m for m in OPTIONAL_METRICS if all(m in c.metrics["model"] for c in clips)]
    for variant in VARIANTS:
        out[variant] = {}
        for metric in (*METRICS, *measured):
            values = np.array([c.metrics[variant][metric] for c in clips], np.float64)
            values = values[~np.isnan(values)]
            if len(values) == 0 or np.isinf(values).any():  # no value, or PSNR of identity
                value = math.inf if len(values) else math.nan
                out[variant][metric] = {"mean": value, "ci95": 0.0 if len(values) else math.nan}
                continue
            half = 1.96 * values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
            out[variant][metric] = {"mean": float(values.mean()), "ci95": float(half)}
    return out
