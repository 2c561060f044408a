"""The jointly trained dubbing model: landmark completion + appearance encoder + denoiser.

The autoencoder is trained before it and frozen; it is kept apart (``FaceAutoencoder``).
"""

from __future__ import annotations

import torch
from torch import nn

from dubtool.face.indices import POSE_SLICE
from dubtool.nets.appearance import AppearanceEncoder
from dubtool.nets.completions import CompletionNet, build_completion
from dubtool.nets.config import ModelConfig
from dubtool.nets.denoiser import Conditioning, Denoiser


def complete_landmarks(completion: CompletionNet, points: torch.Tensor,
                       references: torch.Tensor, speech: torch.Tensor) -> torch.Tensor:
    """Target full-face landmarks: the frames' pose points with lip/jaw from the speech.

    points (B, L, 131, 2) (only the pose part is read), references (B, N, 131, 2),
    speech (B, L, C, W) the frames' windows of speech features -> (B, L, 131, 2).
    """
    pose = points[:, :, POSE_SLICE]
    return torch.cat([pose, completion(pose, references, speech)], dim=2)


class DubbingModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.completion = build_completion(config.completion)
        self.appearance = AppearanceEncoder(config.denoiser)
        self.denoiser = Denoiser(config.denoiser)

    def conditioning(self, landmarks: torch.Tensor, reference_latent: torch.Tensor,
                     motion_latents: torch.Tensor | None = None) -> Conditioning:
        """landmarks (B, L, 131, 2); reference_latent (B, C, h, w); motion_latents
        (B, M, C, h, w) or None -> the denoiser's Conditioning for B*L frames."""
        frames = landmarks.shape[1]
        reference = [f.repeat_interleave(frames, dim=0)
                     for f in self.appearance(reference_latent)]
        motion = None
        if motion_latents is not None and motion_latents.shape[1] > 0:
            motion = self.appearance(motion_latents.flatten(0, 1))
        return Conditioning(landmarks.flatten(0, 1), reference, frames, motion)
