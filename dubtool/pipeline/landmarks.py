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
from scipy.ndimage import gaussian_filter1d

from dubtool.arrays import DiskArray
from dubtool.face.choose import FacePicker
from dubtool.face.crop import CropBox, face_box
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

MESH_FILE = "mesh.npy"
MESH_BLOCK = 256  # frames of raw mesh held in memory before they are written out

Progress = Callable[[int, int], None]


@dataclass
class FaceTrack:
    """A face over F frames.

    mesh      (F, 478, 3) float32  raw detector points in pixels, NaN where no face was found
                                   (in memory, or on disk as a DiskArray or memory map)
    detected  (F,) bool            whether the detector found the face in the frame
    points    (F, 131, 2) float32  the ordered points in pixels, smoothed, gaps interpolated
    boxes     (F, 3) int32         crop box per frame: x0, y0, size (pixels)
    faces_seen                     the most faces found in one frame (the track follows one)
    face                           how that one was chosen (``--face``)
    """

    detector: str
    mesh: np.ndarray
    detected: np.ndarray
    points: np.ndarray
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

    def save(self, folder: Path) -> None:
        if not (isinstance(self.mesh, DiskArray) and self.mesh.path == folder / MESH_FILE):
            np.save(folder / MESH_FILE, self.mesh)
        np.savez(folder / "track.npz", detected=self.detected, points=self.points,
                 boxes=self.boxes)
        (folder / "track.json").write_text(json.dumps(
            {"detector": self.detector, "ms_per_frame": self.ms_per_frame,
             "faces_seen": self.faces_seen, "face": self.face}))

    @classmethod
    def load(cls, folder: Path) -> FaceTrack:
        meta = json.loads((folder / "track.json").read_text())
        with np.load(folder / "track.npz", allow_pickle=False) as data:
            # The raw mesh (5.7 KB a frame) is mapped, not read: what a dub keeps in memory
            # stays small however long the video.
            return cls(meta["detector"], np.load(folder / MESH_FILE, mmap_mode="r"),
                       data["detected"], data["points"], data["boxes"], meta["ms_per_frame"],
                       meta["faces_seen"], meta["face"])


def _fill_gaps(series: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames where ``valid`` is False; ends hold the nearest value."""
    if valid.all():
        return series.copy()
    t = np.arange(len(series))
    known = t[valid]
    flat = series.reshape(len(series), -1)
    filled = np.empty_like(flat)
    for c in range(flat.shape[1]):
        filled[:, c] = np.interp(t, known, flat[valid, c])
    return filled.reshape(series.shape)


def _smooth(series: np.ndarray, sigma_frames: float) -> np.ndarray:
    if sigma_frames < 0.3 or len(series) < 2:
        return series
    return gaussian_filter1d(series, sigma_frames, axis=0, mode="nearest")


def smooth_track(points: np.ndarray, detected: np.ndarray,
                 fps: Fraction | float) -> tuple[np.ndarray, np.ndarray]:
    """Smooth raw 131-point tracks and derive stable crop boxes.

    points (F, 131, 2) px with anything where ``detected`` is False -> (points (F, 131, 2)
    float32, boxes (F, 3) int32). With no face in any frame, both are all zeros.
    """
    frames = len(detected)
    if not detected.any():
        return (np.zeros((frames, NUM_POINTS, 2), np.float32), np.zeros((frames, 3), np.int32))
    fps = float(fps)
    # float32 throughout (a ten-thousandth of a pixel): with float64 copies the smoothing
    # peaked at 5.4 KB a frame (490 MB for an hour at 25 fps), now at 1.7 KB.
    smoothed = _fill_gaps(points.astype(np.float32, copy=False), detected)
    raw_boxes = np.stack([face_box(p) for p in smoothed])
    smoothed[:, POSE_SLICE] = _smooth(smoothed[:, POSE_SLICE], POSE_SIGMA_S * fps)
    smoothed[:, CONTENT_SLICE] = _smooth(smoothed[:, CONTENT_SLICE], CONTENT_SIGMA_S * fps)
    centre = _smooth(raw_boxes[:, :2], BOX_CENTRE_SIGMA_S * fps)
    size = _smooth(raw_boxes[:, 2], BOX_SIZE_SIGMA_S * fps)
    boxes = np.stack([CropBox.from_centre(cx, cy, s).as_array()
                      for (cx, cy), s in zip(centre, size, strict=True)])
    return smoothed, boxes.astype(np.int32)


def track_faces(video: VideoInfo, detector: Detector, face: FaceChoice = "largest",
                progress: Progress | None = None, frames: int | None = None,
                mesh_file: Path | None = None) -> FaceTrack:
    """Detect the faces in the first ``frames`` frames of ``video`` (default: all; streamed,
    one at a time) and follow the one that ``face`` picks. With ``mesh_file`` the raw mesh
    (5.7 KB a frame) goes to that .npy file MESH_BLOCK frames at a time instead of memory, so
    that memory grows only by the 131 points (1 KB a frame) with the video's length."""
    total = video.frame_count if frames is None else min(frames, video.frame_count)
    mesh = (np.empty((total, 478, 3), np.float32) if mesh_file is None
            else DiskArray.create(mesh_file, (total, 478, 3), np.float32))
    block = np.full((MESH_BLOCK, 478, 3), np.nan, np.float32)
    raw_points = np.empty((total, NUM_POINTS, 2), np.float32)
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
            raw_points[i] = select_points(block[row])[:, :2]
            if row == MESH_BLOCK - 1 or i == total - 1:
                mesh[i - row:i + 1] = block[:row + 1]
                block.fill(np.nan)
            if progress is not None:
                progress(i + 1, total)
    points, boxes = smooth_track(raw_points, detected, video.fps)
    return FaceTrack(detector.name, mesh, detected, points, boxes, 1000 * spent / max(total, 1),
                     faces_seen, face)
