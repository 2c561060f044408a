"""Where the networks run and in which precision: one policy for training, dubbing and bench.

- ``resolve_device``: ``--device auto|cpu|cuda[:N]`` as a torch device (auto: CUDA if torch
  sees a GPU), a UsageError for a GPU the machine lacks.
- ``training_processes``: where a training runs: one process, or each of the processes that
  ``accelerate launch`` or ``torchrun`` started (one per GPU, or CPU processes over gloo),
  through Hugging Face Accelerate; its device, mixed precision and gradient accumulation.
  The process group it makes is destroyed as the process exits, however it exits
  (``_end_process_group``), once each training has closed its ``Processes``.
- ``autocast``: training's mixed precision (``--mixed-precision`` or the config's
  ``training.mixed_precision``): bf16 on CUDA or CPU, fp16 on CUDA only (with the loss scaling
  of ``training.loop``).
- ``sampling_precision``: what the dub samples in: bfloat16 on CPUs that compute it natively
  (measured on this project's CPU: the autoencoder 2.2x faster, outputs within 0.2 grey
  levels), float32 on other CPUs and on CUDA. The CUDA choice is not measured (no GPU run
  exists): bf16 or TF32 may well be faster there, at a quality nobody has compared yet.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import os
import signal
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dubtool.errors import UsageError
from dubtool.options import MIXED_PRECISIONS, check_choice, check_device, check_range

if TYPE_CHECKING:
    from accelerate import Accelerator


def resolve_device(device: str = "auto") -> torch.device:
    """``--device`` as a torch device; UsageError (exit 2) for a GPU this machine lacks."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA GPU on this machine; use "
                         "--device cpu or auto")
    resolved = torch.device(device)
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA GPUs (cuda:0 is the first)")
    return resolved


@dataclass(frozen=True)
class Processes:
    """Where a training runs: this process's device, precision and gradient accumulation, and
    its place among the run's processes (Accelerate's state). A context manager: ``close``
    at the end of the block, however it ends."""

    accelerator: Accelerator
    device: torch.device
    mixed_precision: str
    grad_accum: int

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def count(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def close(self, failure: BaseException | None = None) -> None:
        """The end of this training: Accelerate lets go of the prepared (DDP) networks, which
        hold the process group, and so do the frames of ``failure`` (the exception ending the
        training, whose traceback keeps them: its locals are cleared), so that the group can
        be freed at exit (``_end_process_group``). The group itself stays for a later
        training in this process (Accelerate's state is one per process). Local to this
        process (no collective), so it also runs when another process has failed."""
        self.accelerator.free_memory()
        seen: set[int] = set()  # one process: no group, and the locals stay for a debugger
        while self.count > 1 and failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            traceback.clear_frames(failure.__traceback__)  # skips the frames still running
            failure = failure.__cause__ or failure.__context__

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type | None, failure: BaseException | None, tb: object) -> None:
        self.close(failure)


def _end_process_group() -> None:
    """At exit, while the interpreter is whole: destroy the process group Accelerate made,
    which frees it (nothing else holds it once the trainings are closed) and so joins its
    threads (Gloo's or NCCL's). A thread of the group still running as the interpreter is
    torn down aborts the process after its work is done ("terminate called without an active
    exception", SIGABRT). Local to this process (no collective)."""
    # Ctrl-C reaches every process twice (the terminal's, then the launcher passes it on): the
    # second must not cut this short; a third (someone insisting) stops waiting for it.
    main = threading.current_thread() is threading.main_thread()
    caught: list[int] = []

    def interrupted(signum: int, frame: object) -> None:
        caught.append(signum)
        if len(caught) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted) if main else None
    try:
        gc.collect()  # the networks, DDP and Accelerate refer to one another
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        gc.collect()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def training_processes(device: str = "auto", mixed_precision: str = "no",
                       grad_accum: int = 1, unused_parameters: bool = False) -> Processes:
    """The processes a training runs in: those ``accelerate launch`` or ``torchrun`` started
    (WORLD_SIZE > 1: each on the GPU of its local rank, or, with ``--device cpu`` or no GPU,
    on the CPU, talking over gloo), else this one on ``--device``. ``unused_parameters``: some
    steps leave some parameters without a gradient (DDP then looks for them, at a cost).
    Close it when the training ends (``with processes:``); the process group Accelerate makes
    here is destroyed as the process exits.
    UsageError (exit 2) for an option out of its range or a precision the device lacks,
    before any work."""
    check_device(device)
    check_choice("--mixed-precision", mixed_precision, MIXED_PRECISIONS)
    check_range("--grad-accum", grad_accum, at_least=1)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and device.startswith("cuda:"):
        raise UsageError(f"--device {device}: each process of a multi-process run takes the GPU "
                         "of its local rank; use --device cuda or auto")
    dev = resolve_device(device)
    autocast(dev, mixed_precision)
    from accelerate import Accelerator  # only training needs it (and it takes a while to load)
    from accelerate.utils import DistributedDataParallelKwargs

    if several and not torch.distributed.is_initialized():
        # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument,
        # evaluated on import: imported once the group exists (DDP imports it, through
        # torch._dynamo), they would hold the group for good, and destroying it at exit could
        # not free it nor join its threads.
        importlib.import_module("torch.distributed.nn")
        atexit.register(_end_process_group)  # once: Accelerate makes the group here

    # Accelerate's state is one per process: a single process keeps it on its defaults and
    # places the networks itself (``--device cuda:N``), so that trainings on different devices
    # can follow one another in it. Mixed precision stays dubtool's own (``autocast``), the
    # same for one process or many, so Accelerate's is off (it would ignore the config's).
    accelerator = Accelerator(
        cpu=several and dev.type == "cpu", mixed_precision="no", device_placement=False,
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=unused_parameters)])
    return Processes(accelerator, accelerator.device if several else dev, mixed_precision,
                     grad_accum)


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    """The autocast training's mixed precision asks for: "bf16" on CUDA or CPU, "fp16" on CUDA
    only (on a CPU it is slow and needs loss scaling: a UsageError)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    if mixed_precision == "fp16" and device.type != "cuda":
        raise UsageError("--mixed-precision fp16 (or the config's training.mixed_precision) "
                         "needs CUDA (--device cuda); on a CPU use bf16 or no")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]
    return torch.autocast(device.type, dtype=dtype)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): only then is it
    faster than float32 (measured: the autoencoder 2.2x faster, outputs within 0.2 grey levels)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def sampling_precision(device: torch.device) -> torch.dtype:
    """The autocast type the networks sample in on ``device``."""
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
