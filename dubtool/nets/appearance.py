"""Reference appearance encoder (paper III-C.2): the denoiser's encoder structure without
attention, turning the reference face's latent into features at every scale."""

from __future__ import annotations

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from dubtool.nets.config import DenoiserConfig


class EncoderStages(nn.Module):
    """ResNet blocks per scale with a 2x downsampling between scales: the part of the U-Net
    encoder that the denoiser and the appearance encoder share in structure."""

    def __init__(self, config: DenoiserConfig, temb_channels: int | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        previous = config.channels[0]
        for i, channels in enumerate(config.channels):
            self.blocks.append(nn.ModuleList(
                ResnetBlock2D(in_channels=previous if j == 0 else channels,
                              out_channels=channels, temb_channels=temb_channels,
                              groups=config.norm_groups)
                for j in range(config.layers_per_scale)))
            previous = channels
            last = i == len(config.channels) - 1
            self.downsamplers.append(nn.Identity() if last else
                                     nn.Conv2d(channels, channels, 3, stride=2, padding=1))


class AppearanceEncoder(nn.Module):
    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(config.latent_channels, config.channels[0], 3, padding=1)
        self.stages = EncoderStages(config, temb_channels=None)

    def forward(self, latent: torch.Tensor) -> list[torch.Tensor]:
        """Reference latent (B, C, h, w) -> one feature map per scale, (B, C_i, h/2^i, w/2^i)."""
        hidden = self.conv_in(latent)
        features = []
        for blocks, down in zip(self.stages.blocks, self.stages.downsamplers, strict=True):
            for block in blocks:
                hidden = block(hidden, None)
            features.append(hidden)
            hidden = down(hidden)
        return features
