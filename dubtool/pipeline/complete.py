"""Stage ``complete``: lip and jaw landmarks for every output frame, from the new speech.

The completion transformer predicts windows of ``CompletionConfig.window`` frames (about a
second, so that it hears the words around each frame); windows overlap by three quarters and
every frame's prediction is the Hann-weighted mean over the windows that hold it, which joins
them without seams and trusts each window most in its middle. The pose points come from the
source frame that the plan puts at each output frame.

Where the speech pauses for PAUSE_SECONDS or longer (and before the first word and after the
last) the mouth closes to the video's own closed-mouth shape and holds still, with short
cross-fades into and out of speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from dubtool.face.indices import CONTENT_SLICE, POSE_SLICE, inner_lip_opening
from dubtool.media.audio import NORMALISED_CLIP, mel_window, normalise_mel, pauses, voice_activity
from dubtool.nets.landmark_completion import LandmarkCompletion
from dubtool.pipeline.landmarks import FaceTrack

PAUSE_SECONDS = 0.25
FADE_FRAMES = 2        # frames over which the mouth closes into or opens out of a pause
CLOSED_FRACTION = 0.1  # the closed shape: median of this most-closed fraction of the frames
SMOOTH_SECONDS = 0.04  # the predicted lip/jaw are smoothed over time by a Gaussian this wide


@dataclass
class Completion:
    """target (O, 131, 2): pose of the planned source frame + predicted lip/jaw, normalised to
    that frame's crop box. references (N,) source frames whose landmarks were the references.
    predicted (O, 57, 2): the completion's own lip/jaw, before pauses were closed.
    """

    target: np.ndarray
    references: np.ndarray
    predicted: np.ndarray

    def save(self, folder: Path) -> None:
        np.save(folder / "target.npy", self.target)
        np.save(folder / "references.npy", self.references)
        np.save(folder / "predicted.npy", self.predicted)

    @classmethod
    def load(cls, folder: Path) -> Completion:
        return cls(np.load(folder / "target.npy"), np.load(folder / "references.npy"),
                   np.load(folder / "predicted.npy"))


def reference_frames(detected: np.ndarray, count: int) -> np.ndarray:
    """``count`` source frames with a face, spread evenly over the video."""
    faces = np.nonzero(detected)[0]
    if len(faces) == 0:
        return np.zeros(count, np.int64)
    picks = np.linspace(0, len(faces) - 1, count).round().astype(np.int64)
    return faces[picks]


def closed_mouth(points: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """(57, 2) the video's own closed-mouth lip/jaw shape (crop units): the median over the
    frames whose inner lips are closest (CLOSED_FRACTION of the frames with a face)."""
    faces = np.nonzero(detected)[0]
    if len(faces) == 0:  # nothing will be dubbed: any shape does
        return np.median(points[:, CONTENT_SLICE], axis=0)
    opening = inner_lip_opening(points[faces])
    count = max(1, round(CLOSED_FRACTION * len(faces)))
    closest = faces[np.argsort(opening, kind="stable")[:count]]
    return np.median(points[closest][:, CONTENT_SLICE], axis=0)


def window_starts(frames: int, window: int) -> np.ndarray:
    """First frames of windows of ``window`` frames that cover ``frames`` frames (padded up to
    one window), overlapping by three quarters, the last one ending at the end."""
    span = max(frames, window)
    hop = max(1, window // 4)
    starts = list(range(0, span - window + 1, hop))
    if starts[-1] != span - window:
        starts.append(span - window)
    return np.array(starts, np.int64)


@torch.inference_mode()
def predict_content(completion: LandmarkCompletion, points: np.ndarray, references: np.ndarray,
                    plan: np.ndarray, features: np.ndarray, fps: Fraction | float,
                    device: torch.device | str = "cpu", windows_per_batch: int = 32
                    ) -> np.ndarray:
    """(O, 57, 2) lip/jaw points for the O output frames of ``plan`` (source frame per output
    frame): points (S, 131, 2) crop-normalised source landmarks, references (N, 131, 2),
    features: the normalised mel (80, T) of the speech. Works window batch by window batch,
    so memory stays flat in the speech's length."""
    config = completion.config
    window = config.window
    output_frames = len(plan)
    # Pad short outputs to one window by repeating the last frame.
    padded = np.concatenate([np.arange(output_frames),
                             np.full(max(0, window - output_frames), output_frames - 1)])
    starts = window_starts(output_frames, window)
    weights = np.hanning(window + 2)[1:-1]  # > 0 everywhere, largest in the middle
    total = np.zeros((len(padded), config.content_points, 2), np.float64)
    counts = np.zeros(len(padded))
    refs = torch.from_numpy(references[None].astype(np.float32)).to(device)
    for first in range(0, len(starts), windows_per_batch):
        batch = starts[first:first + windows_per_batch]
        index = batch[:, None] + np.arange(window)
        frames = padded[index]
        mels = np.stack([[mel_window(features, int(o), fps, config.mel_window,
                                     fill=-NORMALISED_CLIP) for o in row] for row in frames])
        content = completion(
            torch.from_numpy(points[plan[frames]][:, :, POSE_SLICE].astype(np.float32)).to(device),
            refs.expand(len(batch), -1, -1, -1),
            torch.from_numpy(mels).to(device)).float().cpu().numpy()
        np.add.at(total, index, content * weights[None, :, None, None])
        np.add.at(counts, index, np.broadcast_to(weights, index.shape))
    return (total / counts[:, None, None])[:output_frames].astype(np.float32)


def close_pauses(content: np.ndarray, closed: np.ndarray, paused: np.ndarray) -> np.ndarray:
    """(O, 57, 2) lip/jaw with the ``paused`` frames set to the ``closed`` shape (57, 2),
    cross-faded over FADE_FRAMES frames on the speech side of each pause's edges."""
    # Weight of the closed shape: 1 in pauses, falling linearly to 0 over FADE_FRAMES.
    distance = np.full(len(paused), np.inf)
    last = -np.inf
    for i in range(len(paused)):
        last = i if paused[i] else last
        distance[i] = i - last
    last = np.inf
    for i in reversed(range(len(paused))):
        last = i if paused[i] else last
        distance[i] = min(distance[i], last - i)
    weight = np.clip(1.0 - distance / (FADE_FRAMES + 1), 0.0, 1.0)[:, None, None]
    return (weight * closed[None] + (1 - weight) * content).astype(np.float32)


def complete(completion: LandmarkCompletion, track: FaceTrack, plan: np.ndarray,
             mel: np.ndarray, fps: Fraction, device: torch.device | str = "cpu") -> Completion:
    """Target landmarks for the O output frames of ``plan`` from the speech's log-mel (80, T)
    dB: the completion's lip/jaw, closed in the speech's pauses."""
    points = track.crop_points()
    refs = reference_frames(track.detected, completion.config.references)
    predicted = predict_content(completion, points, points[refs], plan, normalise_mel(mel),
                                fps, device)
    # The windows' predictions jitter from frame to frame by more than a mouth moves: a
    # Gaussian of 0.04 s (a frame at 25 fps) removes it (measured on the 7 validation clips:
    # the opening's correlation with the face track's +0.03 on average, every clip higher).
    predicted = gaussian_filter1d(predicted, SMOOTH_SECONDS * float(fps), axis=0,
                                  mode="nearest").astype(np.float32)
    paused = pauses(voice_activity(mel, fps, len(plan)), fps, PAUSE_SECONDS)
    target = points[plan].copy()
    target[:, CONTENT_SLICE] = close_pauses(predicted, closed_mouth(points, track.detected),
                                            paused)
    return Completion(target.astype(np.float32), refs, predicted)
