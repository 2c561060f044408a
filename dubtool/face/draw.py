"""Drawing landmarks and crop boxes on frames, for debugging videos and strips."""

from __future__ import annotations

import cv2
import numpy as np

from dubtool.face.crop import CropBox
from dubtool.face.indices import CONTENT_SLICE, POSE_SLICE

POSE_COLOUR = (0, 220, 255)      # RGB: cyan
CONTENT_COLOUR = (255, 40, 160)  # RGB: magenta
BOX_COLOUR = (60, 230, 60)
MISSING_COLOUR = (255, 60, 60)


def draw_face(frame: np.ndarray, points: np.ndarray | None, box: CropBox | None,
              label: str | None = None) -> np.ndarray:
    """A copy of an RGB frame with the 131 points (pose and lip/jaw in two colours) and the
    crop box drawn; ``points`` (131, 2) px, None for a frame without face."""
    out = np.ascontiguousarray(frame.copy())
    scale = max(out.shape[:2]) / 512
    radius = max(1, round(2 * scale))
    thickness = max(1, round(scale))
    if box is not None:
        cv2.rectangle(out, (box.x0, box.y0), (box.x0 + box.size, box.y0 + box.size),
                      BOX_COLOUR, thickness)
    if points is not None:
        for part, colour in ((POSE_SLICE, POSE_COLOUR), (CONTENT_SLICE, CONTENT_COLOUR)):
            for x, y in np.rint(points[part]).astype(int):
                cv2.circle(out, (int(x), int(y)), radius, colour, -1, cv2.LINE_AA)
    if label:
        colour = MISSING_COLOUR if points is None else (255, 255, 255)
        cv2.putText(out, label, (8, int(24 * scale) + 8), cv2.FONT_HERSHEY_SIMPLEX,
                    0.6 * scale, colour, thickness, cv2.LINE_AA)
    return out
