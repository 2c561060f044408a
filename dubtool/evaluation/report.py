"""Evaluation reports: JSON (to compare versions), Markdown (to read), strip images (to look)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2

from dubtool.evaluation.evaluate import VARIANTS, ClipEvaluation
from dubtool.evaluation.metrics import __doc__ as DEFINITIONS

LOWER_IS_BETTER = {"lmd", "stability"}


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.3f}"


def to_json(clips: list[ClipEvaluation], summary: dict, settings: dict) -> dict:
    return {"settings": settings, "summary": summary,
            "clips": [{"clip": c.clip, "frames": c.frames, "reference_frame": c.reference_frame,
                       "metrics": c.metrics} for c in clips],
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
    lines += ["", "## Per clip", "", "| clip | frames | " +
              " | ".join(f"{m} (model/static)" for m in ("lmd", "sync_confidence", "psnr")) +
              " |", "|---|---|---|---|---|"]
    for c in clips:
        cells = [f"{_fmt(c.metrics['model'][m])} / {_fmt(c.metrics['static'][m])}"
                 for m in ("lmd", "sync_confidence", "psnr")]
        lines.append(f"| {c.clip} | {c.frames} | " + " | ".join(cells) + " |")
    lines += ["", "## Definitions", "", DEFINITIONS.strip(), ""]
    return "\n".join(lines)


def write_report(path: Path, clips: list[ClipEvaluation], summary: dict, settings: dict) -> None:
    if path.suffix == ".md":
        path.write_text(to_markdown(clips, summary, settings))
    else:
        path.write_text(json.dumps(to_json(clips, summary, settings), indent=1))


def write_strips(folder: Path, clips: list[ClipEvaluation]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for c in clips:
        if c.strip is not None:
            path = folder / f"{Path(c.clip).stem}.png"
            cv2.imwrite(str(path), cv2.cvtColor(c.strip, cv2.COLOR_RGB2BGR))
            written.append(path)
    return written
