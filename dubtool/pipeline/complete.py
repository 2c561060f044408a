"""Stage ``complete``: lip and jaw landmarks for every output frame, from the new speech.

The completion transformer predicts L frames at a time; windows slide by one frame and every
frame's prediction is the mean over the windows that hold it, which smooths in time without
lag. The pose points come from the source frame that the plan puts at each output frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from dubtool.face.indices import CONTENT_SLICE, POSE_SLICE
from dubtool.media.audio import mel_window
from dubtool.nets.dubber import DubbingModel
from dubtool.pipeline.landmarks import FaceTrack


@dataclass
class Completion:
    """target (O, 131, 2): pose of the planned source frame + predicted lip/jaw, normalised to
    that frame's crop box. references (N,) source frames whose landmarks were the references.
    """

    target: np.ndarray
    references: np.ndarray

    def save(self, folder: Path) -> None:
        np.save(folder / "target.npy", self.target)
        np.save(folder / "references.npy", self.references)

    @classmethod
    def load(cls, folder: Path) -> Completion:
        return cls(np.load(folder / "target.npy"), np.load(folder / "references.npy"))


def reference_frames(track: FaceTrack, count: int) -> np.ndarray:
    """``count`` source frames with a face, spread evenly over the video."""
    faces = np.nonzero(track.detected)[0]
    if len(faces) == 0:
        return np.zeros(count, np.int64)
    picks = np.linspace(0, len(faces) - 1, count).round().astype(np.int64)
    return faces[picks]


@torch.inference_mode()
def complete(model: DubbingModel, track: FaceTrack, plan: np.ndarray, mel: np.ndarray,
             fps: Fraction, device: torch.device | str = "cpu",
             windows_per_batch: int = 64) -> Completion:
    """Target landmarks for the O output frames of ``plan`` (source frame per output frame)."""
    config = model.config.completion
    length = config.frames
    points = track.crop_points()
    refs = reference_frames(track, config.references)
    references = torch.from_numpy(points[refs][None]).to(device)
    output_frames = len(plan)
    # Pad short outputs to one window by repeating the last frame.
    padded = np.concatenate([np.arange(output_frames),
                             np.full(max(0, length - output_frames), output_frames - 1)])
    pose = points[plan[padded]]
    mels = np.stack([mel_window(mel, int(o), fps) for o in padded])
    starts = np.arange(len(padded) - length + 1)
    total = np.zeros((len(padded), config.content_points, 2), np.float64)
    counts = np.zeros(len(padded))
    for first in range(0, len(starts), windows_per_batch):
        batch = starts[first:first + windows_per_batch]
        index = batch[:, None] + np.arange(length)
        content = model.completion(
            torch.from_numpy(pose[index][:, :, POSE_SLICE]).to(device),
            references.expand(len(batch), -1, -1, -1),
            torch.from_numpy(mels[index]).to(device)).float().cpu().numpy()
        np.add.at(total, index, content)
        np.add.at(counts, index, 1)
    target = points[plan].copy()
    target[:, CONTENT_SLICE] = (total / counts[:, None, None])[:output_frames]
    return Completion(target.astype(np.float32), refs)
