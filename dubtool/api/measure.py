"""``dubtool eval`` and ``bench``: quality by the reconstruction protocol, and speed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dubtool.errors import InputNotFound, InvalidMedia
from dubtool.options import (
    DEFAULT_MODEL,
    DEFAULT_RENDERER,
    DEFAULT_SOURCES,
    DEFAULT_SYNC_EXPERT,
    RECONSTRUCTION_GAP_SECONDS,
    check_range,
)

if TYPE_CHECKING:
    from dubtool.evaluation.bench import BenchReport
    from dubtool.pipeline.progress import StageProgress


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
             renderer: str = DEFAULT_RENDERER, sources: int = DEFAULT_SOURCES,
             reference_gap: float = RECONSTRUCTION_GAP_SECONDS, adapt: bool = True,
             cache_dir: str | Path | None = None,
             sync_expert: str | Path | None = DEFAULT_SYNC_EXPERT,
             progress: StageProgress | None = None) -> EvalReport:
    """Reconstruction protocol over ``clips``: each is dubbed from its own speech (loop "cut")
    into ``work_dir`` and compared with the original, beside the original and static-mouth
    references. ``seconds``: only the first seconds of each clip are dubbed (its speech cut
    to them) and compared. No reference, of the dub or of the static mouth, comes from within
    ``reference_gap`` seconds of the frame it is pasted on (drawn from the whole clip); frames
    for which the static mouth's reference is that near are left out of every variant's
    scores; nor does the adaptation (``adapt``) learn from such frames. ``sync_expert``: the
    lip-sync expert's model folder (or shipped name) that scores each variant's lips
    (sync_expert, sync_expert_cosine; None: not scored). Writes ``report`` (.json or .md) and
    strip images into ``work_dir``."""
    from dubtool.evaluation.evaluate import evaluate_clip, summarise
    from dubtool.evaluation.identity import NOT_INSTALLED, load_identity_model
    from dubtool.evaluation.report import write_plots, write_report, write_strips
    from dubtool.media.probe import probe_video
    from dubtool.nets.sync_expert import load_sync_expert
    from dubtool.pipeline.dubber import Dubber, check_dub_options
    from dubtool.pipeline.run import Inputs, run_front

    check_dub_options(steps=steps, strength=strength, seed=seed, device=device,
                      renderer=renderer, sources=sources)
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
    dubber = Dubber.from_pretrained(model, device=device, renderer=renderer,
                                    sources=sources, steps=steps, strength=strength,
                                    seed=seed)
    identity = load_identity_model()
    expert = load_sync_expert(sync_expert) if sync_expert is not None else None
    pause_seconds = dubber.model.config.inference.complete.pause_seconds  # the dubs' pauses
    results = []
    for n, clip in enumerate(clips):
        if progress is not None:
            progress("eval", n, len(clips))
        speech = clip if seconds is None else _first_seconds(Path(clip), seconds,
                                                              work / "clips")
        dubbed = dubber.dub(clip, speech, work / f"{Path(clip).stem}.dubbed.mp4", loop="cut",
                            reconstruction_gap=reference_gap, adapt=adapt,
                            cache_dir=cache_dir)
        inputs = Inputs.of(clip, speech)
        with inputs.open_cache(cache_dir) as cache:
            track = run_front(cache, inputs, loop="cut", whole_video=True).track
        results.append(evaluate_clip(clip, dubbed.output, track, dubbed.reference_frame,
                                     dubbed.landmarks, identity, speech=speech,
                                     reference_gap=reference_gap,
                                     pause_seconds=pause_seconds, sync_expert=expert))
    if progress is not None:
        progress("eval", len(clips), len(clips))
    settings = {"model": str(dubber.model.folder), "steps": dubber.settings.steps,
                "strength": dubber.settings.strength, "seed": seed,
                "device": str(dubber.device), "seconds": seconds, "renderer": renderer,
                "sources": sources,
                "reference_gap": reference_gap, "adapt": adapt,
                "sync_expert": str(sync_expert) if expert is not None else "not scored",
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


BUNDLED_CLIP = Path(__file__).resolve().parent.parent / "data" / "may_5s.mp4"  # package data


def bench(clip: str | Path | None = None, speech: str | Path | None = None, *,
          model: str | Path = DEFAULT_MODEL, steps: int | None = None,
          strength: float | None = None, device: str = "auto",
          repeat: int = 1, batch_size: int = 1, renderer: str = DEFAULT_RENDERER,
          sources: int = DEFAULT_SOURCES, adapt: bool = True,
          report: str | Path | None = None) -> BenchReport:
    """Speed of every stage on ``clip`` (default: the bundled 5 s clip; its own audio is the
    speech unless ``speech``): one dub from an empty cache (cold), ``repeat`` with everything
    cached (warm), a fresh ``dubtool dub`` process from an empty cache (start-up included),
    and ffmpeg's own decode + encode time as the floor. Writes JSON to ``report``."""
    import sys
    import tempfile

    from dubtool.devices import sampling_precision
    from dubtool.evaluation.bench import (
        BenchReport,
        bench_run,
        ffmpeg_floor,
        machine,
        peak_rss_mb,
        process_seconds,
    )
    from dubtool.media.probe import probe_video
    from dubtool.pipeline.dubber import Dubber, check_dub_options

    check_range("--repeat", repeat, at_least=0)
    check_dub_options(steps=steps, strength=strength, batch_size=batch_size, device=device,
                      renderer=renderer, sources=sources)
    clip = Path(clip) if clip is not None else BUNDLED_CLIP
    probe_video(clip)  # a clear error before any work for a clip that is not a video
    dubber = Dubber.from_pretrained(model, device=device, renderer=renderer,
                                    sources=sources, steps=steps, strength=strength,
                                    batch_size=batch_size)
    speech = Path(speech) if speech is not None else clip
    floor = ffmpeg_floor(clip)
    runs = []
    with tempfile.TemporaryDirectory(prefix="dubtool-bench-") as scratch:
        scratch = Path(scratch)
        for n in range(1 + repeat):
            result = dubber.dub(clip, speech, scratch / "out.mp4", cache_dir=scratch / "cache",
                                loop="cut", adapt=adapt)
            runs.append(bench_run("cold" if n == 0 else "warm", result.stages,
                                  result.wall_seconds, result.frames, result.seconds_of_video,
                                  floor))
        command = [sys.executable, "-m", "dubtool", "dub", "--model", str(dubber.model.folder),
                   "--device", device, "--batch-size", str(batch_size), "--loop", "cut",
                   "--renderer", renderer, "--sources", str(sources),
                   "--adapt" if adapt else "--no-adapt",
                   "--cache-dir", str(scratch / "process-cache"), "-o",
                   str(scratch / "process.mp4"),
                   *([] if steps is None else ["--steps", str(steps)]),
                   *([] if strength is None else ["--strength", str(strength)]),
                   "--", str(clip), str(speech)]
        process = process_seconds(command)
    settings = {"renderer": renderer, "sources": sources, "adapt": adapt,
                "steps": dubber.settings.steps, "strength": dubber.settings.strength,
                "batch_size": batch_size, "device": device,
                "precision": str(sampling_precision(dubber.device)), **machine()}
    bench_report = BenchReport(str(clip), result.frames, result.seconds_of_video,
                               floor, process, peak_rss_mb(), runs, settings)
    if report is not None:
        from dubtool.pipeline.cache import write_json_atomic

        write_json_atomic(Path(report), bench_report.to_json(), sort_keys=False)
    return bench_report
