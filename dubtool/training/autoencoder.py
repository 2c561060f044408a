"""Training the face-crop autoencoder (first, then frozen for the dubbing model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from dubtool.devices import Processes, training_processes
from dubtool.nets.autoencoder import FaceAutoencoder
from dubtool.nets.config import ModelConfig
from dubtool.nets.io import save_model
from dubtool.pipeline.clips import PreparedData, autoencoder_batch, sample_seeds
from dubtool.training.loop import (
    RunFolder,
    TrainProgress,
    TrainResult,
    TrainState,
    evaluating,
    generators,
    load_splits,
    optimise,
    share,
)


def autoencoder_losses(model: FaceAutoencoder, images: torch.Tensor, kl_weight: float,
                       generator: torch.Generator | list[torch.Generator] | None = None
                       ) -> dict[str, torch.Tensor]:
    """L1 reconstruction + a small KL term keeping the latent close to a unit Gaussian
    (``generator``: the posterior's sampling noise; a list: one per image)."""
    reconstruction, posterior = model(images, generator)
    l1 = (reconstruction - images).abs().mean()
    kl = posterior.kl().mean() / images[0].numel()
    return {"total": l1 + kl_weight * kl, "l1": l1, "kl": kl}


def _validate(model: FaceAutoencoder, data: PreparedData, device: torch.device,
              batches: int, batch_size: int, processes: Processes) -> dict[str, float]:
    def one(k: int) -> dict[str, float]:
        rng = np.random.default_rng([1234, k])  # the same validation crops every time
        images = autoencoder_batch(data, sample_seeds(rng, batch_size), augment=False)
        images = torch.from_numpy(images).to(device)
        reconstruction = model.decode(model.encode(images)).clamp(-1, 1)
        mse = ((reconstruction - images) / 2).pow(2).mean(dim=(1, 2, 3))
        return {"l1": (reconstruction - images).abs().mean().item(),
                "psnr": (-10 * torch.log10(mse.clamp_min(1e-10))).mean().item()}

    with evaluating(model):
        results = share(processes, batches, one)
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def latent_scaling(model: FaceAutoencoder, data: PreparedData, device: torch.device,
                   samples: int = 256) -> float:
    """1 / standard deviation of the unscaled latents of training crops."""
    rng = np.random.default_rng(99)
    with evaluating(model):
        images = autoencoder_batch(data, sample_seeds(rng, samples), augment=False)
        images = torch.from_numpy(images)
        latents = torch.cat([model.encode_distribution(chunk.to(device)).mode()
                             for chunk in images.split(32)])
    return float(1.0 / latents.std().clamp_min(1e-6))


def train_autoencoder(config: ModelConfig, data_dir: str | Path, run_dir: str | Path,
                      steps: int, *, device: str = "auto", resume: bool = False,
                      epoch_steps: int = 200, checkpoint_every: int = 100, decay_steps: int = 0,
                      validation_batches: int = 4, seed: int = 0,
                      mixed_precision: str | None = None, grad_accum: int = 1,
                      progress: TrainProgress | None = None) -> TrainResult:
    """Train ``steps`` optimisation steps in all (counting those of a resumed run), in this
    process or in each of a multi-process run's (``devices.training_processes``);
    ``mixed_precision`` None: the config's."""
    processes = training_processes(device, mixed_precision or config.training.mixed_precision,
                                   grad_accum)
    with processes:  # the process group torn down however the training ends
        dev = processes.device
        train, val = load_splits(data_dir, config)
        run = RunFolder(run_dir, config, resume, processes.main)
        torch.manual_seed(seed)
        model = FaceAutoencoder(config.autoencoder).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(),
                                      lr=config.training.autoencoder_learning_rate)
        state = (run.load({"autoencoder": model}, optimizer) if resume
                 else TrainState(0, np.random.default_rng(seed)))
        batch = config.training.autoencoder_batch_size

        patch = config.training.autoencoder_patch

        def step_losses(rng: np.random.Generator) -> dict[str, torch.Tensor]:
            seeds = sample_seeds(rng, batch, (processes.rank, processes.count))
            images = autoencoder_batch(train, seeds)
            if patch and patch < images.shape[-1]:
                # The autoencoder is fully convolutional: training on random patches costs a
                # fraction of full crops per step, and it still runs on full crops afterwards.
                y, x = rng.integers(0, images.shape[-1] - patch + 1, size=2)
                images = images[:, :, y:y + patch, x:x + patch]
            images = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
            return autoencoder_losses(model, images, config.training.kl_weight, generators(seeds))

        seconds, validation = optimise(
            run, {"autoencoder": model}, optimizer, state, steps, step_losses,
            lambda: _validate(model, val, dev, validation_batches, batch, processes),
            processes=processes, batch=batch, grad_clip=config.training.grad_clip,
            epoch_steps=epoch_steps, checkpoint_every=checkpoint_every, progress=progress,
            decay_steps=decay_steps)
        model_dir = run.folder / "model"
        if processes.main:
            scaling = latent_scaling(model, train, dev)
            final = config.replace(autoencoder=dataclasses.replace(config.autoencoder,
                                                                   scaling_factor=scaling))
            model.config = final.autoencoder
            model.vae.register_to_config(scaling_factor=scaling)
            save_model(model_dir, final, model)
        processes.accelerator.wait_for_everyone()  # every process returns once the model is there
        return TrainResult(run.folder, model_dir, state.step, seconds, validation,
                           sum(p.numel() for p in model.parameters()), processes.count,
                           batch * processes.count * grad_accum)

