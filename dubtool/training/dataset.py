"""Training data: ``dubtool prepare`` turns videos into face-crop clips (read and sampled by
``pipeline.clips``).

The folder it writes is described in ``pipeline.clips``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dubtool.errors import InputNotFound, InvalidMedia
from dubtool.options import VIDEO_SUFFIXES
from dubtool.pipeline.cache import write_json_atomic
from dubtool.pipeline.clips import DATASET_FILE, STATES_FILE
from dubtool.pipeline.run import Inputs, run_front

PEOPLE_FILE = "PEOPLE.tsv"
HELDOUT_EVERY = 10

PrepareProgress = Callable[[str, int, int], None]


def find_videos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())


def person_of(video: Path, root: Path) -> str:
    """Who is in a clip: a PEOPLE.tsv (clip<TAB>person) beside it, else the first folder under
    the root (VoxCeleb/HDTF layout: one folder per person), else the clip itself."""
    table = video.parent / PEOPLE_FILE
    if table.is_file():
        for line in table.read_text().splitlines():
            parts = line.strip().split("\t")
            if len(parts) >= 2 and parts[0] in (video.name, video.stem):
                return parts[1]
    relative = video.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else video.stem


@dataclass
class ClipReport:
    clip: str
    person: str
    frames: int
    faces: int
    status: str  # "train", "val", "heldout" or "skipped: <reason>"


def _clip_name(video: Path, root: Path) -> str:
    relative = str(video.relative_to(root).with_suffix(""))
    return relative.replace(os.sep, "__").replace(" ", "_")


def _write_clip(folder: Path, video: Path, person: str, front, crop_size: int) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from dubtool.pipeline.crops import write_crops

    track, extracted = front.track, front.extracted
    frames = track.frames
    write_crops(extracted.video, track, crop_size, tmp)  # the dub pipeline's crops, same file
    np.save(tmp / "points.npy", track.crop_points())
    np.save(tmp / "detected.npy", track.detected)
    np.save(tmp / "mel.npy", extracted.mel[:])
    _write_states(tmp, video)
    fps = extracted.video.fps
    (tmp / "meta.json").write_text(json.dumps({
        "fps": f"{fps.numerator}/{fps.denominator}", "video": str(video), "person": person,
        "frames": frames, "faces": track.faces_found}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _write_states(folder: Path, video: Path) -> None:
    """The speech encoder's states of ``video``'s sound into ``folder``/STATES_FILE."""
    from dubtool.pipeline import speech

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        speech.encode_file(video, Path(tmp))
        os.replace(Path(tmp) / speech.STATES_FILE, folder / STATES_FILE)


def _validation_people(frames_by_person: dict[str, int], fraction: float) -> set[str]:
    """A deterministic choice of about ``fraction`` of the people, never the one with the most
    footage (it would take a large share of the training data with it)."""
    people = sorted(frames_by_person, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    largest = max(frames_by_person, key=frames_by_person.get)
    count = max(1, round(fraction * len(people))) if len(people) > 1 else 0
    return set([p for p in people if p != largest][:count])


def assign_splits(reports: list[ClipReport], validation_fraction: float) -> None:
    """Turn the "train" status of kept clips into train, val or heldout.

    About ``validation_fraction`` of the people go to validation (never the one with the most
    footage). Of every other person with more than two clips, every HELDOUT_EVERY-th clip is
    held out: known faces with unheard speech, to measure a model on its own speakers.
    """
    kept = [r for r in reports if r.status == "train"]
    frames_by_person: dict[str, int] = {}
    clips_by_person: dict[str, int] = {}
    for r in kept:
        frames_by_person[r.person] = frames_by_person.get(r.person, 0) + r.faces
        clips_by_person[r.person] = clips_by_person.get(r.person, 0) + 1
    val_people = _validation_people(frames_by_person, validation_fraction) if kept else set()
    seen: dict[str, int] = {}
    for r in kept:
        if r.person in val_people:
            r.status = "val"
            continue
        seen[r.person] = seen.get(r.person, 0) + 1
        if clips_by_person[r.person] > 2 and seen[r.person] % HELDOUT_EVERY == 0:
            r.status = "heldout"


def shard_file(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}.json"


def prepare(videos: str | Path, output: str | Path, crop_size: int = 128,
            min_face_fraction: float = 0.9, validation_fraction: float = 0.1,
            cache_dir: str | Path | None = None,
            progress: PrepareProgress | None = None,
            shard: tuple[int, int] | None = None) -> list[ClipReport]:
    """Prepare every video under ``videos`` (its own audio is its speech) into ``output``.

    ``shard`` (K, N): only every N-th video from the K-th (1-based), so that N machines prepare
    disjoint parts; such a part writes ``shard_file`` instead of the split, and
    ``merge_shards`` joins the parts into one data set without reading the videos again.
    """
    from dubtool.pipeline.crops import load_crops

    root = Path(videos).resolve()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    reports: list[ClipReport] = []
    all_videos = find_videos(root)
    picked = range(len(all_videos)) if shard is None else range(shard[0] - 1, len(all_videos),
                                                                shard[1])
    for n, video in ((i, all_videos[i]) for i in picked):
        name = _clip_name(video, root)
        person = person_of(video, root)
        if progress is not None:
            progress(name, n, len(all_videos))
        # A clip that is missing or not usable media is skipped and the others go on; anything
        # else (a bug, a busy or damaged cache, a full disk) stops the run, not hidden as a skip.
        try:
            inputs = Inputs.of(video, video)
            with inputs.open_cache(cache_dir) as cache:
                front = run_front(cache, inputs, loop="cut")
        except (InputNotFound, InvalidMedia) as exc:
            reports.append(ClipReport(name, person, 0, 0, f"skipped: {exc}"))
            continue
        track = front.track
        if track.faces_found < min_face_fraction * track.frames:
            reports.append(ClipReport(name, person, track.frames, track.faces_found,
                                      f"skipped: face in {track.faces_found}/{track.frames} "
                                      "frames"))
            continue
        folder = output / name
        meta = folder / "meta.json"
        if not (meta.exists() and json.loads(meta.read_text()).get("frames") == track.frames
                and load_crops(folder).shape[1] == crop_size):
            _write_clip(folder, video, person, front, crop_size)
        else:
            if (saved := json.loads(meta.read_text()))["person"] != person:
                # PEOPLE.tsv (or the folder) now names someone else: the crops stay valid.
                write_json_atomic(meta, {**saved, "person": person})
            if not (folder / STATES_FILE).is_file():  # prepared before the speech encoder
                _write_states(folder, video)
        reports.append(ClipReport(name, person, track.frames, track.faces_found, "train"))
    if progress is not None:
        progress("", len(all_videos), len(all_videos))
    if shard is not None:
        write_json_atomic(output / shard_file(shard), {
            "crop_size": crop_size, "source": str(root), "shard": list(shard),
            "clips": [asdict(r) for r in reports]})
        return reports
    return write_dataset(output, reports, crop_size, root, validation_fraction)


def write_dataset(output: Path, reports: list[ClipReport], crop_size: int, source: Path | str,
                  validation_fraction: float) -> list[ClipReport]:
    """Decide the split of ``reports`` (in the order of the videos) and write DATASET_FILE."""
    assign_splits(reports, validation_fraction)
    split = {name: [r.clip for r in reports if r.status == name]
             for name in ("train", "val", "heldout")}
    write_json_atomic(output / DATASET_FILE, {
        "crop_size": crop_size, "source": str(source), "split": split,
        "people": {r.clip: r.person for r in reports if r.status in split},
    }, sort_keys=False)
    return reports


def _staging(target: Path) -> Path:
    return target.with_name(target.name + ".merging")


def _move_clip(source: Path, target: Path) -> None:
    """Move the clip folder ``source`` to ``target`` so that a rerun, or a run after an
    interrupted one, never loses it: a clip an earlier run moved is left where it is, and one
    still in its shard replaces the target only once it is wholly beside it."""
    staging = _staging(target)
    if source.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        if source.stat().st_dev == target.parent.stat().st_dev:
            os.rename(source, staging)  # one step: the clip is in the shard or in staging
        else:
            shutil.copytree(source, staging)  # the shard keeps it until the copy is whole
    if staging.is_dir():
        replaced = target.with_name(target.name + ".replaced")
        shutil.rmtree(replaced, ignore_errors=True)
        if target.exists():
            os.rename(target, replaced)
        os.rename(staging, target)
        shutil.rmtree(replaced, ignore_errors=True)
    if source.is_dir():  # copied across file systems: the shard's copy goes last
        trash = source.with_name(source.name + ".merged")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(source, trash)
        shutil.rmtree(trash)


def merge_shards(shards: list[str | Path], output: str | Path,
                 validation_fraction: float = 0.1) -> list[ClipReport]:
    """Join the parts that ``prepare(shard=(K, N))`` wrote (one folder each, or all in
    ``output``) into the data set ``output``: clip folders moved in, the split decided once
    over all the clips in the order of the videos, as one ``prepare`` would have."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    parts = []
    for folder in map(Path, shards):
        found = sorted(folder.glob("shard-*-of-*.json"))
        if not found:
            raise InputNotFound("holds no prepared shard (shard-K-of-N.json)", folder)
        parts += [(folder, json.loads(f.read_text())) for f in found]
    counts = {tuple(p["shard"])[1] for _, p in parts}
    got = sorted(p["shard"][0] for _, p in parts)
    sizes = {p["crop_size"] for _, p in parts}
    if len(counts) != 1 or got != list(range(1, next(iter(counts)) + 1)) or len(sizes) != 1:
        raise InvalidMedia(f"the shards do not make one whole: parts {got} of "
                           f"{sorted(counts)}, crop sizes {sorted(sizes)}", output)
    count = next(iter(counts))
    order, moves = [], []
    for folder, part in parts:
        k = part["shard"][0]
        for j, r in enumerate(part["clips"]):
            report = ClipReport(**r)
            if not report.status.startswith("skipped") and folder.resolve() != output.resolve():
                moves.append((folder / report.clip, output / report.clip))
            order.append((k - 1 + j * count, report))  # its place among all the videos
    # Every clip is found (in its shard, or in the output from an earlier run) before any is
    # moved, so that a merge that cannot finish changes nothing.
    for source, target in moves:
        if not (source.is_dir() or target.is_dir() or _staging(target).is_dir()):
            raise InputNotFound(f"clip {target.name} is neither here nor in {output} (was the "
                                "shard moved or deleted?)", source)
    for source, target in moves:
        _move_clip(source, target)
    reports = [r for _, r in sorted(order, key=lambda item: item[0])]
    return write_dataset(output, reports, sizes.pop(), parts[0][1]["source"],
                         validation_fraction)


