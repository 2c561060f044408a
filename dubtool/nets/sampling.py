"""Diffusion schedule, lower-half mask, and DDIM inpainting of the lower half of a latent."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from dubtool.nets.config import DiffusionConfig
from dubtool.nets.denoiser import Conditioning, Denoiser


def make_scheduler(config: DiffusionConfig) -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=config.train_steps, beta_start=config.beta_start,
                         beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="epsilon")


def lower_half_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, size, size): 1 on the lower half of the rows (diffused), 0 on the upper half."""
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[:, :, size // 2:] = 1.0
    return mask


@torch.inference_mode()
def inpaint_lower_half(denoiser: Denoiser, known: torch.Tensor, cond: Conditioning,
                       scheduler: DDIMScheduler, steps: int, eta: float = 0.0,
                       generator: torch.Generator | None = None,
                       init: torch.Tensor | None = None, strength: float = 1.0,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """Generate the lower half of ``known`` (B*L, C, h, w) by DDIM in ``steps`` steps.

    Only the lower half is diffused: after every step the upper half is reset to the known
    latent, so the result's upper half equals the input's exactly. The same generator seed
    gives the same result. With ``strength`` < 1 the lower half starts from ``init`` (e.g. the
    reference face warped to the target landmarks) noised to ``strength`` x T and only the
    last part of the schedule runs: the image-to-image trade of fidelity to the conditioning
    for stability, useful while a model is weak at the highest noise levels. ``noise`` (shaped
    like ``known``) replaces the starting noise drawn from ``generator``: batches of chunks
    draw each chunk's own.
    """
    mask = lower_half_mask(known.shape[-1], known.device).to(known.dtype)
    masked = known * (1 - mask)
    if noise is None:
        noise = torch.randn(known.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else "cpu")
    noise = noise.to(known.device, known.dtype)
    scheduler.set_timesteps(steps, device=known.device)
    timesteps = scheduler.timesteps
    if strength < 1.0:
        if init is None:
            raise ValueError("strength < 1 needs an init latent")
        keep = max(1, round(steps * strength))
        timesteps = timesteps[len(timesteps) - keep:]
        start = timesteps[:1].expand(known.shape[0])
        latent = scheduler.add_noise(init.expand_as(known), noise, start) * mask + masked
    else:
        latent = noise * mask + masked
    batch_mask = mask.expand(known.shape[0], -1, -1, -1)
    for t in timesteps:
        eps = denoiser(latent, masked, batch_mask, t.expand(known.shape[0]), cond)
        latent = scheduler.step(eps, t, latent, eta=eta, generator=generator).prev_sample
        latent = latent * mask + masked
    return latent
