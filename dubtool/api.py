"""dubtool's library API: every CLI command is one call here.

>>> import dubtool
>>> result = dubtool.landmarks("talk.mp4", output="debug.mp4", json_path="points.json")
>>> result.track.faces_found, result.track.ms_per_frame
>>> dubtool.prepare("videos/", "dataset/")
>>> dubtool.train("autoencoder", "cpu-128", "dataset/", "runs/ae", steps=2000)
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dubtool.errors import (
    DubtoolError,
    InputNotFound,
    InvalidMedia,
    OutputError,
    UsageError,
    disk_full_reported,
)
from dubtool.options import (
    DEFAULT_REFERENCES,
    DEFAULT_RENDERER,
    MIXED_PRECISIONS,
    RENDERERS,
    FaceChoice,
    check_choice,
    check_device,
    check_range,
    check_seed,
)

# Only light modules at the top: the command line imports this one to parse its arguments, and
# each function imports what it needs (torch and diffusers take seconds).
if TYPE_CHECKING:
    import numpy as np

    from dubtool.evaluation.bench import BenchReport
    from dubtool.nets.io import LoadedModel
    from dubtool.pipeline.adapt import Adaptation
    from dubtool.pipeline.cache import RunSummary, StageRecord
    from dubtool.pipeline.extract import Extracted
    from dubtool.pipeline.landmarks import FaceTrack
    from dubtool.pipeline.run import StageProgress
    from dubtool.training.dataset import ClipReport
    from dubtool.training.loop import TrainProgress, TrainResult


@dataclass
class LandmarksResult:
    extracted: Extracted
    track: FaceTrack
    output: Path | None
    json_path: Path | None
    stages: list[StageRecord] = field(default_factory=list)
    cache_dir: Path | None = None


def landmarks(video: str | Path, output: str | Path | None = None,
              json_path: str | Path | None = None, *, detector: str = "mediapipe",
              face: FaceChoice = "largest", cache_dir: str | Path | None = None,
              force: bool = False, progress: StageProgress | None = None) -> LandmarksResult:
    """Detect the face in every frame; optionally draw a debugging video and write the points.

    The video at ``output`` shows the 131 points (pose and lip/jaw in two colours) and the crop
    box on every frame, with the original audio. ``json_path`` gets the points per frame.
    """
    from dubtool.media.frames import check_output_path, check_video_output
    from dubtool.pipeline.run import Inputs, run_front

    inputs = Inputs.of(video)
    checked = [check(p, [inputs.video]) for p, check in
               ((output, check_video_output), (json_path, check_output_path)) if p is not None]
    if len(set(checked)) < len(checked):
        raise OutputError("the video and JSON outputs must be different files", checked[0])
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs, detector=detector, face=face, force=force,
                          progress=progress)
    result = LandmarksResult(front.extracted, front.track,
                             None if output is None else check_output_path(output),
                             None if json_path is None else check_output_path(json_path),
                             cache.records, cache.dir)
    if result.output is not None:
        _write_debug_video(result, progress)
    if result.json_path is not None:
        _write_points_json(result)
    return result


def _write_debug_video(result: LandmarksResult, progress: StageProgress | None) -> None:
    from dubtool.face.draw import draw_face
    from dubtool.media.frames import VideoWriter, read_frames

    video, track = result.extracted.video, result.track
    with VideoWriter(result.output, video.width, video.height, video.fps,
                     audio=video.path if video.has_audio else None) as writer:
        for i, frame in enumerate(read_frames(video)):
            found = bool(track.detected[i])
            label = None if found else f"frame {i}: no face"
            writer.write(draw_face(frame, track.points[i] if found else None,
                                   track.box(i) if track.detected.any() else None, label))
            if progress is not None:
                progress("draw", i + 1, video.frame_count)


def _write_points_json(result: LandmarksResult) -> None:
    from dubtool.face.indices import NUM_POSE, ORDER
    from dubtool.media.frames import partial_path, replace_output

    video, track = result.extracted.video, result.track
    frames = []
    for i in range(track.frames):
        found = bool(track.detected[i])
        frames.append({
            "index": i,
            "time": round(i / float(video.fps), 4),
            "face": found,
            "box": [int(v) for v in track.boxes[i]] if found else None,
            "points": [[round(float(x), 2), round(float(y), 2)] for x, y in track.points[i]]
            if found else None,
        })
    data = {
        "video": video.path, "width": video.width, "height": video.height,
        "fps": float(video.fps), "frame_count": track.frames, "detector": track.detector,
        "points": "131 MediaPipe FaceMesh points in pixels, smoothed; the first "
                  f"{NUM_POSE} are pose points, the rest lip/jaw",
        "mediapipe_indices": list(ORDER), "frames": frames,
    }
    tmp = partial_path(result.json_path)
    try:
        tmp.write_text(json.dumps(data))
        replace_output(tmp, result.json_path)
    finally:
        tmp.unlink(missing_ok=True)


DEFAULT_MODEL = "dubtool-cpu-128"
# The reconstruction protocol: no reference from within this many seconds of its frame.
REFERENCE_GAP_SECONDS = 2.0


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


def dub(video: str | Path, speech: str | Path, output: str | Path | None = None, *,
        model: str | Path | LoadedModel = DEFAULT_MODEL, steps: int | None = None, seed: int = 0,
        eta: float | None = None, strength: float | None = None, batch_size: int = 1,
        device: str = "auto", reference_frame: int | None = None, face: FaceChoice = "largest",
        loop: str = "pingpong", renderer: str = DEFAULT_RENDERER,
        references: int = DEFAULT_REFERENCES,
        cache_dir: str | Path | None = None, force: bool = False,
        keep_cache: bool = True, lock_timeout: float = 0.0,
        reconstruction_gap: float | None = None, adapt: bool = True,
        progress: StageProgress | None = None) -> DubResult:
    """Dub ``video`` with ``speech``: the lower face follows the new speech.

    The output (default: ``<video name>.dubbed.mp4`` in the current folder) has the video's
    size and frame rate, lasts as long as the speech, and carries the speech as AAC. It is
    written under a temporary name and appears only when complete. ``model`` is a model
    name or folder, or a model already loaded (``dubtool.nets.io.load_model``) to reuse it
    (it is moved to ``device``).
    If another process is dubbing the same video with the same speech, wait up to
    ``lock_timeout`` seconds for it (then reuse its cached stages) before failing.
    ``steps``, ``eta`` (the noise DDIM adds at each step: 0 none, 1 as much as DDPM) and
    ``strength`` default to the model's ``diffusion`` config (the ``diffusion`` renderer's).
    ``renderer``: how the lower face is made (``pipeline.render``: ``native`` from the video's
    own frames at their own size, ``diffusion`` by the model at its crop size);
    ``references``: how many of the video's frames the native renderer may draw from (1: the
    reference frame alone; more: per output frame the nearest mouth shape among that many, the
    reference frame preferred, ``pipeline.references``).
    ``reconstruction_gap`` (seconds; the eval's protocol): references come from the whole
    video but never from within that long of the frame they serve. Options outside their
    range raise UsageError before any work.
    """
    import numpy as np

    from dubtool.devices import resolve_device
    from dubtool.media.frames import check_video_output
    from dubtool.media.probe import probe_video
    from dubtool.nets.io import LoadedModel, load_model, model_digest
    from dubtool.pipeline.blend import blended_frames, write_video
    from dubtool.pipeline.cache import clean_runs
    from dubtool.pipeline.render import DiffusionSettings, make_renderer
    from dubtool.pipeline.run import Inputs, run_dub_stages

    start = time.perf_counter()
    _check_dub_options(steps=steps, strength=strength, batch_size=batch_size, seed=seed,
                       device=device, reference_frame=reference_frame, renderer=renderer,
                       references=references)
    check_range("reconstruction_gap", reconstruction_gap, at_least=0)
    inputs = Inputs.of(video, speech)
    target = Path(output) if output is not None else Path(f"{inputs.video.stem}.dubbed.mp4")
    target = check_video_output(target, [inputs.video, inputs.speech])
    if reference_frame is not None:
        last = probe_video(inputs.video).frame_count - 1
        check_range("--reference-frame", reference_frame, at_least=0, at_most=last)
    dev = resolve_device(device)
    # A model the caller loaded is moved too (in place, as torch's .to does): it may sit on
    # another device than the one resolved here, e.g. on the CPU while "auto" picks CUDA.
    loaded = (model if isinstance(model, LoadedModel) else
              load_model(model, completion_only=renderer == "native")).to(dev)
    diffusion = loaded.config.diffusion
    # DDIM cannot take more steps than the schedule the model was trained on has.
    check_range("--steps", steps, at_least=1, at_most=diffusion.train_steps)
    settings = DiffusionSettings(diffusion.sample_steps if steps is None else steps,
                                 diffusion.eta if eta is None else eta, seed,
                                 diffusion.strength if strength is None else strength,
                                 batch_size)
    digest = model_digest(loaded.folder)
    with inputs.open_cache(cache_dir, lock_timeout) as cache:
        stages = run_dub_stages(cache, inputs, loaded, digest,
                                make_renderer(renderer, loaded, digest, settings, dev,
                                              references),
                                loop=loop, face=face, reference_frame=reference_frame,
                                reconstruction_gap=reconstruction_gap, adapt=adapt, seed=seed,
                                device=dev, force=force, progress=progress)
        front = stages.front
        plan = front.extracted.plan
        frames = blended_frames(front.extracted.video, front.track, plan, stages.faces,
                                cache.dir / f"frames.tmp-{os.getpid()}.jpegs")
        dubbed = write_video(frames, front.extracted.video, len(plan), target, inputs.speech,
                             None if progress is None else
                             lambda done, total: progress("blend", done, total))
        records = list(cache.records)
        # A map that outlives the cache entry's removal and holds only what a caller reads.
        landmarks = np.load(stages.completion.target.path, mmap_mode="r")
    if not keep_cache:
        clean_runs(cache.root, [cache.key])
    return DubResult(target, front.extracted.output_seconds, len(plan), dubbed,
                     len(plan) - dubbed, time.perf_counter() - start, stages.reference_frame,
                     front.track.faces_seen, records, landmarks, stages.adaptation)


def _check_dub_options(*, steps: int | None = None, strength: float | None = None,
                       batch_size: int = 1, seed: int = 0, device: str = "auto",
                       reference_frame: int | None = None, renderer: str = DEFAULT_RENDERER,
                       references: int = DEFAULT_REFERENCES, **_: object) -> None:
    """UsageError (exit 2) for a dub option outside its range: what needs neither the inputs
    nor the model to check (``**_``: the other options of a batch)."""
    check_range("--steps", steps, at_least=1)
    check_range("--strength", strength, above=0, at_most=1)
    check_range("--batch-size", batch_size, at_least=1)
    check_range("--reference-frame", reference_frame, at_least=0)
    check_seed(seed)
    check_device(device)
    check_choice("--renderer", renderer, RENDERERS)
    check_range("--references", references, at_least=1)


def cache_list(cache_dir: str | Path | None = None) -> list[RunSummary]:
    """The cached runs, most recently used first."""
    from dubtool.pipeline.cache import list_runs

    return list_runs(cache_dir)


def cache_limit() -> int:
    """The cache's size limit in bytes ($DUBTOOL_CACHE_LIMIT_GB, default 10 GB; 0: none):
    after each run the least recently used runs not in use are removed down to it."""
    from dubtool.pipeline.cache import cache_limit_bytes

    return cache_limit_bytes()


def cache_clean(cache_dir: str | Path | None = None, keys: Sequence[str] | None = None,
                older_than_days: float | None = None) -> list[RunSummary]:
    """Remove cached runs (all, by key prefix, or unused for some days); returns them."""
    from dubtool.pipeline.cache import clean_runs

    check_range("--older-than", older_than_days, at_least=0)
    return clean_runs(cache_dir, list(keys) if keys else None, older_than_days)


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


def train(part: str, config: str | Path, data: str | Path, out: str | Path, *,
          steps: int, autoencoder: str | Path | None = None,
          completion: str | Path | None = None, init: str | Path | None = None,
          end2end: bool = True, device: str = "auto", resume: bool = False, epoch_steps: int = 200,
          checkpoint_every: int = 50, decay_steps: int = 0, refine: float = 0.0,
          seed: int = 0, into: str | Path | None = None, mixed_precision: str | None = None,
          grad_accum: int = 1, progress: TrainProgress | None = None) -> TrainResult:
    """Train ``part``: "autoencoder" first; optionally "completion" (the landmark completion
    alone, fast; ``into``: a model folder that RUN/model then copies with this completion);
    then "dubber" on top of the trained autoencoder (and completion). In this process, or data
    parallel in each process that ``accelerate launch`` or ``torchrun`` started (the config's
    batch sizes are per process); ``mixed_precision``: no, bf16 or fp16 (None: the config's);
    ``grad_accum``: batches whose gradients each step sums."""
    # torch and diffusers are imported only by the commands that need them: start-up stays fast.
    from dubtool.nets.config import ModelConfig

    check_range("--steps", steps, at_least=1)
    check_range("--epoch-steps", epoch_steps, at_least=1)
    check_range("--checkpoint-every", checkpoint_every, at_least=1)
    check_range("--decay-steps", decay_steps, at_least=0)
    check_range("--refine", refine, at_least=0, at_most=1)
    check_seed(seed)
    check_device(device)
    check_choice("--mixed-precision", mixed_precision, MIXED_PRECISIONS)
    check_range("--grad-accum", grad_accum, at_least=1)
    model_config = ModelConfig.named(config)
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
    if part == "completion":
        from dubtool.training.dubber import train_completion

        return train_completion(model_config, data, out, steps, init=completion, into=into,
                                **common)
    raise ValueError(f"unknown part {part!r}: autoencoder, completion or dubber")


def offsets(data: str | Path, completion: str | Path, *, device: str = "auto"):
    """Measure the audio-video offset of every training clip of the prepared data set
    ``data`` with a trained landmark completion (its safetensors, with the run's config.json
    beside it) and write ``data``/offsets.json, which training then applies (shifts the
    confident offsets, leaves out clips it cannot trust). Returns (offsets, path)."""
    from dubtool.devices import resolve_device
    from dubtool.nets.config import ModelConfig
    from dubtool.nets.io import load_weights
    from dubtool.nets.landmark_completion import LandmarkCompletion
    from dubtool.training.dataset import PreparedData
    from dubtool.training.offsets import measure_offsets, save_offsets

    weights = Path(completion)
    config = ModelConfig.load(weights.parent / "config.json")
    dev = resolve_device(device)
    module = LandmarkCompletion(config.completion).to(dev)
    load_weights(module, weights)
    train = PreparedData(data, "train", ignore_offsets=True)
    measured = measure_offsets(module, train.clips, dev)
    return measured, save_offsets(data, measured)


AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus", ".wma"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".m4v", ".png",
                  ".jpg", ".jpeg"}


@dataclass(frozen=True)
class BatchItem:
    video: Path
    speech: Path
    output: Path


@dataclass
class BatchOutcome:
    item: BatchItem
    status: str  # "done", "skipped" (output exists) or "failed"
    seconds: float
    reason: str = ""  # why skipped or failed; NOTHING_DUBBED for a video without a face
    traceback: str = ""  # of a failure: `dubtool --debug batch` shows it


NOTHING_DUBBED = "no face found: written undubbed"


def batch_items(folder: str | Path | None = None, *, speech: str | Path | None = None,
                manifest: str | Path | None = None, out_dir: str | Path = "dubbed",
                shard: tuple[int, int] = (1, 1)) -> list[BatchItem]:
    """The jobs of a batch: videos of ``folder`` paired with the speech file of the same name
    (or one ``speech`` for all), or the rows video,speech[,output] of a CSV ``manifest``
    (paths relative to it). ``shard`` (k, n) keeps every n-th job starting at the k-th.

    Outputs are ``OUT_DIR/NAME.dubbed.mp4``, or ``OUT_DIR/NAME.EXT.dubbed.mp4`` for videos of
    a folder that share a name (``a.mp4`` and ``a.mov``). Two jobs that would still write one
    output (manifest rows) are refused (UsageError) before any work: one would be skipped or
    overwrite the other."""
    import csv
    from collections import Counter

    out_dir = Path(out_dir)
    items: list[BatchItem] = []
    if manifest is not None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise InputNotFound("no such manifest", manifest)
        # utf-8-sig: a byte order mark (spreadsheets write one) is not part of the first cell.
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                for row in reader:
                    cells = [cell.strip() for cell in row]
                    if not any(cells) or cells[0].lower() == "video" or cells[0].startswith("#"):
                        continue
                    while cells and not cells[-1]:
                        cells.pop()  # trailing commas
                    if not 2 <= len(cells) <= 3 or not all(cells[:2]):
                        raise InvalidMedia(f"row {reader.line_num}: expected video,speech"
                                           f"[,output], found {','.join(row)[:120]!r}",
                                           manifest)
                    video, voice = manifest.parent / cells[0], manifest.parent / cells[1]
                    output = (manifest.parent / cells[2] if len(cells) > 2
                              else out_dir / f"{video.stem}.dubbed.mp4")
                    items.append(BatchItem(video, voice, output))
            except UnicodeDecodeError as exc:
                raise InvalidMedia(f"not UTF-8 text ({exc.reason})", manifest) from None
            except csv.Error as exc:
                raise InvalidMedia(f"row {reader.line_num}: {exc}", manifest) from None
    else:
        if folder is None or not Path(folder).is_dir():
            raise InputNotFound("not a folder", folder or "")
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        voices = {p.stem: p for p in files if p.suffix.lower() in AUDIO_SUFFIXES}
        videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
        stems = Counter(video.stem for video in videos)
        for video in videos:
            voice = Path(speech) if speech is not None else voices.get(video.stem)
            if voice is None:
                continue
            name = video.stem if stems[video.stem] == 1 else video.name
            items.append(BatchItem(video, voice, out_dir / f"{name}.dubbed.mp4"))
    k, n = shard
    if not 1 <= k <= n:
        raise ValueError(f"shard {k}/{n}: K must be between 1 and N")
    # Over all the jobs, not this shard's: every machine of a split batch refuses alike.
    writers: dict[Path, BatchItem] = {}
    for item in items:
        first = writers.setdefault(item.output.resolve(), item)
        if first is not item:
            raise UsageError(f"{first.video} ({first.speech.name}) and {item.video} "
                             f"({item.speech.name}) would both be written to {item.output}; "
                             "give each job its own output", manifest or folder)
    return items[k - 1::n]


def batch(items: list[BatchItem], *, model: str | Path = DEFAULT_MODEL, force: bool = False,
          device: str = "auto", jobs: int = 1,
          on_done: Callable[[BatchOutcome], None] | None = None,
          **dub_options: object) -> list[BatchOutcome]:
    """Dub every item, loading the model once per process. A failing item is recorded, whatever
    the exception (but Ctrl-C), and the batch goes on; an existing output is skipped unless
    ``force``. ``jobs`` > 1 runs that many worker processes, sharing the CPU threads between
    them. Options are checked, and the device resolved, before the first item."""
    from dubtool.devices import resolve_device

    check_range("--jobs", jobs, at_least=1)
    _check_dub_options(device=device, **dub_options)
    resolve_device(device)
    outcomes = []
    if jobs <= 1:
        worker = _BatchWorker(model, device, force, dub_options)
        for item in items:
            outcomes.append(worker(item))
            if on_done is not None:
                on_done(outcomes[-1])
        return outcomes
    import multiprocessing

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    with context.Pool(jobs, initializer=_start_worker,
                      initargs=(model, device, force, dub_options, threads)) as pool:
        for outcome in pool.imap(_run_worker, items):
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
    return outcomes


BATCH_LOCK_TIMEOUT = 6 * 3600.0


class _BatchWorker:
    def __init__(self, model: str | Path, device: str, force: bool, dub_options: dict) -> None:
        self.model, self.device, self.force, self.dub_options = model, device, force, dub_options
        self.loaded = None

    def __call__(self, item: BatchItem) -> BatchOutcome:
        from dubtool.devices import resolve_device
        from dubtool.nets.io import load_model

        start = time.perf_counter()
        try:
            if item.output.exists() and not self.force:
                return BatchOutcome(item, "skipped", 0.0, "output exists (use --force)")
            if self.loaded is None:
                native = self.dub_options.get("renderer", DEFAULT_RENDERER) == "native"
                self.loaded = load_model(self.model, completion_only=native).to(
                    resolve_device(self.device))
            item.output.parent.mkdir(parents=True, exist_ok=True)
            # Two jobs with the same inputs share a cache entry: the second waits for the first.
            with disk_full_reported(item.output):
                # ``force`` redoes the output, not the stages: those cached for these inputs
                # and options are what a recomputation would give again.
                result = dub(item.video, item.speech, item.output, model=self.loaded,
                             device=self.device, lock_timeout=BATCH_LOCK_TIMEOUT,
                             **self.dub_options)
            return BatchOutcome(item, "done", time.perf_counter() - start,
                                NOTHING_DUBBED if result.dubbed_frames == 0 else "")
        except Exception as exc:  # bad input, a bug, out of memory: only this item stops
            reason = str(exc) if isinstance(exc, DubtoolError) else f"{type(exc).__name__}: {exc}"
            return BatchOutcome(item, "failed", time.perf_counter() - start, reason,
                                traceback.format_exc())


_worker: _BatchWorker | None = None


def _start_worker(model: str | Path, device: str, force: bool, dub_options: dict,
                  threads: int) -> None:
    import torch

    global _worker
    torch.set_num_threads(threads)
    _worker = _BatchWorker(model, device, force, dub_options)


def _run_worker(item: BatchItem) -> BatchOutcome:
    return _worker(item)


@dataclass
class EvalReport:
    clips: list  # list[ClipEvaluation]
    summary: dict
    settings: dict
    files: list[Path] = field(default_factory=list)


def evaluate(clips: Sequence[str | Path], *, model: str | Path = DEFAULT_MODEL,
             steps: int | None = None, seed: int = 0, strength: float | None = None,
             device: str = "auto", work_dir: str | Path = "eval", report: str | Path | None = None,
             strips: bool = True, seconds: float | None = None,
             renderer: str = DEFAULT_RENDERER, references: int = DEFAULT_REFERENCES,
             reference_gap: float = REFERENCE_GAP_SECONDS, adapt: bool = True,
             cache_dir: str | Path | None = None,
             progress: StageProgress | None = None) -> EvalReport:
    """Reconstruction protocol over ``clips``: each is dubbed from its own speech (loop "cut")
    into ``work_dir`` and compared with the original, beside the original and static-mouth
    references. ``seconds``: only the first seconds of each clip are dubbed (its speech cut
    to them) and compared. No reference, of the dub or of the static mouth, comes from within
    ``reference_gap`` seconds of the frame it is pasted on (drawn from the whole clip); frames
    for which the static mouth's reference is that near are left out of every variant's
    scores; nor does the adaptation (``adapt``) learn from such frames. Writes ``report``
    (.json or .md) and strip images into ``work_dir``."""
    from dubtool.devices import resolve_device
    from dubtool.evaluation.evaluate import evaluate_clip, summarise
    from dubtool.evaluation.identity import NOT_INSTALLED, load_identity_model
    from dubtool.evaluation.report import write_plots, write_report, write_strips
    from dubtool.media.probe import probe_video
    from dubtool.nets.io import load_model
    from dubtool.pipeline.run import Inputs, run_front

    _check_dub_options(steps=steps, strength=strength, seed=seed, device=device,
                       renderer=renderer, references=references)
    check_range("--seconds", seconds, above=0)
    check_range("--reference-gap", reference_gap, at_least=0)
    if not clips:
        raise InputNotFound("no clips to evaluate")
    for clip in clips:
        # Each clip is dubbed from its own sound: one without is refused before any work.
        if not probe_video(clip).has_audio:
            raise InvalidMedia("has no audio stream: dubtool eval dubs each clip from its own "
                               "speech", clip)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    loaded = load_model(model, completion_only=renderer == "native").to(dev)
    identity = load_identity_model()
    results = []
    for n, clip in enumerate(clips):
        if progress is not None:
            progress("eval", n, len(clips))
        speech = clip if seconds is None else _first_seconds(Path(clip), seconds,
                                                              work / "clips")
        dubbed = dub(clip, speech, work / f"{Path(clip).stem}.dubbed.mp4", model=loaded,
                     steps=steps, seed=seed, strength=strength, device=device, loop="cut",
                     renderer=renderer, references=references,
                     reconstruction_gap=reference_gap, adapt=adapt, cache_dir=cache_dir)
        inputs = Inputs.of(clip, speech)
        with inputs.open_cache(cache_dir) as cache:
            track = run_front(cache, inputs, loop="cut", whole_video=True).track
        results.append(evaluate_clip(clip, dubbed.output, track, dubbed.reference_frame,
                                     dubbed.landmarks, identity, speech=speech,
                                     reference_gap=reference_gap))
    if progress is not None:
        progress("eval", len(clips), len(clips))
    diffusion = loaded.config.diffusion
    settings = {"model": str(loaded.folder),
                "steps": diffusion.sample_steps if steps is None else steps,
                "strength": diffusion.strength if strength is None else strength,
                "seed": seed, "device": str(dev), "seconds": seconds, "renderer": renderer,
                "references": references,
                "reference_gap": reference_gap, "adapt": adapt,
                "identity": "dlib face recognition ResNet" if identity else NOT_INSTALLED}
    summary = summarise(results)
    files = write_strips(work / "strips", results) if strips else []
    if strips:
        files += write_plots(work / "plots", results)
    if report is not None:
        write_report(Path(report), results, summary, settings)
        files.append(Path(report))
    return EvalReport(results, summary, settings, files)


def _first_seconds(clip: Path, seconds: float, folder: Path) -> Path:
    """The clip's first ``seconds`` (its speech for the dub), re-encoded nearly losslessly."""
    from dubtool.media.probe import check_readable, probe_video, run_tool

    clip = check_readable(clip)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{clip.stem}.first{seconds:g}s.mp4"
    stream = probe_video(clip).stream  # not 0:v:0, which may be cover art
    run_tool(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(clip), "-t", f"{seconds}",
              "-map", f"0:{stream}", "-map", "0:a:0", "-c:v", "libx264", "-crf", "10", "-preset",
              "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k", str(out)],
             clip, "could not be cut")
    return out


BUNDLED_CLIP = Path(__file__).resolve().parent / "data" / "may_5s.mp4"  # package data


def bench(clip: str | Path | None = None, speech: str | Path | None = None, *,
          model: str | Path = DEFAULT_MODEL, steps: int | None = None, device: str = "auto",
          repeat: int = 1, batch_size: int = 1, renderer: str = DEFAULT_RENDERER,
          references: int = DEFAULT_REFERENCES, adapt: bool = True,
          report: str | Path | None = None) -> BenchReport:
    """Speed of every stage on ``clip`` (default: the bundled 5 s clip; its own audio is the
    speech unless ``speech``): one dub from an empty cache (cold), ``repeat`` with everything
    cached (warm), a fresh ``dubtool dub`` process from an empty cache (start-up included),
    and ffmpeg's own decode + encode time as the floor. Writes JSON to ``report``."""
    import sys
    import tempfile

    from dubtool.devices import resolve_device, sampling_precision
    from dubtool.evaluation.bench import (
        BenchReport,
        bench_run,
        ffmpeg_floor,
        machine,
        peak_rss_mb,
        process_seconds,
    )
    from dubtool.media.probe import probe_video
    from dubtool.nets.io import load_model

    check_range("--repeat", repeat, at_least=0)
    _check_dub_options(steps=steps, batch_size=batch_size, device=device, renderer=renderer,
                       references=references)
    clip = Path(clip) if clip is not None else BUNDLED_CLIP
    probe_video(clip)  # a clear error before any work for a clip that is not a video
    dev = resolve_device(device)
    loaded = load_model(model, completion_only=renderer == "native").to(dev)
    speech = Path(speech) if speech is not None else clip
    runs = []
    with tempfile.TemporaryDirectory(prefix="dubtool-bench-") as scratch:
        scratch = Path(scratch)
        for n in range(1 + repeat):
            result = dub(clip, speech, scratch / "out.mp4", model=loaded, steps=steps,
                         batch_size=batch_size, device=device, cache_dir=scratch / "cache",
                         loop="cut", renderer=renderer, references=references, adapt=adapt)
            runs.append(bench_run("cold" if n == 0 else "warm", result.stages,
                                  result.wall_seconds, result.frames, result.seconds_of_video))
        command = [sys.executable, "-m", "dubtool", "dub", "--model", str(loaded.folder),
                   "--device", device, "--batch-size", str(batch_size), "--loop", "cut",
                   "--renderer", renderer, "--references", str(references),
                   "--adapt" if adapt else "--no-adapt",
                   "--cache-dir", str(scratch / "process-cache"), "-o",
                   str(scratch / "process.mp4"),
                   *([] if steps is None else ["--steps", str(steps)]),
                   "--", str(clip), str(speech)]
        process = process_seconds(command)
    settings = {"renderer": renderer, "references": references, "adapt": adapt, "steps": steps,
                "batch_size": batch_size, "device": device,
                "precision": str(sampling_precision(dev)), **machine()}
    bench_report = BenchReport(str(clip), result.frames, result.seconds_of_video,
                               ffmpeg_floor(clip), process, peak_rss_mb(), runs, settings)
    if report is not None:
        from dubtool.pipeline.cache import write_json_atomic

        write_json_atomic(Path(report), bench_report.to_json(), sort_keys=False)
    return bench_report
