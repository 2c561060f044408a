"""One training run of the multi-process tests (test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node N tests/distributed_train.py \
        PART CONFIG DATA RUN STEPS [--autoencoder MODEL] [--die-at K]

Trains PART with dubtool.api.train on the CPU (validating and checkpointing at every step up
to STEPS) and writes what each process ends with to RUN-rank{R}/: its trained weights
(NAME.safetensors) and the validation it returned (validation.json); the run folder itself is
the main process's alone. ``--die-at K``: the main process dies (os._exit, no clean-up) as
step K ends, before its checkpoint, and torchrun stops the other; the run folder holds the
checkpoint of step K - 1.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import dubtool.training.autoencoder
import dubtool.training.dubber
from dubtool import api
from dubtool.nets.io import save_weights


def keep_each_process_weights(optimise):
    """``optimise``, then this process's modules saved beside the run folder."""

    def wrapped(run, modules, *args, **kwargs):
        result = optimise(run, modules, *args, **kwargs)
        folder = Path(f"{run.folder}-rank{os.environ['RANK']}")
        folder.mkdir(exist_ok=True)
        for name, module in modules.items():
            save_weights(module, folder / f"{name}.safetensors")
        return result

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("part", "config", "data", "run"):
        parser.add_argument(name)
    parser.add_argument("steps", type=int)
    parser.add_argument("--autoencoder")
    parser.add_argument("--die-at", type=int)
    args = parser.parse_args()
    for module in (dubtool.training.autoencoder, dubtool.training.dubber):
        module.optimise = keep_each_process_weights(module.optimise)

    def progress(step: int, total: int, losses: dict[str, float]) -> None:
        if step == args.die_at:
            os._exit(1)

    result = api.train(args.part, args.config, args.data, args.run, steps=args.steps,
                       autoencoder=args.autoencoder, device="cpu", epoch_steps=1,
                       checkpoint_every=1, progress=progress)
    folder = Path(f"{args.run}-rank{os.environ['RANK']}")
    (folder / "validation.json").write_text(json.dumps(result.validation))


if __name__ == "__main__":
    main()
