"""What the trainings share: checkpoints that survive a kill, the log, the loop, its processes.

A run folder holds ``config.json``, ``checkpoint/`` (the latest state: weights, optimiser,
random generators, step), ``log.jsonl`` (a line per start of the run: processes and global
batch; one per logged step and per validation) and, at the end, ``model/`` (a model folder
that dubtool can load). Checkpoints are safetensors plus JSON, written to a temporary folder
and renamed, so a kill at any moment leaves the previous checkpoint intact and ``--resume``
continues from it.

Data parallel (``devices.training_processes``): every process holds the same networks and
optimiser and draws its own part of each global batch (``clips.sample_seeds``); DDP averages
the gradients, so the processes stay identical and N processes at batch B take the step one
process takes at batch N x B. The main process alone writes the run folder; every process
reads it on ``--resume``.
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
from typing import TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dubtool.devices import Processes, autocast
from dubtool.errors import InputNotFound, InvalidMedia, OutputError
from dubtool.nets.config import ModelConfig
from dubtool.nets.io import load_weights, save_weights
from dubtool.nets.sync_expert import SyncExpertConfig
from dubtool.pipeline.clips import PreparedData

CHECKPOINT = "checkpoint"
LOG = "log.jsonl"

# progress(step, total_steps, losses): called after every optimisation step.
TrainProgress = Callable[[int, int, dict[str, float]], None]
T = TypeVar("T")


@dataclass
class TrainState:
    step: int
    rng: np.random.Generator


class RunFolder:
    """A run's folder; ``writes`` False (the processes but the main one of a multi-process
    run) checks and reads it alike but leaves the writing to the main process."""

    def __init__(self, folder: str | Path, config: ModelConfig | SyncExpertConfig,
                 resume: bool, writes: bool = True) -> None:
        self.folder = Path(folder)
        self.checkpoint = self.folder / CHECKPOINT
        self.writes = writes
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
        if writes and not resume:  # a resumed run's config.json is this one already
            self.folder.mkdir(parents=True, exist_ok=True)
            config.save(self.folder / "config.json")

    def log(self, **entry: object) -> None:
        if not self.writes:
            return
        with open(self.folder / LOG, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **entry}) + "\n")

    def save(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             state: TrainState) -> None:
        if not self.writes:
            return
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


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One torch generator per sample (``clips.sample_seeds``), for its noise: the same
    noise whichever process draws the sample."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def share(processes: Processes | None, count: int, work: Callable[[int], T]) -> list[T]:
    """``[work(k) for k in range(count)]``, the run's processes taking every N-th k each (one
    process, or None: all of them); every process gets all the results, in order of k."""
    if processes is None or processes.count == 1:
        return [work(k) for k in range(count)]
    from accelerate.utils import gather_object

    mine = [(k, work(k)) for k in range(processes.rank, count, processes.count)]
    return [value for _, value in sorted(gather_object(mine), key=lambda item: item[0])]


class Objective(nn.Module):
    """The trained modules with one batch's losses as their forward pass: what DDP wraps, as
    it averages the gradients of what runs through its forward."""

    def __init__(self, modules: dict[str, nn.Module],
                 step_losses: Callable[[np.random.Generator], dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.trained = nn.ModuleDict(modules)
        self.step_losses = step_losses

    def forward(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.step_losses(rng)


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
    processes: int
    global_batch: int  # samples per optimisation step over all processes


def load_splits(data_dir: str | Path, config: ModelConfig, person_exponent: float = 0.0
                ) -> tuple[PreparedData, PreparedData]:
    """Training and validation clips (validation falls back to training if it is empty); the
    training people drawn by their footage to the power ``person_exponent``."""
    train = PreparedData(data_dir, "train", person_exponent, hearing=config.completion)
    if not train.clips:
        raise InputNotFound("the data set has no training clips", data_dir)
    if train.crop_size != config.crop_size:
        raise InvalidMedia(f"data set crops are {train.crop_size} px but the config wants "
                          f"{config.crop_size} px: prepare it with --crop-size "
                          f"{config.crop_size}", data_dir)
    val = PreparedData(data_dir, "val", hearing=config.completion)
    return train, (val if val.clips else train)


def optimise(run: RunFolder, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
             state: TrainState, steps: int,
             step_losses: Callable[[np.random.Generator], dict[str, torch.Tensor]],
             validate: Callable[[], dict[str, float]], *, processes: Processes, batch: int,
             grad_clip: float, epoch_steps: int, checkpoint_every: int,
             progress: TrainProgress | None, decay_steps: int = 0
             ) -> tuple[float, dict[str, float]]:
    """The optimisation loop the trainings share, up to ``steps`` steps in all.

    ``step_losses(rng)``: this process's part (``batch`` samples) of one batch, drawn from
    the generator the processes share, and its losses. Each step sums the gradients of
    ``processes.grad_accum`` such batches on every process (a global batch of batch x
    processes x grad_accum samples). Logs losses (averaged over the processes) every 10
    steps, validates every ``epoch_steps`` (and at the end), checkpoints every
    ``checkpoint_every``. Over the last ``decay_steps`` steps the learning rate falls linearly
    towards 0 (a function of the step alone, so a resumed run follows the same schedule).
    Returns (mean seconds per step, last validation).
    """
    accelerator, device = processes.accelerator, processes.device
    accumulate = processes.grad_accum
    objective = accelerator.prepare(Objective(modules, step_losses))
    parameters = [p for m in modules.values() for p in m.parameters()]
    validation: dict[str, float] = {}
    timer = StepTimer()
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda"
                                  and processes.mixed_precision == "fp16")
    run.log(step=state.step, processes=processes.count, batch=batch, grad_accum=accumulate,
            global_batch=batch * processes.count * accumulate,
            mixed_precision=processes.mixed_precision)
    for module in modules.values():
        module.train()
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    while state.step < steps:
        factor = min(1.0, (steps - state.step) / decay_steps) if decay_steps > 0 else 1.0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        with timer:
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, torch.Tensor] = {}
            for micro in range(accumulate):
                # DDP averages the gradients over the processes in the last backward pass.
                last = micro == accumulate - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(objective):
                    # Dropout draws from the global generator: seeded from the shared one (one
                    # draw, whatever the number of processes) and the rank, so that each
                    # process and step drops its own units, and a resumed run the same ones.
                    torch.manual_seed(int(state.rng.integers(2**62)) + processes.rank)
                    with autocast(device, processes.mixed_precision):
                        losses = objective(state.rng)
                    scaler.scale(losses["total"] / accumulate).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float() / accumulate
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            scaler.step(optimizer)
            scaler.update()
        state.step += 1
        means = accelerator.reduce(torch.stack(list(sums.values())), "mean")
        values = dict(zip(sums, means.tolist(), strict=True))
        if progress is not None and processes.main:
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
