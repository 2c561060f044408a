"""The frame plan: which source frame each output frame is made from.

The output lasts as long as the speech. A longer video is cut; a shorter one is played back and
forth (``pingpong``, no jump at the seam), from the start again (``loop``), or the speech is cut
to the video (``cut``). A still image is a one-frame video repeated.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from dubtool.options import LOOP_MODES


def output_frame_count(speech_seconds: float, fps: Fraction | float, source_frames: int,
                       mode: str = "pingpong") -> int:
    """Frames in the output: the speech's length at the video's rate (at least one)."""
    if mode not in LOOP_MODES:
        raise ValueError(f"unknown loop mode {mode!r}; choose one of {', '.join(LOOP_MODES)}")
    wanted = max(1, math.ceil(speech_seconds * float(fps) - 1e-6))
    if mode == "cut" and source_frames > 1:
        return min(wanted, source_frames)
    return wanted


def frame_plan(source_frames: int, output_frames: int, mode: str = "pingpong") -> np.ndarray:
    """Source frame index of every output frame, shape (output_frames,), int64."""
    if source_frames < 1 or output_frames < 0:
        raise ValueError("a plan needs at least one source frame")
    if mode not in LOOP_MODES:
        raise ValueError(f"unknown loop mode {mode!r}; choose one of {', '.join(LOOP_MODES)}")
    i = np.arange(output_frames, dtype=np.int64)
    if source_frames == 1:
        return np.zeros(output_frames, np.int64)
    if mode == "loop":
        return i % source_frames
    if mode == "cut":
        return np.minimum(i, source_frames - 1)
    period = 2 * (source_frames - 1)  # 0 1 .. n-1 n-2 .. 1 | 0 1 ..
    phase = i % period
    return np.where(phase < source_frames, phase, period - phase)


def gap_frames(seconds: float | None, fps: Fraction | float) -> int:
    """The reconstruction protocol's gap (``seconds``, None or 0: none) in frames at ``fps``:
    at least 1 when there is a gap at all."""
    return max(1, round(seconds * float(fps))) if seconds else 0


def far_from_plan(frames: int, plan: np.ndarray, exclude_frames: int) -> np.ndarray:
    """(frames,) bool: the source frames at least ``exclude_frames`` from every frame of the
    ``plan`` (all of them when ``exclude_frames`` is 0): what the reconstruction protocol lets
    the dub learn or take a reference from."""
    if exclude_frames <= 0 or len(plan) == 0:
        return np.ones(frames, bool)
    used = np.unique(plan)  # sorted
    index = np.arange(frames)
    after = np.clip(np.searchsorted(used, index), 0, len(used) - 1)
    before = np.clip(after - 1, 0, len(used) - 1)
    nearest = np.minimum(np.abs(index - used[before]), np.abs(index - used[after]))
    return nearest >= exclude_frames
