"""Audio-driven landmark completion (paper III-B): speech + pose -> lip and jaw landmarks.

For each of L successive frames the transformer sees one pose token (the frame's 74 pose points
through a 1D-conv embedding) and one audio token (the frame's mel window through a 2D-conv
embedding), plus N reference tokens (full-face landmark sets from other frames of the same
video, through another 1D-conv embedding). Sinusoidal positions and learnable modality
embeddings tell the tokens apart. Each frame's lip/jaw points are read from its audio and pose
tokens, as an offset from the mean lip/jaw shape of the references.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dubtool.face.indices import CONTENT_SLICE
from dubtool.nets.config import CompletionConfig

# Log-mel dB values are brought near zero mean / unit spread before the convolutions.
MEL_OFFSET_DB = 40.0
MEL_SCALE_DB = 30.0


def sinusoidal_positions(count: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(count, dim) sinusoidal position embeddings."""
    position = torch.arange(count, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    table = torch.zeros(count, dim, device=device)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


class PointSetEmbedding(nn.Module):
    """1D convolutions along an ordered point set: (B, P, 2) -> one token (B, d)."""

    def __init__(self, points: int, d_model: int, width: int = 64) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(2, width, 3, padding=1), nn.SiLU(),
            nn.Conv1d(width, width * 2, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv1d(width * 2, width * 2, 3, stride=2, padding=1), nn.SiLU(),
        )
        reduced = math.ceil(math.ceil(points / 2) / 2)
        self.proj = nn.Linear(width * 2 * reduced, d_model)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        # Centre on 0.5: crop-normalised coordinates live in [0, 1].
        features = self.convs((points - 0.5).transpose(1, 2))
        return self.proj(features.flatten(1))


class MelEmbedding(nn.Module):
    """2D convolutions over one mel window: (B, mel_bins, window) -> one token (B, d)."""

    def __init__(self, d_model: int, width: int = 32) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width * 2, 3, stride=(2, 1), padding=1), nn.SiLU(),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width * 4, d_model, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        mel = (mel + MEL_OFFSET_DB) / MEL_SCALE_DB
        return self.convs(mel[:, None]).flatten(1)


class LandmarkCompletion(nn.Module):
    def __init__(self, config: CompletionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.pose_embed = PointSetEmbedding(config.pose_points, d)
        self.reference_embed = PointSetEmbedding(config.pose_points + config.content_points, d)
        self.audio_embed = MelEmbedding(d)
        self.modality = nn.Parameter(torch.randn(3, d) * 0.02)  # pose, reference, audio
        layer = nn.TransformerEncoderLayer(d, config.heads, config.ff_dim, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, config.content_points * 2))
        # Start from "the references' mouth": the offset head begins at zero.
        nn.init.zeros_(self.head[1].weight)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, pose: torch.Tensor, references: torch.Tensor,
                mel: torch.Tensor) -> torch.Tensor:
        """Lip and jaw points of L frames.

        pose (B, L, 74, 2), references (B, N, 131, 2), mel (B, L, 80, 16) -> (B, L, 57, 2);
        all points normalised to the face crop.
        """
        b, frames = pose.shape[:2]
        n = references.shape[1]
        d = self.config.d_model
        pose_tokens = self.pose_embed(pose.flatten(0, 1)).view(b, frames, d)
        ref_tokens = self.reference_embed(references.flatten(0, 1)).view(b, n, d)
        audio_tokens = self.audio_embed(mel.flatten(0, 1)).view(b, frames, d)
        frame_pos = sinusoidal_positions(frames, d, pose.device)
        pose_tokens = pose_tokens + frame_pos + self.modality[0]
        ref_tokens = ref_tokens + sinusoidal_positions(n, d, pose.device) + self.modality[1]
        audio_tokens = audio_tokens + frame_pos + self.modality[2]
        out = self.encoder(torch.cat([pose_tokens, ref_tokens, audio_tokens], dim=1))
        per_frame = out[:, :frames] + out[:, frames + n:]
        offsets = self.head(per_frame).view(b, frames, self.config.content_points, 2)
        reference_mouth = references[:, :, CONTENT_SLICE].mean(dim=1, keepdim=True)
        return reference_mouth + offsets
