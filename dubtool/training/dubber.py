"""Joint training of landmark completion + denoiser (paper III-D): L_ldm + lambda * L1.

Each sample is L successive frames of one clip (batched sequential training). The landmark
completion module predicts their lip/jaw points from the speech; joined with the frames' pose
points they condition the denoiser, which learns to predict the noise added to the lower half
of the frames' latents. End to end, the gradient of L_ldm flows back into the completion
module through the predicted landmarks; with ``end2end=False`` (the paper's ablation) the
denoiser sees the detected landmarks and the completion module learns from L1 alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dubtool.devices import Processes, training_processes
from dubtool.errors import ModelError
from dubtool.evaluation import metrics
from dubtool.face.indices import CONTENT_SLICE, inner_lip_opening
from dubtool.nets.autoencoder import FaceAutoencoder
from dubtool.nets.completions import CompletionNet, build_completion
from dubtool.nets.config import AutoencoderConfig, ModelConfig, TrainingConfig
from dubtool.nets.dubber import DubbingModel, complete_landmarks
from dubtool.nets.io import (
    DUBBER_FILE,
    load_model,
    load_weights,
    resolve_model_folder,
    save_model,
    save_weights,
    with_completion,
)
from dubtool.nets.losses import completion_losses
from dubtool.nets.sampling import lower_half_mask, make_scheduler, start_timestep
from dubtool.nets.sync_expert import SyncExpert, load_sync_expert
from dubtool.pipeline.clips import Clip, PreparedData, dubber_batch, sample_seeds
from dubtool.pipeline.complete import predict_content, reference_frames
from dubtool.pipeline.plan import far_from_plan, gap_frames
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

COMPLETION_FILE = "completion.safetensors"

def completed_landmarks(completion: CompletionNet, batch: dict[str, torch.Tensor],
                        config: TrainingConfig, expert: SyncExpert | None = None
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The target landmarks predicted from the speech (B, L, 131, 2), and the completion's
    losses against the detected lip/jaw points (``completion_losses``); with ``expert`` (a
    frozen sync expert), also ``sync``, its ``in_sync_loss`` of the predicted lips, added to
    the total times ``config.completion_sync_weight``."""
    target = batch["points"]
    predicted = complete_landmarks(completion, target, batch["references"], batch["speech"])
    losses = completion_losses(predicted[:, :, CONTENT_SLICE], target[:, :, CONTENT_SLICE],
                               config)
    if expert is not None:
        losses["sync"] = expert.in_sync_loss(predicted[:, :, CONTENT_SLICE],
                                             expert.window_speech(batch["speech"]))
        losses["total"] = losses["total"] + config.completion_sync_weight * losses["sync"]
    return predicted, losses


def dubber_losses(model: DubbingModel, autoencoder: FaceAutoencoder,
                  batch: dict[str, torch.Tensor], scheduler, training: TrainingConfig,
                  end2end: bool = True,
                  generator: torch.Generator | list[torch.Generator] | None = None,
                  refine: float = 0.0) -> dict[str, torch.Tensor]:
    """The training objective on one batch (tensors as made by ``dubber_batch``); the
    diffusion times and noise drawn from ``generator`` (a list: one per sample).

    ``refine`` > 0 trains the denoiser for image-to-image sampling at that strength instead:
    the lower half starts from the reference bent onto the frame's landmarks
    (``batch["warped"]``) noised to a time up to the one nearest refine x T (where sampling
    at that strength starts: ``start_timestep``), and the loss is on the clean
    latent the predicted noise implies, so the denoiser learns to take the warped face to
    the real one (mouth inside, teeth, shading) rather than to remove noise alone.
    """
    frames = batch["frames"]
    b, length = frames.shape[:2]
    with torch.no_grad():  # the autoencoder is frozen
        latents = autoencoder.encode(frames.flatten(0, 1))
        reference_latent = autoencoder.encode(batch["reference_image"])
        motion = batch.get("motion")
        motion_latents = None
        if motion is not None and motion.shape[1] > 0:
            motion_latents = autoencoder.encode(motion.flatten(0, 1)).unflatten(0, motion.shape[:2])
        start = autoencoder.encode(batch["warped"].flatten(0, 1)) if refine > 0 else latents
    landmarks, completion = completed_landmarks(model.completion, batch, training)
    condition_points = landmarks if end2end else batch["points"]
    cond = model.conditioning(condition_points, reference_latent, motion_latents)

    # One diffusion time per sample, shared by its L frames (they are denoised together);
    # refining, the times that sampling at that strength runs at: 1 .. its start time.
    train_steps = scheduler.config.num_train_timesteps
    lowest, end = ((1, start_timestep(refine, train_steps) + 1) if refine > 0
                   else (0, train_steps))
    if isinstance(generator, list):  # one per sample: its time, then its frames' noise
        draws = [(torch.randint(lowest, end, (1,), generator=g),
                  torch.randn((length, *latents.shape[1:]), generator=g)) for g in generator]
        timesteps = torch.cat([t for t, _ in draws])
        noise = torch.cat([n for _, n in draws])
    else:
        device = generator.device if generator is not None else "cpu"
        timesteps = torch.randint(lowest, end, (b,), generator=generator, device=device)
        noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = timesteps.to(latents.device).repeat_interleave(length)
    noise = noise.to(latents.device, latents.dtype)
    mask = lower_half_mask(latents.shape[-1], latents.device).expand(latents.shape[0], -1, -1, -1)
    noisy = scheduler.add_noise(start, noise, timesteps) * mask + latents * (1 - mask)
    predicted = model.denoiser(noisy, latents * (1 - mask), mask, timesteps, cond)
    if refine > 0:
        alpha = scheduler.alphas_cumprod.to(latents.device)[timesteps].view(-1, 1, 1, 1)
        clean = (noisy - (1 - alpha).sqrt() * predicted) / alpha.sqrt()
        error = (clean - latents) ** 2
    else:
        error = (predicted - noise) ** 2
    ldm = (error * mask).sum() / (mask.sum() * latents.shape[1])
    return {"total": ldm + training.l1_weight * completion["total"], "ldm": ldm,
            "l1": completion["l1"], "opening": completion["opening"]}


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


def _validate(model: DubbingModel, autoencoder: FaceAutoencoder, data: PreparedData,
              config: ModelConfig, scheduler, device: torch.device, batches: int,
              end2end: bool, refine: float, processes: Processes) -> dict[str, float]:
    c = config.completion

    def one(k: int) -> dict[str, float]:
        rng = np.random.default_rng([4321, k])  # same samples, noise and times every time
        seeds = sample_seeds(rng, config.training.batch_size)
        batch = dubber_batch(data, seeds, c.frames, c.references, config.denoiser.motion_frames,
                             rng, augment=False, warp=refine > 0)
        losses = dubber_losses(model, autoencoder, to_tensors(batch, device), scheduler,
                               config.training, end2end, generators(seeds), refine)
        return {k: float(losses[k]) for k in ("total", "ldm", "l1", "opening")}

    with evaluating(model):
        results = share(processes, batches, one)
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


def train_dubber(config: ModelConfig, data_dir: str | Path, autoencoder_model: str | Path,
                 run_dir: str | Path, steps: int, *, end2end: bool = True,
                 completion: str | Path | None = None, init: str | Path | None = None,
                 device: str = "auto", resume: bool = False, epoch_steps: int = 200,
                 checkpoint_every: int = 50, decay_steps: int = 0, refine: float = 0.0,
                 validation_batches: int = 4, seed: int = 0,
                 mixed_precision: str | None = None, grad_accum: int = 1,
                 progress: TrainProgress | None = None) -> TrainResult:
    """Train the dubbing model on top of a trained autoencoder (a model folder), optionally
    with a pre-trained landmark completion (``completion``: its safetensors), loaded at the
    start of a new run or over the completion module of a resumed one. ``init``: a model
    folder whose dubbing model a new run starts from; parts this config adds to it (the
    landmark sketch encoder) start from their zero initialisation. ``refine``: train for
    image-to-image sampling from the warped reference at that strength (``dubber_losses``).
    Processes, ``mixed_precision`` and ``grad_accum`` as for ``train_autoencoder``."""
    # Batches without motion frames leave the motion frames' encoder without a gradient.
    processes = training_processes(device, mixed_precision or config.training.mixed_precision,
                                   grad_accum, unused_parameters=True)
    with processes:  # the process group torn down however the training ends
        dev = processes.device
        trained = load_model(autoencoder_model, need_dubber=False)
        ae = trained.config.autoencoder
        if _autoencoder_sizes(ae) != _autoencoder_sizes(config.autoencoder):
            raise ModelError("the autoencoder was trained with other sizes than this config's",
                             trained.folder)
        config = config.replace(autoencoder=ae)  # keeps the measured latent scaling
        train, val = load_splits(data_dir, config)
        run = RunFolder(run_dir, config, resume, processes.main)
        torch.manual_seed(seed)
        autoencoder = trained.autoencoder.to(dev)
        model = DubbingModel(config).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.learning_rate)
        state = (run.load({"dubber": model}, optimizer) if resume
                 else TrainState(0, np.random.default_rng(seed)))
        if init is not None and not resume:
            load_weights(model, resolve_model_folder(init) / DUBBER_FILE,
                         new_modules=("denoiser.sketch.",))
        if completion is not None:
            # A pre-trained landmark completion (train_completion): the start of a new run, or a
            # replacement for the completion module of a resumed one.
            load_weights(model.completion, completion)
        scheduler = make_scheduler(config.diffusion)
        c = config.completion

        batch_size = config.training.batch_size

        def step_losses(rng: np.random.Generator) -> dict[str, torch.Tensor]:
            seeds = sample_seeds(rng, batch_size, (processes.rank, processes.count))
            batch = dubber_batch(train, seeds, c.frames, c.references,
                                 config.denoiser.motion_frames, rng, warp=refine > 0)
            return dubber_losses(model, autoencoder, to_tensors(batch, dev), scheduler,
                                 config.training, end2end, generators(seeds), refine)

        seconds, validation = optimise(
            run, {"dubber": model}, optimizer, state, steps, step_losses,
            lambda: _validate(model, autoencoder, val, config, scheduler, dev, validation_batches,
                              end2end, refine, processes),
            processes=processes, batch=batch_size, grad_clip=config.training.grad_clip,
            epoch_steps=epoch_steps, checkpoint_every=checkpoint_every, progress=progress,
            decay_steps=decay_steps)
        model_dir = run.folder / "model"
        if processes.main:
            save_model(model_dir, config, autoencoder, model)
        processes.accelerator.wait_for_everyone()  # every process returns once the model is there
        return TrainResult(run.folder, model_dir, state.step, seconds, validation,
                           sum(p.numel() for p in model.parameters()), processes.count,
                           batch_size * processes.count * grad_accum)


def _autoencoder_sizes(config: AutoencoderConfig) -> tuple:
    """An autoencoder config's sizes, ignoring the measured latent scaling."""
    return (config.image_size, config.latent_channels, tuple(config.channels),
            config.layers_per_block, config.norm_groups)


VALIDATION_GAP_SECONDS = 1.0  # between the frames a validation scores and its references
# Seconds a validation leaves after that gap for the references to come from (half of what
# follows the gap in a shorter clip): spread over them, as the pipeline spreads its
# references over every frame clear of the output (a linear completion's mouth is the mean
# of its fifty)
VALIDATION_REFERENCE_SECONDS = 1.0


def clip_openings(completion: CompletionNet, clip: Clip, max_frames: int | None = None,
                  device: torch.device | str = "cpu", gap_seconds: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(S,) the inner-lip opening the completion predicts from ``clip``'s own sound, as the
    ``complete`` stage predicts it, and (S,) the detected one (NaN where no face), for the
    first S frames, at most ``max_frames``.

    The completion's reference landmarks are drawn from the whole clip, or, with
    ``gap_seconds`` (a validation), from frames at least that far after every scored frame,
    as in the reconstruction protocol: S then leaves that gap and VALIDATION_REFERENCE_SECONDS
    at the clip's end, and is 0 when the clip has no face there."""
    count = completion.config.references
    frames = min(len(clip.points), max_frames or len(clip.points))
    allowed = clip.detected.astype(bool)
    if gap_seconds > 0:
        gap = gap_frames(gap_seconds, clip.fps)
        after = len(clip.points) - gap
        reserved = min(gap_frames(VALIDATION_REFERENCE_SECONDS, clip.fps), after // 2)
        frames = max(0, min(frames, after - reserved))
        allowed = allowed & far_from_plan(len(clip.points), np.arange(frames), gap)
        if frames == 0 or not allowed.any():
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
    refs = reference_frames(allowed, count)
    with evaluating(completion):
        content = predict_content(completion, clip.points, clip.points[refs], np.arange(frames),
                                  clip.features, clip.fps, device)
    predicted = clip.points[:frames].copy()
    predicted[:, CONTENT_SLICE] = content
    real = np.where(clip.detected[:frames], inner_lip_opening(clip.points[:frames]), np.nan)
    return inner_lip_opening(predicted), real


def opening_scores(completion: CompletionNet, data: PreparedData,
                   device: torch.device | str = "cpu", max_frames: int = 500,
                   processes: Processes | None = None,
                   gap_seconds: float = VALIDATION_GAP_SECONDS) -> dict[str, float]:
    """How the completion's lips follow the real ones over the clips of ``data``: the mean
    over clips of the opening correlation and articulation (``evaluation.metrics``) of
    ``clip_openings`` (first ``max_frames`` frames of each clip, references ``gap_seconds``
    after them; the clips shared among a run's ``processes``)."""
    def one(k: int) -> tuple[float, float]:
        mine, real = clip_openings(completion, data.clips[k], max_frames, device, gap_seconds)
        return metrics.opening_correlation(mine, real), metrics.articulation(mine, real)

    correlations, articulations = zip(*share(processes, len(data.clips), one), strict=True)
    return {"opening_correlation": float(np.nanmean(correlations)),
            "articulation": float(np.nanmean(articulations))}


def train_completion(config: ModelConfig, data_dir: str | Path, run_dir: str | Path,
                     steps: int, *, device: str = "auto", resume: bool = False,
                     epoch_steps: int = 200, checkpoint_every: int = 100, decay_steps: int = 0,
                     validation_batches: int = 8, seed: int = 0, init: str | Path | None = None,
                     into: str | Path | None = None, mixed_precision: str | None = None,
                     grad_accum: int = 1, progress: TrainProgress | None = None) -> TrainResult:
    """Pre-train the landmark completion module alone (no images: fast) on windows of
    ``CompletionConfig.window`` frames, with ``completion_losses``. Validation reports the
    losses on the validation people and the opening correlation and articulation on their
    clips (and on the held-out clips of the training people, when there are any), scored as
    ``opening_scores`` does: the references kept a second clear of the scored frames.
    ``init``: a completion safetensors file a new run starts from. Writes
    RUN/model/completion.safetensors for ``train_dubber(completion=...)``; with ``into`` (a
    model folder), RUN/model is also a whole model folder: that model with this completion
    (``nets.io.with_completion``). Processes, ``mixed_precision`` and ``grad_accum`` as for
    ``train_autoencoder``."""
    processes = training_processes(device, mixed_precision or config.training.mixed_precision,
                                   grad_accum)
    with processes:  # the process group torn down however the training ends
        dev = processes.device
        train, val = load_splits(data_dir, config, config.training.completion_person_exponent)
        heldout = PreparedData(data_dir, "heldout", hearing=config.completion)
        run = RunFolder(run_dir, config, resume, processes.main)
        torch.manual_seed(seed)
        completion = build_completion(config.completion).to(dev)
        if init is not None and not resume:
            load_weights(completion, init)
        optimizer = torch.optim.AdamW(completion.parameters(),
                                      lr=config.training.completion_learning_rate)
        state = (run.load({"completion": completion}, optimizer) if resume
                 else TrainState(0, np.random.default_rng(seed)))
        c, batch_size = config.completion, config.training.completion_batch_size
        expert = None
        if config.training.completion_sync_weight > 0:
            expert = load_sync_expert(config.training.completion_sync_expert).to(dev)
            expert.check_hearing(c)

        def landmarks(data: PreparedData, seeds: list[int], rng: np.random.Generator,
                      augment: bool) -> dict:
            batch = dubber_batch(data, seeds, c.window, c.references, 0, rng, augment,
                                 images=False, tempo=config.training.completion_tempo,
                                 reference_gap=config.training.completion_reference_gap)
            return to_tensors({k: batch[k] for k in ("points", "references", "speech")}, dev)

        def validation_losses(k: int) -> dict[str, float]:
            rng = np.random.default_rng([4321, k])
            batch = landmarks(val, sample_seeds(rng, batch_size), rng, False)
            return {name: float(v) for name, v in
                    completed_landmarks(completion, batch, config.training, expert)[1].items()}

        def validate() -> dict[str, float]:
            with evaluating(completion):
                losses = share(processes, validation_batches, validation_losses)
                out = {k: float(np.mean([v[k] for v in losses])) for k in losses[0]}
                out.update(opening_scores(completion, val, dev, processes=processes))
                if heldout.clips:
                    scores = opening_scores(completion, heldout, dev, processes=processes)
                    out.update({f"heldout_{k}": v for k, v in scores.items()})
            return out

        def step_losses(rng: np.random.Generator) -> dict[str, torch.Tensor]:
            seeds = sample_seeds(rng, batch_size, (processes.rank, processes.count))
            return completed_landmarks(completion, landmarks(train, seeds, rng, True),
                                       config.training, expert)[1]

        seconds, validation = optimise(
            run, {"completion": completion}, optimizer, state, steps, step_losses, validate,
            processes=processes, batch=batch_size, grad_clip=config.training.grad_clip,
            epoch_steps=epoch_steps, checkpoint_every=checkpoint_every, progress=progress,
            decay_steps=decay_steps)
        model_dir = run.folder / "model"
        if processes.main:
            model_dir.mkdir(exist_ok=True)
            config.save(model_dir / "config.json")
            save_weights(completion, model_dir / COMPLETION_FILE)
            if into is not None:
                with_completion(into, model_dir / COMPLETION_FILE, config, model_dir)
        processes.accelerator.wait_for_everyone()  # every process returns once the model is there
        return TrainResult(run.folder, model_dir, state.step, seconds, validation,
                           sum(p.numel() for p in completion.parameters()), processes.count,
                           batch_size * processes.count * grad_accum)

