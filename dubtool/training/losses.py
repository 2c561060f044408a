"""The landmark completion's objective, apart from the rest of training: the dub's ``adapt``
stage uses it without importing the image models."""

from __future__ import annotations

import torch

from dubtool.face.indices import LIP_GAP_PAIRS
from dubtool.nets.config import TrainingConfig


def completion_losses(predicted: torch.Tensor, target: torch.Tensor,
                      config: TrainingConfig) -> dict[str, torch.Tensor]:
    """The landmark completion's objective on lip/jaw points (B, L, 57, 2), crop units.

    l1: point L1. opening: L1 of the lip gaps (upper minus lower point of LIP_GAP_PAIRS), so
    that an under-opened mouth costs what it looks like. velocity: L1 of the frame-to-frame
    motion of the points, so that a mouth that moves too little or too late costs too.
    spread: L1 between the predicted and real spread over time (std) of each lip gap, so
    that a mouth hedging between open and closed (what L1 alone rewards) costs.
    total = l1 + the config's weights times the others.
    """
    l1 = (predicted - target).abs().mean()
    upper, lower = (list(side) for side in zip(*LIP_GAP_PAIRS, strict=True))
    predicted_gaps = predicted[:, :, upper] - predicted[:, :, lower]
    target_gaps = target[:, :, upper] - target[:, :, lower]
    opening = (predicted_gaps - target_gaps).abs().mean()
    if predicted.shape[1] > 1:
        velocity = (predicted.diff(dim=1) - target.diff(dim=1)).abs().mean()
        spread = (predicted_gaps.std(dim=1) - target_gaps.std(dim=1)).abs().mean()
    else:
        velocity = spread = torch.zeros_like(l1)
    total = (l1 + config.opening_weight * opening + config.velocity_weight * velocity
             + config.spread_weight * spread)
    return {"total": total, "l1": l1, "opening": opening, "velocity": velocity,
            "spread": spread}
