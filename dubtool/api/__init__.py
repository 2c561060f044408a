"""dubtool's library API: every CLI command is one call here.

>>> import dubtool
>>> dubber = dubtool.Dubber.from_pretrained("dubtool-cpu-128")
>>> result = dubber.dub("talk.mp4", "speech.wav", "talk.dubbed.mp4")
>>> result = dubtool.landmarks("talk.mp4", output="debug.mp4", json_path="points.json")
>>> result.track.faces_found, result.track.ms_per_frame
>>> dubtool.prepare("videos/", "dataset/")
>>> dubtool.train("autoencoder", "cpu-128", "dataset/", "runs/ae", steps=2000)

Only light modules are imported here: the command line imports this package to parse its
arguments, and each function imports what it needs (torch and diffusers take seconds). The
pipeline object ``Dubber`` and its ``DubResult`` are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dubtool.api.batch import NOTHING_DUBBED, BatchItem, BatchOutcome, batch, batch_items
from dubtool.api.dubbing import cache_clean, cache_limit, cache_list, dub
from dubtool.api.landmarks import LandmarksResult, landmarks
from dubtool.api.measure import BUNDLED_CLIP, EvalReport, bench, evaluate
from dubtool.api.training import merge_shards, offsets, prepare, train
from dubtool.options import DEFAULT_MODEL, RECONSTRUCTION_GAP_SECONDS

if TYPE_CHECKING:
    from dubtool.pipeline.dubber import Dubber, DubResult

__all__ = ["BUNDLED_CLIP", "DEFAULT_MODEL", "NOTHING_DUBBED", "RECONSTRUCTION_GAP_SECONDS",
           "BatchItem", "BatchOutcome", "DubResult", "Dubber", "EvalReport", "LandmarksResult",
           "batch", "batch_items", "bench", "cache_clean", "cache_limit", "cache_list", "dub",
           "evaluate", "landmarks", "merge_shards", "offsets", "prepare", "train"]


def __getattr__(name: str) -> object:
    if name in ("Dubber", "DubResult"):
        return getattr(importlib.import_module("dubtool.pipeline.dubber"), name)
    raise AttributeError(f"module 'dubtool.api' has no attribute {name!r}")
