"""Evaluation reports: JSON (to compare versions), Markdown (to read), strip images (to look)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from dubtool.evaluation.evaluate import VARIANTS, ClipEvaluation
from dubtool.evaluation.metrics import __doc__ as DEFINITIONS
from dubtool.media.audio import MEL_STEPS_PER_SECOND
from dubtool.pipeline.cache import write_json_atomic, write_text_atomic

LOWER_IS_BETTER = {"lmd", "lmd_lips", "lmd_jaw", "stability"}
PER_CLIP = ("opening_correlation", "articulation", "sync_expert", "lmd", "psnr", "sharpness")


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}"


def to_json(clips: list[ClipEvaluation], summary: dict, settings: dict) -> dict:
    return {"settings": settings, "summary": summary,
            "clips": [{"clip": c.clip, "frames": c.frames, "scored_frames": c.scored_frames,
                       "reference_frame": c.reference_frame, "metrics": c.metrics}
                      for c in clips],
            "definitions": DEFINITIONS.strip()}


def to_markdown(clips: list[ClipEvaluation], summary: dict, settings: dict) -> str:
    measured = list(summary["model"])
    lines = ["# dubtool evaluation", "",
             ", ".join(f"{k}: {v}" for k, v in settings.items()), "",
             f"Mean over {len(clips)} clips (± half-width of the 95% interval).", "",
             "| variant | " + " | ".join(measured) + " |",
             "|---|" + "---|" * len(measured)]
    for variant in VARIANTS:
        cells = [f"{_fmt(summary[variant][m]['mean'])} ± {_fmt(summary[variant][m]['ci95'])}"
                 for m in measured]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "## Per clip", "", "| clip | frames | scored | " +
              " | ".join(f"{m} (model/static)" for m in PER_CLIP) + " | completion opening "
              "correlation / articulation |", "|---|---|---|" + "---|" * (len(PER_CLIP) + 1)]
    for c in clips:
        cells = [f"{_fmt(c.metrics['model'][m])} / {_fmt(c.metrics['static'][m])}"
                 for m in PER_CLIP]
        cells.append(f"{_fmt(c.metrics['model']['completion_opening_correlation'])} / "
                     f"{_fmt(c.metrics['model']['completion_articulation'])}")
        lines.append(f"| {c.clip} | {c.frames} | {c.scored_frames} | " + " | ".join(cells)
                     + " |")
    lines += ["", "## Definitions", "", DEFINITIONS.strip(), ""]
    return "\n".join(lines)


def write_report(path: Path, clips: list[ClipEvaluation], summary: dict, settings: dict) -> None:
    """The report as Markdown (``.md``) or JSON, written atomically: an earlier report stays
    whole until the new one is."""
    if path.suffix == ".md":
        write_text_atomic(path, to_markdown(clips, summary, settings))
    else:
        write_json_atomic(path, to_json(clips, summary, settings), sort_keys=False)


def write_strips(folder: Path, clips: list[ClipEvaluation]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for c in clips:
        if c.strip is not None:
            path = folder / f"{Path(c.clip).stem}.png"
            cv2.imwrite(str(path), cv2.cvtColor(c.strip, cv2.COLOR_RGB2BGR))
            written.append(path)
    return written


def plot_opening(clip: ClipEvaluation) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the inner-lip opening over time of the original, the dub and the
    static mouth, above the speech's energy, pauses shaded green in both."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    series = clip.series
    frames = len(series["original"])
    time = np.arange(frames) / clip.fps
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True, dpi=100,
                                         gridspec_kw={"height_ratios": [2, 1]})
    for name, colour in (("original", "black"), ("model", "tab:red"), ("static", "tab:blue")):
        top.plot(time, series[name], color=colour, linewidth=1.2, label=name)
    top.set_ylabel("inner-lip opening\n(eye distances)")
    top.legend(loc="upper right", fontsize=8)
    model = clip.metrics["model"]
    top.set_title(f"{clip.clip}: opening correlation {_fmt(model['opening_correlation'])}, "
                  f"articulation {_fmt(model['articulation'])}", fontsize=9)
    energy = series["energy"]
    bottom.plot(np.arange(len(energy)) / MEL_STEPS_PER_SECOND, energy, color="tab:gray",
                linewidth=0.8)
    paused = np.concatenate([[False], series["paused"], [False]]).astype(np.int8)
    for start, stop in zip(np.nonzero(np.diff(paused) == 1)[0],
                           np.nonzero(np.diff(paused) == -1)[0], strict=True):
        for axis in (top, bottom):
            axis.axvspan(start / clip.fps, stop / clip.fps, color="tab:green", alpha=0.15,
                         linewidth=0)
    bottom.set_ylabel("speech energy\n(mean log-mel, dB)")
    bottom.set_xlabel("seconds")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def write_plots(folder: Path, clips: list[ClipEvaluation]) -> list[Path]:
    """One PNG per clip of ``plot_opening``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for c in clips:
        if "original" in c.series:
            path = folder / f"{Path(c.clip).stem}.opening.png"
            cv2.imwrite(str(path), cv2.cvtColor(plot_opening(c), cv2.COLOR_RGB2BGR))
            written.append(path)
    return written
