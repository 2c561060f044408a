"""Diffusion schedule, lower-half mask, and DDIM inpainting of the lower half of a latent."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise

import torch
from diffusers import DDIMScheduler, SchedulerMixin
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from dubtool.face.mask import DIFFUSED_TOP
from dubtool.nets.config import DiffusionConfig
from dubtool.nets.denoiser import Conditioning, Denoiser


class ListedDDIMScheduler(DDIMScheduler):
    """diffusers' DDIM over any decreasing list of times (``set_timesteps(timesteps=...)``),
    not only the ones its ``set_timesteps`` spaces evenly from T down.

    diffusers (0.42) has no custom times for DDIM: its ``step`` takes the previous time to be
    ``timestep - T // num_inference_steps``. ``step`` here sets ``num_inference_steps`` for
    the one step to T / gap, as an exact fraction (an integer often has no such value: T = 1000,
    gap 249), so that the previous time is the list's next one, or -1 after its last (the
    final alpha), and the update itself is diffusers' own.
    """

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """diffusers' evenly spaced times, or ``timesteps`` (decreasing, >= 0) as given."""
        if timesteps is None:
            super().set_timesteps(num_inference_steps, device)
            return
        if any(a <= b for a, b in pairwise(timesteps)) or timesteps[-1] < 0:
            raise ValueError(f"timesteps must decrease to >= 0: {list(timesteps)}")
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)
        self.num_inference_steps = len(timesteps)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The time after ``timestep`` in ``timesteps``; -1 after the last."""
        later = self.timesteps[self.timesteps < int(timestep)]
        return int(later[0]) if len(later) else -1

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor,
             sample: torch.Tensor, *args, **kwargs) -> DDIMSchedulerOutput | tuple:
        """diffusers' DDIM step (same arguments; ``sample`` (B, C, h, w)) from ``timestep``
        to the next time in ``timesteps``."""
        steps = self.num_inference_steps
        gap = int(timestep) - self.previous_timestep(timestep)
        self.num_inference_steps = Fraction(self.config.num_train_timesteps, gap)
        try:
            return super().step(model_output, int(timestep), sample, *args, **kwargs)
        finally:
            self.num_inference_steps = steps


def make_scheduler(config: DiffusionConfig) -> ListedDDIMScheduler:
    """The DDIM schedule of ``config``; sampling sets its times (``sampling_timesteps``)."""
    return ListedDDIMScheduler(num_train_timesteps=config.train_steps,
                               beta_start=config.beta_start, beta_end=config.beta_end,
                               beta_schedule=config.beta_schedule, clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def lower_half_mask(size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1, size, size): 1 on the lower half of the rows (diffused), 0 on the upper half."""
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[:, :, int(DIFFUSED_TOP * size):] = 1.0
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
                       scheduler: SchedulerMixin, steps: int, eta: float = 0.0,
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
    depend on the batch it is in. ``scheduler``: one whose ``set_timesteps`` takes a list
    of ``timesteps`` (``make_scheduler``'s); it is left set to this call's times.
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
    # The scheduler's own times would be evenly spaced from T; strength starts at S x T.
    scheduler.set_timesteps(device=known.device, timesteps=sampling_timesteps(
        scheduler.config.num_train_timesteps, steps, strength))
    if strength < 1.0:
        if init is None:
            raise ValueError("strength < 1 needs an init latent")
        start = scheduler.timesteps[:1].expand(known.shape[0])
        latent = scheduler.add_noise(init.expand_as(known), noise, start) * mask + masked
    else:
        latent = noise * scheduler.init_noise_sigma * mask + masked

    batch_mask = mask.expand(known.shape[0], -1, -1, -1)
    for t in scheduler.timesteps:
        eps = denoiser(scheduler.scale_model_input(latent, t), masked, batch_mask,
                       t.expand(known.shape[0]), cond).float()
        # eta > 0 (DDIM's own option): the step's noise drawn here, from the chunks' own
        # generators, not by diffusers from one generator for the whole batch.
        noisy = ({"eta": eta, "variance_noise": _noise(known.shape, generators).to(known.device)}
                 if eta > 0 else {})
        with torch.autocast(known.device.type, enabled=False):
            latent = scheduler.step(eps, t, latent, **noisy).prev_sample * mask + masked
    return latent
