"""The ``dubtool`` command: parse arguments, call dubtool.api, show progress and results."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dubtool import api
from dubtool.errors import EXIT_BATCH_FAILURES, EXIT_INTERRUPTED, DubtoolError, disk_full_error
from dubtool.options import (
    DEFAULT_RENDERER,
    DEFAULT_SOURCES,
    DEFAULT_SYNC_EXPERT,
    DETECTORS,
    LOOP_MODES,
    describe,
    parse_face_choice,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Visual dubbing: re-generate the lower face of a talking video to follow "
                       "new speech.")
cache_app = typer.Typer(no_args_is_help=True, help="List and clean cached runs.")
app.add_typer(cache_app, name="cache")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_state = {"debug": bool(os.environ.get("DUBTOOL_DEBUG"))}

T = TypeVar("T")
_IMPORTED = time.perf_counter()


def process_seconds() -> float:
    """Seconds since this process started, as the shell times it (interpreter start-up and
    imports included); since this module was imported where /proc cannot tell."""
    try:
        # Field 22 of /proc/self/stat, the start time in clock ticks since boot; the name in
        # field 2 may hold spaces, so count from its closing parenthesis.
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter() - _IMPORTED

CacheDir = Annotated[Path | None, typer.Option("--cache-dir", help="Cache folder "
                     "(default: $DUBTOOL_CACHE_DIR or ~/.cache/dubtool).")]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and native "
                                             "library logs.")] = False) -> None:
    if debug:
        _state["debug"] = True
        os.environ["DUBTOOL_NATIVE_LOGS"] = "1"


FaceOption = Annotated[str, typer.Option("--face", help="Which face to dub when a frame "
                       "holds several: largest, center, or an index (0 = leftmost); the "
                       "chosen face is then followed.")]


def _face(text: str) -> str | int:
    try:
        return parse_face_choice(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc).removeprefix("--face "), param_hint="--face") from None


def _call(fn: Callable[[], T]) -> T:
    """Run a library call; turn its failures into one line on stderr and an exit code."""
    try:
        return fn()
    except DubtoolError as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted: nothing half-written was kept; run the same command again to "
                  "resume from the cache", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:
        if _state["debug"]:
            raise
        full = disk_full_error(exc) if isinstance(exc, OSError) else None
        if full is not None:
            err.print(f"[bold red]error:[/] {full}", markup=True, soft_wrap=True)
            raise typer.Exit(full.exit_code) from None
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                  "(run with --debug for the traceback)", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None


RendererOption = Annotated[str, typer.Option(help="How the lower face is made: native (from "
                          "the video's own frames, at the face's own size) or diffusion (the "
                          "model, at its crop size).")]
SourcesOption = Annotated[int, typer.Option("--sources", "--references", help="Native renderer: "
                          "how many of the video's frames (source frames) the lower face may be "
                          "drawn from (1: the reference frame alone; more: per frame the "
                          "nearest mouth shape among that many source frames, the reference "
                          "frame preferred). --references is an older name of this option.")]
AdaptOption = Annotated[bool, typer.Option("--adapt/--no-adapt", help="First fine-tune the lip "
                        "model on the video's own sound and lips (when it has sound and "
                        "enough frames with a face).")]


@contextmanager
def _stage_progress() -> Iterator[Callable[[str, int, int], None]]:
    """A rich progress bar per stage, with frames/s and ETA, fed by api progress callbacks."""
    bars = Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=out, transient=False, disable=not out.is_terminal)
    tasks: dict[str, tuple[TaskID, float]] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = (bars.add_task(stage, total=total, rate=""), time.perf_counter())
        task, start = tasks[stage]
        elapsed = time.perf_counter() - start
        rate = f"{done / elapsed:6.1f} fr/s" if elapsed > 0 else ""
        bars.update(task, completed=done, total=total, rate=rate)

    with bars:
        yield update


@app.command("dub")
def dub_cmd(
    video: Annotated[Path, typer.Argument(help="Video (or still image) of the person.")],
    speech: Annotated[Path, typer.Argument(help="New speech: any audio file, or a video's "
                      "audio.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output video (default: "
                      "VIDEO_NAME.dubbed.mp4 here).")] = None,
    model: Annotated[str, typer.Option(help="Model name (shipped in models/) or "
                      "folder.")]
    = api.DEFAULT_MODEL,
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default: the model's).")]
    = None,
    seed: Annotated[int, typer.Option(help="Seed of the diffusion noise.")] = 0,
    strength: Annotated[float | None, typer.Option(help="1: generate the lower face from "
                        "noise; S < 1: start from the reference face warped to the target "
                        "landmarks, noised to the diffusion time nearest S x T, and run about "
                        "S x steps steps (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Chunks of frames denoised together "
                          "(the video is diffused as that many streams side by side; more is "
                          "faster on a GPU, each extra stream restarts the temporal "
                          "context once).")] = 1,
    reference_frame: Annotated[int | None, typer.Option(help="Source frame used as the "
                               "appearance reference (default: a typical one).")] = None,
    loop: Annotated[str, typer.Option(help="Video shorter than the speech: pingpong, loop or "
                    "cut (the speech).")] = "pingpong",
    face: FaceOption = "largest",
    renderer: RendererOption = DEFAULT_RENDERER,
    sources: SourcesOption = DEFAULT_SOURCES,
    adapt: AdaptOption = True,
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute every stage.")] = False,
    keep_cache: Annotated[bool, typer.Option("--keep-cache/--clean-cache", help="Keep the "
                          "run's cache for a later rerun, or remove it at the end.")] = True,
) -> None:
    """Dub VIDEO with SPEECH: re-generate the lower face so that it follows the speech."""
    if loop not in LOOP_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(LOOP_MODES)}", param_hint="--loop")
    choice = _face(face)
    with _stage_progress() as progress:
        result = _call(lambda: api.dub(
            video, speech, output, model=model, steps=steps, seed=seed, strength=strength,
            batch_size=batch_size, device=device, reference_frame=reference_frame, face=choice,
            loop=loop, renderer=renderer, sources=sources, adapt=adapt,
            cache_dir=cache_dir, force=force, keep_cache=keep_cache, progress=progress))
    out.print(", ".join(f"{r.stage} {r.status} ({r.seconds:.1f} s)" for r in result.stages))
    passed = (f", [yellow]{result.passed_through} passed through without a face[/]"
              if result.passed_through else "")
    if result.faces_seen > 1:
        passed += f" (up to {result.faces_seen} faces in a frame: dubbed the {describe(choice)})"
    if result.adaptation is not None:
        a = result.adaptation
        out.print(f"lips adapted to the video's own speech ({a.seconds:.1f} s, loss "
                  f"{a.loss_before:.4f} -> {a.loss_after:.4f})" if a.adapted
                  else f"lips not adapted: {a.reason}")
    wall = process_seconds()
    out.print(f"[bold green]{result.output}[/]: {result.seconds_of_video:.2f} s, "
              f"{result.dubbed_frames} frames dubbed{passed}; wall {wall:.1f} s since start "
              f"(dub {result.wall_seconds:.1f} s), RTF {wall / result.seconds_of_video:.2f}")
    if result.dubbed_frames == 0:
        err.print(f"warning: no frame could be dubbed (no face found in the frames used): "
                  f"{result.output} is the video unchanged with the new speech", soft_wrap=True)


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise typer.BadParameter("K/N, e.g. 2/4", param_hint="--shard") from None
    if not 1 <= k <= n:
        raise typer.BadParameter("K/N with 1 <= K <= N", param_hint="--shard")
    return k, n


@app.command("batch")
def batch_cmd(
    folder: Annotated[Path | None, typer.Argument(help="Folder of videos, each paired with the "
                      "speech file of the same name (or --speech for all).")] = None,
    speech: Annotated[Path | None, typer.Option(help="One speech file for every video.")]
    = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV of video,speech[,output] rows "
                        "instead of a folder.")] = None,
    out_dir: Annotated[Path, typer.Option("-o", "--out-dir", help="Folder for the outputs.")]
    = Path("dubbed"),
    model: Annotated[str, typer.Option(help="Model name or folder.")] = api.DEFAULT_MODEL,
    steps: Annotated[int | None, typer.Option(help="DDIM steps.")] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    loop: Annotated[str, typer.Option(help="pingpong, loop or cut.")] = "pingpong",
    face: FaceOption = "largest",
    renderer: RendererOption = DEFAULT_RENDERER,
    sources: SourcesOption = DEFAULT_SOURCES,
    adapt: AdaptOption = True,
    shard: Annotated[str, typer.Option(help="K/N: do every N-th job starting at the K-th, to "
                     "split a batch over machines.")] = "1/1",
    jobs: Annotated[int, typer.Option(help="Worker processes on this machine.")] = 1,
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option("--force", help="Redo outputs that exist (cached "
                     "stages are reused).")] = False,
) -> None:
    """Dub many videos; a failure never stops the others. Exits 9 if any failed."""
    if loop not in LOOP_MODES:
        raise typer.BadParameter(f"choose one of {', '.join(LOOP_MODES)}", param_hint="--loop")
    choice = _face(face)
    if (folder is None) == (manifest is None):
        raise typer.BadParameter("give a FOLDER or --manifest, not both")
    items = _call(lambda: api.batch_items(folder, speech=speech, manifest=manifest,
                                          out_dir=out_dir, shard=_shard(shard)))
    if not items:
        err.print("error: no (video, speech) pair found")
        raise typer.Exit(3)
    bars = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn(
        "{task.fields[last]}"), TimeElapsedColumn(), console=out, disable=not out.is_terminal)
    with bars:
        task = bars.add_task("batch", total=len(items), last="")
        outcomes = _call(lambda: api.batch(
            items, model=model, force=force, device=device, jobs=jobs, steps=steps, seed=seed,
            loop=loop, face=choice, renderer=renderer, sources=sources, adapt=adapt,
            cache_dir=cache_dir,
            on_done=lambda o: bars.update(task, advance=1, last=f"{o.item.video.name} {o.status}")))
    table = Table("video", "speech", "status", "seconds", "output / reason")
    colours = {"done": "green", "skipped": "yellow", "failed": "red"}
    for o in outcomes:
        table.add_row(o.item.video.name, o.item.speech.name,
                      f"[{colours[o.status]}]{o.status}[/]", f"{o.seconds:.1f}",
                      o.reason or str(o.item.output))
    out.print(table)
    if _state["debug"]:
        for o in outcomes:
            if o.traceback:
                err.print(f"{o.item.video.name}:\n{o.traceback}", markup=False, soft_wrap=True)
    counts = {s: sum(o.status == s for o in outcomes) for s in colours}
    out.print(", ".join(f"{n} {s}" for s, n in counts.items()))
    undubbed = [o.item.video.name for o in outcomes if o.reason == api.NOTHING_DUBBED]
    if undubbed:
        err.print(f"warning: {len(undubbed)} videos had no face to dub and were written "
                  f"unchanged with the new speech: {', '.join(undubbed)}", soft_wrap=True)
    if counts["failed"]:
        raise typer.Exit(EXIT_BATCH_FAILURES)


@app.command("landmarks")
def landmarks_cmd(
    video: Annotated[Path, typer.Argument(help="Video (or still image) to analyse.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Debugging video to "
                      "write: points and crop box drawn on every frame.")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the points of every "
                         "frame as JSON.")] = None,
    detector: Annotated[str, typer.Option(help=f"Landmark detector: {', '.join(DETECTORS)}.")]
    = "mediapipe",
    face: FaceOption = "largest",
    cache_dir: CacheDir = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute every stage.")] = False,
) -> None:
    """Detect the 131 face landmarks in every frame; draw them into a debugging video."""
    if detector not in DETECTORS:
        raise typer.BadParameter(f"choose one of {', '.join(DETECTORS)}", param_hint="--detector")
    choice = _face(face)
    start = time.perf_counter()
    with _stage_progress() as progress:
        result = _call(lambda: api.landmarks(video, output, json_path, detector=detector,
                                             face=choice, cache_dir=cache_dir, force=force,
                                             progress=progress))
    track = result.track
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("video", f"{result.extracted.video.path}")
    table.add_row("frames", f"{track.frames} ({result.extracted.video.width}x"
                            f"{result.extracted.video.height} at "
                            f"{float(result.extracted.video.fps):.3f} fps)")
    table.add_row("faces found", f"{track.faces_found}" + (
        f" (up to {track.faces_seen} in a frame: followed the {describe(choice)})"
        if track.faces_seen > 1 else ""))
    missing = track.frames - track.faces_found
    table.add_row("without face", f"[yellow]{missing}[/]" if missing else "0")
    table.add_row("detector", f"{track.detector}, {track.ms_per_frame:.1f} ms/frame")
    table.add_row("stages", ", ".join(f"{r.stage} {r.status}" for r in result.stages))
    for label, path in (("video out", result.output), ("json out", result.json_path)):
        if path is not None:
            table.add_row(label, str(path))
    table.add_row("wall time", f"{time.perf_counter() - start:.1f} s")
    out.print(table)
    if track.faces_found == 0:
        err.print(f"warning: no face found in any frame of {result.extracted.video.path}")


@app.command("prepare")
def prepare_cmd(
    videos: Annotated[Path, typer.Argument(help="Folder of talking-head videos (searched "
                  "recursively; one sub-folder per person, or a PEOPLE.tsv beside the clips).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Data set folder to write.")],
    crop_size: Annotated[int, typer.Option(help="Side of the face crops in pixels.")] = 128,
    min_face: Annotated[float, typer.Option(help="Keep clips with a face in at least this "
                        "fraction of frames.")] = 0.9,
    validation: Annotated[float, typer.Option(help="Fraction of the people kept for "
                          "validation.")] = 0.1,
    shard: Annotated[str | None, typer.Option(help="K/N: prepare only every N-th video from "
                     "the K-th (one of N machines); join the parts with 'dubtool merge'.")]
    = None,
    cache_dir: CacheDir = None,
) -> None:
    """Turn videos into a training set: face crops, landmarks and mel per clip, split by person."""
    part = _shard(shard) if shard is not None else None
    with _stage_progress() as progress:
        reports = _call(lambda: api.prepare(
            videos, output, crop_size=crop_size, min_face_fraction=min_face,
            validation_fraction=validation, cache_dir=cache_dir,
            progress=lambda clip, done, total: progress("prepare", done, total), shard=part))
    _print_clips(reports, output, "part " + shard if shard else None)
    if not [r for r in reports if not r.status.startswith("skipped")]:
        err.print(f"error: {videos}: no usable clip found")
        raise typer.Exit(4)


@app.command("merge")
def merge_cmd(
    shards: Annotated[list[Path], typer.Argument(help="Folders written by 'dubtool prepare "
                      "--shard K/N' (or one folder holding all the parts).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Data set folder to write "
                      "(the clips are moved into it).")],
    validation: Annotated[float, typer.Option(help="Fraction of the people kept for "
                          "validation.")] = 0.1,
) -> None:
    """Join the parts of a sharded 'prepare' into one data set, split by person once."""
    reports = _call(lambda: api.merge_shards(shards, output, validation_fraction=validation))
    _print_clips(reports, output, None)


def _print_clips(reports: list, output: Path, part: str | None) -> None:
    table = Table("clip", "person", "frames", "faces", "split")
    for r in reports:
        style = "yellow" if r.status.startswith("skipped") else ""
        table.add_row(r.clip, r.person, str(r.frames), str(r.faces), r.status, style=style)
    out.print(table)
    kept = [r for r in reports if not r.status.startswith("skipped")]
    if part is not None:  # a shard has no split yet
        out.print(f"{part}: {len(kept)} clips, {sum(r.faces for r in kept)} frames; join the "
                  "parts with 'dubtool merge'")
    else:
        for split in ("train", "val", "heldout"):
            rows = [r for r in kept if r.status == split]
            out.print(f"{split}: {len(rows)} clips, {len({r.person for r in rows})} people, "
                      f"{sum(r.faces for r in rows)} frames")
    out.print(f"skipped: {len(reports) - len(kept)} clips; data set in {output}")


@app.command("train")
def train_cmd(
    part: Annotated[str, typer.Argument(help="autoencoder (first), completion (optional "
                    "pre-training of the landmark completion), dubber, or sync (the lip-sync "
                    "expert that dubtool eval scores with).")],
    config: Annotated[str | None, typer.Option("--config", help="cpu-128 (default), paper-256 "
                      "or a config.json path; for sync a sync expert config.json (default: "
                      "the shipped expert's settings).")] = None,
    data: Annotated[Path, typer.Option("--data", help="Folder made by 'dubtool prepare'.")]
    = Path("dataset"),
    out_dir: Annotated[Path, typer.Option("--out", help="Run folder (checkpoints, log, "
                       "model/).")] = Path("runs/train"),
    steps: Annotated[int, typer.Option(help="Optimisation steps in all (a resumed run "
                     "continues up to this).")] = 1000,
    autoencoder: Annotated[Path | None, typer.Option(help="For dubber: the trained "
                           "autoencoder's model folder (RUN/model).")] = None,
    completion: Annotated[Path | None, typer.Option(help="For dubber or completion: start "
                          "from a pre-trained completion (RUN/model/completion.safetensors).")]
    = None,
    init: Annotated[Path | None, typer.Option(help="For dubber: start a new run from this "
                    "model folder's dubbing model (parts the config adds start at zero).")]
    = None,
    end2end: Annotated[bool, typer.Option("--end2end/--no-end2end", help="Let L_ldm train "
                       "the landmark completion (the paper's method) or train it on L1 "
                       "alone (its ablation).")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run folder's "
                      "checkpoint.")] = False,
    epoch_steps: Annotated[int, typer.Option(help="Steps between validations (for sync: of "
                           "each member).")] = 200,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 50,
    decay_steps: Annotated[int, typer.Option(help="Let the learning rate fall linearly to 0 "
                           "over the run's last N steps (0: constant).")] = 0,
    refine: Annotated[float, typer.Option(help="For dubber: train the denoiser for sampling "
                      "at this strength (times 1 up to the one nearest S x T), from the "
                      "reference warped onto the landmarks to the real frame (0: plain "
                      "denoising over the whole schedule).")] = 0.0,
    into: Annotated[Path | None, typer.Option(help="For completion: also make RUN/model a "
                    "whole model folder: this model folder's autoencoder and denoiser with the "
                    "new completion.")] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="no, bf16 (CUDA or CPU) or fp16 "
                               "(CUDA); default: the config's training.mixed_precision.")]
    = None,
    grad_accum: Annotated[int, typer.Option(help="Sum the gradients of K batches in each "
                          "step (a global batch of batch size x processes x K).")] = 1,
    seed: int = 0,
) -> None:
    """Train the autoencoder, or the landmark completion + denoiser on top of it. Data parallel
    when started by 'accelerate launch' or 'torchrun' (see README, Training at scale)."""
    if part not in ("autoencoder", "completion", "dubber", "sync"):
        raise typer.BadParameter("autoencoder, completion, dubber or sync", param_hint="PART")
    # accelerate launch and torchrun set RANK: the other processes show no progress or result.
    main = os.environ.get("RANK", "0") == "0"
    bars = Progress(TextColumn("train {task.fields[part]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=out, disable=not (out.is_terminal and main))
    with bars:
        task = bars.add_task("train", total=steps, part=part, losses="")

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            bars.update(task, completed=step, total=total, losses=text)

        result = _call(lambda: api.train(
            part, config, data, out_dir, steps=steps, autoencoder=autoencoder,
            completion=completion, init=init, end2end=end2end,
            device=device, resume=resume, epoch_steps=epoch_steps,
            checkpoint_every=checkpoint_every, decay_steps=decay_steps, refine=refine,
            seed=seed, into=into, mixed_precision=mixed_precision, grad_accum=grad_accum,
            command=shlex.join(["dubtool", *sys.argv[1:]]), progress=progress))
    if not main:
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("steps", str(result.steps))
    table.add_row("processes", f"{result.processes} (global batch {result.global_batch})")
    table.add_row("parameters", f"{result.parameters / 1e6:.2f} M")
    table.add_row("s/step", f"{result.seconds_per_step:.2f}")
    table.add_row("validation", ", ".join(f"{k} {v:.4f}" for k, v in result.validation.items()))
    table.add_row("model", str(result.model))
    out.print(table)


@app.command("offsets")
def offsets_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder made by 'dubtool prepare'.")]
    = Path("dataset"),
    completion: Annotated[Path, typer.Option(help="A trained landmark completion "
                          "(RUN/model/completion.safetensors).")] = Path("completion"),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Measure each training clip's audio-video offset; training then shifts or drops them."""
    measured, path = _call(lambda: api.offsets(data, completion, device=device))
    info = json.loads(path.read_text())
    for title, names in (("shifted", info["applied"]), ("dropped", info["dropped"])):
        rows = {o.clip: o for o in measured if o.clip in names}
        out.print(f"{title}: {len(rows)} of {len(measured)} clips")
        for o in rows.values():
            out.print(f"  {o.clip}: picture {o.lag:+d} frames after the sound "
                      f"(r {o.correlation:.2f}, at 0: {o.at_zero:.2f})")
    out.print(f"written: {path}")


@app.command("eval")
def eval_cmd(
    clips: Annotated[list[Path] | None, typer.Argument(help="Talking clips (each is dubbed "
                     "from its own speech and compared with itself).")] = None,
    list_file: Annotated[Path | None, typer.Option("--list", help="A file with one clip path "
                         "per line.")] = None,
    model: Annotated[str, typer.Option(help="Model name or folder.")] = api.DEFAULT_MODEL,
    steps: Annotated[int | None, typer.Option(help="DDIM steps.")] = None,
    seed: int = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    report: Annotated[Path | None, typer.Option("-o", "--report", help="Write the report: "
                      ".json or .md.")] = None,
    work_dir: Annotated[Path, typer.Option(help="Folder for the dubs and strip images.")]
    = Path("eval"),
    seconds: Annotated[float | None, typer.Option(help="Evaluate only the first seconds of "
                       "each clip.")] = None,
    strength: Annotated[float | None, typer.Option(help="Sampling strength (default: the "
                        "model's).")] = None,
    renderer: RendererOption = DEFAULT_RENDERER,
    sources: SourcesOption = DEFAULT_SOURCES,
    reference_gap: Annotated[float, typer.Option(help="No reference from within this many "
                             "seconds of the frame it is pasted on (frames that cannot meet "
                             "it are not scored).")] = api.RECONSTRUCTION_GAP_SECONDS,
    adapt: AdaptOption = True,
    cache_dir: CacheDir = None,
    sync_expert: Annotated[str, typer.Option(help="The lip-sync expert (model name or folder) "
                           "that scores each variant's lips.")] = DEFAULT_SYNC_EXPERT,
) -> None:
    """Quality against ground truth: the model beside the original and a static mouth."""
    paths = list(clips or [])
    if list_file is not None:
        if not list_file.is_file():
            err.print(f"error: {list_file}: no such file")
            raise typer.Exit(3)
        base = list_file.parent
        paths += [base / line.strip() for line in list_file.read_text().splitlines()
                  if line.strip() and not line.startswith("#")]
    with _stage_progress() as progress:
        result = _call(lambda: api.evaluate(paths, model=model, steps=steps, seed=seed,
                                            strength=strength, device=device,
                                            work_dir=work_dir, report=report,
                                            seconds=seconds, renderer=renderer,
                                            sources=sources,
                                            reference_gap=reference_gap, adapt=adapt,
                                            cache_dir=cache_dir, sync_expert=sync_expert,
                                            progress=progress))
    from dubtool.evaluation.evaluate import VARIANTS

    # The terminal shows the main metrics; the report (-o) holds them all.
    shown = [m for m in ("opening_correlation", "articulation", "completion_opening_correlation",
                         "sync_expert", "lmd", "psnr", "identity")
             if m in result.summary["model"]]
    names = {"opening_correlation": "opening corr", "completion_opening_correlation":
             "completion corr"}
    table = Table("variant", *(names.get(m, m) for m in shown),
                  title=f"{len(result.clips)} clips, mean ± 95% interval")
    for variant in VARIANTS:
        cells = []
        for m in shown:
            v = result.summary[variant][m]
            cells.append("inf" if v["mean"] == float("inf") else "-" if v["mean"] != v["mean"]
                         else f"{v['mean']:.3f} ± {v['ci95']:.3f}")
        table.add_row(variant, *cells)
    out.print(table)
    out.print("opening corr: correlation of the dub's inner-lip opening with the real mouth's "
              "(1 = in step); articulation: how wide it opens against the real mouth (1 = as "
              "wide); sync_expert: the lip-sync expert's pairwise accuracy (0.5 = chance, as a "
              "still mouth); lmd: lip/jaw landmark distance / eye distance (lower is better); the "
              "report (-o) has every metric and its definition")
    if "identity" not in shown:
        out.print(result.settings["identity"])
    for path in result.files:
        out.print(f"wrote {path}")


@app.command("bench")
def bench_cmd(
    clip: Annotated[Path | None, typer.Argument(help="Clip to dub (default: the bundled 5 s "
                    "clip); its own audio is the speech unless --speech.")] = None,
    speech: Annotated[Path | None, typer.Option(help="Speech to dub with.")] = None,
    model: Annotated[str, typer.Option(help="Model name or folder.")] = api.DEFAULT_MODEL,
    steps: Annotated[int | None, typer.Option(help="DDIM steps.")] = None,
    strength: Annotated[float | None, typer.Option(help="Sampling strength of the diffusion "
                        "renderer (default: the model's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    repeat: Annotated[int, typer.Option(help="Warm (cached) runs after the cold one.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Chunks denoised together.")] = 1,
    renderer: RendererOption = DEFAULT_RENDERER,
    sources: SourcesOption = DEFAULT_SOURCES,
    adapt: AdaptOption = True,
    report: Annotated[Path | None, typer.Option("-o", "--report", help="Write JSON.")] = None,
) -> None:
    """Speed per stage (ms/frame), real-time factor, peak memory, beside ffmpeg's floor; and
    the whole time of a fresh `dubtool dub` process."""
    result = _call(lambda: api.bench(clip, speech, model=model, steps=steps, strength=strength,
                                     device=device, repeat=repeat, batch_size=batch_size,
                                     renderer=renderer, sources=sources, adapt=adapt,
                                     report=report))
    runs, cold = result.runs, result.runs[0]
    table = Table("stage", *[f"{r.kind} ms/frame" for r in runs], "cold: cores busy",
                  "cold: each core busy",
                  title=f"{result.clip}: {result.frames} frames, {result.video_seconds:.1f} s")
    for s in cold.stage_seconds:
        table.add_row(s, *[f"{r.stage_ms_per_frame.get(s, 0.0):.1f}" for r in runs],
                      f"{cold.stage_cores[s]:.2f}",
                      " ".join(f"{b:.0%}" for b in cold.stage_core_busy[s]))
    table.add_row("wall s", *[f"{r.wall_seconds:.2f}" for r in runs], "", "")
    table.add_row("RTF", *[f"{r.real_time_factor:.2f}" for r in runs], "", "")
    table.add_row("x ffmpeg floor", *[f"{r.floor_ratio:.2f}" for r in runs], "", "")
    out.print(table)
    out.print(f"a fresh `dubtool dub` process, empty cache, start-up included: "
              f"{result.process_seconds:.1f} s, RTF {result.process_real_time_factor:.2f}, "
              f"{result.process_floor_ratio:.2f} x the ffmpeg floor")
    out.print(f"ffmpeg floor (decode + H.264 encode): {result.ffmpeg_floor_seconds:.2f} s; "
              f"peak RSS {result.peak_rss_mb:.0f} MB; {result.settings}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cache_app.command("list")
def cache_list_cmd(cache_dir: CacheDir = None) -> None:
    """List cached runs, most recently used first, and the cache's size limit."""
    runs = _call(lambda: api.cache_list(cache_dir))
    limit = _call(api.cache_limit)
    limit_text = (f"limit {_size(limit)}" if limit else "no limit") + " ($DUBTOOL_CACHE_LIMIT_GB)"
    if not runs:
        out.print(f"no cached runs; {limit_text}")
        return
    table = Table("key", "video", "speech", "stages", "size", "last used")
    for run in runs:
        table.add_row(run.key[:12], Path(run.description.get("video", "?")).name,
                      Path(run.description.get("speech") or "-").name, ", ".join(run.stages),
                      _size(run.size_bytes), time.strftime("%Y-%m-%d %H:%M",
                                                           time.localtime(run.used)))
    out.print(table)
    out.print(f"{len(runs)} runs, {_size(sum(r.size_bytes for r in runs))} in all; {limit_text}")


@cache_app.command("clean")
def cache_clean_cmd(
    keys: Annotated[list[str] | None, typer.Argument(help="Key prefixes of the runs to remove "
                    "(default: all).")] = None,
    older_than: Annotated[float | None, typer.Option("--older-than", help="Only runs unused "
                          "for this many days.")] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Remove cached runs. Runs in use by another dubtool process are left alone."""
    removed = _call(lambda: api.cache_clean(cache_dir, keys, older_than))
    out.print(f"removed {len(removed)} runs, {_size(sum(r.size_bytes for r in removed))}")


def run() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    run()
