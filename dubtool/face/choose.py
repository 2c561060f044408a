"""Which face to dub when a frame holds several: ``--face largest|center|INDEX``.

The choice picks a face once; after that the picked face is followed from frame to frame (the
face nearest to where it was), so that someone walking through the shot does not take over
the dub. When the followed face is lost, the choice picks again.
"""

from __future__ import annotations

import numpy as np

from dubtool.face.indices import select_points
from dubtool.options import FaceChoice

FOLLOW_DISTANCE = 0.5  # a face is the same one if its centre moved less than this x its size


def _centre_and_size(mesh: np.ndarray) -> tuple[np.ndarray, float]:
    points = select_points(mesh)[:, :2]
    low, high = points.min(axis=0), points.max(axis=0)
    return (low + high) / 2, float(np.max(high - low))


class FacePicker:
    """Picks one face per frame from a detector's faces (each (478, 3) pixel points)."""

    def __init__(self, choice: FaceChoice, width: int, height: int) -> None:
        self.choice = choice
        self.frame_centre = np.array([width / 2, height / 2])
        self._last: tuple[np.ndarray, float] | None = None

    def pick(self, faces: list[np.ndarray]) -> np.ndarray | None:
        if not faces:
            return None
        shapes = [_centre_and_size(face) for face in faces]
        index = self._follow(shapes)
        if index is None:
            index = self._choose(shapes)
        if index is None:
            return None
        self._last = shapes[index]
        return faces[index]

    def _follow(self, shapes: list[tuple[np.ndarray, float]]) -> int | None:
        if self._last is None:
            return None
        centre, size = self._last
        moved = [float(np.linalg.norm(c - centre)) for c, _ in shapes]
        nearest = int(np.argmin(moved))
        return nearest if moved[nearest] < FOLLOW_DISTANCE * size else None

    def _choose(self, shapes: list[tuple[np.ndarray, float]]) -> int | None:
        if self.choice == "largest":
            return int(np.argmax([size for _, size in shapes]))
        if self.choice == "center":
            return int(np.argmin([np.linalg.norm(c - self.frame_centre) for c, _ in shapes]))
        left_to_right = np.argsort([c[0] for c, _ in shapes])
        return int(left_to_right[self.choice]) if self.choice < len(shapes) else None
