"""Data-parallel training: two CPU processes (torchrun, gloo) against one at twice the batch.

Each run is tests/distributed_train.py under torchrun; the one-process runs go through the same
api.train in this process. Tiny networks without dropout (tiny_config), 32 px crops.
"""

import ast
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_nets import tiny_config
from typer.testing import CliRunner

from dubtool import api
from dubtool.cli import app

TESTS = Path(__file__).resolve().parent
MODULE = {"autoencoder": "autoencoder", "completion": "completion", "dubber": "dubber"}
# Float summation order (one mean over 2B samples against two over B), which Adam magnifies
# where a gradient is near 0: measured up to 5e-6 here, against a learning rate of 2e-4+.
TOLERANCE = 5e-5


def config_file(folder: Path, batch: int) -> Path:
    """The tiny config at ``batch`` samples per process for every trainer, as a JSON file."""
    config = tiny_config()
    config = config.replace(training=dataclasses.replace(
        config.training, batch_size=batch, autoencoder_batch_size=batch,
        completion_batch_size=batch))
    path = folder / f"tiny-batch{batch}.json"
    config.save(path)
    return path


def launch(*args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run`` (torchrun) of two processes: ``args`` a script
    and its arguments, or -m and a module."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "--monitor-interval", "0.2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


HELPER = str(TESTS / "distributed_train.py")
CLEAN_EXIT = str(TESTS / "clean_exit.py")


def launcher(name: str) -> list[str]:
    """The command of ``name`` (torchrun or accelerate launch) that starts two CPU processes
    of a script (then its arguments)."""
    if name == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "--monitor-interval", "0.2"]
    with socket.socket() as s:  # accelerate launch has no --standalone: a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port)]


def train_cli(config: Path, dataset: Path, run: Path, *more: str) -> list[str]:
    """``-m dubtool train completion`` of ``config`` on ``dataset`` into ``run``."""
    return ["-m", "dubtool", "train", "completion", "--config", str(config), "--data",
            str(dataset), "--out", str(run), "--device", "cpu", *more]


def ends(stderr: str) -> dict[int, tuple[str, list[str]]]:
    """Each process's exit status and the threads still running as its interpreter exited
    (clean_exit.py)."""
    found = re.findall(r"rank (\d+): exit (\S+), \d+ threads at exit: (\[[^\]]*\])", stderr)
    return {int(rank): (code, ast.literal_eval(names)) for rank, code, names in found}


def assert_ended_cleanly(stderr: str, code: str) -> None:
    """Both processes exited with ``code`` and reached the end of their interpreter with no
    thread but the main one (a Gloo thread still running there aborts the process), and none
    aborted."""
    assert "terminate called" not in stderr and "SIGABRT" not in stderr, stderr[-3000:]
    found = ends(stderr)
    assert {rank: (status, len(names)) for rank, (status, names) in found.items()} == {
        0: (code, 1), 1: (code, 1)}, (found, stderr[-3000:])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def one_process(part: str, config: Path, dataset: Path, run: Path, steps: int,
                autoencoder: Path | None) -> dict[str, float]:
    """The same training in this one process; its validation."""
    result = api.train(part, config, dataset, run, steps=steps, autoencoder=autoencoder,
                       device="cpu", epoch_steps=1, checkpoint_every=1)
    assert result.processes == 1
    return result.validation


@pytest.mark.parametrize("part", ["autoencoder", "completion", "dubber"])
def test_two_processes_at_batch_b_equal_one_at_2b(part: str, dataset: Path, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    """Two steps in 2 processes at batch B: both processes end with identical weights, equal
    (to float tolerance) to one process's at batch 2B; the validation they share among them
    is the one one process makes of those weights."""
    autoencoder = tiny_model if part == "dubber" else None
    extra = ["--autoencoder", str(autoencoder)] if autoencoder else []
    two = tmp_path / "two"
    done = launch(HELPER, part, str(config_file(tmp_path, 2)), str(dataset), str(two), "2",
                  *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    name = f"{MODULE[part]}.safetensors"
    ranks = [weights(tmp_path / f"two-rank{r}" / name) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert ranks[0].keys() == weights(two / "checkpoint" / name).keys()
    one_process(part, config_file(tmp_path, 4), dataset, tmp_path / "one", 2, autoencoder)
    difference = max_difference(ranks[0], weights(tmp_path / "one" / "checkpoint" / name))
    assert difference < TOLERANCE, difference
    start = json.loads((two / "log.jsonl").read_text().splitlines()[0])
    assert (start["processes"], start["batch"], start["global_batch"]) == (2, 2, 4)
    # Resumed here with no step left, the run validates its weights in one process.
    alone = api.train(part, config_file(tmp_path, 2), dataset, two, steps=2, resume=True,
                      autoencoder=autoencoder, device="cpu").validation
    for r in (0, 1):
        shared = json.loads((tmp_path / f"two-rank{r}" / "validation.json").read_text())
        assert shared.keys() == alone.keys()
        assert all(abs(shared[k] - alone[k]) < 1e-6 for k in alone), (shared, alone)


def test_two_process_run_killed_midway_resumes_to_the_one_run_through(
        dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The main process of a 2-process dubber run dies as step 3 ends (its checkpoint is of
    step 2) and torchrun stops the other; 'torchrun -m dubtool train ... --resume' takes it
    to step 4: its checkpoint then equals that of one uninterrupted run (one process at twice
    the batch)."""
    run, config = tmp_path / "two", config_file(tmp_path, 2)
    killed = launch(HELPER, "dubber", str(config), str(dataset), str(run), "4",
                    "--autoencoder", str(tiny_model), "--die-at", "3")
    assert killed.returncode != 0
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = launch("-m", "dubtool", "train", "dubber", "--config", str(config), "--data",
                     str(dataset), "--autoencoder", str(tiny_model), "--out", str(run),
                     "--steps", "4", "--epoch-steps", "1", "--checkpoint-every", "1",
                     "--device", "cpu", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("processes") == 1  # the result, printed by the main process
    assert "2 (global batch 4)" in resumed.stdout
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    starts = [(e["step"], e["processes"]) for e in log if "processes" in e]
    assert starts == [(0, 2), (2, 2)]
    assert [e["step"] for e in log if "validation" in e] == [1, 2, 3, 4]
    one_process("dubber", config_file(tmp_path, 4), dataset, tmp_path / "one", 4, tiny_model)
    for name in ("dubber.safetensors", "optimizer.safetensors"):
        ours, straight = (weights(folder / "checkpoint" / name)
                          for folder in (run, tmp_path / "one"))
        difference = max_difference(ours, straight)
        assert difference < TOLERANCE, (name, difference)
    states = [json.loads((folder / "checkpoint" / "state.json").read_text())
              for folder in (run, tmp_path / "one")]
    assert states[0] == states[1]  # the step, the optimiser's settings, the shared generator


@pytest.mark.parametrize(("args", "message"), [
    (["--mixed-precision", "fp32"], "--mixed-precision fp32: must be no, bf16, fp16"),
    (["--grad-accum", "0"], "--grad-accum 0: must be >= 1"),
    (["--mixed-precision", "fp16", "--device", "cpu"], "--mixed-precision fp16"),
])
def test_training_option_errors_exit_2_before_any_work(args: list[str], message: str,
                                                       tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "autoencoder", "--data", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_gradient_accumulation_takes_the_step_of_the_whole_batch(tmp_path: Path) -> None:
    """--grad-accum 2 over two halves of a batch: the step (SGD) of the whole batch at once."""
    from dubtool.devices import training_processes
    from dubtool.training.loop import RunFolder, TrainState, optimise

    data = torch.arange(8.0).reshape(4, 2) / 8

    def run(accumulate: int) -> torch.Tensor:
        torch.manual_seed(0)
        layer = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        parts = iter(data.chunk(accumulate) * 2)  # two steps

        def step_losses(rng) -> dict[str, torch.Tensor]:
            return {"total": layer(next(parts)).pow(2).mean()}

        optimise(RunFolder(tmp_path / str(accumulate), tiny_config(), False), {"layer": layer},
                 optimizer, TrainState(0, np.random.default_rng(0)), 2, step_losses, dict,
                 processes=training_processes("cpu", grad_accum=accumulate),
                 batch=4 // accumulate, grad_clip=100.0, epoch_steps=100, checkpoint_every=100,
                 progress=None)
        return torch.cat([p.detach().flatten() for p in layer.parameters()])

    torch.testing.assert_close(run(2), run(1), rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "runs"), [("torchrun", 3), ("accelerate", 1)])
def test_two_process_training_ends_with_nothing_left_running(
        name: str, runs: int, dataset: Path, tmp_path: Path) -> None:
    """Issue 29: a finished 2-process training sometimes aborted at exit (SIGABRT, "terminate
    called without an active exception"): the process group was never torn down, and Gloo's
    threads still ran as the interpreter exited. Now every process ends with its main thread
    alone, run after run, under either launcher."""
    config = config_file(tmp_path, 2)
    for k in range(runs):
        run = tmp_path / f"run{k}"
        done = subprocess.run([*launcher(name), CLEAN_EXIT, *train_cli(config, dataset, run,
                                                                      "--steps", "2")],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert_ended_cleanly(done.stderr, "0")
        assert (run / "model" / "completion.safetensors").exists()
        assert done.stdout.count("2 (global batch 4)") == 1


@pytest.mark.slow
def test_two_process_training_ends_cleanly_on_errors_and_ctrl_c(dataset: Path,
                                                                 tmp_path: Path) -> None:
    """Issue 29, the other ways a run ends: a validation error found once the processes
    are up (exit 4 in each), an exception in the middle of training in every process (exit
    1), Ctrl-C (the terminal's SIGINT to every process, then torchrun's: exit 130): each
    process tears its process group down and ends with its main thread alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = config_file(tmp_path, 2)

    # cpu-128 wants 128 px crops; the data set has 32 px ones.
    refused = subprocess.run([*launcher("torchrun"), CLEAN_EXIT, *train_cli(
        Path("cpu-128"), dataset, tmp_path / "refused", "--steps", "2")],
        capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0
    assert refused.stderr.count("data set crops are 32 px but the config wants 128 px") == 2
    assert_ended_cleanly(refused.stderr, "4")
    assert not (tmp_path / "refused").exists()

    failed = subprocess.run([*launcher("torchrun"), CLEAN_EXIT, "--fail-at", "2", *train_cli(
        config, dataset, tmp_path / "failed", "--steps", "4", "--epoch-steps", "100")],
        capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode != 0
    assert failed.stderr.count("injected failure in forward pass 2") == 2, failed.stderr[-3000:]
    assert_ended_cleanly(failed.stderr, "1")  # dubtool's internal error

    run = tmp_path / "interrupted"
    process = subprocess.Popen([*launcher("torchrun"), CLEAN_EXIT, *train_cli(
        config, dataset, run, "--steps", "1000000", "--epoch-steps", "1000000")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "log.jsonl").exists() and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)  # into the steps
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal: every process
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "interrupted:" in stderr, stderr[-3000:]
    assert_ended_cleanly(stderr, "130")
