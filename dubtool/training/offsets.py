"""Audio-video offsets of training clips, measured with a trained landmark completion.

A clip whose sound is shifted against its picture teaches late or smeared mouths. The
completion predicts each frame's lip opening from the sound; where a clip's real opening
matches that prediction best a few frames later (or earlier) than at lag 0, its sound is
shifted by that much. ``measure_offsets`` finds the lag of every clip; ``save_offsets``
writes the confident ones to the data set's OFFSETS_FILE, which the samplers then apply
(``PreparedData``): the sound of frame f is taken from frame f - offset. A confident lag
beyond MAX_SHIFT frames is more likely a clip the model cannot follow (or speech with a
rhythm that matches itself shifted by a syllable) than a real offset: such clips are dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dubtool.evaluation.metrics import opening_correlation
from dubtool.nets.completions import CompletionNet
from dubtool.pipeline.clips import OFFSETS_FILE, Clip
from dubtool.training.dubber import clip_openings

MAX_LAG = 8
MAX_SHIFT = 4
# A lag is applied only when it beats lag 0 by this much correlation, on a clip with a
# prediction this good at its best lag: short or badly predicted clips keep their sound.
MIN_GAIN = 0.1
MIN_CORRELATION = 0.4


@dataclass
class ClipOffset:
    clip: str
    frames: int
    lag: int             # frames the picture lags the sound (negative: it leads)
    correlation: float   # opening correlation at that lag
    at_zero: float       # ... and at lag 0

    @property
    def confident(self) -> bool:
        return (self.lag != 0 and self.correlation >= MIN_CORRELATION
                and self.correlation - self.at_zero >= MIN_GAIN)


def lag_curve(predicted: np.ndarray, real: np.ndarray, max_lag: int = MAX_LAG
              ) -> dict[int, float]:
    """Opening correlation of predicted[t] with real[t + lag] for |lag| <= max_lag."""
    curve = {}
    n = len(real)
    for lag in range(-max_lag, max_lag + 1):
        a = predicted[max(-lag, 0):n - max(lag, 0)]
        b = real[max(lag, 0):n - max(-lag, 0)]
        curve[lag] = opening_correlation(a, b) if len(a) >= 10 else float("nan")
    return curve


def clip_offset(completion: CompletionNet, clip: Clip, device: torch.device | str = "cpu"
                ) -> ClipOffset:
    """The lag at which ``clip``'s real inner-lip opening best follows the one the completion
    predicts from the clip's own sound."""
    predicted, real = clip_openings(completion, clip, device=device)
    curve = lag_curve(predicted, real)
    finite = {k: v for k, v in curve.items() if np.isfinite(v)}
    lag = max(finite, key=finite.get) if finite else 0
    return ClipOffset(clip.name, len(clip.points), int(lag), float(curve[lag]), float(curve[0]))


def measure_offsets(completion: CompletionNet, clips: list[Clip],
                    device: torch.device | str = "cpu") -> list[ClipOffset]:
    return [clip_offset(completion, clip, device) for clip in clips]


def save_offsets(data_dir: str | Path, offsets: list[ClipOffset]) -> Path:
    """Write every measurement to the data set's OFFSETS_FILE, with the shifts the samplers
    apply and the clips they leave out."""
    path = Path(data_dir) / OFFSETS_FILE
    path.write_text(json.dumps({
        "applied": {o.clip: o.lag for o in offsets if o.confident and abs(o.lag) <= MAX_SHIFT},
        "dropped": [o.clip for o in offsets if o.confident and abs(o.lag) > MAX_SHIFT],
        "measured": [asdict(o) for o in offsets],
        "rule": f"a lag is confident when it beats lag 0 by >= {MIN_GAIN} correlation and "
                f"reaches >= {MIN_CORRELATION}; confident lags up to {MAX_SHIFT} frames are "
                "applied, longer ones drop the clip",
    }, indent=1))
    return path
