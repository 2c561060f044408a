"""The pipeline object: a model on a device with its sampling settings, loaded once, that dubs
any number of videos.

>>> from dubtool import Dubber
>>> dubber = Dubber.from_pretrained("dubtool-cpu-128", device="auto")
>>> result = dubber.dub("talk.mp4", "speech.wav", "talk.dubbed.mp4")
>>> result.real_time_factor

``dubtool dub``, ``batch``, ``eval`` and ``bench`` all dub through it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from dubtool.devices import resolve_device
from dubtool.media.frames import check_video_output
from dubtool.media.probe import probe_video
from dubtool.nets.io import LoadedModel, load_model, model_digest
from dubtool.options import (
    DEFAULT_MODEL,
    DEFAULT_RENDERER,
    DEFAULT_SOURCES,
    RENDERERS,
    FaceChoice,
    check_choice,
    check_device,
    check_range,
    check_seed,
)
from dubtool.overlap import ahead
from dubtool.pipeline.adapt import Adaptation
from dubtool.pipeline.blend import blended_frames, write_video
from dubtool.pipeline.cache import StageRecord, clean_runs
from dubtool.pipeline.progress import StageProgress
from dubtool.pipeline.renderers import make_renderer
from dubtool.pipeline.renderers.base import DiffusionSettings
from dubtool.pipeline.run import Inputs, run_dub_stages
from dubtool.pipeline.timing import Stopwatch


@dataclass
class DubResult:
    output: Path
    seconds_of_video: float
    frames: int
    dubbed_frames: int
    passed_through: int
    wall_seconds: float
    reference_frame: int
    faces_seen: int = 1
    stages: list[StageRecord] = field(default_factory=list)
    # (frames, 131, 2) the landmarks the lower face was drawn to, normalised to each frame's
    # crop box: the frame's pose points with the lip/jaw points predicted from the speech.
    landmarks: np.ndarray | None = field(default=None, repr=False)
    adaptation: Adaptation | None = None  # what the adapt stage did (None: not asked for)

    @property
    def real_time_factor(self) -> float:
        """Processing seconds per second of video."""
        return self.wall_seconds / max(self.seconds_of_video, 1e-9)


# The options of a ``Dubber`` (the others are ``Dubber.dub``'s).
DUBBER_OPTIONS = ("renderer", "sources", "steps", "eta", "strength", "seed", "batch_size")


def check_dub_options(*, steps: int | None = None, strength: float | None = None,
                      batch_size: int = 1, seed: int = 0, device: str = "auto",
                      reference_frame: int | None = None, renderer: str = DEFAULT_RENDERER,
                      sources: int = DEFAULT_SOURCES, **_: object) -> None:
    """UsageError (exit 2) for a dub option outside its range: what needs neither the inputs
    nor the model to check (``**_``: the other options of a batch)."""
    check_range("--steps", steps, at_least=1)
    check_range("--strength", strength, above=0, at_most=1)
    check_range("--batch-size", batch_size, at_least=1)
    check_range("--reference-frame", reference_frame, at_least=0)
    check_seed(seed)
    check_device(device)
    check_choice("--renderer", renderer, RENDERERS)
    check_range("--sources", sources, at_least=1)


class Dubber:
    """A model (``nets.io.LoadedModel``) moved to ``device`` ("auto": CUDA when there is one)
    with the renderer that draws its lower faces and that renderer's settings.

    ``renderer``: ``native`` (from the video's own frames at their own size) or ``diffusion``
    (by the model at its crop size, ``pipeline.renderers``). ``sources``: how many of the
    video's frames the native renderer may draw from (1: the reference frame alone).
    ``steps``, ``eta`` (the noise DDIM adds at each step: 0 none, 1 as much as DDPM) and
    ``strength`` default to the model's ``diffusion`` config (the diffusion renderer's).
    ``seed`` drives the diffusion's noise and the adaptation's sampling. Options outside
    their range raise UsageError before any work.
    """

    def __init__(self, model: LoadedModel, *, device: str = "auto",
                 renderer: str = DEFAULT_RENDERER, sources: int = DEFAULT_SOURCES,
                 steps: int | None = None, eta: float | None = None,
                 strength: float | None = None, seed: int = 0, batch_size: int = 1) -> None:
        check_dub_options(steps=steps, strength=strength, batch_size=batch_size, seed=seed,
                          device=device, renderer=renderer, sources=sources)
        diffusion = model.config.diffusion
        # DDIM cannot take more steps than the schedule the model was trained on has.
        check_range("--steps", steps, at_least=1, at_most=diffusion.train_steps)
        self.device = resolve_device(device)
        # Moved in place, as torch's .to does: a model loaded by the caller may sit on another
        # device than the one resolved here, e.g. on the CPU while "auto" picks CUDA.
        self.model = model.to(self.device)
        self.model_digest = model_digest(model.folder)
        self.seed = seed
        self.settings = DiffusionSettings(diffusion.sample_steps if steps is None else steps,
                                          diffusion.eta if eta is None else eta, seed,
                                          diffusion.strength if strength is None else strength,
                                          batch_size)
        self.renderer = make_renderer(renderer, self.model, self.model_digest, self.settings,
                                      self.device, sources)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path = DEFAULT_MODEL, *, device: str = "auto",
                        renderer: str = DEFAULT_RENDERER, **options: object) -> Dubber:
        """The model folder ``name_or_dir`` (a shipped model's name or a path), loaded with
        the networks ``renderer`` needs (the native renderer: the landmark completion alone).
        Options as for the constructor, checked before the model is read."""
        check_dub_options(device=device, renderer=renderer, **options)
        model = load_model(name_or_dir, completion_only=renderer == "native")
        return cls(model, device=device, renderer=renderer, **options)

    def dub(self, video: str | Path, speech: str | Path, output: str | Path | None = None, *,
            reference_frame: int | None = None, face: FaceChoice = "largest",
            loop: str = "pingpong", cache_dir: str | Path | None = None, force: bool = False,
            keep_cache: bool = True, lock_timeout: float = 0.0,
            reconstruction_gap: float | None = None, adapt: bool = True,
            progress: StageProgress | None = None) -> DubResult:
        """Dub ``video`` with ``speech``: the lower face follows the new speech.

        The output (default: ``<video name>.dubbed.mp4`` in the current folder) has the
        video's size and frame rate, lasts as long as the speech, and carries the speech. It
        is written under a temporary name and appears only when complete. If another process
        is dubbing the same video with the same speech, wait up to ``lock_timeout`` seconds
        for it (then reuse its cached stages) before failing. ``reconstruction_gap`` (seconds;
        the eval's protocol): references come from the whole video but never from within
        that long of the frame they serve. ``adapt``: fine-tune the completion on the video's
        own sound and lips first.
        """
        start = time.perf_counter()
        check_range("--reference-frame", reference_frame, at_least=0)
        check_range("reconstruction_gap", reconstruction_gap, at_least=0)
        inputs = Inputs.of(video, speech)
        target = Path(output) if output is not None else Path(f"{inputs.video.stem}.dubbed.mp4")
        target = check_video_output(target, [inputs.video, inputs.speech])
        if reference_frame is not None:
            last = probe_video(inputs.video).frame_count - 1
            check_range("--reference-frame", reference_frame, at_least=0, at_most=last)
        # One BLAS thread: OpenBLAS's second thread spins while it waits for work, on the
        # core that x264, FaceMesh or the stage beside this one needs, and the dub's matrix
        # products (a spline through 139 points a frame, one ridge solve) are too small to
        # gain from it (measured: a warm 10 s 512 px dub 4.4 -> 2.8 s).
        with threadpool_limits(limits=1, user_api="blas"), \
                inputs.open_cache(cache_dir, lock_timeout) as cache:
            stages = run_dub_stages(cache, inputs, self.model, self.model_digest, self.renderer,
                                    loop=loop, face=face, reference_frame=reference_frame,
                                    reconstruction_gap=reconstruction_gap, adapt=adapt,
                                    seed=self.seed, device=self.device, force=force,
                                    progress=progress)
            front = stages.front
            plan = front.extracted.plan
            blending = Stopwatch()  # not a cached stage: its output is the dub itself
            # Decoding, drawing and pasting the lower faces run a few frames ahead of the
            # encoder, on the other core.
            frames = ahead(blended_frames(front.extracted.video, front.track, plan,
                                          stages.faces,
                                          cache.dir / f"frames.tmp-{os.getpid()}.jpegs"))
            dubbed = write_video(frames, front.extracted.video, len(plan), target,
                                 inputs.speech, None if progress is None else
                                 lambda done, total: progress("blend", done, total))
            records = [*cache.records, StageRecord.of("blend", "ran", blending.span())]
            # A map that outlives the cache entry's removal and holds only what a caller reads.
            landmarks = np.load(stages.completion.target.path, mmap_mode="r")
        if not keep_cache:
            clean_runs(cache.root, [cache.key])
        return DubResult(target, front.extracted.output_seconds, len(plan), dubbed,
                         len(plan) - dubbed, time.perf_counter() - start,
                         stages.reference_frame, front.track.faces_seen, records, landmarks,
                         stages.adaptation)
