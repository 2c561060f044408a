"""Landmark-driven warp of a face crop: a thin-plate spline through the 131 points.

Used to start the diffusion from the reference face already moved to the target landmarks
(jaw, lips and head pose), so the denoiser refines a mouth in the right place instead of
having to move one from the reference's place.
"""

from __future__ import annotations

import cv2
import numpy as np

# The crop's corners and edge midpoints stay where they are: the spline then only bends
# the face, not the crop's frame.
_ANCHORS = np.array([[0, 0], [0.5, 0], [1, 0], [0, 0.5], [1, 0.5], [0, 1], [0.5, 1], [1, 1]],
                    np.float64)


def _radial(r2: np.ndarray) -> np.ndarray:
    """The thin-plate kernel r^2 log r^2 (0 at r = 0)."""
    return np.where(r2 > 0, r2 * np.log(np.maximum(r2, 1e-12)), 0.0)


def thin_plate_map(from_points: np.ndarray, to_points: np.ndarray, size: int,
                   smoothing: float = 1e-4, grid: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Backward map for ``cv2.remap``: for every pixel of the warped (size, size) image, where
    to read in the source image so that ``from_points`` land on ``to_points``.

    Points are crop-normalised (n, 2) in [0, 1]; ``smoothing`` keeps the spline solvable when
    target points coincide (a closed mouth's inner lips). The spline is smooth, so it is
    evaluated on a ``grid`` x ``grid`` lattice and resized (a tenth of the time at 128 px).
    Returns (map_x, map_y) float32.
    """
    target = np.concatenate([to_points.astype(np.float64), _ANCHORS])
    source = np.concatenate([from_points.astype(np.float64), _ANCHORS])
    n = len(target)
    affine = np.concatenate([np.ones((n, 1)), target], axis=1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _radial(((target[:, None] - target[None]) ** 2).sum(-1)) \
        + smoothing * np.eye(n)
    system[:n, n:] = affine
    system[n:, :n] = affine.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = source
    weights = np.linalg.solve(system, rhs)
    cells = min(grid, size)
    # The lattice spans the first to the last pixel centre, so that linear interpolation
    # from it reaches the crop's edges exactly.
    axis = np.linspace(0.5 / size, 1 - 0.5 / size, cells)
    lattice = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
    kernel = _radial(((lattice[:, None] - target[None]) ** 2).sum(-1))
    mapped = kernel @ weights[:n] + np.concatenate([np.ones((len(lattice), 1)), lattice], 1) \
        @ weights[n:]
    mapped = mapped.reshape(cells, cells, 2) * size - 0.5
    spread = _interpolation(cells, size)
    map_x, map_y = (spread @ mapped[..., c] @ spread.T for c in (0, 1))
    return map_x.astype(np.float32), map_y.astype(np.float32)


def _interpolation(cells: int, size: int) -> np.ndarray:
    """(size, cells) weights of linear interpolation from ``cells`` evenly spaced samples."""
    position = np.linspace(0, cells - 1, size)
    low = np.minimum(np.floor(position).astype(int), cells - 2) if cells > 1 else \
        np.zeros(size, int)
    frac = position - low
    weights = np.zeros((size, cells))
    weights[np.arange(size), low] = 1 - frac
    if cells > 1:
        weights[np.arange(size), low + 1] = frac
    return weights


def warp_face(face_crop: np.ndarray, from_points: np.ndarray,
              to_points: np.ndarray) -> np.ndarray:
    """``face_crop`` (S, S, 3) bent so that its landmarks ``from_points`` move to ``to_points``
    (both (131, 2) crop-normalised); the same shape and dtype."""
    map_x, map_y = thin_plate_map(from_points, to_points, face_crop.shape[0])
    return cv2.remap(face_crop, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
