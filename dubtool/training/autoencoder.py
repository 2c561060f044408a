"""Training the face-crop autoencoder (first, then frozen for the dubbing model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from dubtool.devices import resolve_device
from dubtool.nets.autoencoder import FaceAutoencoder
from dubtool.nets.config import ModelConfig
from dubtool.nets.io import save_model
from dubtool.training.dataset import PreparedData, autoencoder_batch
from dubtool.training.loop import (
    RunFolder,
    TrainProgress,
    TrainResult,
    TrainState,
    evaluating,
    load_splits,
    optimise,
)


def autoencoder_losses(model: FaceAutoencoder, images: torch.Tensor, kl_weight: float,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """L1 reconstruction + a small KL term keeping the latent close to a unit Gaussian."""
    reconstruction, posterior = model(images, generator)
    l1 = (reconstruction - images).abs().mean()
    kl = posterior.kl().mean() / images[0].numel()
    return {"total": l1 + kl_weight * kl, "l1": l1, "kl": kl}


def _validate(model: FaceAutoencoder, data: PreparedData, device: torch.device,
              batches: int, batch_size: int) -> dict[str, float]:
    rng = np.random.default_rng(1234)  # the same validation crops every time
    totals = {"l1": 0.0, "psnr": 0.0}
    with evaluating(model):
        for _ in range(batches):
            images = torch.from_numpy(autoencoder_batch(data, batch_size, rng, augment=False))
            images = images.to(device)
            reconstruction = model.decode(model.encode(images)).clamp(-1, 1)
            totals["l1"] += (reconstruction - images).abs().mean().item()
            mse = ((reconstruction - images) / 2).pow(2).mean(dim=(1, 2, 3))
            totals["psnr"] += (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()
    return {k: v / batches for k, v in totals.items()}


def latent_scaling(model: FaceAutoencoder, data: PreparedData, device: torch.device,
                   samples: int = 256) -> float:
    """1 / standard deviation of the unscaled latents of training crops."""
    rng = np.random.default_rng(99)
    with evaluating(model):
        images = torch.from_numpy(autoencoder_batch(data, samples, rng, augment=False))
        latents = torch.cat([model.encode_distribution(chunk.to(device)).mode()
                             for chunk in images.split(32)])
    return float(1.0 / latents.std().clamp_min(1e-6))


def train_autoencoder(config: ModelConfig, data_dir: str | Path, run_dir: str | Path,
                      steps: int, *, device: str = "auto", resume: bool = False,
                      epoch_steps: int = 200, checkpoint_every: int = 100, decay_steps: int = 0,
                      validation_batches: int = 4, seed: int = 0,
                      progress: TrainProgress | None = None) -> TrainResult:
    """Train ``steps`` optimisation steps in all (counting those of a resumed run)."""
    dev = resolve_device(device)
    train, val = load_splits(data_dir, config)
    run = RunFolder(run_dir, config, resume)
    torch.manual_seed(seed)
    model = FaceAutoencoder(config.autoencoder).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.autoencoder_learning_rate)
    state = (run.load({"autoencoder": model}, optimizer) if resume
             else TrainState(0, np.random.default_rng(seed)))
    batch = config.training.autoencoder_batch_size

    patch = config.training.autoencoder_patch

    def step_losses(rng: np.random.Generator) -> dict[str, torch.Tensor]:
        images = autoencoder_batch(train, batch, rng)
        if patch and patch < images.shape[-1]:
            # The autoencoder is fully convolutional: training on random patches costs a
            # fraction of full crops per step, and it still runs on full crops afterwards.
            y, x = rng.integers(0, images.shape[-1] - patch + 1, size=2)
            images = images[:, :, y:y + patch, x:x + patch]
        images = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
        return autoencoder_losses(model, images, config.training.kl_weight)

    seconds, validation = optimise(
        run, {"autoencoder": model}, optimizer, state, steps, step_losses,
        lambda: _validate(model, val, dev, validation_batches, batch), device=dev,
        mixed_precision=config.training.mixed_precision, grad_clip=config.training.grad_clip,
        epoch_steps=epoch_steps, checkpoint_every=checkpoint_every, progress=progress,
        decay_steps=decay_steps)
    scaling = latent_scaling(model, train, dev)
    final = config.replace(autoencoder=dataclasses.replace(config.autoencoder,
                                                           scaling_factor=scaling))
    model.config = final.autoencoder
    model.vae.register_to_config(scaling_factor=scaling)
    model_dir = save_model(run.folder / "model", final, model)
    return TrainResult(run.folder, model_dir, state.step, seconds, validation,
                       sum(p.numel() for p in model.parameters()))

