"""The denoiser U-Net: lower-half inpainting in latent space, conditioned through TalkFormer.

Input: the noisy latent, the masked latent of the frame (upper half kept, lower half zeroed)
and the mask, stacked on channels; optionally (``sketch_scale``) a drawing of the target jaw
and lips, encoded and added to the first layer's features. Each scale has ResNet blocks;
scales 2..I (and the middle) add a TalkFormer block that attends to the target landmarks and
to the reference features of that scale. Output: the predicted noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from dubtool.nets.appearance import EncoderStages
from dubtool.nets.config import DenoiserConfig
from dubtool.nets.sketch import SketchEncoder, sketch
from dubtool.nets.talkformer import LandmarkEmbedding, TalkFormer


@dataclass
class Conditioning:
    """What a denoiser call is conditioned on, for a batch of B samples of L frames.

    landmarks  (B*L, 131, 2) target full-face points, normalised to the crop
    reference  per scale (B*L, C_i, H_i, W_i) appearance features of the reference face
    frames     L, the frames per sample (temporal attention runs across them)
    motion     per scale (B*M, C_i, H_i, W_i) features of the M frames before, or None
    """

    landmarks: torch.Tensor
    reference: list[torch.Tensor]
    frames: int
    motion: list[torch.Tensor] | None = None
    _sketches: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def sketch(self, size: int) -> torch.Tensor:
        """(B*L, 3, size, size) drawing of the target jaw and lips, drawn once and reused by
        every denoising step."""
        if size not in self._sketches:
            self._sketches[size] = sketch(self.landmarks.float(), size)
        return self._sketches[size]


class Denoiser(nn.Module):
    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        groups, head = config.norm_groups, config.head_dim
        temb = ch[0] * 4

        def talkformer(c: int) -> TalkFormer:
            return TalkFormer(c, config.landmark_dim, head, groups, config.temporal_attention,
                              config.motion_frames)

        def resblock(cin: int, cout: int) -> ResnetBlock2D:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb,
                                 groups=groups)

        self.conv_in = nn.Conv2d(2 * config.latent_channels + 1, ch[0], 3, padding=1)
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(ch[0], temb)
        self.landmark_embed = LandmarkEmbedding(config.landmark_points, config.landmark_dim)
        self.sketch = (SketchEncoder(config.sketch_scale, ch[0]) if config.sketch_scale
                       else None)
        self.down = EncoderStages(config, temb)
        # Scale 1 has ResNet blocks only (paper III-C): its TalkFormer slot is empty.
        self.down_talk = nn.ModuleList(talkformer(c) if i else nn.Identity()
                                       for i, c in enumerate(ch))
        self.mid_in = resblock(ch[-1], ch[-1])
        self.mid_talk = talkformer(ch[-1])
        self.mid_out = resblock(ch[-1], ch[-1])
        self.up_blocks = nn.ModuleList()
        self.up_talk = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(len(ch))):
            self.up_blocks.append(nn.ModuleList(
                resblock(2 * ch[i] if j == 0 else ch[i], ch[i])
                for j in range(config.layers_per_scale)))
            self.up_talk.append(talkformer(ch[i]) if i else nn.Identity())
            self.upsamplers.append(nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                                 nn.Conv2d(ch[i], ch[i - 1], 3, padding=1))
                                   if i else nn.Identity())
        self.norm_out = nn.GroupNorm(groups, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], config.latent_channels, 3, padding=1)

    def forward(self, noisy: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor,
                timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """noisy, masked (B*L, C, h, w); mask (B*L, 1, h, w), 1 where diffused; timesteps
        (B*L,) -> predicted noise (B*L, C, h, w)."""
        temb = self.time_embed(self.time_proj(timesteps).to(noisy.dtype))
        landmarks = self.landmark_embed(cond.landmarks.to(noisy.dtype))
        motion = cond.motion or [None] * len(cond.reference)
        hidden = self.conv_in(torch.cat([noisy, masked, mask], dim=1))
        if self.sketch is not None:
            drawing = cond.sketch(noisy.shape[-1] * self.config.sketch_scale)
            hidden = hidden + self.sketch(drawing.to(hidden.dtype))
        skips = []
        for i, (blocks, talk, down) in enumerate(zip(self.down.blocks, self.down_talk,
                                                     self.down.downsamplers, strict=True)):
            for block in blocks:
                hidden = block(hidden, temb)
            if i:
                hidden = talk(hidden, landmarks, cond.reference[i], cond.frames, motion[i])
            skips.append(hidden)
            hidden = down(hidden)
        hidden = self.mid_in(hidden, temb)
        hidden = self.mid_talk(hidden, landmarks, cond.reference[-1], cond.frames, motion[-1])
        hidden = self.mid_out(hidden, temb)
        for blocks, talk, up in zip(self.up_blocks, self.up_talk, self.upsamplers, strict=True):
            i = len(skips) - 1
            hidden = torch.cat([hidden, skips.pop()], dim=1)
            for block in blocks:
                hidden = block(hidden, temb)
            if i:
                hidden = talk(hidden, landmarks, cond.reference[i], cond.frames, motion[i])
            hidden = up(hidden)
        return self.conv_out(nn.functional.silu(self.norm_out(hidden)))
