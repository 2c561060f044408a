"""TalkFormer (paper III-C) and the blocks it is made of.

A TalkFormer block follows the ResNet blocks of a denoiser scale:
  1. motion alignment: cross-attention from the hidden features to the 131 landmark embeddings;
  2. reference alignment (implicit warping): cross-attention from the hidden features to the
     same-scale features of the reference face from the appearance encoder;
  3. optionally, temporal self-attention across the L frames of a sample (plus the features of
     motion frames from the previous chunk as extra keys/values).
Every branch ends in a zero-initialised projection added residually, so a fresh block is the
identity and training starts from a plain U-Net.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LandmarkEmbedding(nn.Module):
    """1D convolution along the ordered landmarks: (B, 131, 2) -> (B, 131, dim) key/value tokens.

    A learned per-point embedding is added so attention knows which point each token is.
    """

    def __init__(self, points: int, dim: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(2, dim, 3, padding=1), nn.SiLU(),
                                   nn.Conv1d(dim, dim, 3, padding=1))
        self.point = nn.Parameter(torch.randn(points, dim) * 0.02)

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        tokens = self.convs((landmarks - 0.5).transpose(1, 2)).transpose(1, 2)
        return tokens + self.point


class CrossAttention2d(nn.Module):
    """Queries from a feature map, keys/values from a token sequence; zero-initialised output."""

    def __init__(self, channels: int, context_dim: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.attn = Attention(query_dim=channels, cross_attention_dim=context_dim,
                              heads=channels // head_dim, dim_head=head_dim)
        self.out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = hidden.shape
        queries = self.norm(hidden).flatten(2).transpose(1, 2)  # (B, HW, C)
        attended = self.attn(queries, encoder_hidden_states=context)
        return hidden + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


class TemporalAttention(nn.Module):
    """Self-attention along time at every spatial position, over the L frames of a sample;
    features of earlier (motion) frames, when given, join as extra keys and values."""

    def __init__(self, channels: int, head_dim: int, groups: int, motion_slots: int = 2,
                 max_frames: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        # Positions 0..motion_slots-1 belong to motion frames, the sample's frames follow.
        self.motion_slots = motion_slots
        self.position = nn.Parameter(torch.randn(motion_slots + max_frames, channels) * 0.02)
        self.attn = Attention(query_dim=channels, heads=channels // head_dim, dim_head=head_dim)
        self.out = zero_module(nn.Linear(channels, channels))

    def forward(self, hidden: torch.Tensor, frames: int,
                motion: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B*L, C, H, W); motion (B*M, C, H, W) or None."""
        bl, c, h, w = hidden.shape
        b = bl // frames

        def tokens(x: torch.Tensor, count: int) -> torch.Tensor:  # -> (B*H*W, count, C)
            x = self.norm(x).view(b, count, c, h * w)
            return x.permute(0, 3, 1, 2).reshape(b * h * w, count, c)

        start = self.motion_slots
        queries = tokens(hidden, frames) + self.position[start:start + frames]
        context = queries
        if motion is not None:
            m = motion.shape[0] // b
            if m > start:
                raise ValueError(f"{m} motion frames given, the block has {start} slots")
            context = torch.cat([tokens(motion, m) + self.position[start - m:start], queries], 1)
        attended = self.out(self.attn(queries, encoder_hidden_states=context))
        attended = attended.view(b, h * w, frames, c).permute(0, 2, 3, 1).reshape(bl, c, h, w)
        return hidden + attended


class TalkFormer(nn.Module):
    def __init__(self, channels: int, landmark_dim: int, head_dim: int, groups: int,
                 temporal: bool, motion_slots: int = 2) -> None:
        super().__init__()
        self.motion_alignment = CrossAttention2d(channels, landmark_dim, head_dim, groups)
        self.reference_alignment = CrossAttention2d(channels, channels, head_dim, groups)
        self.temporal = (TemporalAttention(channels, head_dim, groups, motion_slots)
                         if temporal else None)

    def forward(self, hidden: torch.Tensor, landmarks: torch.Tensor, reference: torch.Tensor,
                frames: int, motion: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B*L, C, H, W); landmarks (B*L, 131, D) embeddings; reference (B*L, C, H, W)
        appearance features of the same scale; motion (B*M, C, H, W) or None."""
        hidden = self.motion_alignment(hidden, landmarks)
        hidden = self.reference_alignment(hidden, reference.flatten(2).transpose(1, 2))
        if self.temporal is not None:
            hidden = self.temporal(hidden, frames, motion)
        return hidden
