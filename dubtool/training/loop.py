"""What both training runs share: device choice, checkpoints that survive a kill, the log.

A run folder holds ``config.json``, ``checkpoint/`` (the latest state: weights, optimiser,
random generators, step), ``log.jsonl`` (one line per logged step and per validation) and, at
the end, ``model/`` (a model folder that dubtool can load). Checkpoints are safetensors plus
JSON, written to a temporary folder and renamed, so a kill at any moment leaves the previous
checkpoint intact and ``--resume`` continues from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dubtool.devices import autocast
from dubtool.errors import InputNotFound, InvalidMedia, OutputError
from dubtool.nets.config import ModelConfig
from dubtool.nets.io import load_weights, save_weights
from dubtool.training.dataset import PreparedData

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"

# progress(step, total_steps, losses): called after every optimisation step.
TrainProgress = Callable[[int, int, dict[str, float]], None]


@dataclass
class TrainState:
    step: int
    rng: np.random.Generator


class RunFolder:
    def __init__(self, folder: str | Path, config: ModelConfig, resume: bool) -> None:
        self.folder = Path(folder)
        self.checkpoint = self.folder / CHECKPOINT
        if resume:
            if not (self.checkpoint / "state.json").is_file():
                raise InputNotFound("no checkpoint to resume from", self.folder)
            saved = ModelConfig.load(self.folder / "config.json")
            if saved != config:
                raise OutputError("the run was started with another config; resume it with "
                                  "the same --config or start a new run folder", self.folder)
        elif (self.checkpoint / "state.json").exists():
            raise OutputError("holds a checkpoint already: pass --resume to continue it, or "
                              "choose another output folder", self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        config.save(self.folder / "config.json")

    def log(self, **entry: object) -> None:
        with open(self.folder / LOG, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **entry}) + "\n")

    def save(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             state: TrainState) -> None:
        tmp = self.folder / f"{CHECKPOINT}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, module in modules.items():
            save_weights(module, tmp / f"{name}.safetensors")
        opt = optimizer.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items()
                   for k, v in s.items() if isinstance(v, torch.Tensor)}
        tensors["torch_rng"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": state.step, "param_groups": opt["param_groups"],
            "numpy_rng": state.rng.bit_generator.state}, default=_jsonable))
        old = self.folder / f"{CHECKPOINT}.old-{os.getpid()}"
        if self.checkpoint.exists():
            os.replace(self.checkpoint, old)
        os.replace(tmp, self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def load(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> TrainState:
        for name, module in modules.items():
            load_weights(module, self.checkpoint / f"{name}.safetensors")
        meta = json.loads((self.checkpoint / "state.json").read_text())
        tensors = load_file(str(self.checkpoint / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("torch_rng"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["numpy_rng"]
        return TrainState(meta["step"], rng)


def _jsonable(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Modules in eval mode without gradients for the block, then back to training."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


class StepTimer:
    """Mean wall time of the timed blocks (optimisation steps)."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._start
        self.count += 1

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)


@dataclass
class TrainResult:
    run: Path
    model: Path
    steps: int
    seconds_per_step: float
    validation: dict[str, float]
    parameters: int


def load_splits(data_dir: str | Path, config: ModelConfig, person_exponent: float = 0.0
                ) -> tuple[PreparedData, PreparedData]:
    """Training and validation clips (validation falls back to training if it is empty); the
    training people drawn by their footage to the power ``person_exponent``."""
    train = PreparedData(data_dir, "train", person_exponent)
    if not train.clips:
        raise InputNotFound("the data set has no training clips", data_dir)
    if train.crop_size != config.crop_size:
        raise InvalidMedia(f"data set crops are {train.crop_size} px but the config wants "
                          f"{config.crop_size} px: prepare it with --crop-size "
                          f"{config.crop_size}", data_dir)
    val = PreparedData(data_dir, "val")
    return train, (val if val.clips else train)


def optimise(run: RunFolder, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             state: TrainState, steps: int,
             step_losses: Callable[[np.random.Generator], dict[str, torch.Tensor]],
             validate: Callable[[], dict[str, float]], *, device: torch.device,
             mixed_precision: str, grad_clip: float, epoch_steps: int, checkpoint_every: int,
             progress: TrainProgress | None, decay_steps: int = 0
             ) -> tuple[float, dict[str, float]]:
    """The optimisation loop both trainings share, up to ``steps`` steps in all.

    Logs losses every 10 steps, validates every ``epoch_steps`` (and at the end), checkpoints
    every ``checkpoint_every``. Over the last ``decay_steps`` steps the learning rate falls
    linearly towards 0 (a function of the step alone, so a resumed run follows the same
    schedule). Returns (mean seconds per step, last validation).
    """
    autocast(device, mixed_precision)  # an unsupported precision fails before any step
    parameters = [p for m in modules.values() for p in m.parameters()]
    validation: dict[str, float] = {}
    timer = StepTimer()
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda"
                                  and mixed_precision == "fp16")
    for module in modules.values():
        module.train()
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    while state.step < steps:
        factor = min(1.0, (steps - state.step) / decay_steps) if decay_steps > 0 else 1.0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        with timer:
            with autocast(device, mixed_precision):
                losses = step_losses(state.rng)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            scaler.step(optimizer)
            scaler.update()
        state.step += 1
        values = {k: float(v.detach()) for k, v in losses.items()}
        if progress is not None:
            progress(state.step, steps, values)
        if state.step % 10 == 0:
            run.log(step=state.step, **values)
        if state.step % epoch_steps == 0 or state.step == steps:
            validation = validate()
            run.log(step=state.step, validation=validation)
        if state.step % checkpoint_every == 0 or state.step == steps:
            run.save(modules, optimizer, state)
    if not validation:  # a resumed run that had no step left to do
        validation = validate()
    return timer.mean, validation
