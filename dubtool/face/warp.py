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
    """The thin-plate kernel r^2 log r^2 (0 at r = 0: 0 times a finite log)."""
    return r2 * np.log(np.maximum(r2, 1e-30))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) squared distances between the rows of a (n, 2) and b (m, 2), by one product
    (a tenth of the time of broadcasting the differences)."""
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def thin_plate_map(from_points: np.ndarray, to_points: np.ndarray, size: int,
                   smoothing: float = 1e-4, grid: int = 32,
                   source_size: int | None = None, from_row: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Backward map for ``cv2.remap``: for every pixel of the warped (size, size) image, from
    row ``from_row`` down, where to read in the (source_size, source_size) source image
    (default: the same size) so that ``from_points`` land on ``to_points``.

    Points are crop-normalised (n, 2) in [0, 1]; ``smoothing`` keeps the spline solvable when
    target points coincide (a closed mouth's inner lips). The spline is smooth, so it is
    evaluated on a ``grid`` x ``grid`` lattice and resized (a tenth of the time at 128 px).
    Returns (map_x, map_y) float32, (size - from_row, size) each.
    """
    target = np.concatenate([to_points.astype(np.float64), _ANCHORS])
    source = np.concatenate([from_points.astype(np.float64), _ANCHORS])
    n = len(target)
    affine = np.concatenate([np.ones((n, 1)), target], axis=1)
    system = np.zeros((n + 3, n + 3))
    system[:n, :n] = _radial(_squared_distances(target, target)) + smoothing * np.eye(n)
    system[:n, n:] = affine
    system[n:, :n] = affine.T
    rhs = np.zeros((n + 3, 2))
    rhs[:n] = source
    weights = np.linalg.solve(system, rhs)
    cells = min(grid, size)
    spread = _interpolation(cells, size).astype(np.float32)  # float32: 1e-4 px at 512 px
    # Only the lattice rows that rows from ``from_row`` down are interpolated from (the
    # others have weight 0 there): the lower face, about half the lattice.
    first = int(np.argmax(spread[from_row] > 0))
    # The lattice spans the first to the last pixel centre, so that linear interpolation
    # from it reaches the crop's edges exactly.
    axis = np.linspace(0.5 / size, 1 - 0.5 / size, cells)
    lattice = np.stack(np.meshgrid(axis, axis[first:]), axis=-1).reshape(-1, 2)
    kernel = _radial(_squared_distances(lattice, target))
    mapped = kernel @ weights[:n] + np.concatenate([np.ones((len(lattice), 1)), lattice], 1) \
        @ weights[n:]
    mapped = (mapped.reshape(cells - first, cells, 2) * (source_size or size) - 0.5
              ).astype(np.float32)
    map_x, map_y = (spread[from_row:, first:] @ mapped[..., c] @ spread.T for c in (0, 1))
    return map_x, map_y


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


def warp_face(face_crop: np.ndarray, from_points: np.ndarray, to_points: np.ndarray,
              size: int | None = None, interpolation: int = cv2.INTER_LINEAR,
              from_row: int = 0) -> np.ndarray:
    """``face_crop`` (S, S, C) bent so that its landmarks ``from_points`` move to ``to_points``
    (both (131, 2) crop-normalised), resampled to (size, size, C) (default S x S), of which
    the rows from ``from_row`` down are made and returned.

    Bilinear resampling softens every pixel it moves by a fraction of a pixel; at the video's
    own resolution use ``cv2.INTER_CUBIC`` (measured: a smooth sub-pixel shift of a 512 px face
    keeps 0.59 of its sharpness bilinear, 0.89 bicubic)."""
    map_x, map_y = thin_plate_map(from_points, to_points, size or face_crop.shape[0],
                                  source_size=face_crop.shape[0], from_row=from_row)
    return cv2.remap(face_crop, map_x, map_y, interpolation, borderMode=cv2.BORDER_REPLICATE)
