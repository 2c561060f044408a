"""Stage ``landmarks``: a face track over every source frame of the video.

Per frame: the detector's raw points, the 131 ordered points (smoothed in time), a detection
flag and a square crop box that is stable over time. Frames without a face are flagged and
their points and box are interpolated from the neighbouring frames, never fatal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from dubtool.arrays import DiskArray, gaussian_in_time, gaussian_reach
from dubtool.face.choose import FacePicker
from dubtool.face.crop import CropBox, box_arrays, face_box
from dubtool.face.detect import Detector
from dubtool.face.indices import CONTENT_SLICE, NUM_POINTS, POSE_SLICE, select_points
from dubtool.media.frames import read_frames
from dubtool.media.probe import VideoInfo
from dubtool.options import FaceChoice

# Smoothing widths (Gaussian sigma) in seconds: the crop box moves slowly so that the face does
# not shake inside the crop; pose points a little; lips and jaw barely: speech moves them fast.
BOX_CENTRE_SIGMA_S = 0.08
BOX_SIZE_SIGMA_S = 0.4
POSE_SIGMA_S = 0.04
CONTENT_SIGMA_S = 0.02

MESH_FILE, POINTS_FILE = "mesh.npy", "points.npy"
MESH_BLOCK = 256  # frames of raw mesh held in memory before they are written out
SMOOTH_CHUNK = 4096  # frames smoothed at once
FRAME_CHUNK = 4096   # frames read at once by map_points

Progress = Callable[[int, int], None]
# Per-frame points (F, 131, 2): an array, or anything that reads frames by index (a DiskArray).
PointSource = np.ndarray | DiskArray


@dataclass
class FaceTrack:
    """A face over F frames.

    mesh      (F, 478, 3) float32  raw detector points in pixels, NaN where no face was found
    detected  (F,) bool            whether the detector found the face in the frame
    points    (F, 131, 2) float32  the ordered points in pixels, smoothed, gaps interpolated
    boxes     (F, 3) int32         crop box per frame: x0, y0, size (pixels)
    faces_seen                     the most faces found in one frame (the track follows one)
    face                           how that one was chosen (``--face``)

    ``mesh`` and ``points`` are arrays, or DiskArrays (a loaded track: reading a frame reads
    that frame alone, so a dub's memory does not grow with the video's length); measures over
    the whole track go through ``map_points``.
    """

    detector: str
    mesh: PointSource
    detected: np.ndarray
    points: PointSource
    boxes: np.ndarray
    ms_per_frame: float
    faces_seen: int = 1
    face: FaceChoice = "largest"

    @property
    def frames(self) -> int:
        return len(self.detected)

    @property
    def faces_found(self) -> int:
        return int(self.detected.sum())

    def box(self, frame: int) -> CropBox:
        x0, y0, size = (int(v) for v in self.boxes[frame])
        return CropBox(x0, y0, size)

    def crop_points(self, frames: int | slice | np.ndarray = slice(None)) -> np.ndarray:
        """The 131 points of ``frames`` (default all: (F, 131, 2); one frame: (131, 2))
        normalised to each frame's own crop box, [0, 1] inside."""
        boxes = self.boxes[frames]
        offset = boxes[..., None, :2].astype(np.float32)
        size = np.maximum(boxes[..., None, 2:3], 1).astype(np.float32)  # no face: size 0
        return (self.points[frames] - offset) / size

    @property
    def cropped(self) -> CropPoints:
        """``crop_points`` as an array-like: ``track.cropped[index]`` reads those frames."""
        return CropPoints(self)

    def save(self, folder: Path) -> None:
        for array, name in ((self.mesh, MESH_FILE), (self.points, POINTS_FILE)):
            if not (isinstance(array, DiskArray) and array.path == folder / name):
                np.save(folder / name, array[:])
        np.savez(folder / "track.npz", detected=self.detected, boxes=self.boxes)
        (folder / "track.json").write_text(json.dumps(
            {"detector": self.detector, "ms_per_frame": self.ms_per_frame,
             "faces_seen": self.faces_seen, "face": self.face}))

    @classmethod
    def load(cls, folder: Path) -> FaceTrack:
        meta = json.loads((folder / "track.json").read_text())
        with np.load(folder / "track.npz", allow_pickle=False) as data:
            return cls(meta["detector"], DiskArray.open(folder / MESH_FILE), data["detected"],
                       DiskArray.open(folder / POINTS_FILE), data["boxes"],
                       meta["ms_per_frame"], meta["faces_seen"], meta["face"])


def map_points(points: PointSource | CropPoints, measure: Callable[[np.ndarray], np.ndarray],
               frames: np.ndarray) -> np.ndarray:
    """``measure`` ((n, 131, 2) points -> (n, ...)) over the ``frames`` (int array) of
    ``points`` (any array-like), read FRAME_CHUNK frames at a time."""
    parts = [measure(points[frames[i:i + FRAME_CHUNK]])
             for i in range(0, len(frames), FRAME_CHUNK)]
    return np.concatenate(parts) if parts else measure(points[frames])


class CropPoints:
    """A track's points normalised to its crop boxes, read by parts: ``view[index]`` is
    ``track.crop_points(index)`` (for what indexes an (F, 131, 2) array)."""

    def __init__(self, track: FaceTrack) -> None:
        self.track = track

    def __len__(self) -> int:
        return self.track.frames

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        return self.track.crop_points(index)


def _fill_gaps(series: np.ndarray, valid: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Linear interpolation over the rows where ``valid`` is False, from the valid rows at
    ``times`` (increasing frame numbers, one per row); ends hold the nearest value."""
    if valid.all():
        return series.copy()
    known = times[valid]
    flat = series.reshape(len(series), -1)
    filled = np.empty_like(flat)
    for c in range(flat.shape[1]):
        filled[:, c] = np.interp(times, known, flat[valid, c])
    return filled.reshape(series.shape)


def _smooth(series: np.ndarray, sigma_frames: float) -> np.ndarray:
    if sigma_frames < 0.3 or len(series) < 2:
        return series
    return gaussian_in_time(series, sigma_frames)


def _filled_points(points: PointSource, detected: np.ndarray, known: np.ndarray, lo: int,
                   hi: int) -> np.ndarray:
    """(hi - lo, 131, 2) float32: frames lo..hi of ``points`` with the frames without a face
    interpolated from the nearest frames with one (which may lie outside lo..hi)."""
    inside = known[(known >= lo) & (known < hi)]
    before, after = known[known < lo][-1:], known[known >= hi][:1]
    if len(inside) == hi - lo:
        return np.asarray(points[lo:hi], np.float32)
    times = np.concatenate([before, np.arange(lo, hi), after])
    valid = np.concatenate([np.ones(len(before), bool), detected[lo:hi],
                            np.ones(len(after), bool)])
    series = np.zeros((len(times), NUM_POINTS, 2), np.float32)
    series[valid] = points[times[valid]]
    return _fill_gaps(series, valid, times)[len(before):len(before) + hi - lo]


def smooth_track(points: PointSource, detected: np.ndarray, fps: Fraction | float,
                 out: np.ndarray | DiskArray | None = None) -> tuple[np.ndarray | DiskArray,
                                                                      np.ndarray]:
    """Smooth raw 131-point tracks and derive stable crop boxes.

    points (F, 131, 2) px (an array, or anything that reads its frames by index) with anything
    where ``detected`` is False -> (points (F, 131, 2) float32, written into ``out`` when given,
    boxes (F, 3) int32). With no face in any frame, both are all zeros. Works SMOOTH_CHUNK
    frames at a time, each read with the neighbours its smoothing reaches, so that besides
    the output it holds a few bytes a frame whatever the track's length.
    """
    frames = len(detected)
    if out is None:
        out = np.empty((frames, NUM_POINTS, 2), np.float32)
    if not detected.any():
        for start in range(0, frames, SMOOTH_CHUNK):
            out[start:start + SMOOTH_CHUNK] = 0.0
        return out, np.zeros((frames, 3), np.int32)
    fps = float(fps)
    known = np.nonzero(detected)[0]
    pose_sigma, content_sigma = POSE_SIGMA_S * fps, CONTENT_SIGMA_S * fps
    halo = gaussian_reach(max(pose_sigma, content_sigma)) + 1
    raw_boxes = np.empty((frames, 3), np.float64)
    for start in range(0, frames, SMOOTH_CHUNK):
        stop = min(start + SMOOTH_CHUNK, frames)
        lo, hi = max(0, start - halo), min(frames, stop + halo)
        # float32 throughout (a ten-thousandth of a pixel).
        part = _filled_points(points, detected, known, lo, hi)
        raw_boxes[start:stop] = [face_box(p) for p in part[start - lo:stop - lo]]
        part[:, POSE_SLICE] = _smooth(part[:, POSE_SLICE], pose_sigma)
        part[:, CONTENT_SLICE] = _smooth(part[:, CONTENT_SLICE], content_sigma)
        out[start:stop] = part[start - lo:stop - lo]
    centre = _smooth(raw_boxes[:, :2], BOX_CENTRE_SIGMA_S * fps)
    size = _smooth(raw_boxes[:, 2], BOX_SIZE_SIGMA_S * fps)
    return out, box_arrays(centre, size)


class _MeshPoints:
    """The 131 ordered points (x, y) of a raw mesh (F, 478, 3), read a part at a time."""

    def __init__(self, mesh: np.ndarray | DiskArray) -> None:
        self.mesh = mesh

    def __len__(self) -> int:
        return len(self.mesh)

    def __getitem__(self, index: object) -> np.ndarray:
        return select_points(self.mesh[index])[..., :2]


def track_faces(video: VideoInfo, detector: Detector, face: FaceChoice = "largest",
                progress: Progress | None = None, frames: int | None = None,
                folder: Path | None = None) -> FaceTrack:
    """Detect the faces in the first ``frames`` frames of ``video`` (default: all; streamed,
    one at a time) and follow the one that ``face`` picks. With ``folder`` the raw mesh (5.7
    KB a frame, MESH_BLOCK frames at a time) and the smoothed points (1 KB a frame) go to its
    MESH_FILE and POINTS_FILE instead of memory, so that memory does not grow with the
    video's length (but for a few bytes a frame: the detection flags and crop boxes)."""
    total = video.frame_count if frames is None else min(frames, video.frame_count)
    mesh = (np.empty((total, 478, 3), np.float32) if folder is None
            else DiskArray.create(folder / MESH_FILE, (total, 478, 3), np.float32))
    block = np.full((MESH_BLOCK, 478, 3), np.nan, np.float32)
    detected = np.zeros(total, bool)
    picker = FacePicker(face, video.width, video.height)
    spent, faces_seen = 0.0, 0
    with detector:
        for i, frame in enumerate(read_frames(video, total)):
            start = time.perf_counter()
            faces = detector.detect_all(frame)
            found = picker.pick(faces)
            spent += time.perf_counter() - start
            faces_seen = max(faces_seen, len(faces))
            row = i % MESH_BLOCK
            if found is not None:
                block[row] = found
                detected[i] = True
            if row == MESH_BLOCK - 1 or i == total - 1:
                mesh[i - row:i + 1] = block[:row + 1]
                block.fill(np.nan)
            if progress is not None:
                progress(i + 1, total)
    out = (None if folder is None
           else DiskArray.create(folder / POINTS_FILE, (total, NUM_POINTS, 2), np.float32))
    points, boxes = smooth_track(_MeshPoints(mesh), detected, video.fps, out)
    return FaceTrack(detector.name, mesh, detected, points, boxes, 1000 * spent / max(total, 1),
                     faces_seen, face)
