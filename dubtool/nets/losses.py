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
    that a mouth hedging between open and closed (what L1 alone rewards) costs. correlation:
    1 - the Pearson correlation over time of each predicted and real vertical lip gap, over
    the windows whose real gap moves (std > 0.002 of the crop): when the mouth opens, whatever
    its size, which is what lip sync is judged by.
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
        correlation = _uncorrelation(predicted_gaps[..., 1], target_gaps[..., 1])
    else:
        velocity = spread = correlation = torch.zeros_like(l1)
    total = (l1 + config.opening_weight * opening + config.velocity_weight * velocity
             + config.spread_weight * spread + config.correlation_weight * correlation)
    return {"total": total, "l1": l1, "opening": opening, "velocity": velocity,
            "spread": spread, "correlation": correlation}


def _uncorrelation(predicted: torch.Tensor, target: torch.Tensor,
                   moving: float = 0.002) -> torch.Tensor:
    """Mean of 1 - Pearson r over time (dim 1) of (B, L, K) series, over the series whose
    target's std exceeds ``moving``; 0 when none does."""
    p = predicted - predicted.mean(dim=1, keepdim=True)
    t = target - target.mean(dim=1, keepdim=True)
    r = (p * t).sum(dim=1) / (p.norm(dim=1) * t.norm(dim=1) + 1e-8)
    keep = target.std(dim=1) > moving
    return (1 - r[keep]).mean() if keep.any() else torch.zeros((), device=r.device)
