"""Lip-sync expert: does a window of lip/jaw motion go with a window of speech?

Two small convolutional encoders map a window of ``SyncExpertConfig.window`` frames (1.5 s
at 25 fps) to a unit vector each: one of the lip/jaw points' motion, one of the speech
encoder's states (``nets.speech_encoder``). Trained contrastively (InfoNCE, ``training.sync``)
so that a window's motion has a higher cosine with its own speech than with the same clip's
speech shifted by ``min_shift`` to ``max_shift`` frames, or with other clips' speech. It
scores lips without the original as reference: ``SyncExpert.score`` gives, over a clip's
windows, the share of (window, shift) pairs in which the in-sync speech scores higher (0.5 for
a mouth that does not move, or moves at random).

The encoders see every frame once: a per-frame trunk (a pointwise convolution, then two
3-frame ones) runs over a whole clip, and the window head is a convolution as wide as the
window (the same as a linear layer over the flattened window), so the embeddings of all the
clip's windows cost one pass. The points are normalised per clip (their mean removed, divided
by one standard deviation over every coordinate), so any scale, pixels or crop units, scores
alike; the speech is standardised by the training frames' mean and deviation, held as
buffers with the weights. ``members`` experts trained from different seeds score as one,
their cosines averaged (seeds vary by a few points of accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dubtool.errors import ModelError
from dubtool.face.indices import CONTENT_SLICE, MIRROR, NUM_CONTENT, NUM_POSE
from dubtool.media.audio import feature_window
from dubtool.nets.config import CompletionConfig, build_dataclass, read_config
from dubtool.nets.io import CONFIG_FILE, load_weights, resolve_model_folder, save_weights
from dubtool.nets.speech_encoder import ENCODER_STATES, STATE_DIM

WEIGHTS_FILE = "sync_expert.safetensors"
# The two 3-frame convolutions of the trunk: a window's embedding also reads this many frames
# on each side of it (training cuts them from its segments, so no sample sees zero padding).
TRUNK_MARGIN = 2
# Frame-to-frame differences are small beside the positions: scaled up to weigh alike.
MOTION_GAIN = 3.0
# A clip's points are divided by their spread, but by no less than this share of the mean
# mouth's size: a still mouth stays still instead of its jitter being blown up.
STILL_SPREAD = 2e-3
# The lip/jaw points' left/right twins among the 57 (for mirrored training samples).
CONTENT_MIRROR = MIRROR[CONTENT_SLICE] - NUM_POSE


@dataclass(frozen=True)
class SyncTrainingConfig:
    """How ``training.sync`` trains each member (the steps are the command's)."""

    batch_size: int = 64           # windows a step, each against its shifts and the others
    learning_rate: float = 2e-3    # the one-cycle schedule's peak
    warmup: float = 0.1            # share of the steps the rate rises over
    weight_decay: float = 1e-2
    temperature: float = 0.1       # of the cosines, at the start (it is learned)
    point_noise: float = 0.05      # in the clip's normalised units
    scale_jitter: float = 1.25     # the motion scaled by a factor in [1 / this, this]
    speech_noise: float = 0.3      # most noise added to the standardised speech
    mirror: float = 0.5            # share of samples seen mirrored left to right


@dataclass(frozen=True)
class SyncExpertConfig:
    """The expert's windows, inputs and sizes: saved with its weights as config.json."""

    window: int = 37               # frames a window spans (1.5 s at 25 fps)
    min_shift: int = 5             # the shifts the in-sync speech is scored against:
    max_shift: int = 15            # min_shift <= |s| <= max_shift frames
    content_points: int = NUM_CONTENT
    speech_channels: int = STATE_DIM
    speech_steps: int = 2          # encoder states averaged into a frame's (40 ms)
    speech_lead: int = 5           # states a frame's speech lies after it (mouths lead sounds)
    hidden: int = 128              # trunk channels
    dim: int = 64                  # embedding size
    dropout: float = 0.2
    members: int = 3               # experts of different seeds whose cosines are averaged
    training: SyncTrainingConfig = field(default_factory=SyncTrainingConfig)

    def __post_init__(self) -> None:
        problems = [f"{name} must be at least 1" for name in (
            "window", "content_points", "speech_channels", "speech_steps", "hidden", "dim",
            "members") if getattr(self, name) < 1]
        if not 1 <= self.min_shift <= self.max_shift:
            problems.append("shifts must satisfy 1 <= min_shift <= max_shift")
        if not 0 <= self.dropout < 1:
            problems.append("dropout must be in [0, 1)")
        if problems:
            raise ModelError("invalid sync expert config: " + "; ".join(problems))

    @property
    def span(self) -> int:
        """Frames a scored window needs: itself and every shift of the speech."""
        return self.window + 2 * self.max_shift

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyncExpertConfig:
        try:
            return build_dataclass(cls, data, "")
        except TypeError as exc:
            raise ModelError(f"invalid sync expert config: {exc}") from exc

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SyncExpertConfig:
        return cls.from_dict(read_config(path))


def normalised_points(points: torch.Tensor) -> torch.Tensor:
    """(..., F, P, 2) points of F frames -> the same less their mean over the frames, divided
    by one standard deviation over every frame and coordinate (at least ``STILL_SPREAD`` of
    the mean shape's size): any scale gives the same motion."""
    mean = points.mean(dim=-3, keepdim=True)
    centred = points - mean
    size = (mean.amax(dim=-2) - mean.amin(dim=-2)).amax(dim=-1)[..., None, None]  # (..., 1, 1, 1)
    spread = centred.pow(2).mean(dim=(-3, -2, -1), keepdim=True).sqrt()
    return centred / torch.maximum(spread, STILL_SPREAD * size).clamp_min(1e-12)


def motion_features(normalised: torch.Tensor) -> torch.Tensor:
    """(..., F, P, 2) normalised points -> (..., F, 4P): each frame's points and their change
    from the frame before (none at the first)."""
    flat = normalised.flatten(-2)
    change = torch.diff(flat, dim=-2, prepend=flat[..., :1, :]) * MOTION_GAIN
    return torch.cat([flat, change], dim=-1)


def mirrored(normalised: torch.Tensor) -> torch.Tensor:
    """(..., F, P, 2) normalised lip/jaw points of the mirrored face (their mean is 0, so x
    changes sign; left and right twins swap)."""
    return normalised[..., CONTENT_MIRROR, :] * normalised.new_tensor([-1.0, 1.0])


def frame_speech(states: np.ndarray, frames: int, fps: Fraction | float,
                 config: SyncExpertConfig, offset: int = 0) -> np.ndarray:
    """(C, T) speech encoder states -> (frames, C) float32: each video frame's, the mean of
    ``speech_steps`` states ``speech_lead`` states after the frame's middle (silence's outside
    the speech). ``offset``: frames the picture lags the sound (frame f hears f - offset)."""
    timing = dataclasses.replace(ENCODER_STATES,
                                 centre=ENCODER_STATES.centre - config.speech_lead)
    return np.stack([feature_window(states, f - offset, fps, config.speech_steps, timing
                                    ).mean(axis=1) for f in range(frames)]).astype(np.float32)


class _WindowEncoder(nn.Module):
    """Per-frame features -> a unit vector for every window of ``window`` frames."""

    def __init__(self, inputs: int, config: SyncExpertConfig) -> None:
        super().__init__()
        hidden = config.hidden
        self.trunk = nn.Sequential(
            nn.Dropout(config.dropout), nn.Conv1d(inputs, hidden, 1), nn.GELU(),
            nn.Conv1d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv1d(hidden, hidden, 3, padding=1), nn.GELU())
        self.head_dropout = nn.Dropout(config.dropout)
        self.head = nn.Conv1d(hidden, config.dim, config.window)

    def forward(self, features: torch.Tensor, margin: int = 0) -> torch.Tensor:
        """(N, T, D) -> (N, T - 2 margin - window + 1, dim): row j the window starting at frame
        margin + j; ``margin`` frames at each end are read by the trunk only."""
        trunk = self.trunk(features.transpose(1, 2))
        if margin:
            trunk = trunk[:, :, margin:-margin]
        return F.normalize(self.head(self.head_dropout(trunk)).transpose(1, 2), dim=-1)


class SyncMember(nn.Module):
    """One expert: the motion and speech encoders and the learned scale of their cosines."""

    def __init__(self, config: SyncExpertConfig) -> None:
        super().__init__()
        self.motion = _WindowEncoder(4 * config.content_points, config)
        self.speech = _WindowEncoder(config.speech_channels, config)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / config.training.temperature)))


@dataclass
class SyncScores:
    """The cosines of N windows' motion with their speech shifted by -max_shift..max_shift
    frames: ``cosines`` (N, 2 max_shift + 1), column max_shift in sync."""

    cosines: np.ndarray
    min_shift: int

    @property
    def max_shift(self) -> int:
        return (self.cosines.shape[1] - 1) // 2

    @property
    def windows(self) -> int:
        return len(self.cosines)

    def _shifted(self) -> np.ndarray:
        s, m = self.max_shift, self.min_shift
        return np.r_[0:s - m + 1, s + m:2 * s + 1]

    def pairwise(self) -> np.ndarray:
        """(N,) each window's share of shifts (min_shift <= |s| <= max_shift) at which the
        speech scores below the in-sync speech (a tie counts half)."""
        in_sync = self.cosines[:, self.max_shift, None]
        shifted = self.cosines[:, self._shifted()]
        return (shifted < in_sync).mean(axis=1) + 0.5 * (shifted == in_sync).mean(axis=1)

    @property
    def accuracy(self) -> float:
        """The mean of ``pairwise`` (NaN without windows)."""
        return float(self.pairwise().mean()) if self.windows else math.nan

    @property
    def in_sync(self) -> float:
        """The mean cosine of the windows in sync (NaN without windows)."""
        return float(self.cosines[:, self.max_shift].mean()) if self.windows else math.nan

    @property
    def shifted(self) -> float:
        """The mean cosine of the windows shifted by min_shift..max_shift frames."""
        return float(self.cosines[:, self._shifted()].mean()) if self.windows else math.nan

    @classmethod
    def join(cls, parts: list[SyncScores], config: SyncExpertConfig) -> SyncScores:
        """The windows of ``parts`` (clips, or runs of frames) pooled."""
        empty = np.zeros((0, 2 * config.max_shift + 1), np.float32)
        return cls(np.concatenate([empty, *(p.cosines for p in parts)]), config.min_shift)


class SyncExpert(nn.Module):
    """``members`` experts scoring as one; the speech standardisation held as buffers."""

    def __init__(self, config: SyncExpertConfig) -> None:
        super().__init__()
        self.config = config
        self.members = nn.ModuleList(SyncMember(config) for _ in range(config.members))
        self.register_buffer("speech_mean", torch.zeros(config.speech_channels))
        self.register_buffer("speech_scale", torch.ones(config.speech_channels))

    def standardised(self, speech: torch.Tensor) -> torch.Tensor:
        """(..., C) per-frame speech states -> the same, standardised as in training."""
        return (speech - self.speech_mean) / self.speech_scale

    def embed(self, points: torch.Tensor, speech: torch.Tensor, member: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Member ``member``'s embeddings of every window of B clips of F frames: points
        (B, F, P, 2) raw (any scale), speech (B, F, C) raw per-frame states (``frame_speech``)
        -> motion and speech (B, F - window + 1, dim) unit vectors, row j the window starting
        at frame j."""
        expert = self.members[member]
        motion = expert.motion(motion_features(normalised_points(points)))
        return motion, expert.speech(self.standardised(speech))

    def cosines(self, points: torch.Tensor, speech: torch.Tensor, member: int | None = None
                ) -> torch.Tensor:
        """(B, F, P, 2) raw points and (B, F, C) raw per-frame states of clips of F >= ``span``
        frames -> (B, N, 2 max_shift + 1) cosines of each scored window's motion with the
        speech shifted by -max_shift..max_shift frames (N = F - span + 1 windows, the first
        starting at frame max_shift): the members' mean, or member ``member``'s."""
        shifts = self.config.max_shift
        count = points.shape[-3] - self.config.span + 1
        chosen = range(len(self.members)) if member is None else [member]
        total = 0
        for k in chosen:
            motion, heard = self.embed(points, speech, k)
            motion = motion[:, shifts:shifts + count]
            total = total + torch.stack([(motion * heard[:, s:s + count]).sum(-1)
                                         for s in range(2 * shifts + 1)], dim=-1)
        return total / len(chosen)

    def in_sync_loss(self, points: torch.Tensor, speech: torch.Tensor) -> torch.Tensor:
        """Minus the members' mean in-sync cosine over every window of B sequences: points
        (B, L, P, 2) lip/jaw points (any unit), speech (B, L, C) raw per-frame states, L >=
        ``window``. A training loss for lips predicted from the speech (the expert frozen)."""
        total = 0
        for k in range(len(self.members)):
            motion, heard = self.embed(points, speech, k)
            total = total + (motion * heard).sum(-1).mean()
        return -total / len(self.members)

    def check_hearing(self, hearing: CompletionConfig) -> None:
        """ModelError unless a completion of ``hearing`` hears what this expert does (the
        speech encoder's states, with its lead) in windows it can score."""
        config = self.config
        if (hearing.speech_features != "whisper" or hearing.speech_lead != config.speech_lead
                or hearing.speech_window < config.speech_steps
                or hearing.window < config.window):
            raise ModelError(
                "the sync expert's loss needs a completion hearing the speech encoder's states "
                f"(speech_features whisper) with speech_lead {config.speech_lead}, "
                f"speech_window >= {config.speech_steps} and window >= {config.window} frames")

    def window_speech(self, speech: torch.Tensor) -> torch.Tensor:
        """(..., C, W) a completion's windows of speech states (``check_hearing``) -> (..., C)
        each frame's states as ``frame_speech`` takes them: the middle ``speech_steps``."""
        steps = self.config.speech_steps
        first = speech.shape[-1] // 2 - steps // 2  # both windows centred as feature_window
        return speech[..., first:first + steps].mean(dim=-1)

    @torch.no_grad()
    def score(self, points: np.ndarray, speech: np.ndarray, member: int | None = None
              ) -> SyncScores:
        """Score one clip: points (F, P, 2) its lip/jaw points (``CONTENT_SLICE``), in any
        unit, and speech (F, C) its per-frame speech states (``frame_speech``); no windows
        (NaN accuracy) when F < ``config.span``."""
        if len(points) != len(speech):
            raise ValueError(f"{len(points)} frames of points but {len(speech)} of speech")
        if len(points) < self.config.span:
            return SyncScores.join([], self.config)
        device = self.speech_mean.device
        # (copies: the arrays may be read-only views)
        cosines = self.cosines(torch.tensor(np.array(points, np.float32), device=device)[None],
                               torch.tensor(np.array(speech, np.float32), device=device)[None],
                               member)[0]
        return SyncScores(cosines.float().cpu().numpy(), self.config.min_shift)


def save_sync_expert(expert: SyncExpert, folder: str | Path, half: bool = True) -> Path:
    """Write a sync expert's model folder: config.json and its safetensors (``half``: float16
    weights, as shipped)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expert.config.save(folder / CONFIG_FILE)
    save_weights(expert, folder / WEIGHTS_FILE, {"kind": "sync_expert"}, half)
    return folder


def load_sync_expert(name_or_path: str | Path) -> SyncExpert:
    """The sync expert of a model folder (by path, or by name among the shipped models),
    in eval mode, its weights frozen."""
    folder = resolve_model_folder(name_or_path)
    expert = SyncExpert(SyncExpertConfig.load(folder / CONFIG_FILE))
    load_weights(expert, folder / WEIGHTS_FILE)
    return expert.eval().requires_grad_(False)
