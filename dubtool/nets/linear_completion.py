"""Linear landmark completion: lip and jaw landmarks as a ridge regression of the speech.

The transformer completion (``landmark_completion``) memorises its fifty training people: on
their own clips its lips follow the speech at r = 0.92, on people it never saw at 0.51. A
linear map of the same speech encoder states, fitted in closed form with a strong ridge
penalty, follows the unseen people better (0.62 on the same frames and references): the
encoder already hears the words and not the voice, and a linear read-out of it cannot learn
fifty voices by heart.

Each frame's lip/jaw points are the references' mean lip/jaw shape plus two linear terms:
one of the frame's window of speech features (averaged over runs of
``CompletionConfig.speech_pool`` steps and standardised), one of how the frame's pose points
lie from the references' mean pose (a turned head moves the mouth in the crop). With
``CompletionConfig.references`` in the tens, the references' mean is the person's mean
mouth. Fitting is a linear solve (``fit``), so adapting to a video is one solve too, pulled
towards the trained weights (``prior``) instead of tens of gradient steps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dubtool.face.indices import CONTENT_SLICE, POSE_SLICE
from dubtool.nets.config import CompletionConfig

# The offsets are fitted in hundredths of the crop: half-precision weights keep their digits.
OFFSET_UNIT = 0.01


class LinearCompletion(nn.Module):
    def __init__(self, config: CompletionConfig) -> None:
        super().__init__()
        self.config = config
        pooled = config.speech_channels * (config.speech_window // config.speech_pool)
        outputs = config.content_points * 2
        self.register_buffer("speech_mean", torch.zeros(pooled))
        self.register_buffer("speech_scale", torch.ones(pooled))
        self.speech = nn.Linear(pooled, outputs)
        self.pose = nn.Linear(config.pose_points * 2, outputs, bias=False)
        for weight in (self.speech.weight, self.speech.bias, self.pose.weight):
            nn.init.zeros_(weight)  # untrained: the references' mouth

    def pooled_speech(self, speech: torch.Tensor) -> torch.Tensor:
        """(..., C, W) windows of speech features -> (..., C * W / pool), each channel averaged
        over runs of ``speech_pool`` steps (not standardised)."""
        pool = self.config.speech_pool
        shape = speech.shape
        runs = speech.reshape(*shape[:-1], shape[-1] // pool, pool).mean(-1)
        return runs.flatten(-2)

    def standardised(self, pooled: torch.Tensor) -> torch.Tensor:
        """(..., Ds) pooled speech -> the same, standardised as fitted."""
        return (pooled - self.speech_mean) / self.speech_scale

    def _offsets(self, heard: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
        """(..., Ds) standardised speech, (..., 148) moved pose -> (..., 114) lip/jaw offsets
        in crop units."""
        return (self.speech(heard) + self.pose(moved)) * OFFSET_UNIT

    def forward(self, pose: torch.Tensor, references: torch.Tensor,
                speech: torch.Tensor) -> torch.Tensor:
        """Lip and jaw points of L frames: pose (B, L, 74, 2), references (B, N, 131, 2),
        speech (B, L, speech_channels, speech_window) -> (B, L, 57, 2), as
        ``LandmarkCompletion``: the references' mean lip/jaw plus the offsets of the
        standardised pooled speech and of the pose's offset from the references' mean pose."""
        reference_pose = references[:, :, POSE_SLICE].mean(dim=1, keepdim=True)
        offsets = self._offsets(self.standardised(self.pooled_speech(speech)),
                                (pose - reference_pose).flatten(2))
        reference_mouth = references[:, :, CONTENT_SLICE].mean(dim=1, keepdim=True)
        return reference_mouth + offsets.view(*pose.shape[:2], self.config.content_points, 2)

    @torch.no_grad()
    def predicted_offsets(self, speech: np.ndarray, moved: np.ndarray) -> np.ndarray:
        """(R, 57, 2) the lip/jaw offsets from the mean mouth of R rows as ``fit`` takes
        them."""
        heard = self.standardised(torch.from_numpy(speech)).float()
        offsets = self._offsets(heard, torch.from_numpy(moved).float())
        return offsets.view(len(speech), -1, 2).numpy()

    @torch.no_grad()
    def fit(self, speech: np.ndarray, moved: np.ndarray, offsets: np.ndarray,
            weights: np.ndarray, speech_ridge: float, pose_ridge: float,
            prior: bool = False) -> None:
        """Set the weights by weighted ridge regression over R frames.

        speech (R, Ds): pooled speech (``pooled_speech``); moved (R, 148): the pose's offset
        from the person's mean pose; offsets (R, 57, 2): the lip/jaw points' offset from the
        person's mean lip/jaw; weights (R,) > 0. The penalties are per unit of weight (the
        same fit on twice the frames is penalised twice as much). Without ``prior`` the
        standardisation is measured on these frames and the weights pulled towards 0; with it
        the standardisation is kept and the weights pulled towards their present values (a
        fine-tuning: the person's own frames move a trained map only as far as they show)."""
        weights = np.asarray(weights, np.float64)
        if not prior:
            mean = np.average(speech, axis=0, weights=weights)
            scale = np.sqrt(np.average((speech - mean) ** 2, axis=0, weights=weights)) + 1e-6
            self.speech_mean.copy_(torch.from_numpy(mean))
            self.speech_scale.copy_(torch.from_numpy(scale))
        heard = self.standardised(torch.from_numpy(speech).double()).numpy()
        design = np.concatenate([heard, moved], axis=1)
        target = offsets.reshape(len(offsets), -1) / OFFSET_UNIT
        current = np.concatenate([self.speech.weight.double().numpy(),
                                  self.pose.weight.double().numpy()], axis=1).T  # (D, 114)
        bias = self.speech.bias.double().numpy()
        if prior:
            target = target - design @ current - bias
        # Centred on the weighted means, the bias is not penalised.
        total = weights.sum()
        design_mean = weights @ design / total
        target_mean = weights @ target / total
        centred = design - design_mean
        gram = (centred * weights[:, None]).T @ centred
        # The penalty added on the diagonal in place: a diagonal matrix of 2,452 would be
        # 48 MB to build (0.1 s of a 1 s adaptation).
        gram[np.diag_indices_from(gram)] += np.concatenate(
            [np.full(heard.shape[1], speech_ridge), np.full(moved.shape[1], pose_ridge)]) * total
        solution = np.linalg.solve(gram, (centred * weights[:, None]).T @ (target - target_mean))
        new_bias = target_mean - design_mean @ solution
        if prior:
            solution, new_bias = current + solution, bias + new_bias
        split = heard.shape[1]
        self.speech.weight.copy_(torch.from_numpy(solution[:split].T))
        self.pose.weight.copy_(torch.from_numpy(solution[split:].T))
        self.speech.bias.copy_(torch.from_numpy(new_bias))
