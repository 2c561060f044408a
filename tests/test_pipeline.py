"""The stage cache and the extract + landmarks stages, on real and synthetic media."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tone, make_video

from dubtool.errors import CacheError, UsageError
from dubtool.hashing import code_digest, fingerprint
from dubtool.media.audio import load_speech, mel_spectrogram
from dubtool.media.frames import VideoWriter, read_frames
from dubtool.media.probe import probe_video
from dubtool.pipeline.cache import (
    LIMIT_VARIABLE,
    RunCache,
    cache_limit_bytes,
    clean_runs,
    list_runs,
)
from dubtool.pipeline.extract import extract
from dubtool.pipeline.landmarks import FaceTrack, smooth_track
from dubtool.pipeline.plan import frame_plan, output_frame_count
from dubtool.pipeline.run import Inputs, run_front

# -- frame plan -------------------------------------------------------------------------


def test_pingpong_plan_has_no_jump() -> None:
    plan = frame_plan(4, 12, "pingpong")
    assert plan.tolist() == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3, 2, 1]
    assert np.abs(np.diff(plan)).max() == 1


def test_loop_cut_and_still_plans() -> None:
    assert frame_plan(3, 7, "loop").tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert frame_plan(10, 4, "pingpong").tolist() == [0, 1, 2, 3]  # longer video is cut
    assert frame_plan(1, 5, "pingpong").tolist() == [0] * 5  # still image
    assert output_frame_count(2.0, 25, 10, "cut") == 10  # speech cut to the video
    assert output_frame_count(2.0, 25, 10, "loop") == 50
    assert output_frame_count(1.01, Fraction(30000, 1001), 100) == 31
    assert output_frame_count(1.001, Fraction(30000, 1001), 100) == 30
    assert output_frame_count(0.01, 25, 100) == 1
    with pytest.raises(ValueError, match="loop mode"):
        frame_plan(3, 3, "bounce")


def test_extract_plans_the_speech_length(tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", seconds=1.0)
    speech = make_tone(tmp_path / "s.wav", seconds=2.2)
    folder = tmp_path / "extract"
    folder.mkdir()
    result = extract(video, speech, "pingpong", folder)
    assert len(result.plan) == 55 and result.plan.max() == 24
    assert result.mel.shape[0] == 80 and abs(result.mel.shape[1] - 2.2 * 80) <= 2
    assert result.output_seconds == pytest.approx(2.2)
    # The mel on disk is the one of the speech decoded whole; the decoded speech is not kept.
    assert np.array_equal(result.mel[:], mel_spectrogram(load_speech(speech)))
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "mel.npy", "plan.npy"]
    again = type(result).load(folder)
    assert again.video == result.video and np.array_equal(again.plan, result.plan)


# -- the stage cache --------------------------------------------------------------------


def _statuses(cache: RunCache) -> dict[str, str]:
    return {r.stage: r.status for r in cache.records}


def test_only_the_source_frames_the_plan_uses_are_tracked_and_cropped(
        face_clip: Path, tmp_path: Path, cache_dir: Path, monkeypatch) -> None:
    from dubtool.face.detect import FaceMeshDetector
    from dubtool.pipeline.crops import load_crops, write_crops

    calls = []
    real_detect = FaceMeshDetector.detect_all

    def counted(self, frame):
        calls.append(1)
        return real_detect(self, frame)

    monkeypatch.setattr(FaceMeshDetector, "detect_all", counted)
    speech = make_tone(tmp_path / "speech.wav", seconds=0.4)  # 10 of the clip's 50 frames
    inputs = Inputs.of(face_clip, speech)
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs)
    assert len(calls) == 10 and front.track.frames == 10 and front.track.faces_found == 10
    write_crops(front.extracted.video, front.track, 32, tmp_path)
    assert load_crops(tmp_path).shape == (10, 32, 32, 3)
    # A speech as long as the video tracks all of it.
    inputs = Inputs.of(face_clip, make_tone(tmp_path / "long.wav", seconds=2.5))
    with inputs.open_cache(cache_dir) as cache:
        assert run_front(cache, inputs).track.frames == 50


def test_second_run_skips_done_stages(face_clip: Path, tmp_path: Path, cache_dir: Path) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=1.0)
    inputs = Inputs.of(face_clip, speech)
    with inputs.open_cache(cache_dir) as cache:
        first = run_front(cache, inputs)
    assert _statuses(cache) == {"extract": "ran", "landmarks": "ran"}
    with inputs.open_cache(cache_dir) as cache:
        second = run_front(cache, inputs)
    assert _statuses(cache) == {"extract": "cached", "landmarks": "cached"}
    assert np.array_equal(first.track.points, second.track.points)
    with inputs.open_cache(cache_dir) as cache:
        run_front(cache, inputs, force=True)
    assert _statuses(cache) == {"extract": "ran", "landmarks": "ran"}


def test_changed_speech_content_with_same_name_recomputes(face_clip: Path, tmp_path: Path,
                                                          cache_dir: Path) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=1.0)
    inputs = Inputs.of(face_clip, speech)
    with inputs.open_cache(cache_dir) as cache:
        assert len(run_front(cache, inputs).extracted.plan) == 25
    make_tone(speech, seconds=1.6)  # same name, new content
    inputs = Inputs.of(face_clip, speech)
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs)
    assert _statuses(cache)["extract"] == "ran"
    assert len(front.extracted.plan) == 40


def test_changed_setting_recomputes_that_stage_and_keeps_independent_ones(
        face_clip: Path, tmp_path: Path, cache_dir: Path) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=3.0)
    inputs = Inputs.of(face_clip, speech)
    with inputs.open_cache(cache_dir) as cache:
        assert run_front(cache, inputs, loop="pingpong").extracted.plan[60] == 38
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs, loop="loop")
    # The loop mode changes the plan, not the face track (which depends on the video only).
    assert _statuses(cache) == {"extract": "ran", "landmarks": "cached"}
    assert front.extracted.plan[60] == 10


def test_downstream_stage_reruns_when_upstream_changes(tmp_path: Path) -> None:
    calls = []

    def stage(name: str, value: str):
        def compute(folder: Path) -> None:
            calls.append(name)
            (folder / "out.txt").write_text(value)
        return compute

    for setting in ("a", "a", "b"):
        with RunCache(tmp_path, "run") as cache:
            fp1 = fingerprint("first", setting)
            cache.run_stage("first", fp1, stage("first", setting))
            cache.run_stage("second", fingerprint("second", fp1), stage("second", setting))
    assert calls == ["first", "second", "first", "second"]
    assert (tmp_path / "run" / "second" / "out.txt").read_text() == "b"


def test_code_digest_follows_the_code_a_module_uses(tmp_path: Path, monkeypatch) -> None:
    import importlib

    package = tmp_path / "stagepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("from stagepkg import helper\n\n"
                                      "def run():\n    return helper.value()\n")
    (package / "helper.py").write_text("def value():\n    return 1\n")
    (package / "unused.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stage = importlib.import_module("stagepkg.stage")
    importlib.import_module("stagepkg.unused")

    def digest() -> str:
        code_digest.cache_clear()
        return code_digest(stage)

    first = digest()
    (package / "stage.py").write_text("from stagepkg import helper  # a comment\n\n\n"
                                      "def run():\n    return helper.value()\n")
    (package / "unused.py").write_text("X = 2\n")
    assert digest() == first  # comments, layout and modules it does not use do not count
    (package / "helper.py").write_text("def value():\n    return 2\n")
    assert digest() != first  # a change in the code it uses does
    code_digest.cache_clear()


def test_a_stage_whose_code_changed_is_recomputed(face_clip: Path, cache_dir: Path,
                                                  tmp_path: Path) -> None:
    """Real edits of a copy of the package, run in a child process on the same cache: a
    comment changes no fingerprint; a statement added to extract.py recomputes extract, and
    only it (landmarks does not use that module)."""
    inputs = Inputs.of(face_clip)
    with inputs.open_cache(cache_dir) as cache:
        run_front(cache, inputs)
    copy = tmp_path / "src" / "dubtool"
    shutil.copytree(Path(run_front.__code__.co_filename).parents[1], copy,
                    ignore=shutil.ignore_patterns("__pycache__", "models"))
    script = textwrap.dedent("""
        import json, sys
        import dubtool
        from dubtool.pipeline.run import Inputs, run_front
        inputs = Inputs.of(sys.argv[1])
        with inputs.open_cache(sys.argv[2]) as cache:
            run_front(cache, inputs)
        print(dubtool.__file__)
        print(json.dumps({r.stage: r.status for r in cache.records}))
    """)

    def statuses_after(edit: str) -> dict[str, str]:
        extract = copy / "pipeline" / "extract.py"
        extract.write_text(extract.read_text() + edit)
        proc = subprocess.run([sys.executable, "-c", script, str(face_clip), str(cache_dir)],
                              capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(copy.parent)})
        assert proc.returncode == 0, proc.stderr
        package, statuses = proc.stdout.strip().splitlines()[-2:]
        assert Path(package).parent == copy  # the edited copy ran
        return json.loads(statuses)

    assert statuses_after("\n# a comment, and layout\n\n") == {"extract": "cached",
                                                                 "landmarks": "cached"}
    assert statuses_after("\n_EDITED_BY_A_TEST = 1\n") == {"extract": "ran",
                                                            "landmarks": "cached"}


def test_interrupted_stage_leaves_no_half_result(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "part.npy").write_bytes(b"half")
        raise KeyboardInterrupt

    with RunCache(tmp_path, "run") as cache:
        cache.run_stage("first", "fp1", lambda f: (f / "x").write_text("1"))
        with pytest.raises(KeyboardInterrupt):
            cache.run_stage("first", "fp2", broken)
        assert "first" not in cache.manifest()["stages"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["first", "lock",
                                                                    "manifest.json"]
    with RunCache(tmp_path, "run") as cache:
        cache.run_stage("first", "fp2", lambda f: (f / "x").write_text("2"))
        assert _statuses(cache) == {"first": "ran"}
    assert (tmp_path / "run" / "first" / "x").read_text() == "2"


def test_run_killed_during_landmarks_resumes(face_clip: Path, cache_dir: Path) -> None:
    # A real SIGKILL in the middle of the landmarks stage, in a child process.
    script = textwrap.dedent("""
        import os, signal, sys
        from dubtool.face.detect import FaceMeshDetector
        from dubtool.pipeline import run

        class DiesAtFrame10(FaceMeshDetector):
            seen = 0
            def detect_all(self, frame):
                DiesAtFrame10.seen += 1
                if DiesAtFrame10.seen == 10:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().detect_all(frame)

        run.make_detector = lambda name: DiesAtFrame10()
        inputs = run.Inputs.of(sys.argv[1])
        with inputs.open_cache(sys.argv[2]) as cache:
            run.run_front(cache, inputs)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(face_clip), str(cache_dir)],
                          capture_output=True)
    assert proc.returncode == -9
    (run_dir,) = cache_dir.iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"extract"}
    assert any(".tmp-" in p.name for p in run_dir.iterdir())  # the dead run's scratch
    inputs = Inputs.of(face_clip)
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs)
    assert _statuses(cache) == {"extract": "cached", "landmarks": "ran"}
    assert front.track.faces_found == 50
    assert not any(".tmp-" in p.name for p in run_dir.iterdir())


def test_second_process_on_same_run_is_refused(tmp_path: Path) -> None:
    with RunCache(tmp_path, "run"):
        with (pytest.raises(CacheError, match="another dubtool run") as info,
              RunCache(tmp_path, "run", lock_timeout=0.3)):
            pass
        assert info.value.exit_code == 8
    with RunCache(tmp_path, "run"):
        pass  # free again


def test_damaged_manifest_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="unreadable"), RunCache(tmp_path, "run"):
        pass


def test_list_and_clean(tmp_path: Path) -> None:
    for key in ("aaa1", "bbb2"):
        with RunCache(tmp_path, key, {"video": f"/x/{key}.mp4"}) as cache:
            cache.run_stage("s", "fp", lambda f: (f / "data").write_bytes(b"x" * 1000))
    (tmp_path / "not-a-run").mkdir()  # a stranger's folder is never touched
    runs = list_runs(tmp_path)
    assert {r.key for r in runs} == {"aaa1", "bbb2"}
    assert all(r.size_bytes >= 1000 and r.stages == ("s",) for r in runs)
    assert [r.key for r in clean_runs(tmp_path, keys=["aa"])] == ["aaa1"]
    assert clean_runs(tmp_path, older_than_days=1) == []
    assert [r.key for r in clean_runs(tmp_path)] == ["bbb2"]
    assert [p.name for p in tmp_path.iterdir()] == ["not-a-run"]


# -- landmarks stage --------------------------------------------------------------------


def test_landmarks_on_a_real_face(face_clip: Path, cache_dir: Path) -> None:
    inputs = Inputs.of(face_clip)
    with inputs.open_cache(cache_dir) as cache:
        track = run_front(cache, inputs).track
    assert track.frames == 50 and track.faces_found == 50
    assert track.points.shape == (50, 131, 2) and track.mesh.shape == (50, 478, 3)
    sizes = track.boxes[:, 2]
    assert sizes.min() > 80 and sizes.max() < 256 and np.ptp(sizes) <= 6  # stable box
    inside = track.crop_points()[25]
    assert (inside > 0).all() and (inside < 1).all()
    # The mouth moves while she talks: lip opening varies over the clip.
    from dubtool.face.indices import ORDER
    opening = track.points[:, ORDER.index(14), 1] - track.points[:, ORDER.index(13), 1]
    assert np.ptp(opening) > 2.0


def test_frames_without_face_are_flagged_not_fatal(face_clip: Path, tmp_path: Path,
                                                   cache_dir: Path) -> None:
    blank = make_video(tmp_path / "pattern.mp4", seconds=0.4, size="256x256", audio=False)
    joined = tmp_path / "face_then_pattern.mp4"
    with VideoWriter(joined, 256, 256, Fraction(25)) as writer:
        for path in (face_clip, blank):
            for frame in read_frames(probe_video(path)):
                writer.write(frame)
    inputs = Inputs.of(joined)
    with inputs.open_cache(cache_dir) as cache:
        track = run_front(cache, inputs).track
    assert track.frames == 60
    assert track.detected[:45].all() and not track.detected[52:].any()
    # Boxes of the faceless frames hold (within smoothing) the last face's box.
    last_face = track.detected.nonzero()[0][-1]
    assert np.abs(track.boxes[-1] - track.boxes[last_face]).max() <= 2

    only_pattern = Inputs.of(blank)
    with only_pattern.open_cache(cache_dir) as cache:
        none = run_front(cache, only_pattern).track
    assert none.faces_found == 0 and none.frames == 10


def test_smoothing_fills_gaps_and_removes_jitter() -> None:
    rng = np.random.default_rng(0)
    frames = 100
    truth = np.zeros((frames, 131, 2))
    truth[..., 0] = np.linspace(100, 140, frames)[:, None] + np.linspace(-50, 50, 131)
    truth[..., 1] = 200 + np.linspace(-60, 60, 131)
    noisy = truth + rng.normal(0, 1.5, truth.shape)
    detected = np.ones(frames, bool)
    detected[40:45] = False
    noisy[40:45] = 0.0  # garbage where nothing was found
    points, boxes = smooth_track(noisy, detected, 25)
    assert np.abs(points[40:45] - truth[40:45]).max() < 6
    jitter_in = np.abs(np.diff(noisy[:30, :74], axis=0)).mean()
    jitter_out = np.abs(np.diff(points[:30, :74], axis=0)).mean()
    assert jitter_out < 0.6 * jitter_in
    assert np.abs(np.diff(boxes[:, 2])).max() <= 1


def test_smoothing_by_parts_equals_smoothing_at_once(monkeypatch) -> None:
    """Smoothed SMOOTH_CHUNK frames at a time, each part with the neighbours its smoothing
    and its gap filling reach: the same points and boxes as in one part, gaps across the
    parts' edges and at the track's ends included."""
    from dubtool.pipeline import landmarks as landmarks_stage

    rng = np.random.default_rng(1)
    frames = 300
    points = (rng.uniform(100, 300, (131, 2))
              + rng.normal(0, 2, (frames, 131, 2))).astype(np.float32)
    detected = rng.random(frames) > 0.2
    detected[:7] = detected[-5:] = False
    detected[95:130] = False  # a gap longer than a part
    whole, whole_boxes = smooth_track(points, detected, 25)
    monkeypatch.setattr(landmarks_stage, "SMOOTH_CHUNK", 16)
    parts, part_boxes = smooth_track(points, detected, 25)
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(part_boxes, whole_boxes)


def test_smoothing_into_a_file_holds_a_few_bytes_a_frame(tmp_path: Path,
                                                         monkeypatch) -> None:
    """Smoothed into a DiskArray, a track's memory does not grow with its length: the peak
    is a few bytes a frame (flags, boxes) above a constant (one part)."""
    import tracemalloc

    from dubtool.arrays import DiskArray
    from dubtool.pipeline import landmarks as landmarks_stage

    monkeypatch.setattr(landmarks_stage, "SMOOTH_CHUNK", 256)
    rng = np.random.default_rng(0)
    peaks = {}
    for frames in (5_000, 20_000):
        points = DiskArray.create(tmp_path / f"raw{frames}.npy", (frames, 131, 2), np.float32)
        points[:] = (rng.uniform(100, 300, (131, 2))
                     + rng.normal(0, 1, (frames, 131, 2))).astype(np.float32)
        detected = rng.random(frames) > 0.1
        out = DiskArray.create(tmp_path / f"out{frames}.npy", (frames, 131, 2), np.float32)
        tracemalloc.start()
        try:
            smooth_track(points, detected, 25, out)
            peaks[frames] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    per_frame = (peaks[20_000] - peaks[5_000]) / 15_000
    assert per_frame < 150, per_frame  # the points alone are 1,048 bytes a frame


def test_smoothing_holds_little_more_than_its_output() -> None:
    """An hour's track is smoothed without float64 copies: the peak memory of smooth_track
    stays under 2.5 KB a frame (its float32 output alone is 1 KB; float64 work arrays of the
    points would take it past 5), and the points it returns are float32."""
    import tracemalloc

    rng = np.random.default_rng(0)
    frames = 20_000
    points = (rng.uniform(100, 300, (131, 2))
              + rng.normal(0, 1, (frames, 131, 2))).astype(np.float32)
    detected = rng.random(frames) > 0.1
    tracemalloc.start()
    try:
        smoothed, _ = smooth_track(points, detected, 25)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert smoothed.dtype == np.float32
    assert peak / frames < 2500


def test_native_logs_stay_out_of_stderr(face_clip: Path) -> None:
    script = ("import sys; from dubtool.face.detect import FaceMeshDetector\n"
              "from dubtool.media.frames import read_frames\n"
              "from dubtool.media.probe import probe_video\n"
              "with FaceMeshDetector() as d:\n"
              "    frames = read_frames(probe_video(sys.argv[1]))\n"
              "    n = sum(len(d.detect_all(f)) > 0 for f in frames)\n"
              "print(n)\n")
    env = {k: v for k, v in os.environ.items() if k != "DUBTOOL_NATIVE_LOGS"}
    proc = subprocess.run([sys.executable, "-c", script, str(face_clip)], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "50"
    assert proc.stderr == ""


def test_cache_dir_is_created_and_reused(face_clip: Path, tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"
    inputs = Inputs.of(face_clip)
    with inputs.open_cache(nested) as cache:
        run_front(cache, inputs)
    assert (nested / cache.key / "landmarks" / "track.npz").is_file()
    shutil.rmtree(nested / cache.key / "landmarks")  # a stage folder lost by hand
    with inputs.open_cache(nested) as cache:
        run_front(cache, inputs)
    assert _statuses(cache)["landmarks"] == "ran"



@pytest.mark.shared
def test_landmarks_on_the_shared_news_clip(tmp_path: Path) -> None:
    from conftest import SHARED

    from dubtool.api import landmarks

    clip = SHARED / "train" / "clips" / "German_20s.mp4"
    if not clip.exists():
        pytest.skip("../shared/data is not beside the repository")
    result = landmarks(clip, output=tmp_path / "debug.mp4", cache_dir=tmp_path / "cache")
    assert result.track.frames == 500 and result.track.faces_found == 500
    assert probe_video(tmp_path / "debug.mp4").frame_count == 500


def test_cache_limit_evicts_least_recently_used_runs_not_in_use(tmp_path: Path) -> None:
    def run(key: str, size: int = 10_000) -> None:
        with RunCache(tmp_path, key, limit_bytes=25_000) as cache:
            cache.run_stage("s", "fp", lambda f: (f / "data").write_bytes(b"x" * size))

    def keys() -> set[str]:
        return {r.key for r in list_runs(tmp_path)}

    run("a")
    run("b")
    run("a")  # a is now the most recently used
    run("c")  # three runs do not fit: b goes
    assert keys() == {"a", "c"}
    with open(tmp_path / "a" / "lock", "a+") as held:  # another process runs a
        fcntl.flock(held, fcntl.LOCK_EX)
        run("d")  # a is the least recently used, but in use: c goes instead
        assert keys() == {"a", "d"}
    run("big", size=40_000)  # the run just made stays even alone over the limit
    assert keys() == {"big"}


def test_eviction_never_fails_a_run(tmp_path: Path, monkeypatch) -> None:
    """In a cache shared between users: another user's run that cannot be removed is left
    alone (a PermissionError escaped, so a dub whose output was written exited 1); a run
    starting on a key that is being evicted gets a fresh folder (it failed as busy, exit 8),
    whether it arrives while the files are removed or while the evictor holds the lock."""
    import threading

    from dubtool.pipeline import cache as cache_module

    def run(key: str, limit: int = 25_000) -> None:
        with RunCache(tmp_path, key, limit_bytes=limit) as cache:
            cache.run_stage("s", "fp", lambda f: (f / "data").write_bytes(b"x" * 10_000))

    def keys() -> set[str]:
        return {r.key for r in list_runs(tmp_path)}

    theirs = tmp_path / "theirs" / "lock"

    def no_access(path, *args, **kwargs):
        if Path(path) == theirs:
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    run("theirs", limit=0)
    monkeypatch.setattr(cache_module, "open", no_access, raising=False)
    run("mine")
    run("again")  # over the limit: theirs cannot go (mine does), and "again" is not failed
    assert keys() == {"theirs", "again"}
    monkeypatch.undo()

    real_rmtree, real_rename = shutil.rmtree, os.rename
    started = []

    def rmtree(path, *args, **kwargs):  # a run starts on "a" while its files are removed
        if Path(path).name.split(".")[0] == "a" and not started:
            started.append("while removing")
            run("a", limit=0)
        real_rmtree(path, *args, **kwargs)

    for key in ("a", "b", "c"):
        run(key, limit=0)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    run("d", limit=35_000)  # evicts "theirs", "again" and "a"
    monkeypatch.undo()
    assert started and "a" in keys()
    assert (tmp_path / "a" / "s" / "data").stat().st_size == 10_000
    # A run starting on "b" while the evictor holds b's lock waits for it, not "busy".
    errors = []

    def start_b() -> None:
        try:
            run("b", limit=0)
        except CacheError as exc:
            errors.append(exc)

    def rename(src, dst):
        if Path(src) == tmp_path / "b":
            started.append(threading.Thread(target=start_b))
            started[-1].start()
            started[-1].join(0.3)  # it is waiting for the lock
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    run("e", limit=35_000)  # evicts "b" and "c"
    monkeypatch.undo()
    assert isinstance(started[-1], threading.Thread)
    started[-1].join(5)
    assert not errors and "b" in keys()
    assert (tmp_path / "b" / "s" / "data").stat().st_size == 10_000
    assert not list(tmp_path.glob("*.evicted*"))


def test_cache_limit_setting(monkeypatch) -> None:
    monkeypatch.delenv(LIMIT_VARIABLE, raising=False)
    assert cache_limit_bytes() == 10 * 1024**3
    monkeypatch.setenv(LIMIT_VARIABLE, "0")
    assert cache_limit_bytes() == 0  # no limit
    monkeypatch.setenv(LIMIT_VARIABLE, "0.5")
    assert cache_limit_bytes() == 512 * 1024**2
    for bad in ("-1", "ten", "nan"):
        monkeypatch.setenv(LIMIT_VARIABLE, bad)
        with pytest.raises(UsageError, match=f"DUBTOOL_CACHE_LIMIT_GB '{bad}': must be"):
            cache_limit_bytes()


def test_track_writes_the_raw_mesh_and_points_to_disk(tmp_path: Path, monkeypatch) -> None:
    """With a folder the raw mesh goes to disk MESH_BLOCK frames at a time and the smoothed
    points to their file (what memory holds stays small for long videos): the same track as
    in memory, NaN where no face, and saving leaves the files as written."""
    from dubtool.arrays import DiskArray
    from dubtool.pipeline import landmarks as landmarks_stage

    video = probe_video(make_video(tmp_path / "v.mp4", seconds=0.8, size="64x48", audio=False))
    rng = np.random.default_rng(0)
    base = rng.uniform(10, 40, (478, 3)).astype(np.float32)

    class Scripted:
        name = "scripted"

        def __init__(self) -> None:
            self.calls = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def detect_all(self, frame: np.ndarray) -> list[np.ndarray]:
            self.calls += 1
            return [] if self.calls % 5 == 3 else [base + self.calls * 0.1]

    monkeypatch.setattr(landmarks_stage, "MESH_BLOCK", 4)
    in_memory = landmarks_stage.track_faces(video, Scripted())
    on_disk = landmarks_stage.track_faces(video, Scripted(), folder=tmp_path)
    assert isinstance(on_disk.mesh, DiskArray) and on_disk.frames == video.frame_count == 20
    assert isinstance(on_disk.points, DiskArray)
    np.testing.assert_array_equal(on_disk.mesh[:], in_memory.mesh)
    np.testing.assert_array_equal(on_disk.points[:], in_memory.points)
    assert (~on_disk.detected).sum() == 4 and np.isnan(on_disk.mesh[:][~on_disk.detected]).all()
    np.testing.assert_allclose(on_disk.mesh[19], base + 2.0, rtol=1e-6)
    on_disk.save(tmp_path)
    loaded = FaceTrack.load(tmp_path)
    np.testing.assert_array_equal(loaded.mesh[:], in_memory.mesh)
