"""Stage ``blend``: paste the generated lower faces into the original frames and mux the speech.

Each generated crop goes back through a soft mask of the lower face (the region between the
nose and the chin of both the original and the target landmarks, dilated and Gaussian-blurred,
so no box edge shows), after a colour correction that matches the generated skin around the
mask to the original's. Frames without a face are written untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np

from dubtool.arrays import DiskArray
from dubtool.face.indices import JAW, NOSE, ORDER
from dubtool.media.frames import VideoWriter, read_frames_in_order
from dubtool.media.probe import VideoInfo
from dubtool.pipeline.landmarks import FaceTrack

_LOWER_FACE = [ORDER.index(i) for i in (*JAW, *NOSE[5:])]  # jaw line and the nose base


def lower_face_mask(points: list[np.ndarray], size: int, dilate: float = 0.04,
                    blur: float = 0.03) -> np.ndarray:
    """Soft mask (size, size) float32 in [0, 1] of the lower face.

    ``points``: crop-normalised (131, 2) landmark sets whose lower faces the mask must cover
    (the original's and the target's, so that neither mouth shows through the other).
    """
    mask = np.zeros((size, size), np.uint8)
    for p in points:
        hull = cv2.convexHull(np.round(p[_LOWER_FACE] * size).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255)
    grow = max(1, round(dilate * size))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), max(blur * size, 0.5))
    # The model regenerates the lower half only: fade the mask out above the middle.
    ramp = np.clip((np.arange(size) - 0.42 * size) / (0.08 * size), 0.0, 1.0)
    return (soft * ramp[:, None]).astype(np.float32)


def match_colour(generated: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Shift the generated crop's colours so that the band around the mask's edge (skin both
    images should share) has the original's mean colour."""
    band = ((mask > 0.05) & (mask < 0.6)).astype(np.uint8)
    if cv2.countNonZero(band) < 16:
        return generated
    offset = np.subtract(cv2.mean(original, band)[:3], cv2.mean(generated, band)[:3])
    return cv2.add(generated, (*offset, 0.0))  # saturating, per channel


def blended_frames(video: VideoInfo, track: FaceTrack, plan: np.ndarray,
                   target: np.ndarray | DiskArray, crops: np.ndarray,
                   generated: Iterator[np.ndarray],
                   scratch: Path) -> Iterator[tuple[np.ndarray, bool]]:
    """(frame, dubbed) for every output frame; ``generated`` yields one crop per output frame,
    ``target`` (O, 131, 2) holds its landmarks (on disk: read a frame's at a time)."""
    original_points = track.crop_points()
    size = crops.shape[1]
    for o, (frame, new_crop) in enumerate(zip(read_frames_in_order(video, plan, scratch),
                                              generated, strict=False)):
        source = int(plan[o])
        if not track.detected[source]:
            yield frame, False
            continue
        mask = lower_face_mask([original_points[source], target[o]], size)
        corrected = match_colour(new_crop, crops[source], mask)
        yield track.box(source).paste(frame, corrected, mask), True


def write_video(frames: Iterator[tuple[np.ndarray, bool]], video: VideoInfo, total: int,
                output: Path, speech: Path, progress: Callable[[int, int], None] | None = None
                ) -> int:
    """Encode the ``total`` frames with the speech, cut to their duration (``--loop cut``:
    a video shorter than the speech); returns how many were dubbed (had a face)."""
    dubbed = 0
    with VideoWriter(output, video.width, video.height, video.fps, audio=speech,
                     audio_seconds=total / float(video.fps)) as writer:
        for i, (frame, was_dubbed) in enumerate(frames):
            writer.write(frame)
            dubbed += was_dubbed
            if progress is not None:
                progress(i + 1, total)
    return dubbed
