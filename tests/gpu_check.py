"""GPU check, not part of CI's run (``make gpu-check``): what a CUDA machine is to measure.

    python tests/gpu_check.py [--out gpu-check.json] [--steps 200]

1. the tests marked ``cuda`` (pytest -m cuda);
2. ``dubtool bench`` on the bundled clip, on cuda: the shipped cpu-128 model with the native
   renderer (the default) and with the diffusion renderer sampling the whole schedule (10 DDIM
   steps from noise: autoencoder, denoiser and scheduler on the GPU), and an untrained
   paper-256 model (random weights: the speed of the paper's sizes) with the diffusion
   renderer likewise: ms/frame of every stage of the cold dub, its real-time factor and that
   of a fresh process;
3. ``--steps`` training steps of the paper-256 dubber in bf16 on the bundled clip prepared at
   256 px: samples/s and peak GPU memory.
Prints one table and writes the numbers to ``--out`` (JSON). Exits 1 without a CUDA GPU and 1
if a part fails. Sized to take under 8 minutes on one recent GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def cuda_tests() -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(TESTS)],
                          capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    return {"passed": proc.returncode == 0, "summary": summary,
            "seconds": round(time.perf_counter() - start, 1)}


def bench(model: str | Path, renderer: str = "native") -> dict:
    from dubtool import api

    diffusion = {"steps": 10, "strength": 1.0} if renderer == "diffusion" else {}
    report = api.bench(model=model, device="cuda", repeat=1, renderer=renderer, **diffusion)
    cold = report.runs[0]
    return {"ms_per_frame": {k: round(v, 2) for k, v in cold.stage_ms_per_frame.items()},
            "rtf_cold": round(cold.real_time_factor, 3),
            "rtf_process": round(report.process_real_time_factor, 3),
            "precision": report.settings["precision"], "frames": report.frames}


def untrained_paper_model(folder: Path) -> Path:
    import torch

    from dubtool.nets.autoencoder import FaceAutoencoder
    from dubtool.nets.config import ModelConfig
    from dubtool.nets.dubber import DubbingModel
    from dubtool.nets.io import save_model

    torch.manual_seed(0)
    config = ModelConfig.named("paper-256")
    return save_model(folder, config, FaceAutoencoder(config.autoencoder), DubbingModel(config))


def train_paper(work: Path, model: Path, steps: int) -> dict:
    import torch

    from dubtool import api

    videos = work / "videos" / "may"
    videos.mkdir(parents=True)
    shutil.copy(api.BUNDLED_CLIP, videos / "may_5s.mp4")
    api.prepare(work / "videos", work / "data", crop_size=256, cache_dir=work / "cache")
    torch.cuda.reset_peak_memory_stats()
    result = api.train("dubber", "paper-256", work / "data", work / "run", steps=steps,
                       autoencoder=model, device="cuda", mixed_precision="bf16",
                       epoch_steps=steps, checkpoint_every=steps)
    return {"steps": result.steps, "global_batch": result.global_batch,
            "seconds_per_step": round(result.seconds_per_step, 4),
            "samples_per_second": round(result.global_batch / result.seconds_per_step, 1),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "validation": result.validation}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA GPU on this machine; run it on one",
              file=sys.stderr)
        return 1
    from rich.console import Console
    from rich.table import Table

    from dubtool.evaluation.bench import machine

    start = time.perf_counter()
    results: dict = machine()
    parts = {"cuda tests": cuda_tests}
    with tempfile.TemporaryDirectory(prefix="dubtool-gpu-check-") as scratch:
        work = Path(scratch)
        paper = untrained_paper_model(work / "paper-256")
        parts["bench cpu-128 native"] = lambda: bench("dubtool-cpu-128")
        parts["bench cpu-128 diffusion, 10 steps"] = lambda: bench("dubtool-cpu-128", "diffusion")
        parts["bench paper-256 (untrained) diffusion, 10 steps"] = lambda: bench(paper,
                                                                                  "diffusion")
        parts[f"train paper-256 dubber bf16, {args.steps} steps"] = (
            lambda: train_paper(work, paper, args.steps))
        failed = False
        for name, part in parts.items():
            try:
                results[name] = part()
            except Exception as exc:  # one failing part: the others are still measured
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed |= "error" in results[name] or results[name].get("passed") is False
    results["seconds"] = round(time.perf_counter() - start, 1)
    table = Table("part", "result", title=f"gpu-check on {results['cuda']}")
    for name in parts:
        table.add_row(name, json.dumps(results[name]))
    table.add_row("total", f"{results['seconds']} s")
    Console().print(table)
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"written: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
