"""What the options accept.

Kept free of numpy and torch: the command line imports it to build its arguments.
"""

from __future__ import annotations

LOOP_MODES = ("pingpong", "loop", "cut")
DETECTORS = ("mediapipe", "face-alignment")
FACE_CHOICES = ("largest", "center")

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
