"""What the options accept: vocabularies and numeric ranges, checked before any work.

Kept free of numpy and torch: the command line imports it to build its arguments.
"""

from __future__ import annotations

import math
import operator

from dubtool.errors import UsageError

LOOP_MODES = ("pingpong", "loop", "cut")
DETECTORS = ("mediapipe", "face-alignment")
FACE_CHOICES = ("largest", "center")
RENDERERS = ("native", "diffusion")  # pipeline/renderers/; the first is the default
DEFAULT_RENDERER = RENDERERS[0]
DEFAULT_SOURCES = 48  # frames the native renderer may draw from (pipeline/sources.py)
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # training's --mixed-precision and the configs'
MAX_SEED = 2**32 - 1  # numpy's generators take at most this; torch's seeds derive from it
DEFAULT_MODEL = "dubtool-cpu-128"  # a shipped model (models/)
DEFAULT_SYNC_EXPERT = "sync-expert"  # the lip-sync expert dubtool eval scores with (models/)
# The reconstruction protocol (eval): no reference from within this many seconds of its frame.
RECONSTRUCTION_GAP_SECONDS = 2.0
# What a folder of inputs may hold (batch takes images as one-frame videos; prepare videos).
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".mpg", ".mpeg", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg", ".opus", ".wma")

FaceChoice = str | int


def parse_face_choice(text: str) -> FaceChoice:
    """"largest", "center" or a face index (0 = leftmost); ValueError otherwise."""
    text = text.strip().lower()
    if text in FACE_CHOICES:
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"--face must be largest, center or a face index (0 = leftmost), "
                     f"not {text!r}")


def describe(choice: FaceChoice) -> str:
    return f"face {choice} from the left" if isinstance(choice, int) else f"{choice} face"


def _text(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


_TESTS = {">": operator.gt, ">=": operator.ge, "<=": operator.le}


def check_range(option: str, value: float | None, *, above: float | None = None,
                at_least: float | None = None, at_most: float | None = None) -> None:
    """UsageError (exit 2) naming ``option`` and its valid range unless ``value`` lies in it.
    None is an unset option: always accepted."""
    if value is None:
        return
    bounds = [(sign, limit) for sign, limit in ((">", above), (">=", at_least),
                                                 ("<=", at_most)) if limit is not None]
    if math.isnan(value) or not all(_TESTS[sign](value, limit) for sign, limit in bounds):
        valid = " and ".join(f"{sign} {_text(limit)}" for sign, limit in bounds)
        raise UsageError(f"{option} {_text(value)}: must be {valid}")


def check_seed(seed: int) -> None:
    check_range("--seed", seed, at_least=0, at_most=MAX_SEED)


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N; whether CUDA is there is checked when torch is loaded."""
    index = device.removeprefix("cuda:")
    if device not in ("auto", "cpu", "cuda") and not (index != device and index.isdigit()):
        raise UsageError(f"--device {device}: must be auto, cpu, cuda or cuda:N")


def check_choice(option: str, value: str | None, choices: tuple[str, ...]) -> None:
    """UsageError (exit 2) naming ``option`` unless ``value`` is one of ``choices`` (None: an
    unset option, accepted)."""
    if value is not None and value not in choices:
        raise UsageError(f"{option} {value}: must be {', '.join(choices)}")
