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
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from dubtool.arrays import true_runs
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
from dubtool.face.mask import DIFFUSED_TOP, lower_face_mask
from dubtool.face.warp import warp_face
from dubtool.media.audio import decode_speech, mel_spectrogram, pauses, voice_activity
from dubtool.media.frames import VideoWriter, read_frames
from dubtool.media.probe import probe_video
from dubtool.nets.config import CompleteSettings
from dubtool.nets.speech_encoder import encode_speech
from dubtool.nets.sync_expert import SyncExpert, SyncScores, frame_speech
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.plan import gap_frames

VARIANTS = ("model", "original", "static")
METRICS = ("opening_correlation", "articulation", "completion_opening_correlation",
           "completion_articulation", "lmd", "lmd_lips", "lmd_jaw", "psnr", "ssim",
           "sharpness", "psnr_native", "ssim_native",
           "sync_offset", "sync_confidence", "sync_expert", "sync_expert_cosine", "stability")
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


def _detect(detector: FaceMeshDetector, frame: np.ndarray, track: FaceTrack | None,
            i: int) -> np.ndarray | None:
    """(131, 2) the points of frame ``i``'s face: of several, the one nearest the track's."""
    faces = [select_points(mesh)[:, :2] for mesh in detector.detect_all(frame)]
    if not faces:
        return None
    if track is not None and len(faces) > 1:
        centre = track.points[i].mean(axis=0)
        faces.sort(key=lambda f: float(np.linalg.norm(f.mean(axis=0) - centre)))
    return faces[0]


def detect_points(frames: np.ndarray, track: FaceTrack | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """FaceMesh on each frame: (F, 131, 2) pixel points (NaN where none) and (F,) found. With
    ``track``, of the faces found in a frame the one nearest the track's (the dubbed face),
    not FaceMesh's first."""
    points = np.full((len(frames), 131, 2), np.nan, np.float32)
    found = np.zeros(len(frames), bool)
    with FaceMeshDetector() as detector:
        for i, frame in enumerate(frames):
            face = _detect(detector, frame, track, i)
            if face is not None:
                points[i], found[i] = face, True
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


class StaticMouth:
    """The no-motion baseline, a frame at a time: each frame with the reference frame's lower
    face, bent to follow the frame's head pose (the same thin-plate warp the dub starts from)
    but with the reference's still mouth."""

    def __init__(self, track: FaceTrack, reference_frame: int,
                 reference_image: np.ndarray) -> None:
        self.track = track
        self.crop = track.box(reference_frame).crop(reference_image, EVAL_CROP)
        self.points = track.crop_points(reference_frame)

    def __call__(self, frame: np.ndarray, i: int) -> np.ndarray:
        if not self.track.detected[i]:
            return frame
        frame_points = self.track.crop_points(i)
        target = still_mouth_points(self.points, frame_points)
        face = warp_face(self.crop, self.points, target)
        mask = lower_face_mask([frame_points, target], EVAL_CROP)
        return self.track.box(i).paste(frame, face, mask)


def _lower_half(frame: np.ndarray, track: FaceTrack, i: int) -> np.ndarray:
    return track.box(i).crop(frame, EVAL_CROP)[int(DIFFUSED_TOP * EVAL_CROP):]


def _mouth(frame: np.ndarray, track: FaceTrack, i: int) -> np.ndarray:
    c = EVAL_CROP
    return track.box(i).crop(frame, c)[c // 2 + c // 8:c - c // 8, c // 4:3 * c // 4]


def mouth_boxes(track: FaceTrack, frames: int, width: int, height: int) -> np.ndarray:
    """(F, 4) x0, y0, x1, y1: the box of each frame's 57 lip/jaw track points in pixels,
    inside the frame (empty where the box would be)."""
    content = track.points[:frames, CONTENT_SLICE]
    lo = np.floor(content.min(axis=1)).astype(int)
    hi = np.ceil(content.max(axis=1)).astype(int)
    x0, y0 = np.clip(lo[:, 0], 0, width), np.clip(lo[:, 1], 0, height)
    x1, y1 = np.clip(hi[:, 0], 0, width), np.clip(hi[:, 1], 0, height)
    return np.stack([x0, y0, x1, y1], axis=1)


def scored_frames(frames: int, reference_frame: int, gap: int) -> np.ndarray:
    """(frames,) bool: the frames at least ``gap`` frames from the reference frame. The dub's
    references obey the same rule frame by frame and always include this reference, so no
    scored frame of any variant is drawn from its own ground truth or a frame near it."""
    return np.abs(np.arange(frames) - reference_frame) >= gap


class _Variant:
    """One variant measured a frame at a time against the original: FaceMesh's points (kept
    whole for the original only: a variant's distances need the original's), its openings,
    and the image scores as running lists of one number a frame. Nothing holds its frames:
    eval's memory does not grow with the clip's frames (it held each variant whole)."""

    def __init__(self, frames: int, track: FaceTrack, faces: np.ndarray, boxes: np.ndarray,
                 keep_points: bool = False) -> None:
        self.track, self.faces, self.boxes = track, faces, boxes
        self.points = np.full((frames, 131, 2), np.nan, np.float32) if keep_points else None
        self.found = np.zeros(frames, bool)
        self.inner = np.full(frames, np.nan, np.float32)  # inner-lip opening (nan: no face)
        self.mouth = np.full(frames, np.nan, np.float32)  # mouth opening, for the sync score
        # lip/jaw points in the track's crop box (the units the sync expert learned in)
        self.content = np.full((frames, CONTENT_SLICE.stop - CONTENT_SLICE.start, 2), np.nan,
                               np.float32)
        self.scores: dict[str, list[float]] = {name: [] for name in (
            "psnr", "ssim", "lmd", "lmd_lips", "lmd_jaw", "sharpness", "psnr_native",
            "ssim_native")}
        self.change, self.changes, self._last_mouth = 0.0, 0, None
        self.ids: list[np.ndarray] = []
        self.tiles: dict[int, np.ndarray] = {}  # the strip's tile of its frames

    def add(self, i: int, frame: np.ndarray, detector: FaceMeshDetector,
            original: np.ndarray, reference: _Variant | None,
            identity: IdentityModel | None, id_picks: set[int],
            tiles: dict[int, CropBox], tile_side: int) -> None:
        """Frame ``i`` of this variant, beside the original's frame ``original``; ``reference``
        is the original's _Variant (None: this is it, and ``frame`` is ``original``)."""
        track = self.track
        points = _detect(detector, frame, track, i)
        if points is not None:
            self.found[i] = True
            if self.points is not None:
                self.points[i] = points
            self.inner[i] = inner_lip_opening(points[None])[0]
            self.mouth[i] = mouth_opening(points[None])[0]
            box = track.box(i)
            self.content[i] = (points[CONTENT_SLICE] - (box.x0, box.y0)) / max(box.size, 1)
        if self.faces[i]:
            half, real_half = _lower_half(frame, track, i), _lower_half(original, track, i)
            self.scores["psnr"].append(metrics.psnr(half, real_half))
            self.scores["ssim"].append(metrics.ssim(half, real_half))
            mouth = _mouth(frame, track, i).astype(np.float32)
            if self._last_mouth is not None:  # between successive scored frames with a face
                self.change += float(np.abs(mouth - self._last_mouth).sum(dtype=np.float64))
                self.changes += mouth.size
            self._last_mouth = mouth
            x0, y0, x1, y1 = self.boxes[i]
            if x1 - x0 >= 8 and y1 - y0 >= 8:
                a, b = frame[y0:y1, x0:x1], original[y0:y1, x0:x1]
                self.scores["sharpness"].append(metrics.sharpness(a, b))
                self.scores["psnr_native"].append(metrics.psnr(a, b))
                self.scores["ssim_native"].append(metrics.ssim(a, b))
            real = self if reference is None else reference
            if points is not None and real.found[i]:
                for name, part in (("lmd", CONTENT_SLICE), ("lmd_lips", LIPS_SLICE),
                                   ("lmd_jaw", JAW_SLICE)):
                    self.scores[name].append(metrics.lmd(points[None], real.points[i:i + 1],
                                                         part))
        if identity is not None and i in id_picks:
            self.ids.append(identity.descriptors(frame[None], track.points[i:i + 1],
                                                 np.zeros(1, int))[0])
        if i in tiles:
            self.tiles[i] = tiles[i].crop(frame, tile_side)

    def results(self, reference: _Variant, envelope: np.ndarray, fps: float,
                landmarks: np.ndarray | None, original_ids: np.ndarray | None,
                expert: SyncExpert | None = None, speech: np.ndarray | None = None
                ) -> tuple[dict[str, float], np.ndarray]:
        """Every metric, and the inner-lip opening series (nan where not scored); the sync
        expert's with ``expert`` and ``speech``, its (F, C) per-frame states."""
        frames = len(self.found)
        offset, _, confidence = metrics.sync_score(self.mouth, envelope, fps)
        expert_scores = (expert_sync(expert, self.content, self.found & self.faces, speech)
                         if expert is not None and speech is not None else None)
        opening = np.where(self.found & self.faces, self.inner, np.nan)
        real_opening = np.where(reference.found & self.faces, reference.inner, np.nan)
        completion = {"completion_opening_correlation": math.nan,
                      "completion_articulation": math.nan}
        if landmarks is not None:
            predicted = np.where(self.faces, inner_lip_opening(landmarks[:frames]), np.nan)
            completion = {
                "completion_opening_correlation": metrics.opening_correlation(predicted,
                                                                              real_opening),
                "completion_articulation": metrics.articulation(predicted, real_opening)}

        def mean(name: str) -> float:
            values = self.scores[name]
            return float(np.mean(values)) if values else math.nan

        def change(variant: _Variant) -> float:
            return variant.change / variant.changes if variant.changes else math.nan

        results = {
            "opening_correlation": metrics.opening_correlation(opening, real_opening),
            "articulation": metrics.articulation(opening, real_opening),
            **completion,
            "lmd_lips": mean("lmd_lips"), "lmd_jaw": mean("lmd_jaw"),
            "psnr": mean("psnr"), "ssim": mean("ssim"), "lmd": mean("lmd"),
            "sync_offset": float(offset), "sync_confidence": confidence,
            "sync_expert": expert_scores.accuracy if expert_scores else math.nan,
            "sync_expert_cosine": expert_scores.in_sync if expert_scores else math.nan,
            "stability": change(self) / max(change(reference), 1e-6),
            "sharpness": mean("sharpness"), "psnr_native": mean("psnr_native"),
            "ssim_native": mean("ssim_native"),
        }
        if original_ids is not None:
            results["identity"] = identity_distance(np.stack(self.ids), original_ids)
        return results, opening


def runs_of(usable: np.ndarray, length: int) -> Iterator[slice]:
    """The runs of consecutive True frames of ``usable`` (F,) at least ``length`` long."""
    for start, stop in zip(*true_runs(usable), strict=True):
        if stop - start >= length:
            yield slice(int(start), int(stop))


def expert_sync(expert: SyncExpert, content: np.ndarray, usable: np.ndarray,
                speech: np.ndarray) -> SyncScores:
    """The sync expert's scores of the windows of every run of ``usable`` frames long enough
    for a window and all its shifts (``SyncExpertConfig.span``), pooled: content (F, 57, 2)
    lip/jaw points, speech (F', C) per-frame states (F' >= F). No windows (NaN accuracy) when
    no run is that long: a short run is not scored, rather than scored as chance."""
    return SyncScores.join([expert.score(content[run], speech[run])
                            for run in runs_of(usable, expert.config.span)], expert.config)


def strip_picks(frames: int, scored: np.ndarray | None = None, count: int = 4) -> np.ndarray:
    """``count`` evenly spaced frames (of the scored ones, when there are any)."""
    chosen = np.nonzero(scored)[0] if scored is not None and scored.any() else np.arange(frames)
    return chosen[np.linspace(0, len(chosen) - 1, count).round().astype(int)]


def strip_boxes(track: FaceTrack, picks: np.ndarray) -> tuple[list[CropBox], int]:
    """The tiles of a strip: a square around each pick's lip/jaw points at the video's own
    resolution, the same size in every tile."""
    content = track.points[picks][:, CONTENT_SLICE]
    side = int(np.ceil(1.2 * (content.max(axis=1) - content.min(axis=1)).max()))
    side = max(side, 32)
    boxes = []
    for points in content:
        cx, cy = (points.min(axis=0) + points.max(axis=0)) / 2
        boxes.append(CropBox.from_centre(cx, cy, side))
    return boxes, side


def strip_of_tiles(tiles: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Rows original | model | static of their tiles, each row labelled."""
    rows = []
    for name in ("original", "model", "static"):
        row = np.concatenate(tiles[name], axis=1)
        cv2.putText(row, name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1,
                    cv2.LINE_AA)
        rows.append(row)
    return np.concatenate(rows, axis=0)


def strip_image(variants: dict[str, np.ndarray], track: FaceTrack, count: int = 4,
                scored: np.ndarray | None = None) -> np.ndarray:
    """Rows original | model | static of ``count`` evenly spaced (scored) frames: the mouth
    and jaw at the video's own resolution, not scaled (a square around the lip/jaw points,
    the same size in every tile)."""
    picks = strip_picks(len(next(iter(variants.values()))), scored, count)
    boxes, side = strip_boxes(track, picks)
    return strip_of_tiles({name: [box.crop(variants[name][i], side)
                                  for i, box in zip(picks, boxes, strict=True)]
                           for name in ("original", "model", "static")})


def evaluate_clip(clip: str | Path, dubbed: str | Path, track: FaceTrack,
                  reference_frame: int, landmarks: np.ndarray | None = None,
                  identity: IdentityModel | None = None, speech: str | Path | None = None,
                  reference_gap: float = 0.0,
                  pause_seconds: float = CompleteSettings().pause_seconds,
                  sync_expert: SyncExpert | None = None) -> ClipEvaluation:
    """Measure a clip's dub (made from the clip's own ``speech``, default the clip's, with
    loop 'cut') and the two reference variants over the dub's frames. ``track`` is the
    clip's face track, ``reference_frame`` the dub's, ``landmarks`` the dub's target
    landmarks (for the completion_* metrics). Frames within ``reference_gap`` seconds of the
    reference frame are not scored (see ``scored_frames``). ``pause_seconds``: the silences
    marked as pauses in the series (the dubbing model's ``inference.complete``).
    ``sync_expert``: scores each variant's lip/jaw motion against the speech encoder's states
    of the speech (``expert_sync``; without it sync_expert* are NaN).

    The frames are read a frame at a time, twice: the clip beside the dub (the static mouth
    written to an H.264 file as it goes, to be encoded like the dub), then the clip beside
    the static mouth decoded. What is kept per frame is a few numbers and the original's
    points, so that memory does not grow with the frames' size times their number."""
    info = probe_video(clip)
    dub_info = probe_video(dubbed)
    frames = min(info.frame_count, dub_info.frame_count)
    if (dub_info.height, dub_info.width) != (info.height, info.width):
        raise ValueError(f"{dubbed}: frames of {(dub_info.height, dub_info.width, 3)} differ "
                         f"from the clip's {(info.height, info.width, 3)}")
    reference_image = next(iter(read_frames(info, select=[reference_frame]))).copy()
    fps = float(info.fps)
    scored = scored_frames(frames, reference_frame, gap_frames(reference_gap, fps))
    faces = track.detected[:frames] & scored
    boxes = mouth_boxes(track, frames, info.width, info.height)
    face_frames = np.nonzero(faces)[0]
    id_picks: set[int] = set()
    if identity is not None and len(face_frames):
        id_picks = set(face_frames[np.linspace(0, len(face_frames) - 1, min(
            IDENTITY_FRAMES, len(face_frames))).astype(int)].tolist())
    picks = strip_picks(frames, scored)
    tile_boxes, side = strip_boxes(track, picks)
    tiles = dict(zip(picks.tolist(), tile_boxes, strict=True))
    variants = {name: _Variant(frames, track, faces, boxes, keep_points=name == "original")
                for name in ("original", "model", "static")}
    original = variants["original"]
    scratch = Path(dubbed).parent / f".static.{Path(dubbed).stem}.mp4"
    make_static = StaticMouth(track, reference_frame, reference_image)
    try:
        with (VideoWriter(scratch, info.width, info.height, info.fps) as writer,
              FaceMeshDetector() as on_original, FaceMeshDetector() as on_dub):
            for i, (real, dub) in enumerate(zip(read_frames(info, frames),
                                                read_frames(dub_info, frames), strict=True)):
                writer.write(make_static(real, i))
                original.add(i, real, on_original, real, None, identity, id_picks, tiles, side)
                variants["model"].add(i, dub, on_dub, real, original, identity, id_picks,
                                      tiles, side)
        static_info = probe_video(scratch)
        with FaceMeshDetector() as on_static:
            for i, (real, static) in enumerate(zip(read_frames(info, frames),
                                                   read_frames(static_info, frames),
                                                   strict=True)):
                # (cut to the clip's size: the encoder pads odd sides)
                variants["static"].add(i, static[:info.height, :info.width], on_static, real,
                                       original, identity, id_picks, tiles, side)
    finally:
        scratch.unlink(missing_ok=True)
    # The speech from a file, read by blocks (ten minutes are 38 MB as float32).
    sound = Path(dubbed).parent / f".speech.{Path(dubbed).stem}.f32"
    try:
        samples = decode_speech(speech if speech is not None else clip, sound)
        envelope = metrics.speech_envelope(samples, fps, frames)
        mel = mel_spectrogram(samples)
        heard = (frame_speech(encode_speech(samples), frames, fps, sync_expert.config)
                 if sync_expert is not None else None)
    finally:
        sound.unlink(missing_ok=True)
    original_ids = np.stack(original.ids) if original.ids else None
    results, series = {}, {}
    for name in VARIANTS:
        results[name], series[name] = variants[name].results(
            original, envelope, fps, landmarks if name == "model" else None, original_ids,
            sync_expert, heard)
    series["energy"] = mel.mean(axis=0)
    series["paused"] = pauses(voice_activity(mel, info.fps, frames), info.fps, pause_seconds)
    # (a frame may be picked more than once: fewer scored frames than tiles)
    strip = strip_of_tiles({name: [variants[name].tiles[i] for i in picks.tolist()]
                            for name in VARIANTS})
    return ClipEvaluation(Path(clip).name, frames, reference_frame, fps, results, strip,
                          series, int(scored.sum()))


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
