"""The run cache: one folder per (video content, speech content), one sub-folder per stage.

A run folder's ``manifest.json`` records, for every finished stage, the fingerprint of what it
was computed from (its settings, its code (``code_digest``) and the fingerprints of the stages it
read). A stage whose
fingerprint is unchanged is skipped; one whose fingerprint changed is recomputed, and since the
stages after it include its fingerprint in theirs, they are recomputed too.

Writes are atomic: a stage computes into a temporary folder that is renamed into place, and the
manifest is rewritten through a temporary file, so a run killed at any point leaves either the
old result or the new one, never half of one. A lock file keeps two processes out of one run.

The cache has a size limit ($DUBTOOL_CACHE_LIMIT_GB, default 10; 0: none): when a run ends, the
least recently used other runs are removed until the cache fits it; runs in use stay.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dubtool.errors import CacheError, UsageError, disk_full_reported
from dubtool.pipeline.timing import Span, Stopwatch

MANIFEST = "manifest.json"
LOCK = "lock"
FORMAT = "dubtool-run-cache/1"
_TMP_MARK = ".tmp-"
LIMIT_VARIABLE = "DUBTOOL_CACHE_LIMIT_GB"
DEFAULT_LIMIT_GB = 10.0  # a 5 s dub caches about 10 MB: a thousand clips fit
GB = 1024**3
# An eviction holds a run's lock only to unlink its manifest and rename its folder away: a run
# starting on that key waits this long for it (whatever its lock timeout) before it is "busy".
EVICTION_GRACE = 1.0
_EVICTED = ".evicted"

if TYPE_CHECKING:  # the chunk functions import numpy when they run: `cache list` needs none
    import numpy as np


def default_cache_dir() -> Path:
    """$DUBTOOL_CACHE_DIR, else $XDG_CACHE_HOME/dubtool, else ~/.cache/dubtool."""
    if os.environ.get("DUBTOOL_CACHE_DIR"):
        return Path(os.environ["DUBTOOL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dubtool"


def cache_limit_bytes() -> int:
    """$DUBTOOL_CACHE_LIMIT_GB in bytes (default 10 GB); 0 for no limit."""
    text = os.environ.get(LIMIT_VARIABLE, "").strip()
    try:
        gb = float(text) if text else DEFAULT_LIMIT_GB
    except ValueError:
        gb = float("nan")
    if not gb >= 0:  # NaN too
        raise UsageError(f"${LIMIT_VARIABLE} {text!r}: must be a number of GB >= 0 (0: no "
                         "limit)")
    return int(gb * GB)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: into a temporary file beside it,
    renamed over it once on disk (a full disk or Ctrl-C leaves the old file, and no scratch)."""
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: object, indent: int = 1, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys))


@dataclass(frozen=True)
class StageRecord:
    """What one stage call did: 'ran' or 'cached', how long it took and how busy it kept the
    CPU (``timing.Span``)."""

    stage: str
    status: str
    seconds: float
    cpu_seconds: float = 0.0
    core_busy: tuple[float, ...] = ()

    @classmethod
    def of(cls, stage: str, status: str, span: Span) -> StageRecord:
        return cls(stage, status, span.seconds, span.cpu_seconds, span.core_busy)

    @property
    def cores(self) -> float:
        """Cores the stage kept busy on average (CPU time over wall time)."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0


class RunCache:
    """One run folder. Use as a context manager: entering takes the run's lock."""

    def __init__(self, root: str | Path, key: str, description: dict | None = None,
                 lock_timeout: float = 0.0, limit_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key
        self.description = description or {}
        # Stages may run in two threads (the speech stage beside the video's): the manifest's
        # read-change-write is one step at a time.
        self._manifest_lock = threading.Lock()
        self.lock_timeout = lock_timeout
        # Read now: a bad $DUBTOOL_CACHE_LIMIT_GB is refused before any work.
        self.limit_bytes = cache_limit_bytes() if limit_bytes is None else limit_bytes
        self._lock_file = None
        self.records: list[StageRecord] = []

    # -- lifetime -------------------------------------------------------------------------
    def __enter__(self) -> RunCache:
        deadline = time.monotonic() + max(self.lock_timeout, EVICTION_GRACE)
        while True:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._lock_file = open(self.dir / LOCK, "a+")
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) and time.monotonic() < deadline:
                    continue  # evicted between the two calls: make the folder again
                raise CacheError(f"cannot create the cache folder ({exc.strerror})",
                                 self.dir) from exc
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _is_current(self._lock_file, self.dir / LOCK):
                    break
                # Another process removed the run (evicted or cleaned) while we waited: the
                # lock we hold is on a deleted file. Start again with a fresh folder.
            except BlockingIOError:
                if not _is_current(self._lock_file, self.dir / LOCK):
                    pass  # an eviction moved the run away meanwhile: start again at once
                elif time.monotonic() >= deadline:
                    self._lock_file.close()
                    self._lock_file = None
                    raise CacheError("another dubtool run is using this cache entry; wait for "
                                     "it to finish or use another --cache-dir", self.dir) from None
                else:
                    time.sleep(0.05)
            self._lock_file.close()
        self._remove_leftovers()
        manifest = self.manifest()
        manifest.setdefault("created", time.time())
        manifest["used"] = time.time()
        manifest["description"] = {**manifest.get("description", {}), **self.description}
        self._write_manifest(manifest)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        # After a failure too (its stages stay cached), but not after Ctrl-C: stop at once.
        # Eviction is housekeeping: whatever goes wrong in it never fails the run.
        if exc_type is None or issubclass(exc_type, Exception):
            with contextlib.suppress(OSError):
                evict_runs(self.root, self.limit_bytes, keep=self.key)

    def _remove_leftovers(self) -> None:
        # Temporary files of a run that was killed: safe to remove while we hold the lock.
        for entry in [*self.dir.iterdir(), *self.dir.glob(f"*.chunks/*{_TMP_MARK}*")]:
            if _TMP_MARK in entry.name:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    # -- manifest -------------------------------------------------------------------------
    def manifest(self) -> dict:
        path = self.dir / MANIFEST
        if not path.exists():
            return {"format": FORMAT, "key": self.key, "stages": {}}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CacheError("cache manifest is unreadable; remove this folder or run "
                             "'dubtool cache clean'", path) from exc
        if data.get("format") != FORMAT:
            raise CacheError("not a dubtool cache folder of this version", self.dir)
        return data

    def _write_manifest(self, data: dict) -> None:
        write_json_atomic(self.dir / MANIFEST, data)

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    def is_done(self, stage: str, stage_fingerprint: str) -> bool:
        entry = self.manifest()["stages"].get(stage)
        return (entry is not None and entry.get("fingerprint") == stage_fingerprint
                and self.stage_dir(stage).is_dir())

    # -- running stages -------------------------------------------------------------------
    def run_stage(self, stage: str, stage_fingerprint: str, compute: Callable[[Path], None],
                  force: bool = False) -> Path:
        """Make sure ``stage``'s folder holds a result for ``stage_fingerprint``.

        ``compute(folder)`` writes the stage's files into an empty folder; it runs only when
        the manifest has no result for this fingerprint (or ``force``). Returns the folder.
        """
        start = Stopwatch()
        final = self.stage_dir(stage)
        if self._reuse(stage, stage_fingerprint, force, start):
            return final
        tmp = self.dir / f"{stage}{_TMP_MARK}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with disk_full_reported(tmp):
                compute(tmp)
                if final.exists():
                    trash = self.dir / f"{stage}.old{_TMP_MARK}{os.getpid()}"
                    os.replace(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._finish(stage, stage_fingerprint, "ran", start)
        return final

    def _reuse(self, stage: str, stage_fingerprint: str, force: bool, start: Stopwatch) -> bool:
        """True if the stage's recorded result can be used as it is. Otherwise the manifest
        forgets it first: if the run dies while recomputing, it never claims a stale one."""
        if self._lock_file is None:
            raise RuntimeError("RunCache must be entered (locked) before running stages")
        with self._manifest_lock:
            if not force and self.is_done(stage, stage_fingerprint):
                self.records.append(StageRecord.of(stage, "cached", start.span()))
                return True
            manifest = self.manifest()
            if manifest["stages"].pop(stage, None) is not None:
                self._write_manifest(manifest)
            return False

    def _finish(self, stage: str, stage_fingerprint: str, status: str, start: Stopwatch) -> None:
        with self._manifest_lock:
            manifest = self.manifest()
            manifest["stages"][stage] = {"fingerprint": stage_fingerprint,
                                         "finished": time.time()}
            self._write_manifest(manifest)
            self.records.append(StageRecord.of(stage, status, start.span()))

    def run_chunked_stage(self, stage: str, stage_fingerprint: str, chunks: int,
                          compute_chunks: Callable[[list[int], list[dict | None]],
                                                   list[dict[str, np.ndarray]]],
                          force: bool = False, streams: int = 1) -> Path:
        """Like run_stage, for a stage made of ``chunks`` pieces computed in order.

        ``compute_chunks(ks, previous)`` returns the arrays of chunks ``ks``, given each one's
        predecessor's arrays (None for the first chunk of a stream). The chunks are split into
        ``streams`` contiguous runs computed side by side: step j computes the j-th chunk of
        every run in one call (a batch). Each chunk is written atomically as soon as it is
        done, into a work folder that outlives a killed run: the next run with the same
        fingerprint computes only the missing chunks. Returns the stage folder, whose chunk
        files ``load_chunk`` reads.
        """
        start = Stopwatch()
        final = self.stage_dir(stage)
        if self._reuse(stage, stage_fingerprint, force, start):
            return final
        work = self.dir / f"{stage}.chunks"
        marker = work / "fingerprint"
        if force or not marker.is_file() or marker.read_text() != stage_fingerprint:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            marker.write_text(stage_fingerprint)
        firsts, ends = stream_bounds(chunks, streams)
        latest: dict[int, dict[str, np.ndarray]] = {}  # the last chunk computed, by index
        resumed = 0
        for step in range(max((e - f for f, e in zip(firsts, ends, strict=True)), default=0)):
            group = [f + step for f, e in zip(firsts, ends, strict=True) if f + step < e]
            missing = [k for k in group if not (work / chunk_name(k)).is_file()]
            resumed += len(group) - len(missing)
            if not missing:
                continue
            previous = [None if k in firsts else latest.pop(k - 1, None) or load_chunk(work, k - 1)
                        for k in missing]
            for k, arrays in zip(missing, compute_chunks(missing, previous), strict=True):
                self._write_chunk(work, k, arrays)
                latest[k] = arrays
        marker.unlink()
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        self._finish(stage, stage_fingerprint, f"resumed at chunk {resumed}" if resumed else "ran",
                     start)
        return final

    @staticmethod
    def _write_chunk(work: Path, k: int, arrays: dict[str, np.ndarray]) -> None:
        import numpy as np

        path = work / chunk_name(k)
        tmp = work / f"{chunk_name(k)}{_TMP_MARK}{os.getpid()}.npz"
        try:
            with disk_full_reported(path):
                np.savez(tmp, **arrays)
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def stream_bounds(chunks: int, streams: int) -> tuple[list[int], list[int]]:
    """First and end chunk of each of ``streams`` contiguous runs of near-equal length."""
    import numpy as np

    streams = max(1, min(streams, chunks))
    edges = np.linspace(0, chunks, streams + 1).round().astype(int).tolist()
    return edges[:-1], edges[1:]


def chunk_name(k: int) -> str:
    return f"chunk_{k:06d}.npz"


def load_chunk(folder: Path, k: int) -> dict[str, np.ndarray]:
    import numpy as np

    with np.load(folder / chunk_name(k), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


# -- listing and cleaning -----------------------------------------------------------------
@dataclass(frozen=True)
class RunSummary:
    key: str
    path: Path
    size_bytes: int
    created: float
    used: float
    stages: tuple[str, ...]
    description: dict


def _folder_size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):  # os.walk skips what another process removes
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile, or another user's
                total += os.stat(os.path.join(folder, name)).st_size
    return total


def _is_current(lock_file, path: Path) -> bool:
    """Whether the open ``lock_file`` is still the file at ``path`` (not removed meanwhile)."""
    try:
        return os.fstat(lock_file.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def list_runs(root: str | Path | None = None) -> list[RunSummary]:
    """Every run folder under the cache root, most recently used first."""
    root = Path(root) if root is not None else default_cache_dir()
    runs = []
    if not root.is_dir():
        return runs
    for manifest_path in root.glob(f"*/{MANIFEST}"):
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("format") != FORMAT:
            continue
        folder = manifest_path.parent
        runs.append(RunSummary(folder.name, folder, _folder_size(folder), data.get("created", 0),
                               data.get("used", 0), tuple(data.get("stages", {})),
                               data.get("description", {})))
    return sorted(runs, key=lambda r: r.used, reverse=True)


def _remove_run(run: RunSummary) -> bool:
    """Remove a run folder unless another process holds its lock, removed it already, or it
    cannot be removed (another user's run in a shared cache): never raises OSError."""
    lock = run.path / LOCK
    trash = run.path.with_name(f"{run.key}{_EVICTED}{_TMP_MARK}{os.getpid()}")
    try:
        with open(lock, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not _is_current(lock_file, lock) or not (run.path / MANIFEST).is_file():
                return False
            # Drop the manifest first: a half-removed folder is then no longer a run. Then
            # free the key's name at once (a run may start on it while the files go), and
            # the lock with it: a run starting on the key never waits for the removal.
            (run.path / MANIFEST).unlink()
            try:
                os.rename(run.path, trash)
            except OSError:  # cannot be renamed: removed in place, under the lock
                shutil.rmtree(run.path, ignore_errors=True)
                return True
    except OSError:  # removed meanwhile, in use, or not ours to remove
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def clean_runs(root: str | Path | None = None, keys: list[str] | None = None,
               older_than_days: float | None = None) -> list[RunSummary]:
    """Remove run folders (all, those whose key starts with one of ``keys``, or those unused
    for ``older_than_days``). Only folders with a dubtool manifest are touched, and runs in use
    by another process are left alone. Returns what was removed."""
    now = time.time()
    return [run for run in list_runs(root)
            if not (keys and not any(run.key.startswith(k) for k in keys))
            and not (older_than_days is not None and now - run.used < older_than_days * 86400)
            and _remove_run(run)]


def evict_runs(root: str | Path, limit_bytes: int, keep: str | None = None) -> list[RunSummary]:
    """Remove the least recently used runs until the cache holds at most ``limit_bytes``
    (0: no limit). The run ``keep`` (the one just finished) and runs in use by another
    process stay, even if the cache is still over the limit then. Returns what was removed."""
    if limit_bytes <= 0:
        return []
    for leftover in Path(root).glob(f"*{_EVICTED}{_TMP_MARK}*"):  # of an evictor killed
        shutil.rmtree(leftover, ignore_errors=True)
    runs = list_runs(root)
    total = sum(run.size_bytes for run in runs)
    removed = []
    for run in reversed(runs):  # least recently used first
        if total <= limit_bytes:
            break
        if run.key != keep and _remove_run(run):
            total -= run.size_bytes
            removed.append(run)
    return removed
