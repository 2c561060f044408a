"""Landmark sketches: the target jaw and lips drawn as soft lines, a spatial hint for the denoiser.

TalkFormer reads the landmarks as 131 tokens through cross-attention, which a small model on a
CPU budget learns slowly: measured, the first shipped model left the generated mouth loosely
tied to its target points. A sketch (one channel each for the jaw line, the outer and the
inner lip) is pixel-aligned with the latent, so a few convolutions map it straight onto the
features (ControlNet-style); its encoder ends in a zero convolution, so adding it to a trained
denoiser starts from that denoiser's function.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dubtool.face.indices import JAW, LIPS_INNER, LIPS_OUTER, ORDER
from dubtool.nets.talkformer import zero_module


def _segments(mesh_ids: tuple[int, ...], closed: bool) -> np.ndarray:
    """(S, 2) pairs of indices into the 131 ordered points, one per line segment."""
    ids = [ORDER.index(i) for i in mesh_ids]
    ends = ids[1:] + ids[:1] if closed else ids[1:]
    return np.array(list(zip(ids, ends, strict=False)), np.int64)


# Channel per line: the jaw is open, the lips are closed loops.
SKETCH_LINES = (_segments(JAW, False), _segments(LIPS_OUTER, True),
                _segments(LIPS_INNER, True))


def sketch(points: torch.Tensor, size: int, width: float = 1.0) -> torch.Tensor:
    """Soft line drawing of the jaw, outer lip and inner lip.

    points (N, 131, 2) in crop units ([0, 1] inside the crop, x then y) -> (N, 3, size, size)
    in [0, 1]: exp(-d^2 / 2 width^2) of each pixel centre's distance d (pixels) to the nearest
    segment of the channel's line.
    """
    centres = (torch.arange(size, device=points.device, dtype=points.dtype) + 0.5) / size
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
    channels = []
    for pairs in SKETCH_LINES:
        index = torch.from_numpy(pairs).to(points.device)
        start, end = points[:, index[:, 0]], points[:, index[:, 1]]       # (N, S, 2)
        direction = end - start
        length2 = (direction ** 2).sum(-1).clamp_min(1e-12)                # (N, S)
        offset = grid[None, :, None, :] - start[:, None]                   # (N, P, S, 2)
        along = ((offset * direction[:, None]).sum(-1) / length2[:, None]).clamp(0, 1)
        nearest = offset - along[..., None] * direction[:, None]
        distance2 = (nearest ** 2).sum(-1).amin(dim=-1) * size ** 2        # (N, P) in pixels^2
        channels.append(torch.exp(-distance2 / (2 * width ** 2)).reshape(-1, size, size))
    return torch.stack(channels, dim=1)


class SketchEncoder(nn.Module):
    """(N, 3, S, S) sketch -> (N, channels, S/scale, S/scale) features added to the denoiser's
    first layer; stride-2 convolutions bring the sketch grid (``scale`` pixels per latent cell,
    a power of two) down to the latent grid."""

    def __init__(self, scale: int, channels: int) -> None:
        super().__init__()
        halvings = round(math.log2(scale))
        layers: list[nn.Module] = [nn.Conv2d(len(SKETCH_LINES), 32, 3, padding=1), nn.SiLU()]
        for _ in range(halvings):
            layers += [nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(32, channels, 3, padding=1)))
        self.layers = nn.Sequential(*layers)

    def forward(self, drawing: torch.Tensor) -> torch.Tensor:
        return self.layers(drawing)
