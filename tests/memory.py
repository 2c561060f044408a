"""Peak RSS of the stages that grow with the speech, not part of CI's default run.

    python tests/memory.py VIDEO SPEECH MODEL CACHE

Runs extract, landmarks and complete on (VIDEO, SPEECH) in this process, in the run cache
under CACHE, with MODEL's completion network loaded, and prints the output frames, the stage
times and the process's peak RSS (docs/robustness.md, "Memory and the speech's length").
"""

from __future__ import annotations

import resource
import sys

from dubtool.nets.io import load_model
from dubtool.pipeline import complete as complete_stage
from dubtool.pipeline.run import Inputs, run_front


def main(video: str, speech: str, model: str, cache_dir: str) -> None:
    loaded = load_model(model)
    completion = loaded.dubber.completion
    inputs = Inputs.of(video, speech)
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs, force=True)
        extracted = front.extracted
        cache.run_stage("complete", "memory", lambda out: complete_stage.complete(
            completion, front.track, extracted.plan, extracted.mel, extracted.video.fps, out,
            loaded.config.inference.complete),
            force=True)
        times = ", ".join(f"{r.stage} {r.seconds:.1f} s" for r in cache.records)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(extracted.plan)} output frames; {times}; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main(*sys.argv[1:5])
