"""How the stages report their progress."""

from __future__ import annotations

from collections.abc import Callable

# progress(stage, done, total): called as a stage advances.
StageProgress = Callable[[str, int, int], None]
