"""Soak test, not part of CI's default run: a batch of dubs killed at random moments.

    python tests/soak.py [--dubs 50] [--work /tmp/dubtool-soak] [--seed 0]

Builds a tiny random model and DUBS (video, speech) pairs from tests/data/face_2s.mp4 and
synthetic speech, dubs them once without interruption (the reference), then runs the same
batch again in a fresh cache and output folder, killing the whole process group with SIGKILL
every few seconds (3-10 s) and restarting it, until a run finishes. Then checks that every
output exists, decodes to exactly the reference's frames and carries audio, and that no
temporary or partial file is left in the cache or the output folder. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parent


def build_inputs(work: Path, dubs: int) -> tuple[Path, Path, Path]:
    """The tiny model folder and the two manifests (reference and soak outputs)."""
    sys.path.insert(0, str(TESTS))
    from test_nets import save_tiny_model

    model = save_tiny_model(work / "model")

    inputs = work / "inputs"
    inputs.mkdir()
    video = inputs / "face_1s.mp4"
    ffmpeg("-i", str(TESTS / "data" / "face_2s.mp4"), "-t", "1", "-c", "copy", str(video))
    manifests = []
    for kind in ("reference", "soak"):
        manifest = work / f"{kind}.csv"
        with manifest.open("w", newline="") as f:
            rows = csv.writer(f)
            for i in range(dubs):
                speech = inputs / f"speech_{i:02d}.wav"
                if not speech.exists():
                    seconds = 0.6 + 0.2 * (i % 5)
                    ffmpeg("-f", "lavfi", "-i",
                           f"sine=frequency={180 + 7 * i}:duration={seconds}:sample_rate=16000",
                           str(speech))
                rows.writerow([video, speech, work / kind / f"dub_{i:02d}.mp4"])
        manifests.append(manifest)
    return model, manifests[0], manifests[1]


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


# The tiny model gains nothing from threads; spinning OpenMP threads only slow it down.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def batch_command(model: Path, manifest: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "dubtool", "batch", "--manifest", str(manifest), "--model",
            str(model), "--cache-dir", str(cache), "--device", "cpu"]


def frames_of(path: Path) -> np.ndarray:
    from dubtool.media.frames import read_frames
    from dubtool.media.probe import probe_video

    return np.stack([f.copy() for f in read_frames(probe_video(path))])


def leftovers(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*")
            if ".tmp-" in p.name or ".partial" in p.name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dubs", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dubtool-soak"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-kill", type=float, default=3.0)
    parser.add_argument("--max-kill", type=float, default=10.0)
    parser.add_argument("--max-kills", type=int, default=500, help="give up after this many")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    model, reference, soak = build_inputs(args.work, args.dubs)

    start = time.perf_counter()
    done = subprocess.run(batch_command(model, reference, args.work / "reference_cache"),
                          capture_output=True, text=True, env=CHILD_ENV)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:])
        return 1
    reference_seconds = time.perf_counter() - start

    kills, start = 0, time.perf_counter()
    command = batch_command(model, soak, args.work / "soak_cache")
    while True:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True,  # its own group: ffmpeg dies with it
                                env=CHILD_ENV)
        try:
            proc.wait(timeout=rng.uniform(args.min_kill, args.max_kill))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            if kills >= args.max_kills:
                print(f"no progress after {kills} kills")
                return 1
            continue
        if proc.returncode != 0:
            print(proc.stderr.read().decode()[-2000:])
            return 1
        break
    soak_seconds = time.perf_counter() - start

    failures = []
    for i in range(args.dubs):
        ours = args.work / "soak" / f"dub_{i:02d}.mp4"
        theirs = args.work / "reference" / f"dub_{i:02d}.mp4"
        if not ours.is_file():
            failures.append(f"{ours.name}: missing")
        elif not np.array_equal(frames_of(ours), frames_of(theirs)):
            failures.append(f"{ours.name}: frames differ from the uninterrupted run")
    stray = leftovers(args.work / "soak_cache", args.work / "soak")
    failures += [f"{p}: temporary file left behind" for p in stray]
    print(f"{args.dubs} dubs; uninterrupted batch {reference_seconds:.0f} s; soak batch "
          f"{soak_seconds:.0f} s with {kills} SIGKILLs; outputs identical: "
          f"{args.dubs - sum('differ' in f or 'missing' in f for f in failures)}/{args.dubs}; "
          f"temporary files left: {len(stray)}")
    for failure in failures:
        print("FAIL", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
