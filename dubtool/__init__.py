"""dubtool: visual dubbing with landmark-guided latent diffusion.

The library API (``dubtool.Dubber``, ``dubtool.dub``, ``dubtool.batch``, ...) lives in
``dubtool.api``; its names are loaded on first use, so that ``import dubtool`` stays fast and
imports neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dubtool.errors import DubtoolError

if TYPE_CHECKING:
    from dubtool.api import (
        BatchItem,
        BatchOutcome,
        Dubber,
        DubResult,
        EvalReport,
        LandmarksResult,
        batch,
        batch_items,
        bench,
        cache_clean,
        cache_list,
        dub,
        evaluate,
        landmarks,
        prepare,
        train,
    )

__version__ = "0.1.0"
__all__ = ["BatchItem", "BatchOutcome", "DubResult", "Dubber", "DubtoolError", "EvalReport",
           "LandmarksResult", "batch", "batch_items", "bench", "cache_clean", "cache_list",
           "dub", "evaluate", "landmarks", "prepare", "train"]
_API = frozenset(__all__) - {"DubtoolError"}


def __getattr__(name: str) -> object:
    if name in _API:
        return getattr(importlib.import_module("dubtool.api"), name)
    raise AttributeError(f"module 'dubtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
