"""Stage ``adapt``: the landmark completion fine-tuned to the person in the video.

Trained on some fifty people, the completion moves an unseen person's lips only loosely with
the speech, and a speaker it trained on for 15 minutes far better. The video to dub holds the
person's own speech in sync with their own lips, which teach the completion this person before
it hears the new speech: a linear completion is fitted again on every usable frame in one
ridge solve, pulled towards its trained weights (``ridge``); a transformer takes ``steps``
steps of training on windows of it (sampled and augmented as ``dubtool train completion``
does, with the same losses). Skipped, and the completion left as it
is, when the video has no sound, fewer than ``min_seconds`` of frames with a face in the
part that was tracked (a few seconds are learned by heart rather than generalised from), or
no run of successive frames with a face as long as the completion's window.

In the reconstruction protocol (``exclude_frames`` > 0) no frame within that many frames of an
output frame is learned from: the lips to be reconstructed are never seen.

The settings are the model's (``AdaptSettings``, the ``inference.adapt`` section of its
config.json).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from dubtool.arrays import DiskArray, true_runs
from dubtool.face.indices import CONTENT_SLICE, POSE_SLICE
from dubtool.media.audio import decode_speech, mel_spectrogram, normalise_mel
from dubtool.media.probe import VideoInfo
from dubtool.nets.completions import CompletionNet
from dubtool.nets.config import AdaptSettings, CompletionConfig, TrainingConfig
from dubtool.nets.io import load_weights, save_weights
from dubtool.nets.linear_completion import LinearCompletion
from dubtool.nets.losses import completion_losses
from dubtool.pipeline import speech
from dubtool.pipeline.clips import (
    Clip,
    PreparedData,
    dubber_batch,
    regression_rows,
    sample_seeds,
)
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.plan import far_from_plan

WEIGHTS_FILE, INFO_FILE, SOUND_FILE = "completion.safetensors", "adapt.json", "sound.f32"


@dataclass
class Adaptation:
    """What the stage did: ``seconds`` of the video learned from, the loss over the first and
    the last few steps; ``reason`` why it was skipped (``adapted`` False)."""

    adapted: bool
    seconds: float = 0.0
    steps: int = 0
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    reason: str = ""

    @classmethod
    def load(cls, folder: Path) -> Adaptation:
        return cls(**json.loads((folder / INFO_FILE).read_text()))


def learnable_frames(track: FaceTrack, plan: np.ndarray, exclude_frames: int,
                     fps: Fraction, max_seconds: float) -> np.ndarray:
    """(F,) bool over the tracked frames: a face, within the first ``max_seconds``, and (with
    ``exclude_frames``) at least that many frames from every frame of the ``plan``."""
    usable = track.detected & far_from_plan(track.frames, plan, exclude_frames)
    usable[int(max_seconds * float(fps)):] = False
    return usable


def longest_run(usable: np.ndarray) -> int:
    """The most successive True values in the (F,) bool ``usable``."""
    starts, stops = true_runs(usable)
    return int((stops - starts).max()) if len(starts) else 0


def _reach_seconds(config: CompletionConfig) -> float:
    """Seconds of sound past a frame that its speech window may read (a whole window and the
    lead: a margin over the half window it reaches)."""
    return (config.speech_window + abs(config.speech_lead)) / config.speech_timing.rate


def sound_seconds(config: CompletionConfig, settings: AdaptSettings) -> float:
    """How much of the video's own sound the stage can hear at most: its ``max_seconds`` and
    the reach of the last frame's speech window past them."""
    return settings.max_seconds + _reach_seconds(config)


def adapt(completion: CompletionNet, video: VideoInfo, track: FaceTrack, plan: np.ndarray,
          folder: Path, training: TrainingConfig, settings: AdaptSettings, *,
          exclude_frames: int = 0, seed: int = 0, device: torch.device | str = "cpu",
          sound: DiskArray | None = None) -> Adaptation:
    """Fine-tune a copy of ``completion`` on the video's own sound and face track, as
    ``settings`` say; writes INFO_FILE (an ``Adaptation``) and, when adapted, the weights to
    ``folder``. ``sound``: the speech encoder's states of the video's own sound (its first
    ``sound_seconds`` at least; ``pipeline.speech.encode_file``), when already made; else
    the stage makes those it needs."""
    usable = learnable_frames(track, plan, exclude_frames, video.fps, settings.max_seconds)
    seconds = float(usable.sum() / video.fps)
    result = Adaptation(False, seconds)
    if not video.has_audio:
        result.reason = "the video has no sound"
    elif seconds < settings.min_seconds:
        result.reason = (f"{seconds:.1f} s of the video's frames can be learned from, fewer "
                         f"than {settings.min_seconds:g}")
    elif longest_run(usable) < completion.config.window:
        # Each training window is that many successive frames with a face: scattered faces
        # (a flickering detection, cuts) give none, however many seconds they add up to.
        result.reason = (f"{seconds:.1f} s of the video's frames can be learned from, but "
                         f"never {completion.config.window} successive ones (at most "
                         f"{longest_run(usable)})")
    else:
        clip = _video_clip(video, track, usable, folder, completion.config, sound)
        if isinstance(completion, LinearCompletion):
            result = _fit(completion, clip, folder, settings)
        else:
            result = _train(completion, clip, folder, training, settings, seed, device)
        result.seconds = seconds
    (folder / INFO_FILE).write_text(json.dumps(vars(result)))
    return result


def adapted_completion(completion: CompletionNet, folder: Path) -> CompletionNet:
    """The completion the ``adapt`` stage in ``folder`` made (``completion`` if it skipped)."""
    if not (folder / WEIGHTS_FILE).is_file():
        return completion
    adapted = copy.deepcopy(completion)
    load_weights(adapted, folder / WEIGHTS_FILE)
    return adapted.eval()


def _video_clip(video: VideoInfo, track: FaceTrack, usable: np.ndarray, folder: Path,
                config: CompletionConfig, sound: DiskArray | None) -> Clip:
    """The video's first tracked frames as a training clip: its points, ``usable`` as the
    frames with a face, the features of its own sound that ``config`` hears (of ``sound``,
    when given)."""
    last = int(np.nonzero(usable)[0].max()) + 1
    timing = config.speech_timing
    # Only the sound the windows hear (the last frame's window reaches half a window past
    # its end): ffmpeg stops there, and the features read the file block by block (five
    # minutes of sound whole in memory would be 19 MB).
    seconds = last / float(video.fps) + _reach_seconds(config)
    if config.speech_features == "whisper":
        if sound is None:
            states = speech.encode_file(video.path, folder, seconds)
            features = states[:].astype(np.float32)
            states.path.unlink()
        else:
            features = sound[:, :math.ceil(seconds * timing.rate)].astype(np.float32)
    else:
        samples = decode_speech(video.path, folder / SOUND_FILE, seconds)
        features = normalise_mel(mel_spectrogram(samples))
        samples.path.unlink()
    return Clip("video", "video", video.fps, np.zeros((0, 0, 0, 3), np.uint8),
                track.crop_points(slice(0, last)), usable[:last], features)


def _fit(completion: LinearCompletion, clip: Clip, folder: Path,
         settings: AdaptSettings) -> Adaptation:
    """A linear completion fitted again on the clip's frames in one solve, pulled towards
    its trained weights by ``settings.ridge`` (the losses: mean squared lip/jaw error)."""
    net = copy.deepcopy(completion)
    rows = regression_rows(net, clip, np.nonzero(clip.detected)[0])

    def loss() -> float:
        return float(np.mean((net.predicted_offsets(rows.speech, rows.moved) - rows.offsets) ** 2))

    before = loss()
    net.fit(rows.speech, rows.moved, rows.offsets, np.ones(len(rows.offsets)), settings.ridge,
            settings.ridge, prior=True)
    save_weights(net, folder / WEIGHTS_FILE)
    return Adaptation(True, steps=1, loss_before=before, loss_after=loss())


def _train(completion: CompletionNet, clip: Clip, folder: Path, training: TrainingConfig,
           settings: AdaptSettings, seed: int, device: torch.device | str) -> Adaptation:
    config = completion.config
    net = copy.deepcopy(completion).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.learning_rate)
    data = PreparedData.of_clips([clip], hearing=config)
    rng = np.random.default_rng(seed)
    losses = []
    with torch.random.fork_rng(devices=[]):  # dropout's draws, seeded, leave the caller's RNG
        torch.manual_seed(seed)
        for _ in range(settings.steps):
            batch = dubber_batch(data, sample_seeds(rng, settings.batch), config.window,
                                 config.references, 0, rng, images=False)
            points = torch.from_numpy(batch["points"]).to(device)
            predicted = net(points[:, :, POSE_SLICE],
                            torch.from_numpy(batch["references"]).to(device),
                            torch.from_numpy(batch["speech"]).to(device))
            loss = completion_losses(predicted, points[:, :, CONTENT_SLICE], training)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    save_weights(net, folder / WEIGHTS_FILE)
    few = max(1, settings.steps // 10)
    return Adaptation(True, steps=settings.steps, loss_before=float(np.mean(losses[:few])),
                      loss_after=float(np.mean(losses[-few:])))
