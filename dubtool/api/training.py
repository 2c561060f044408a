"""``dubtool prepare``, ``train`` and ``offsets``: data sets and training runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dubtool.errors import InputNotFound, OutputError, UsageError
from dubtool.options import (
    MIXED_PRECISIONS,
    check_choice,
    check_device,
    check_range,
    check_seed,
)

if TYPE_CHECKING:
    from dubtool.pipeline.progress import StageProgress
    from dubtool.training.dataset import ClipReport
    from dubtool.training.loop import TrainProgress, TrainResult


MIN_CROP_SIZE = 16  # a face crop smaller than this holds no mouth to learn from


def prepare(videos: str | Path, output: str | Path, *, crop_size: int = 128,
            min_face_fraction: float = 0.9, validation_fraction: float = 0.1,
            cache_dir: str | Path | None = None,
            progress: StageProgress | None = None,
            shard: tuple[int, int] | None = None) -> list[ClipReport]:
    """Turn a folder of talking-head videos into a training set (see training.dataset);
    ``shard`` (K, N): only the K-th of N disjoint parts, for ``merge_shards``."""
    from dubtool.training.dataset import prepare as prepare_dataset

    if shard is not None and not 1 <= shard[0] <= shard[1]:
        raise UsageError(f"--shard {shard[0]}/{shard[1]}: K/N with 1 <= K <= N")

    check_range("--crop-size", crop_size, at_least=MIN_CROP_SIZE)
    check_range("--min-face", min_face_fraction, at_least=0, at_most=1)
    check_range("--validation", validation_fraction, at_least=0, at_most=1)
    source = Path(videos)
    if not source.is_dir():
        raise InputNotFound("not a folder of videos", source)
    target = Path(output).resolve()
    if target == source.resolve() or source.resolve() in target.parents:
        raise OutputError("the data set must be written outside the videos folder", target)
    return prepare_dataset(source, target, crop_size, min_face_fraction, validation_fraction,
                           cache_dir, progress, shard)


def merge_shards(shards: Sequence[str | Path], output: str | Path, *,
                 validation_fraction: float = 0.1) -> list[ClipReport]:
    """Join the parts of ``prepare(shard=...)`` into one data set (see training.dataset)."""
    from dubtool.training.dataset import merge_shards as merge

    check_range("--validation", validation_fraction, at_least=0, at_most=1)
    return merge(list(shards), output, validation_fraction)


DEFAULT_CONFIG = "cpu-128"


def train(part: str, config: str | Path | None, data: str | Path, out: str | Path, *,
          steps: int, autoencoder: str | Path | None = None,
          completion: str | Path | None = None, init: str | Path | None = None,
          end2end: bool = True, device: str = "auto", resume: bool = False, epoch_steps: int = 200,
          checkpoint_every: int = 50, decay_steps: int = 0, refine: float = 0.0,
          seed: int = 0, into: str | Path | None = None, mixed_precision: str | None = None,
          grad_accum: int = 1, command: str = "",
          progress: TrainProgress | None = None) -> TrainResult:
    """Train ``part``: "autoencoder" first; optionally "completion" (the landmark completion
    alone, fast; ``into``: a model folder that RUN/model then copies with this completion);
    then "dubber" on top of the trained autoencoder (and completion). In this process, or data
    parallel in each process that ``accelerate launch`` or ``torchrun`` started (the config's
    batch sizes are per process); ``mixed_precision``: no, bf16 or fp16 (None: the config's);
    ``grad_accum``: batches whose gradients each step sums. ``config``: a model config's name
    or path (None: cpu-128). Or "sync": the lip-sync expert (``training.sync``; ``config``: a
    sync expert config.json, None: the defaults), ``steps`` a member, validated every
    ``epoch_steps``, on this process's device; ``command``: the command line its model card
    quotes."""
    # torch and diffusers are imported only by the commands that need them: start-up stays fast.
    from dubtool.nets.config import ModelConfig

    check_range("--steps", steps, at_least=1)
    check_range("--epoch-steps", epoch_steps, at_least=1)
    if part == "sync":
        check_seed(seed)
        check_device(device)
        from dubtool.nets.sync_expert import SyncExpertConfig
        from dubtool.training.sync import train_sync_expert

        expert_config = SyncExpertConfig() if config is None else SyncExpertConfig.load(config)
        return train_sync_expert(expert_config, data, out, steps, device=device,
                                 epoch_steps=epoch_steps, seed=seed, command=command,
                                 progress=progress)
    check_range("--checkpoint-every", checkpoint_every, at_least=1)
    check_range("--decay-steps", decay_steps, at_least=0)
    check_range("--refine", refine, at_least=0, at_most=1)
    check_seed(seed)
    check_device(device)
    check_choice("--mixed-precision", mixed_precision, MIXED_PRECISIONS)
    check_range("--grad-accum", grad_accum, at_least=1)
    model_config = ModelConfig.named(DEFAULT_CONFIG if config is None else config)
    common = {"device": device, "resume": resume, "epoch_steps": epoch_steps,
              "checkpoint_every": checkpoint_every, "decay_steps": decay_steps, "seed": seed,
              "mixed_precision": mixed_precision, "grad_accum": grad_accum,
              "progress": progress}
    if part == "autoencoder":
        from dubtool.training.autoencoder import train_autoencoder

        return train_autoencoder(model_config, data, out, steps, **common)
    if part == "dubber":
        if autoencoder is None:
            raise InputNotFound("training the dubber needs --autoencoder: the model folder "
                                "of a trained autoencoder (RUN/model)")
        from dubtool.training.dubber import train_dubber

        return train_dubber(model_config, data, autoencoder, out, steps, end2end=end2end,
                            completion=completion, init=init, refine=refine, **common)
    if part == "completion" and model_config.completion.kind == "linear":
        from dubtool.training.linear import fit_completion

        return fit_completion(model_config, data, out, into=into)
    if part == "completion":
        from dubtool.training.dubber import train_completion

        return train_completion(model_config, data, out, steps, init=completion, into=into,
                                **common)
    raise ValueError(f"unknown part {part!r}: autoencoder, completion, dubber or sync")


def offsets(data: str | Path, completion: str | Path, *, device: str = "auto"):
    """Measure the audio-video offset of every training clip of the prepared data set
    ``data`` with a trained landmark completion (its safetensors, with the run's config.json
    beside it) and write ``data``/offsets.json, which training then applies (shifts the
    confident offsets, leaves out clips it cannot trust). Returns (offsets, path)."""
    from dubtool.devices import resolve_device
    from dubtool.nets.completions import build_completion
    from dubtool.nets.config import ModelConfig
    from dubtool.nets.io import load_weights
    from dubtool.pipeline.clips import PreparedData
    from dubtool.training.offsets import measure_offsets, save_offsets

    weights = Path(completion)
    config = ModelConfig.load(weights.parent / "config.json")
    dev = resolve_device(device)
    module = build_completion(config.completion).to(dev)
    load_weights(module, weights)
    train = PreparedData(data, "train", ignore_offsets=True)
    measured = measure_offsets(module, train.clips, dev)
    return measured, save_offsets(data, measured)
