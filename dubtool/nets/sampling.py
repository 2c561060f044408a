"""Diffusion schedule, lower-half mask, and DDIM inpainting of the lower half of a latent."""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def start_timestep(strength: float, train_steps: int) -> int:
    """The diffusion time that sampling at ``strength`` S starts from, and that ``train
    --refine S`` trains up to: the one nearest S x T (at least 1, at most T - 1)."""
    return min(train_steps - 1, max(1, round(strength * train_steps)))


def sampling_timesteps(train_steps: int, steps: int, strength: float = 1.0) -> list[int]:
    """The times the denoiser runs at, highest first.

    ``steps`` DDIM steps would cover the whole schedule; strength S starts at the time
    nearest S x T, whatever ``steps``, and covers the rest of the way to 0 in
    max(1, round(steps x S)) evenly spaced steps.
    """
    strength = min(strength, 1.0)
    start = start_timestep(strength, train_steps)
    count = max(1, round(steps * strength))
    times = {round(start * (count - i) / count) for i in range(count)}
    return sorted((t for t in times if t >= 1), reverse=True)


def _ddim_step(scheduler: DDIMScheduler, eps: torch.Tensor, t: int, prev: int | None,
               latent: torch.Tensor, eta: float,
               draw_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One DDIM step (Song et al., eq. 12) from time ``t`` to ``prev`` (None: the end).

    diffusers' own step assumes the times are evenly spaced from T down; a partial schedule
    that starts at S x T is not, so the step is taken here, by the same formula.
    """
    alphas = scheduler.alphas_cumprod
    a_t = float(alphas[t])
    a_prev = float(alphas[prev] if prev is not None else scheduler.final_alpha_cumprod)
    clean = (latent - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    latent = a_prev ** 0.5 * clean + (1 - a_prev - std ** 2) ** 0.5 * eps
    return latent + std * draw_noise() if eta > 0 else latent


def _noise(shape: torch.Size, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of ``shape`` (float32), its rows shared out evenly among the
    generators in order, so that each part's noise comes from its own generator alone (the
    global generator without any)."""
    if not generators:
        return torch.randn(shape)
    rows = shape[0] // len(generators)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g, device=g.device).cpu()
                      for g in generators])


@torch.inference_mode()
def inpaint_lower_half(denoiser: Denoiser, known: torch.Tensor, cond: Conditioning,
                       scheduler: DDIMScheduler, steps: int, eta: float = 0.0,
                       generator: torch.Generator | Sequence[torch.Generator] | None = None,
                       init: torch.Tensor | None = None,
                       strength: float = 1.0) -> torch.Tensor:
    """Generate the lower half of ``known`` (B*L, C, h, w) by DDIM; float32, whatever the
    type of ``known`` or the autocast the call is made in (which the denoiser runs under).

    Only the lower half is diffused: after every step the upper half is reset to the known
    latent, so the result's upper half equals the input's exactly. The same generator seed
    gives the same result. ``steps`` is the number of DDIM steps over the whole schedule
    (strength 1: from pure noise). With ``strength`` S < 1 the lower half starts from
    ``init`` (e.g. the reference face warped to the target landmarks) noised to the time
    nearest S x T, and about S x ``steps`` steps run from there (``sampling_timesteps``): the
    image-to-image trade of fidelity to the conditioning for stability, useful while a model
    is weak at the highest noise levels. ``generator`` may be a list: the batch is then
    that many equal parts (chunks), and each part's starting noise and, with ``eta`` > 0,
    its noise at every step come from its own generator, so that a chunk's result does not
    depend on the batch it is in.
    """
    generators = ([] if generator is None else
                  [generator] if isinstance(generator, torch.Generator) else list(generator))
    # The latents and the DDIM update stay in float32 whatever the autocast around (as in
    # diffusers' pipelines): only the denoiser runs in the lower precision. In bfloat16 (8
    # bits of mantissa) each step's update would be rounded into the latent, 50 times over.
    known = known.float()
    init = None if init is None else init.float()
    mask = lower_half_mask(known.shape[-1], known.device)
    masked = known * (1 - mask)
    noise = _noise(known.shape, generators).to(known.device)
    timesteps = sampling_timesteps(scheduler.config.num_train_timesteps, steps, strength)
    if strength < 1.0:
        if init is None:
            raise ValueError("strength < 1 needs an init latent")
        start = torch.full((known.shape[0],), timesteps[0], dtype=torch.long)
        latent = scheduler.add_noise(init.expand_as(known), noise, start) * mask + masked
    else:
        latent = noise * mask + masked

    def draw_noise() -> torch.Tensor:
        return _noise(known.shape, generators).to(known.device)

    batch_mask = mask.expand(known.shape[0], -1, -1, -1)
    for i, t in enumerate(timesteps):
        times = torch.full((known.shape[0],), t, dtype=torch.long, device=known.device)
        eps = denoiser(latent, masked, batch_mask, times, cond).float()
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        with torch.autocast(known.device.type, enabled=False):
            latent = _ddim_step(scheduler, eps, t, prev, latent, eta, draw_noise)
            latent = latent * mask + masked
    return latent
