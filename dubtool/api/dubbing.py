"""``dubtool dub`` and the run cache's upkeep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dubtool.options import DEFAULT_MODEL, DEFAULT_RENDERER, DEFAULT_SOURCES, check_range

if TYPE_CHECKING:
    from dubtool.pipeline.cache import RunSummary
    from dubtool.pipeline.dubber import DubResult


def dub(video: str | Path, speech: str | Path, output: str | Path | None = None, *,
        model: str | Path = DEFAULT_MODEL, device: str = "auto",
        renderer: str = DEFAULT_RENDERER, sources: int = DEFAULT_SOURCES,
        steps: int | None = None, eta: float | None = None, strength: float | None = None,
        seed: int = 0, batch_size: int = 1, **dub_options: object) -> DubResult:
    """Dub ``video`` with ``speech`` by the model ``model`` (a name or folder): one call of
    ``Dubber.from_pretrained(model, ...).dub(video, speech, output, ...)``, whose docstrings
    say what each option does. To dub several videos with one model, keep a ``Dubber``."""
    from dubtool.pipeline.dubber import Dubber

    dubber = Dubber.from_pretrained(model, device=device, renderer=renderer,
                                    sources=sources, steps=steps, eta=eta,
                                    strength=strength, seed=seed, batch_size=batch_size)
    return dubber.dub(video, speech, output, **dub_options)


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
