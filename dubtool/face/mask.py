"""The lower face a dub redraws: its soft mask (the region between the nose and the chin of
both the original and the target landmarks, dilated and Gaussian-blurred, so no box edge
shows) and the colour correction that matches the new skin around it to the original's. Every
renderer makes its lower faces with these; the blend pastes them."""

from __future__ import annotations

import cv2
import numpy as np

from dubtool.face.indices import JAW, NOSE, ORDER

_LOWER_FACE = [ORDER.index(i) for i in (*JAW, *NOSE[5:])]  # jaw line and the nose base
MASK_SIZE = 128
# Where the lower face begins, in fractions of the face crop's height: every such boundary is
# here. The paste mask is 0 above MASK_TOP; the diffusion model redraws the rows below
# DIFFUSED_TOP of its latent (and eval's lower-half scores read those rows); the detail the
# diffusion renderer's autoencoder loses is added back from DETAIL_FROM, ramping in over
# DETAIL_RAMP.
MASK_TOP = 0.42
DIFFUSED_TOP = 0.5
DETAIL_FROM = 0.4
DETAIL_RAMP = 0.1


def lower_face_mask(points: list[np.ndarray], size: int, dilate: float = 0.04,
                    blur: float = 0.03) -> np.ndarray:
    """Soft mask (size, size) float32 in [0, 1] of the lower face.

    ``points``: crop-normalised (131, 2) landmark sets whose lower faces the mask must cover
    (the original's and the target's, so that neither mouth shows through the other).
    """
    # The mask is smooth: made at most MASK_SIZE px wide and scaled up (a tenth of the time
    # at 512 px).
    work = min(size, MASK_SIZE)
    mask = np.zeros((work, work), np.uint8)
    for p in points:
        hull = cv2.convexHull(np.round(p[_LOWER_FACE] * work).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255)
    grow = max(1, round(dilate * work))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), max(blur * work, 0.5))
    # The model regenerates the lower half only: fade the mask out above the middle.
    ramp = np.clip((np.arange(work) - MASK_TOP * work) / (0.08 * work), 0.0, 1.0)
    soft = (soft * ramp[:, None]).astype(np.float32)
    return soft if work == size else cv2.resize(soft, (size, size),
                                                interpolation=cv2.INTER_LINEAR)


def match_colour(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift the generated crop's colours so that the band around the mask's edge (skin both
    images should share) has the original's mean colour."""
    band = ((mask > 0.05) & (mask < 0.6)).astype(np.uint8)
    if cv2.countNonZero(band) < 16:
        return generated
    offset = np.subtract(cv2.mean(original, band)[:3], cv2.mean(generated, band)[:3])
    return cv2.add(generated, (*offset, 0.0))  # saturating, per channel
