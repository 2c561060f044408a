"""Audio-driven landmark completion (paper III-B): speech + pose -> lip and jaw landmarks.

For each of L successive frames the transformer sees one frame token: the frame's window of
speech features (1D convolutions along time, the features as channels: the log-mel or the
speech encoder's states, ``CompletionConfig.speech_features``) plus its 74 pose points (an MLP),
plus a sinusoidal position. N reference tokens (full-face landmark sets from other frames of
the same video, 1D convolutions along the ordered point set) tell it the speaker's mouth.
Each frame's lip/jaw points are read from its token, as an offset from the mean lip/jaw shape
of the references. L can be any length: the network is trained on windows of
``CompletionConfig.window`` frames (about a second) so that it hears the words around a frame.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dubtool.face.indices import CONTENT_SLICE
from dubtool.nets.config import CompletionConfig


def sinusoidal_positions(count: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(count, dim) sinusoidal position embeddings."""
    position = torch.arange(count, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    table = torch.zeros(count, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


def _reduced(length: int, halvings: int) -> int:
    for _ in range(halvings):
        length = math.ceil(length / 2)
    return length


class PointSetEmbedding(nn.Module):
    """1D convolutions along an ordered point set: (B, P, 2) -> one token (B, d)."""

    def __init__(self, points: int, d_model: int, width: int = 64) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(2, width, 3, padding=1), nn.SiLU(),
            nn.Conv1d(width, width * 2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(width * 2, width * 2, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.proj = nn.Linear(width * 2 * _reduced(points, 2), d_model)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        # Centre on 0.5: crop-normalised coordinates live in [0, 1].
        features = self.convs((points - 0.5).transpose(1, 2))
        return self.proj(features.flatten(1))


class PoseEmbedding(nn.Module):
    """An MLP over one frame's pose points: (B, P, 2) -> one token (B, d). Cheaper than
    convolutions for the B x L point sets of every step, and the pose only has to say how the
    head is turned and where the face sits in the crop."""

    def __init__(self, points: int, d_model: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(points * 2, d_model), nn.SiLU(),
                                 nn.Linear(d_model, d_model))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.mlp((points - 0.5).flatten(1))


class SpeechEmbedding(nn.Module):
    """1D convolutions along time over one frame's window of speech features (the mel's bins
    or the speech encoder's states as channels): (B, channels, window) -> one token (B, d).
    Flattened, not pooled: where in the window a sound falls is when the mouth moves.

    ``reduce`` > 0: the features are first taken to that many channels at half the rate (a
    convolution of 2 steps, stride 2): the encoder's 384 states every 20 ms carry more than a
    25 fps mouth needs, and convolving them whole made the embedding 9 tenths of a training
    step's cost. ``pool`` > 0: no convolutions; the window averaged over runs of ``pool``
    steps, then one linear layer (``CompletionConfig.speech_pool``)."""

    def __init__(self, channels: int, window: int, d_model: int, width: int = 128,
                 reduce: int = 0, pool: int = 0) -> None:
        super().__init__()
        if pool:
            # Linear in the pooled window: what a ridge probe of the states reads.
            self.reduce = nn.AvgPool1d(pool)
            self.convs = nn.Identity()
            self.proj = nn.Linear(channels * (window // pool), d_model)
            return
        self.reduce = (nn.Sequential(nn.Conv1d(channels, reduce, 2, stride=2), nn.SiLU())
                       if reduce else nn.Identity())
        if reduce:
            channels, window = reduce, window // 2
        self.convs = nn.Sequential(
            nn.Conv1d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.proj = nn.Linear(width * _reduced(window, 2), d_model)

    def forward(self, speech: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(self.reduce(speech)).flatten(1))


class LandmarkCompletion(nn.Module):
    def __init__(self, config: CompletionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.pose_embed = PoseEmbedding(config.pose_points, d)
        self.reference_embed = PointSetEmbedding(config.pose_points + config.content_points, d)
        self.audio_embed = SpeechEmbedding(config.speech_channels, config.speech_window, d,
                                           reduce=config.speech_reduce, pool=config.speech_pool)
        self.modality = nn.Parameter(torch.randn(2, d) * 0.02)  # frame, reference
        layer = nn.TransformerEncoderLayer(d, config.heads, config.ff_dim, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.content_points * 2))
        # Start from "the references' mouth": the offset head begins at zero.
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, pose: torch.Tensor, references: torch.Tensor,
                speech: torch.Tensor) -> torch.Tensor:
        """Lip and jaw points of L frames.

        pose (B, L, 74, 2), references (B, N, 131, 2), speech (B, L, speech_channels,
        speech_window): each frame's window of the speech features (the per-utterance
        normalised log-mel, ``media.audio.normalise_mel``, or the speech encoder's states)
        -> (B, L, 57, 2); all points normalised to the face crop.
        """
        b, frames = pose.shape[:2]
        n = references.shape[1]
        d = self.config.d_model
        frame_tokens = (self.pose_embed(pose.flatten(0, 1)).view(b, frames, d)
                        + self.audio_embed(speech.flatten(0, 1)).view(b, frames, d)
                        + sinusoidal_positions(frames, d, pose.device) + self.modality[0])
        ref_tokens = self.reference_embed(references.flatten(0, 1)).view(b, n, d) + self.modality[1]
        out = self.encoder(torch.cat([frame_tokens, ref_tokens], dim=1))
        offsets = self.head(out[:, :frames]).view(b, frames, self.config.content_points, 2)
        reference_mouth = references[:, :, CONTENT_SLICE].mean(dim=1, keepdim=True)
        return reference_mouth + offsets
