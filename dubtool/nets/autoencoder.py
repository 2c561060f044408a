"""KL autoencoder of face crops (diffusers' AutoencoderKL), 4x smaller sides in the latent."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import nn

from dubtool.nets.config import AutoencoderConfig


class FaceAutoencoder(nn.Module):
    """Images in [-1, 1], (B, 3, S, S) <-> scaled latents (B, C, S/f, S/f)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        blocks = len(config.channels)
        self.vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=tuple(config.channels),
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_groups,
            sample_size=config.image_size,
            scaling_factor=config.scaling_factor,
            # Self-attention over every latent pixel costs much and gives little on crops.
            mid_block_add_attention=False,
        )

    def encode_distribution(self, images: torch.Tensor):
        """The posterior (DiagonalGaussianDistribution) of unscaled latents."""
        return self.vae.encode(images).latent_dist

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: the posterior's mean, or a sample of it."""
        dist = self.encode_distribution(images)
        latents = dist.sample(generator) if sample else dist.mode()
        return latents * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.config.scaling_factor).sample

    def forward(self, images: torch.Tensor,
                generator: torch.Generator | list[torch.Generator] | None = None):
        """Reconstruction and posterior for training: (B, 3, S, S) -> (images, dist); a list of
        generators: one per image, for its posterior sample."""
        dist = self.encode_distribution(images)
        return self.vae.decode(dist.sample(generator)).sample, dist
