"""Stage ``complete``: lip and jaw landmarks for every output frame, from the new speech.

The completion transformer predicts windows of ``CompletionConfig.window`` frames (about a
second, so that it hears the words around each frame); windows overlap by three quarters and
every frame's prediction is the Hann-weighted mean over the windows that hold it, which joins
them without seams and trusts each window most in its middle. The pose points come from the
source frame that the plan puts at each output frame. The prediction is smoothed over
``smooth_seconds`` and its lips' opening and closing amplified by ``articulation_gain`` (the
completion under-opens, ``articulate``).

Where the speech pauses for ``pause_seconds`` or longer (and before the first word and after
the last) the mouth closes to the video's own closed-mouth shape and holds still, with short
cross-fades into and out of speech.

The settings are the model's (``CompleteSettings``, the ``inference.complete`` section of its
config.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from dubtool.arrays import DiskArray, gaussian_in_time, gaussian_reach, mean_in_time
from dubtool.face.indices import (
    CONTENT_SLICE,
    LIPS_SLICE,
    NUM_POINTS,
    NUM_POSE,
    POSE_SLICE,
    inner_lip_opening,
    lips_apart,
)
from dubtool.media.audio import (
    MelNormalisation,
    feature_window,
    mel_normalisation,
    pauses,
    voice_activity,
)
from dubtool.nets.completions import CompletionNet
from dubtool.nets.config import CompleteSettings
from dubtool.pipeline.landmarks import CropPoints, FaceTrack, PointSource, map_points
from dubtool.pipeline.plan import far_from_plan

OUTPUT_CHUNK = 1024    # output frames of the targets computed and written at once
LIPS_IN_CONTENT = slice(LIPS_SLICE.start - NUM_POSE, LIPS_SLICE.stop - NUM_POSE)
TARGET_FILE, PREDICTED_FILE, REFERENCES_FILE = "target.npy", "predicted.npy", "references.npy"
CLOSING_FILE = "closing.npy"


@dataclass
class Completion:
    """target (O, 131, 2): pose of the planned source frame + predicted lip/jaw, normalised to
    that frame's crop box. references (N,) source frames whose landmarks were the references.
    predicted (O, 57, 2): the completion's own lip/jaw, before pauses were closed. closing
    (O,): how far each frame's mouth was closed to the video's closed shape (1 in the speech's
    pauses, ``closing_weight``). The per-output-frame points stay on disk (an hour at 25 fps
    is 135 MB).
    """

    target: DiskArray
    references: np.ndarray
    predicted: DiskArray
    closing: np.ndarray

    @classmethod
    def load(cls, folder: Path) -> Completion:
        return cls(DiskArray.open(folder / TARGET_FILE), np.load(folder / REFERENCES_FILE),
                   DiskArray.open(folder / PREDICTED_FILE), np.load(folder / CLOSING_FILE))


def reference_frames(detected: np.ndarray, count: int) -> np.ndarray:
    """``count`` source frames with a face, spread evenly over the video."""
    faces = np.nonzero(detected)[0]
    if len(faces) == 0:
        return np.zeros(count, np.int64)
    picks = np.linspace(0, len(faces) - 1, count).round().astype(np.int64)
    return faces[picks]


def reference_candidates(detected: np.ndarray, plan: np.ndarray, exclude_frames: int = 0,
                         reference_frame: int = 0, enough: int = 1) -> np.ndarray:
    """(F,) bool: the frames the completion's reference landmarks and the closed mouth may come
    from. Every frame with a face; with ``exclude_frames`` (the reconstruction protocol), those
    at least that far from every frame of the ``plan``, or, when fewer than ``enough`` are,
    those within half of it of the dub's ``reference_frame``: every frame the protocol scores
    is at least ``exclude_frames`` from that one, so at least half of it from these."""
    if exclude_frames <= 0:
        return detected.copy()
    far = detected & far_from_plan(len(detected), plan, exclude_frames)
    if far.sum() >= enough:
        return far
    near = np.abs(np.arange(len(detected)) - reference_frame) < max(1, exclude_frames // 2)
    return detected & near


def closed_mouth(points: PointSource, detected: np.ndarray, fraction: float,
                 max_frames: int) -> np.ndarray:
    """(57, 2) the video's own closed-mouth lip/jaw shape (in the units of ``points``, (F, 131,
    2), any array-like): the median over the frames whose inner lips are closest
    (``fraction`` of the frames with a face, at most ``max_frames``)."""
    faces = np.nonzero(detected)[0]
    if len(faces) == 0:  # nothing will be dubbed: any shape does
        return points[0][CONTENT_SLICE]
    opening = map_points(points, inner_lip_opening, faces)
    count = min(max(1, round(fraction * len(faces))), max_frames)
    closest = np.sort(faces[np.argsort(opening, kind="stable")[:count]])
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
def predict_content(completion: CompletionNet, points: PointSource | CropPoints,
                    references: np.ndarray,
                    plan: np.ndarray, features: np.ndarray | DiskArray, fps: Fraction | float,
                    device: torch.device | str = "cpu", windows_per_batch: int = 32,
                    normalisation: MelNormalisation | None = None,
                    out: DiskArray | None = None) -> np.ndarray | DiskArray:
    """(O, 57, 2) lip/jaw points for the O output frames of ``plan`` (source frame per output
    frame): points (S, 131, 2) crop-normalised source landmarks (any array-like, read a batch
    at a time), references (N, 131, 2),
    features (C, T): the speech features the completion hears (``speech_features`` of its
    config: the normalised mel, or its dB mel with the ``normalisation`` that makes it so; or
    the speech encoder's states). Works window batch by window batch, reading (and
    normalising) only the columns a batch hears, and writes each frame into ``out``
    (default: a new array) once no later window holds it, so memory stays flat in the
    speech's length."""
    config = completion.config
    window, width, timing = config.window, config.speech_window, config.speech_timing
    output_frames = len(plan)
    # Pad short outputs to one window by repeating the last frame.
    padded = np.concatenate([np.arange(output_frames),
                             np.full(max(0, window - output_frames), output_frames - 1)])
    starts = window_starts(output_frames, window)
    weights = np.hanning(window + 2)[1:-1]  # > 0 everywhere, largest in the middle
    if out is None:
        out = np.empty((output_frames, config.content_points, 2), np.float32)
    # Weighted sums over the windows so far of the frames from ``done`` on.
    done = 0
    total = np.zeros((0, config.content_points, 2), np.float64)
    counts = np.zeros(0)
    columns = features.shape[1]
    refs = torch.from_numpy(references[None].astype(np.float32)).to(device)
    for first in range(0, len(starts), windows_per_batch):
        batch = starts[first:first + windows_per_batch]
        index = batch[:, None] + np.arange(window)
        frames = padded[index]
        lo = max(timing.window_start(int(frames.min()), fps, width), 0)
        hi = max(lo, min(timing.window_start(int(frames.max()), fps, width) + width, columns))
        heard = features[:, lo:hi]
        if normalisation is not None:
            heard = normalisation.apply(heard)
        speech = np.stack([[feature_window(heard, int(o), fps, width, timing, first_column=lo,
                                           columns=columns) for o in row]
                           for row in frames])
        content = completion(
            torch.from_numpy(points[plan[frames]][:, :, POSE_SLICE].astype(np.float32)).to(device),
            refs.expand(len(batch), -1, -1, -1),
            torch.from_numpy(speech).to(device)).float().cpu().numpy()
        grow = int(index.max()) + 1 - done - len(counts)
        if grow > 0:
            total = np.concatenate([total, np.zeros((grow, *total.shape[1:]))])
            counts = np.concatenate([counts, np.zeros(grow)])
        np.add.at(total, index - done, content * weights[None, :, None, None])
        np.add.at(counts, index - done, np.broadcast_to(weights, index.shape))
        # The windows start in order: frames before the next one's start are complete.
        following = first + windows_per_batch
        final = int(starts[following]) if following < len(starts) else len(padded)
        ready = min(final, output_frames)
        if ready > done:
            out[done:ready] = (total[:ready - done] / counts[:ready - done, None, None]
                               ).astype(np.float32)
        total, counts, done = total[final - done:], counts[final - done:], final
    return out


def closing_weight(paused: np.ndarray, fade_frames: int) -> np.ndarray:
    """(O,) how far each frame's mouth is closed for the ``paused`` frames: 1 in pauses,
    falling linearly to 0 over ``fade_frames`` frames on the speech side of each pause's
    edges."""
    distance = np.full(len(paused), np.inf)
    last = -np.inf
    for i in range(len(paused)):
        last = i if paused[i] else last
        distance[i] = i - last
    last = np.inf
    for i in reversed(range(len(paused))):
        last = i if paused[i] else last
        distance[i] = min(distance[i], last - i)
    return np.clip(1.0 - distance / (fade_frames + 1), 0.0, 1.0)


def articulate(content: np.ndarray, gain: float, frames: int) -> np.ndarray:
    """(O, 57, 2) lip/jaw with the lips' vertical motion about their own centre amplified:
    each lip point's height over the lips' mean height, minus its mean over ``frames``
    frames, times ``gain``. The jaw, the mouth's place and its width are left as they are.

    Trained on L1-like losses, the completion hedges: on the validation people's whole
    clips its lips open 0.67 as wide as the real ones, and a gain of 1.5 about a 2 s mean
    brings that to 0.91, the opening correlation 0.470 -> 0.468 and the lip/jaw L1 0.0098 ->
    0.0099 crop units; on the training speaker's held-out clips 0.91 -> 1.12, 0.891 -> 0.888.
    A shorter mean (0.5 s) amplifies the fast motion most, which follows the real mouth less
    (correlation -0.02 on the dubs); one over the whole clip amplifies the slow changes of
    the mouth's shape with the head's pose too (0.457)."""
    if gain == 1.0 or len(content) == 0:
        return content
    out = content.astype(np.float32, copy=True)
    lips = out[:, LIPS_IN_CONTENT, 1]
    height = lips - lips.mean(axis=1, keepdims=True)
    local = mean_in_time(height, max(1, frames))
    out[:, LIPS_IN_CONTENT, 1] = lips + (gain - 1.0) * (height - local)
    return out


def articulation_frames(fps: Fraction | float, seconds: float) -> int:
    """The odd number of frames nearest ``seconds``: the mean ``articulate`` works about."""
    return round(seconds * float(fps)) // 2 * 2 + 1


def close_pauses(content: np.ndarray, closed: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(O, 57, 2) lip/jaw cross-faded to the ``closed`` shape (57, 2) by ``weight`` (O,)
    (``closing_weight``)."""
    weight = weight[:, None, None]
    return (weight * closed[None] + (1 - weight) * content).astype(np.float32)


def complete(completion: CompletionNet, track: FaceTrack, plan: np.ndarray,
             mel: np.ndarray | DiskArray, fps: Fraction, folder: Path,
             settings: CompleteSettings, device: torch.device | str = "cpu", *,
             states: np.ndarray | DiskArray | None = None, exclude_frames: int = 0,
             reference_frame: int = 0) -> Completion:
    """Target landmarks for the O output frames of ``plan`` from the speech: the completion's
    lip/jaw from its log-mel (80, T) dB, or from the speech encoder's ``states`` (384, T') for
    a completion that hears them, closed in the speech's pauses (found on the mel), smoothed
    and articulated as ``settings`` say. Writes
    the Completion's arrays into ``folder``, OUTPUT_CHUNK frames at a time.
    ``exclude_frames`` and the dub's ``reference_frame``: where the reference landmarks and
    the closed mouth may come from in the reconstruction protocol (``reference_candidates``)."""
    points = track.cropped  # read by parts: the whole track would grow with the video
    candidates = reference_candidates(track.detected, plan, exclude_frames, reference_frame,
                                      completion.config.references)
    refs = reference_frames(candidates, completion.config.references)
    np.save(folder / REFERENCES_FILE, refs)
    if completion.config.speech_features == "whisper":
        if states is None:
            raise ValueError("this completion hears the speech encoder's states: none given")
        features, normalisation = states, None
    else:
        features, normalisation = mel, mel_normalisation(mel)
    predicted = predict_content(
        completion, points, points[refs], plan, features, fps, device,
        normalisation=normalisation,
        out=DiskArray.create(folder / PREDICTED_FILE,
                             (len(plan), completion.config.content_points, 2), np.float32))
    weight = closing_weight(pauses(voice_activity(mel, fps, len(plan)), fps,
                                   settings.pause_seconds), settings.fade_frames)
    np.save(folder / CLOSING_FILE, weight.astype(np.float32))
    closed = closed_mouth(points, candidates, settings.closed_fraction,
                          settings.closed_max_frames)
    target = DiskArray.create(folder / TARGET_FILE, (len(plan), NUM_POINTS, 2), np.float32)
    # The windows' predictions jitter from frame to frame by more than a mouth moves: a
    # Gaussian of 0.04 s (a frame at 25 fps) removes it (measured on the 7 validation clips:
    # the opening's correlation with the face track's +0.03 on average, every clip higher).
    # Each part is smoothed with enough of its neighbours to equal smoothing all at once.
    sigma = settings.smooth_seconds * float(fps)
    mean_frames = articulation_frames(fps, settings.articulation_seconds)
    # The smoothing's reach, then the local mean's.
    halo = gaussian_reach(sigma) + 1 + mean_frames // 2
    for start in range(0, len(plan), OUTPUT_CHUNK):
        stop = min(start + OUTPUT_CHUNK, len(plan))
        low, high = max(0, start - halo), min(len(plan), stop + halo)
        part = np.asarray(predicted[low:high])
        if sigma > 0:  # (0: not smoothed)
            part = gaussian_in_time(part, sigma)
        content = articulate(part, settings.articulation_gain, mean_frames)
        frames = points[plan[start:stop]]
        # A linear completion, or the articulation, can push the lips through each other.
        frames[:, CONTENT_SLICE] = lips_apart(close_pauses(content[start - low:stop - low],
                                                           closed, weight[start:stop]))
        target[start:stop] = frames
    return Completion.load(folder)
