"""The 131 MediaPipe FaceMesh points the method works on, in their one fixed order.

Order: 74 pose points (8 cheek points of the face oval, 20 brow, 14 nose, 32 eye points), then
57 content points (17 jaw points of the oval, 40 lip points: 20 outer then 20 inner). Pose points
describe where the face is and how it is turned; content points are what speech moves.
"""

from __future__ import annotations

import numpy as np

FACE_OVAL = (162, 127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379,
             365, 397, 288, 361, 323, 454, 356, 389)
CHEEKS = (162, 127, 234, 93, 389, 356, 454, 323)
JAW = tuple(i for i in FACE_OVAL if i not in CHEEKS)
BROWS = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46,
         336, 296, 334, 293, 300, 276, 283, 282, 295, 285)
NOSE = (168, 6, 197, 195, 5, 48, 115, 220, 45, 4, 275, 440, 344, 278)
EYES = (33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7,
        362, 398, 384, 385, 386, 387, 388, 466, 263, 249, 390, 373, 374, 380, 381, 382)
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181,
              91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178,
              88, 95)

POSE = CHEEKS + BROWS + NOSE + EYES
CONTENT = JAW + LIPS_OUTER + LIPS_INNER
ORDER = POSE + CONTENT
"""MediaPipe index of each of the 131 points, pose first."""

NUM_POINTS = len(ORDER)
NUM_POSE = len(POSE)
NUM_CONTENT = len(CONTENT)
POSE_SLICE = slice(0, NUM_POSE)
CONTENT_SLICE = slice(NUM_POSE, NUM_POINTS)
LIPS_SLICE = slice(NUM_POSE + len(JAW), NUM_POINTS)
JAW_SLICE = slice(NUM_POSE, NUM_POSE + len(JAW))

# Left/right twins in the FaceMesh topology (points on the mid-line are their own twin).
_MIRROR_PAIRS = (
    # face oval
    (162, 389), (127, 356), (234, 454), (93, 323), (132, 361), (58, 288), (172, 397),
    (136, 365), (150, 379), (149, 378), (176, 400), (148, 377),
    # brows
    (70, 300), (63, 293), (105, 334), (66, 296), (107, 336), (55, 285), (65, 295), (52, 282),
    (53, 283), (46, 276),
    # nose
    (48, 278), (115, 344), (220, 440), (45, 275),
    # eyes
    (33, 263), (246, 466), (161, 388), (160, 387), (159, 386), (158, 385), (157, 384),
    (173, 398), (133, 362), (155, 382), (154, 381), (153, 380), (145, 374), (144, 373),
    (163, 390), (7, 249),
    # lips
    (61, 291), (185, 409), (40, 270), (39, 269), (37, 267), (146, 375), (91, 321), (181, 405),
    (84, 314), (78, 308), (191, 415), (80, 310), (81, 311), (82, 312), (95, 324), (88, 318),
    (178, 402), (87, 317),
)


def _mirror_map() -> np.ndarray:
    twin = {}
    for a, b in _MIRROR_PAIRS:
        twin[a], twin[b] = b, a
    position = {mp_index: k for k, mp_index in enumerate(ORDER)}
    return np.array([position[twin.get(i, i)] for i in ORDER], dtype=np.int64)


MIRROR = _mirror_map()
"""MIRROR[k] is the position of point k's left/right twin among the 131 (an involution)."""


def select_points(mesh: np.ndarray) -> np.ndarray:
    """The 131 ordered points from a full FaceMesh result: (..., 478, C) -> (..., 131, C)."""
    return mesh[..., ORDER, :]


def mirror_points(points: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Landmarks of the horizontally flipped image: x -> width - x, twins swapped.

    ``points`` has shape (..., 131, 2+), x first; ``width`` is 1 for normalised coordinates.
    """
    flipped = points[..., MIRROR, :].copy()
    flipped[..., 0] = width - flipped[..., 0]
    return flipped


# Upper/lower lip twins across the mouth, as positions among the 57 content points: their
# gaps are how far the mouth opens (inner lips first, then outer).
LIP_GAP_PAIRS = tuple((CONTENT.index(a), CONTENT.index(b)) for a, b in (
    (13, 14), (82, 87), (312, 317), (81, 178), (311, 402), (80, 88), (310, 318),
    (0, 17), (37, 84), (267, 314)))

INNER_LIP_PAIRS = LIP_GAP_PAIRS[:7]


def lips_apart(content: np.ndarray) -> np.ndarray:
    """(..., 57, 2) lip/jaw points with no inner lower-lip point above its upper twin: where
    a prediction pushed the lips through each other, both meet at their middle height (a
    closed mouth, not one inside out; y grows downwards). A copy."""
    out = np.array(content, dtype=np.float32, copy=True)
    upper, lower = (list(side) for side in zip(*INNER_LIP_PAIRS, strict=True))
    overlap = np.maximum(out[..., upper, 1] - out[..., lower, 1], 0.0) / 2
    out[..., upper, 1] -= overlap
    out[..., lower, 1] += overlap
    return out


_EYE_CORNERS = (ORDER.index(33), ORDER.index(263))
_INNER_GAP = (ORDER.index(13), ORDER.index(14))
_LIP_GAPS = ((ORDER.index(13), ORDER.index(14)), (ORDER.index(0), ORDER.index(17)))


def interocular(points: np.ndarray) -> np.ndarray:
    """(..., 131, 2) -> (...) distance between the outer eye corners."""
    left, right = _EYE_CORNERS
    return np.linalg.norm(points[..., left, :] - points[..., right, :], axis=-1)


def mouth_opening(points: np.ndarray) -> np.ndarray:
    """(..., 131, 2) -> (...) mean of the inner (13-14) and outer (0-17) lip gaps over the
    eye distance."""
    gaps = [np.linalg.norm(points[..., b, :] - points[..., t, :], axis=-1) for t, b in _LIP_GAPS]
    return np.mean(gaps, axis=0) / interocular(points)


def inner_lip_opening(points: np.ndarray) -> np.ndarray:
    """(..., 131, 2) -> (...) inner-lip gap (13-14) over the eye distance (33-263)."""
    top, bottom = _INNER_GAP
    gap = np.linalg.norm(points[..., bottom, :] - points[..., top, :], axis=-1)
    return gap / interocular(points)
