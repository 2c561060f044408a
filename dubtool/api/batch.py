"""``dubtool batch``: many dubs, the model loaded once per worker process."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dubtool.errors import DubtoolError, InputNotFound, InvalidMedia, UsageError, disk_full_reported
from dubtool.options import (
    AUDIO_SUFFIXES,
    DEFAULT_MODEL,
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    check_range,
)


@dataclass(frozen=True)
class BatchItem:
    video: Path
    speech: Path
    output: Path


@dataclass
class BatchOutcome:
    item: BatchItem
    status: str  # "done", "skipped" (output exists) or "failed"
    seconds: float
    reason: str = ""  # why skipped or failed; NOTHING_DUBBED for a video without a face
    traceback: str = ""  # of a failure: `dubtool --debug batch` shows it


NOTHING_DUBBED = "no face found: written undubbed"


def batch_items(folder: str | Path | None = None, *, speech: str | Path | None = None,
                manifest: str | Path | None = None, out_dir: str | Path = "dubbed",
                shard: tuple[int, int] = (1, 1)) -> list[BatchItem]:
    """The jobs of a batch: videos of ``folder`` paired with the speech file of the same name
    (or one ``speech`` for all), or the rows video,speech[,output] of a CSV ``manifest``
    (paths relative to it). ``shard`` (k, n) keeps every n-th job starting at the k-th.

    Outputs are ``OUT_DIR/NAME.dubbed.mp4``, or ``OUT_DIR/NAME.EXT.dubbed.mp4`` for videos of
    a folder that share a name (``a.mp4`` and ``a.mov``). Two jobs that would still write one
    output (manifest rows) are refused (UsageError) before any work: one would be skipped or
    overwrite the other."""
    import csv
    from collections import Counter

    out_dir = Path(out_dir)
    items: list[BatchItem] = []
    if manifest is not None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise InputNotFound("no such manifest", manifest)
        # utf-8-sig: a byte order mark (spreadsheets write one) is not part of the first cell.
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                for row in reader:
                    cells = [cell.strip() for cell in row]
                    if not any(cells) or cells[0].lower() == "video" or cells[0].startswith("#"):
                        continue
                    while cells and not cells[-1]:
                        cells.pop()  # trailing commas
                    if not 2 <= len(cells) <= 3 or not all(cells[:2]):
                        raise InvalidMedia(f"row {reader.line_num}: expected video,speech"
                                           f"[,output], found {','.join(row)[:120]!r}",
                                           manifest)
                    video, voice = manifest.parent / cells[0], manifest.parent / cells[1]
                    output = (manifest.parent / cells[2] if len(cells) > 2
                              else out_dir / f"{video.stem}.dubbed.mp4")
                    items.append(BatchItem(video, voice, output))
            except UnicodeDecodeError as exc:
                raise InvalidMedia(f"not UTF-8 text ({exc.reason})", manifest) from None
            except csv.Error as exc:
                raise InvalidMedia(f"row {reader.line_num}: {exc}", manifest) from None
    else:
        if folder is None or not Path(folder).is_dir():
            raise InputNotFound("not a folder", folder or "")
        files = sorted(p for p in Path(folder).iterdir() if p.is_file())
        voices = {p.stem: p for p in files if p.suffix.lower() in AUDIO_SUFFIXES}
        videos = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES]
        stems = Counter(video.stem for video in videos)
        for video in videos:
            voice = Path(speech) if speech is not None else voices.get(video.stem)
            if voice is None:
                continue
            name = video.stem if stems[video.stem] == 1 else video.name
            items.append(BatchItem(video, voice, out_dir / f"{name}.dubbed.mp4"))
    k, n = shard
    if not 1 <= k <= n:
        raise ValueError(f"shard {k}/{n}: K must be between 1 and N")
    # Over all the jobs, not this shard's: every machine of a split batch refuses alike.
    writers: dict[Path, BatchItem] = {}
    for item in items:
        first = writers.setdefault(item.output.resolve(), item)
        if first is not item:
            raise UsageError(f"{first.video} ({first.speech.name}) and {item.video} "
                             f"({item.speech.name}) would both be written to {item.output}; "
                             "give each job its own output", manifest or folder)
    return items[k - 1::n]


def batch(items: list[BatchItem], *, model: str | Path = DEFAULT_MODEL, force: bool = False,
          device: str = "auto", jobs: int = 1,
          on_done: Callable[[BatchOutcome], None] | None = None,
          **dub_options: object) -> list[BatchOutcome]:
    """Dub every item, loading the model once per process. A failing item is recorded, whatever
    the exception (but Ctrl-C), and the batch goes on; an existing output is skipped unless
    ``force``. ``jobs`` > 1 runs that many worker processes, sharing the CPU threads between
    them. Options are checked, and the device resolved, before the first item."""
    from dubtool.devices import resolve_device
    from dubtool.pipeline.dubber import check_dub_options

    check_range("--jobs", jobs, at_least=1)
    check_dub_options(device=device, **dub_options)
    resolve_device(device)
    outcomes = []
    if jobs <= 1:
        worker = _BatchWorker(model, device, force, dub_options)
        for item in items:
            outcomes.append(worker(item))
            if on_done is not None:
                on_done(outcomes[-1])
        return outcomes
    import multiprocessing

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch state
    with context.Pool(jobs, initializer=_start_worker,
                      initargs=(model, device, force, dub_options, threads)) as pool:
        for outcome in pool.imap(_run_worker, items):
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
    return outcomes


BATCH_LOCK_TIMEOUT = 6 * 3600.0


class _BatchWorker:
    def __init__(self, model: str | Path, device: str, force: bool, dub_options: dict) -> None:
        self.model, self.device, self.force, self.dub_options = model, device, force, dub_options
        self.dubber = None

    def __call__(self, item: BatchItem) -> BatchOutcome:
        from dubtool.pipeline.dubber import DUBBER_OPTIONS, Dubber

        start = time.perf_counter()
        try:
            if item.output.exists() and not self.force:
                return BatchOutcome(item, "skipped", 0.0, "output exists (use --force)")
            if self.dubber is None:
                self.dubber = Dubber.from_pretrained(self.model, device=self.device, **{
                    k: v for k, v in self.dub_options.items() if k in DUBBER_OPTIONS})
            item.output.parent.mkdir(parents=True, exist_ok=True)
            # Two jobs with the same inputs share a cache entry: the second waits for the first.
            with disk_full_reported(item.output):
                # ``force`` redoes the output, not the stages: those cached for these inputs
                # and options are what a recomputation would give again.
                result = self.dubber.dub(
                    item.video, item.speech, item.output, lock_timeout=BATCH_LOCK_TIMEOUT,
                    **{k: v for k, v in self.dub_options.items() if k not in DUBBER_OPTIONS})
            return BatchOutcome(item, "done", time.perf_counter() - start,
                                NOTHING_DUBBED if result.dubbed_frames == 0 else "")
        except Exception as exc:  # bad input, a bug, out of memory: only this item stops
            reason = str(exc) if isinstance(exc, DubtoolError) else f"{type(exc).__name__}: {exc}"
            return BatchOutcome(item, "failed", time.perf_counter() - start, reason,
                                traceback.format_exc())


_worker: _BatchWorker | None = None


def _start_worker(model: str | Path, device: str, force: bool, dub_options: dict,
                  threads: int) -> None:
    import torch

    global _worker
    torch.set_num_threads(threads)
    _worker = _BatchWorker(model, device, force, dub_options)


def _run_worker(item: BatchItem) -> BatchOutcome:
    return _worker(item)
