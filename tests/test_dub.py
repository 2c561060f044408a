"""`dub` end to end on a tiny model built here: outputs, resume, plans, still images."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ffmpeg, make_tone

import dubtool
from dubtool import api
from dubtool.errors import InvalidMedia, UsageError
from dubtool.face.warp import warp_face
from dubtool.media.frames import read_frames
from dubtool.media.probe import ffprobe, probe_video
from dubtool.nets.io import load_model
from dubtool.pipeline.renderers import DiffusionSettings
from dubtool.pipeline.renderers.diffusion import LowerFaceGenerator


def frames_of(path: Path) -> np.ndarray:
    return np.stack([f.copy() for f in read_frames(probe_video(path))])


def stream_durations(path: Path) -> dict[str, float]:
    """ffprobe's duration of the file's video and audio streams, in seconds."""
    streams = ffprobe(path)["streams"]
    return {s["codec_type"]: float(s["duration"]) for s in streams}


def test_package_exports_the_library_api_without_loading_torch() -> None:
    for name in ("dub", "batch", "batch_items", "prepare", "train", "evaluate", "bench",
                 "landmarks", "cache_list", "cache_clean", "DubResult", "BatchItem"):
        assert getattr(dubtool, name) is getattr(api, name), name
        assert name in dubtool.__all__ and name in dir(dubtool)
    with pytest.raises(AttributeError, match="no attribute 'dubb'"):
        dubtool.dubb  # noqa: B018
    # A fresh interpreter: importing the package loads neither torch nor diffusers.
    code = ("import sys, dubtool; heavy = [m for m in ('torch', 'diffusers', 'dubtool.api') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "[]"


def test_the_native_dub_loads_the_completion_alone(face_clip: Path, tiny_model: Path,
                                                   tmp_path: Path) -> None:
    """diffusers takes seconds to import: the native renderer needs only the completion."""
    speech = make_tone(tmp_path / "speech.wav", seconds=0.4)
    code = ("import sys, dubtool; dubtool.dub(sys.argv[1], sys.argv[2], sys.argv[3], "
            "model=sys.argv[4], cache_dir=sys.argv[5], device='cpu'); "
            "print([m for m in ('diffusers', 'dubtool.nets.autoencoder') if m in sys.modules])")
    run = subprocess.run([sys.executable, "-c", code, str(face_clip), str(speech),
                          str(tmp_path / "out.mp4"), str(tiny_model), str(tmp_path / "cache")],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip().splitlines()[-1] == "[]"
    model = load_model(tiny_model, completion_only=True)
    assert model.autoencoder is None and model.dubber is None
    full = load_model(tiny_model)
    for name, weight in model.completion.state_dict().items():
        assert torch.equal(weight, full.dubber.completion.state_dict()[name])


@pytest.mark.parametrize(("renderer", "stages"), [
    ("native", ["extract", "landmarks", "adapt", "complete", "sources", "source-crops",
                "blend"]),
    ("diffusion", ["extract", "landmarks", "adapt", "complete", "crops", "diffuse", "blend"])])
def test_dub_end_to_end(face_clip: Path, tiny_model: Path, tmp_path: Path, renderer: str,
                        stages: list[str]) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=1.5)
    result = dubtool.dub(face_clip, speech, tmp_path / "out.mp4", model=tiny_model,
                         cache_dir=tmp_path / "cache", device="cpu", renderer=renderer)
    info = probe_video(result.output)
    assert (info.width, info.height, info.fps) == (256, 256, 25)
    assert abs(info.frame_count - 1.5 * 25) <= 1
    assert info.has_audio and abs(info.audio[0].duration - 1.5) < 0.05
    assert result.dubbed_frames == result.frames == info.frame_count
    assert [r.stage for r in result.stages] == stages
    # The upper face is the original's; the lower face is new.
    original = frames_of(face_clip)[:info.frame_count].astype(int)
    dubbed = frames_of(result.output).astype(int)
    assert np.abs(dubbed[:, :60] - original[:, :60]).mean() < 4
    assert np.abs(dubbed[:, 150:200, 90:170] - original[:, 150:200, 90:170]).mean() > 5


@pytest.mark.parametrize("batch_size", [1, 3])
def test_interrupted_diffuse_resumes_to_the_same_video(face_clip: Path, tiny_model: Path,
                                                       tmp_path: Path, monkeypatch,
                                                       batch_size: int) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=1.0)
    whole = api.dub(face_clip, speech, tmp_path / "whole.mp4", model=tiny_model,
                    cache_dir=tmp_path / "cache_a", device="cpu", batch_size=batch_size,
                    renderer="diffusion")
    assert probe_video(whole.output).frame_count == 25

    real_generate = LowerFaceGenerator.generate

    def dies_at_chunk_4(self, ks, previous):
        if 4 in ks:
            raise KeyboardInterrupt
        return real_generate(self, ks, previous)

    monkeypatch.setattr(LowerFaceGenerator, "generate", dies_at_chunk_4)
    out = tmp_path / "resumed.mp4"
    with pytest.raises(KeyboardInterrupt):
        api.dub(face_clip, speech, out, model=tiny_model, cache_dir=tmp_path / "cache_b",
                device="cpu", batch_size=batch_size, renderer="diffusion")
    assert not out.exists() and not list(tmp_path.glob(".resumed*"))
    monkeypatch.setattr(LowerFaceGenerator, "generate", real_generate)
    resumed = api.dub(face_clip, speech, out, model=tiny_model, cache_dir=tmp_path / "cache_b",
                      device="cpu", batch_size=batch_size, renderer="diffusion")
    statuses = {r.stage: r.status for r in resumed.stages}
    # One stream: chunks 0-3 were done. Three streams of 3 chunks (0-2, 3-5, 6-8): the batch
    # of step 0 (chunks 0, 3, 6) was done; the next one holds chunk 4.
    assert statuses["diffuse"] == f"resumed at chunk {4 if batch_size == 1 else 3}"
    assert statuses["extract"] == "cached"
    assert np.array_equal(frames_of(whole.output), frames_of(out))


def test_pingpong_and_still_image(face_clip: Path, tiny_model: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.mp4"
    ffmpeg("-i", str(face_clip), "-t", "0.6", "-c:v", "libx264", "-an", str(short))
    speech = make_tone(tmp_path / "speech.wav", seconds=1.6)
    result = api.dub(short, speech, tmp_path / "pingpong.mp4", model=tiny_model,
                     cache_dir=tmp_path / "cache", device="cpu")
    assert probe_video(result.output).frame_count == 40
    cut = api.dub(short, speech, tmp_path / "cut.mp4", model=tiny_model, loop="cut",
                  cache_dir=tmp_path / "cache", device="cpu")
    assert probe_video(cut.output).frame_count == 15
    # The speech is cut to the video: both streams last 0.6 s, within a frame.
    durations = stream_durations(cut.output)
    assert abs(durations["video"] - 0.6) < 0.04 and abs(durations["audio"] - 0.6) < 0.04
    assert abs(durations["video"] - durations["audio"]) < 0.04

    still = tmp_path / "face.png"
    ffmpeg("-i", str(face_clip), "-frames:v", "1", str(still))
    image = api.dub(still, speech, tmp_path / "still.mp4", model=tiny_model,
                    cache_dir=tmp_path / "cache", device="cpu")
    info = probe_video(image.output)
    assert info.frame_count == 40 and (info.width, info.height) == (256, 256)
    assert image.dubbed_frames == 40


def test_model_without_dubber_is_refused(tiny_model: Path, face_clip: Path,
                                         tmp_path: Path) -> None:
    from dubtool.errors import ModelError

    folder = tmp_path / "ae_only"
    folder.mkdir()
    for name in ("config.json", "autoencoder.safetensors"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    speech = make_tone(tmp_path / "speech.wav", seconds=0.5)
    with pytest.raises(ModelError, match="no trained dubbing model"):
        api.dub(face_clip, speech, tmp_path / "o.mp4", model=folder, cache_dir=tmp_path / "c")
    assert not (tmp_path / "o.mp4").exists()


def test_batch_goes_on_past_a_corrupt_file(face_clip: Path, tiny_model: Path,
                                           tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dubtool.cli import app

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("anna", "bert"):
        ffmpeg("-i", str(face_clip), "-t", "0.4", "-c:v", "libx264", "-an",
               str(jobs / f"{name}.mp4"))
        make_tone(jobs / f"{name}.wav", seconds=0.4)
    (jobs / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    make_tone(jobs / "broken.wav", seconds=0.4)
    make_tone(jobs / "lonely.wav", seconds=0.4)  # no video of that name: not a job
    args = ["batch", str(jobs), "-o", str(tmp_path / "out"), "--model", str(tiny_model),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--jobs", "2"])  # two worker processes
    assert result.exit_code == 9, result.output
    assert "2 done, 0 skipped, 1 failed" in result.stdout
    assert "broken.mp4" in result.stdout and "not readable as media" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["anna.dubbed.mp4",
                                                                  "bert.dubbed.mp4"]
    again = CliRunner().invoke(app, args)
    assert "0 done, 2 skipped, 1 failed" in again.stdout


def test_batch_reports_any_failure_and_goes_on(face_clip: Path, tiny_model: Path,
                                               tmp_path: Path, monkeypatch) -> None:
    """Not only DubtoolErrors: an OS error making an output folder (in a worker process of
    --jobs 2) and a RuntimeError inside the model are each one failed row; --debug shows
    their tracebacks; the other jobs are done."""
    from typer.testing import CliRunner

    from dubtool import cli

    video = tmp_path / "anna.mp4"
    ffmpeg("-i", str(face_clip), "-t", "0.4", "-c:v", "libx264", "-an", str(video))
    make_tone(tmp_path / "anna.wav", seconds=0.4)
    (tmp_path / "a_file").write_text("not a folder")
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("anna.mp4,anna.wav,out/anna.mp4\n"
                        "anna.mp4,anna.wav,a_file/anna.mp4\n")  # its folder cannot be made
    args = ["batch", "--manifest", str(manifest), "--model", str(tiny_model),
            "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    result = CliRunner().invoke(cli.app, [*args, "--jobs", "2"])
    assert result.exit_code == 9, result.output
    assert "1 done, 0 skipped, 1 failed" in result.stdout
    assert "FileExistsError" in result.stdout and (tmp_path / "out" / "anna.mp4").is_file()

    from dubtool.pipeline.dubber import Dubber

    real_dub = Dubber.dub

    def out_of_memory_for_bert(self, video, speech, output, **options):
        if "bert" in str(output):
            raise RuntimeError("CUDA out of memory (a test)")
        return real_dub(self, video, speech, output, **options)

    monkeypatch.setattr(Dubber, "dub", out_of_memory_for_bert)
    monkeypatch.setitem(cli._state, "debug", False)  # restored after --debug sets it
    monkeypatch.setenv("DUBTOOL_NATIVE_LOGS", "0")
    manifest.write_text("anna.mp4,anna.wav,out/bert.mp4\nanna.mp4,anna.wav,out/carl.mp4\n")
    result = CliRunner().invoke(cli.app, ["--debug", *args])
    assert result.exit_code == 9, result.output
    assert "1 done, 0 skipped, 1 failed" in result.stdout
    assert "RuntimeError: CUDA out of memory" in " ".join(result.stdout.split())
    assert "Traceback" in result.stderr and "out_of_memory_for_bert" in result.stderr
    assert (tmp_path / "out" / "carl.mp4").is_file()


def test_batch_waits_for_another_run_holding_the_same_inputs(face_clip: Path, tiny_model: Path,
                                                             tmp_path: Path,
                                                             monkeypatch) -> None:
    """A batch job whose cache entry is locked by another run waits for it, then goes on."""
    import threading
    import time

    from dubtool.pipeline import cache as cache_module
    from dubtool.pipeline.run import Inputs

    class CountingClock:  # the cache's time module, counting its waits for the lock
        waits = 0

        def sleep(self, seconds: float) -> None:
            CountingClock.waits += 1
            time.sleep(seconds)

        def __getattr__(self, name: str):
            return getattr(time, name)

    monkeypatch.setattr(cache_module, "time", CountingClock())
    video = tmp_path / "anna.mp4"
    ffmpeg("-i", str(face_clip), "-t", "0.4", "-c:v", "libx264", "-an", str(video))
    speech = make_tone(tmp_path / "anna.wav", seconds=0.4)
    item = api.BatchItem(video, speech, tmp_path / "out" / "anna.mp4")
    outcomes = []
    with Inputs.of(video, speech).open_cache(tmp_path / "cache"):  # another run holds it
        worker = threading.Thread(target=lambda: outcomes.extend(api.batch(
            [item], model=tiny_model, device="cpu", cache_dir=tmp_path / "cache")))
        worker.start()
        deadline = time.monotonic() + 60
        while CountingClock.waits < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert CountingClock.waits >= 3 and worker.is_alive() and not outcomes
    worker.join(timeout=120)
    assert [o.status for o in outcomes] == ["done"] and item.output.is_file()


def test_cut_mode_carries_the_start_of_the_speech(espeak: str, face_clip: Path,
                                                  tiny_model: Path, tmp_path: Path) -> None:
    """Real (synthetic) speech, unlike a tone, shows which part of it was kept."""
    from dubtool.media.audio import SAMPLE_RATE, load_speech

    speech = tmp_path / "speech.wav"
    subprocess.run([espeak, "-w", str(speech), "Hello there. This sentence is longer than "
                    "the video it is dubbed onto."], check=True)
    short = tmp_path / "short.mp4"
    ffmpeg("-i", str(face_clip), "-t", "0.6", "-c:v", "libx264", "-an", str(short))
    result = api.dub(short, speech, tmp_path / "cut.mp4", model=tiny_model, loop="cut",
                     cache_dir=tmp_path / "cache", device="cpu")
    given, carried = load_speech(speech), load_speech(result.output)
    assert len(given) > 2 * SAMPLE_RATE and abs(len(carried) / SAMPLE_RATE - 0.6) < 0.04

    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        n = min(len(a), len(b))
        return float(np.dot(a[:n], b[:n]) / (np.linalg.norm(a[:n]) * np.linalg.norm(b[:n])))

    assert similarity(carried, given) > 0.9  # its first 0.6 s ...
    assert abs(similarity(carried, given[len(carried):])) < 0.3  # ... not another part


def test_batch_manifest_and_shards(tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("video,speech,output\na.mp4,a.wav,x/a_out.mp4\nb.mp4,s.wav,\n"
                        "c.mp4,s.wav,\n")
    items = api.batch_items(manifest=manifest, out_dir=tmp_path / "o")
    assert [i.video.name for i in items] == ["a.mp4", "b.mp4", "c.mp4"]
    assert items[0].output == tmp_path / "x" / "a_out.mp4"
    assert items[1].output == tmp_path / "o" / "b.dubbed.mp4"
    assert [i.video.name for i in api.batch_items(manifest=manifest, shard=(2, 2))] == ["b.mp4"]


def test_batch_manifest_with_a_byte_order_mark_and_malformed_rows(tmp_path: Path) -> None:
    """Issue 26.4: a manifest starting with a UTF-8 BOM and holding a one-column row gave
    `internal error: IndexError`. The BOM is not part of the header; a malformed row is a
    one-line error naming the manifest and the row (exit 4), before any work."""
    from typer.testing import CliRunner

    from dubtool.cli import app

    manifest = tmp_path / "jobs.csv"
    manifest.write_bytes("video,speech,output\r\na.mp4,a.wav,\r\n".encode("utf-8-sig"))
    items = api.batch_items(manifest=manifest, out_dir=tmp_path / "o")
    assert [(i.video.name, i.speech.name) for i in items] == [("a.mp4", "a.wav")]
    for rows, row in [("video,speech\na.mp4,a.wav\nb.mp4\n", 3),   # one column
                      ("a.mp4,a.wav,o.mp4,extra\n", 1),              # four
                      ("a.mp4,a.wav\n\n# a comment\n,b.wav\n", 4)]:  # no video
        manifest.write_bytes(rows.encode("utf-8-sig"))
        result = CliRunner().invoke(app, ["batch", "--manifest", str(manifest), "--model",
                                          str(tmp_path / "no-model")])
        assert result.exit_code == 4, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"{manifest}: row {row}: expected video,speech[,output]" in lines[0]
    manifest.write_bytes(b"a.mp4,\xff\xfe.wav\n")
    with pytest.raises(InvalidMedia, match="not UTF-8 text"):
        api.batch_items(manifest=manifest)


def test_batch_videos_of_one_name_get_their_own_outputs(tmp_path: Path) -> None:
    """a.mp4 and a.mov in one folder wrote one output (the second skipped or overwriting
    it); manifest rows that would write one output are refused before any work."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name in ("a.mp4", "a.mov", "b.mp4", "a.wav", "b.wav"):
        (jobs / name).write_bytes(b"media")
    items = api.batch_items(jobs, out_dir=tmp_path / "o")
    assert [(i.video.name, i.speech.name, i.output.name) for i in items] == [
        ("a.mov", "a.wav", "a.mov.dubbed.mp4"), ("a.mp4", "a.wav", "a.mp4.dubbed.mp4"),
        ("b.mp4", "b.wav", "b.dubbed.mp4")]
    manifest = tmp_path / "jobs.csv"
    manifest.write_text("jobs/b.mp4,jobs/a.wav,\njobs/b.mp4,jobs/b.wav,\n")
    for shard in ((1, 2), (2, 2)):  # every machine of a split batch refuses alike
        with pytest.raises(UsageError, match=r"b.mp4 \(a.wav\) and .*b.mp4 \(b.wav\) "
                           r"would both be written to .*b.dubbed.mp4") as info:
            api.batch_items(manifest=manifest, out_dir=tmp_path / "o", shard=shard)
        assert info.value.exit_code == 2 and str(manifest) in str(info.value)


def test_batch_force_redoes_the_outputs_from_the_cached_stages(face_clip: Path, tiny_model: Path,
                                                               tmp_path: Path) -> None:
    """--force redoes an output that exists, as its help says, and keeps every stage cached
    for it (it recomputed them all)."""
    import json

    video = tmp_path / "anna.mp4"
    ffmpeg("-i", str(face_clip), "-t", "0.4", "-c:v", "libx264", "-an", str(video))
    item = api.BatchItem(video, make_tone(tmp_path / "anna.wav", seconds=0.4),
                         tmp_path / "out" / "anna.mp4")
    cache = tmp_path / "cache"

    def finished() -> dict[str, float]:
        (manifest,) = cache.glob("*/manifest.json")
        return {k: v["finished"] for k, v in json.loads(manifest.read_text())["stages"].items()}

    options = {"model": tiny_model, "device": "cpu", "cache_dir": cache, "adapt": False}
    assert [o.status for o in api.batch([item], **options)] == ["done"]
    first, made = finished(), item.output.stat().st_mtime_ns
    assert [o.status for o in api.batch([item], **options)] == ["skipped"]
    assert [o.status for o in api.batch([item], force=True, **options)] == ["done"]
    assert item.output.stat().st_mtime_ns > made and finished() == first


def test_eval_runs_the_reconstruction_protocol(face_clip: Path, tiny_model: Path,
                                               tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    result = api.evaluate([face_clip], model=tiny_model, work_dir=tmp_path / "eval",
                          report=report, seconds=1.2, cache_dir=tmp_path / "cache",
                          device="cpu", reference_gap=0.6)
    (clip,) = result.clips
    # References come from the whole 2 s clip, none within 0.6 s (15 frames) of its frame:
    # a reference past 1.8 s leaves every frame dubbed to be scored.
    assert clip.scored_frames == clip.frames in (30, 31)  # the cut speech, AAC-padded
    assert clip.reference_frame >= 44
    original, static = clip.metrics["original"], clip.metrics["static"]
    assert original["lmd"] == 0.0 and original["psnr"] == float("inf")
    assert original["stability"] == 1.0
    assert static["lmd"] > 0 and static["psnr"] < 60
    # The real mouth follows itself; the static one barely moves (FaceMesh jitter only).
    assert original["opening_correlation"] == pytest.approx(1.0)
    assert original["sharpness"] == pytest.approx(1.0)
    assert original["psnr_native"] == float("inf")
    assert original["articulation"] == pytest.approx(1.0)
    assert static["articulation"] < 0.5
    # The dub is measured like the others, and its landmarks on their own.
    model = clip.metrics["model"]
    assert 0 < model["lmd"] < 1 and 5 < model["psnr"] < 60
    assert model["lmd_lips"] > 0 and model["lmd_jaw"] > 0
    assert 0 < model["sharpness"] < 2 and 5 < model["psnr_native"] < 60
    for name in ("opening_correlation", "completion_opening_correlation"):
        assert -1 <= model[name] <= 1
    assert model["articulation"] >= 0 and model["completion_articulation"] >= 0
    assert math.isnan(static["completion_opening_correlation"])
    text = report.read_text()
    assert "| model |" in text and "opening_correlation" in text
    assert (tmp_path / "eval" / "strips" / "face_2s.png").is_file()
    assert (tmp_path / "eval" / "plots" / "face_2s.opening.png").is_file()
    if importlib.util.find_spec("dlib") is not None:  # the optional identity extra
        assert original["identity"] == 0.0 and "identity" in result.summary["static"]
        assert "| stability | identity |" in report.read_text()
    else:
        assert "identity" not in result.summary["model"]


def test_bench_reports_cold_and_warm_runs(face_clip: Path, tiny_model: Path,
                                          tmp_path: Path) -> None:
    import json

    report = tmp_path / "bench.json"
    result = api.bench(face_clip, model=tiny_model, device="cpu", repeat=1, report=report)
    assert [r.kind for r in result.runs] == ["cold", "warm"]
    assert result.frames == 50 and result.video_seconds == 2.0
    cold, warm = result.runs
    assert set(cold.stage_seconds) == {"extract", "landmarks", "adapt", "complete", "sources",
                                       "source-crops", "blend"}
    assert sum(cold.stage_seconds.values()) <= cold.wall_seconds
    assert all(v >= 0 for v in cold.stage_ms_per_frame.values())
    # How busy each stage kept the CPU: some core time in every stage that ran, and a share
    # per core of this machine.
    assert all(cold.stage_cores[s] > 0 for s in ("landmarks", "complete", "blend"))
    assert all(len(busy) == os.cpu_count() and all(0 <= b <= 1 for b in busy)
               for busy in cold.stage_core_busy.values())
    assert cold.floor_ratio == pytest.approx(cold.wall_seconds / result.ffmpeg_floor_seconds)
    assert set(cold.stage_status.values()) == {"ran"}
    assert {s for s, status in warm.stage_status.items() if status == "ran"} == {"blend"}
    assert result.ffmpeg_floor_seconds > 0 and result.peak_rss_mb > 50
    # A fresh process does the cold run's work and starts Python, torch and the model too.
    assert result.process_seconds > cold.wall_seconds
    data = json.loads(report.read_text())
    assert data["runs"][1]["kind"] == "warm" and data["settings"]["device"] == "cpu"
    assert data["process_real_time_factor"] == pytest.approx(result.process_seconds / 2.0)
    assert data["process_floor_ratio"] == pytest.approx(result.process_seconds
                                                        / result.ffmpeg_floor_seconds)


def test_bench_samples_the_whole_schedule_when_asked(face_clip: Path, tiny_model: Path) -> None:
    """What gpu-check measures on a GPU: the diffusion renderer from noise (strength 1), its
    steps and strength passed to the fresh process too."""
    result = api.bench(face_clip, model=tiny_model, device="cpu", repeat=0,
                       renderer="diffusion", steps=2, strength=1.0)
    (cold,) = result.runs
    assert {"crops", "diffuse"} <= set(cold.stage_seconds)
    assert (result.settings["steps"], result.settings["strength"]) == (2, 1.0)
    assert result.process_seconds > 0


def test_sampling_defaults_come_from_the_model_config(face_clip: Path, tiny_model: Path,
                                                      tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from dubtool.pipeline import dubber as dubber_module
    from dubtool.pipeline.dubber import Dubber

    model = load_model(tiny_model)
    diffusion = dataclasses.replace(model.config.diffusion, eta=0.7, strength=0.4)
    model.config = model.config.replace(diffusion=diffusion)
    seen = []

    def stop(cache, inputs, loaded, digest, renderer, **options):
        seen.append(renderer.settings)
        raise KeyboardInterrupt

    monkeypatch.setattr(dubber_module, "run_dub_stages", stop)
    speech = make_tone(tmp_path / "speech.wav", seconds=0.2)
    for options in ({}, {"eta": 0.0, "strength": 1.0, "steps": 2}):
        dubber = Dubber(model, device="cpu", renderer="diffusion", **options)
        with pytest.raises(KeyboardInterrupt):
            dubber.dub(face_clip, speech, tmp_path / "o.mp4", cache_dir=tmp_path / "cache")
    assert [(s.steps, s.eta, s.strength) for s in seen] == [(4, 0.7, 0.4), (2, 0.0, 1.0)]


def test_inference_settings_come_from_the_model_and_key_their_stages(
        face_clip: Path, tiny_model: Path, tmp_path: Path) -> None:
    """The stages read their settings from the model's config (its ``inference`` section),
    and each group is part of its stage's fingerprint: a changed setting recomputes its stage
    and those after it and keeps those before it, with the model's weights unchanged."""
    import dataclasses

    from conftest import model_with_settings

    from dubtool.pipeline.dubber import Dubber

    cache = tmp_path / "cache"
    model = load_model(tiny_model, completion_only=True)

    def dub(name: str, **changes: dict) -> tuple[dict[str, str], np.ndarray]:
        """Dubbed with these settings changed from the last dub's."""
        now = model.config.inference
        groups = {group: dataclasses.replace(getattr(now, group), **fields)
                  for group, fields in changes.items()}
        model.config = model.config.replace(inference=dataclasses.replace(now, **groups))
        result = Dubber(model, device="cpu").dub(face_clip, face_clip, tmp_path / f"{name}.mp4",
                                                 cache_dir=cache)
        return {r.stage: r.status for r in result.stages}, np.array(result.landmarks)

    model_stages = ("adapt", "complete", "sources", "source-crops")
    ran, base = dub("base")
    assert all(ran[stage] == "ran" for stage in model_stages)
    ran, gain = dub("gain", complete={"articulation_gain": 3.0})
    assert [ran[s] for s in model_stages] == ["cached", "ran", "ran", "ran"]
    assert not np.allclose(gain, base)
    ran, again = dub("again")  # the same settings: cached
    assert all(ran[stage] == "cached" for stage in model_stages)
    np.testing.assert_array_equal(again, gain)
    ran, _ = dub("switch", sources={"switch_cost": 0.5})
    assert [ran[s] for s in model_stages] == ["cached", "cached", "ran", "ran"]
    ran, _ = dub("sharp", native={"max_sharpening": 0.0})
    assert [ran[s] for s in model_stages] == ["cached", "cached", "cached", "ran"]
    # From a model folder: its config.json's section is what the stages read.
    folder = model_with_settings(tiny_model, tmp_path / "gain-model",
                                 complete={"articulation_gain": 3.0})
    result = dubtool.dub(face_clip, face_clip, tmp_path / "folder.mp4", model=folder,
                         cache_dir=cache)
    assert {r.stage: r.status for r in result.stages}["complete"] == "ran"
    np.testing.assert_allclose(result.landmarks, gain, atol=1e-6)


def test_partial_strength_starts_from_the_reference_warped_to_the_target(
        tiny_model: Path) -> None:
    """At a strength that leaves one almost noiseless step, the generated lower half is the
    reference face bent onto each frame's target landmarks, autoencoder detail included."""
    model = load_model(tiny_model)
    size = model.config.crop_size
    rng = np.random.default_rng(0)
    face = cv2.resize(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8), (size, size),
                      interpolation=cv2.INTER_CUBIC)
    frames = 2 * model.config.completion.frames
    reference_points = 0.3 + 0.4 * rng.random((131, 2))
    target = np.stack([reference_points + np.array([0.0, 0.1 * i / frames])
                       for i in range(frames)])
    generator = LowerFaceGenerator(model, np.stack([face] * frames), np.arange(frames), target,
                                   np.ones(frames, bool), 0, reference_points,
                                   DiffusionSettings(steps=10, strength=0.001),
                                   torch.device("cpu"))
    generated = np.concatenate([c["crops"] for c in generator.generate([0, 1], [None, None])])
    warped = np.stack([warp_face(face, reference_points, t) for t in target])
    lower = slice(size // 2, size)
    assert np.abs(generated[:, lower].astype(int) - warped[:, lower]).mean() < 6
    # The warp moved the face down the crop: the output follows it.
    assert np.abs(generated[-1, lower].astype(int) - generated[0, lower]).mean() > 10


def test_a_chunk_generated_with_eta_does_not_depend_on_its_batch(tiny_model: Path) -> None:
    model = load_model(tiny_model)
    size, length = model.config.crop_size, model.config.completion.frames
    rng = np.random.default_rng(0)
    frames = 2 * length
    crops = rng.integers(0, 256, (frames, size, size, 3)).astype(np.uint8)
    points = 0.3 + 0.4 * rng.random((frames, 131, 2))
    generator = LowerFaceGenerator(model, crops, np.arange(frames), points,
                                   np.ones(frames, bool), 0, points[0],
                                   DiffusionSettings(steps=4, eta=1.0, batch_size=2),
                                   torch.device("cpu"))
    together = generator.generate([0, 1], [None, None])
    alone = generator.generate([1], [None])
    assert np.abs(together[1]["latents"] - alone[0]["latents"]).max() < 1e-4


@pytest.mark.parametrize("renderer", ["native", "diffusion"])
def test_a_loaded_model_given_to_the_dubber_is_moved_to_the_resolved_device(
        face_clip: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        renderer: str) -> None:
    """device="auto" may resolve to a GPU while the caller's model sits on the CPU: the
    Dubber moves it. "meta" plays the GPU here (a device the model is not on), and the
    stages, which would need real weights, are stopped where they receive the model."""
    from dubtool.pipeline import dubber as dubber_module
    from dubtool.pipeline.dubber import Dubber

    model = load_model(tiny_model, completion_only=renderer == "native")
    fake_gpu = torch.device("meta")
    monkeypatch.setattr(dubber_module, "resolve_device", lambda device="auto": fake_gpu)
    seen = {}

    def stages(cache, inputs, loaded, digest, render, **options):
        seen["loaded"], seen["device"] = loaded, options["device"]
        raise KeyboardInterrupt  # stop before any network runs

    monkeypatch.setattr(dubber_module, "run_dub_stages", stages)
    speech = make_tone(tmp_path / "speech.wav", seconds=0.4)
    dubber = Dubber(model, renderer=renderer)
    with pytest.raises(KeyboardInterrupt):
        dubber.dub(face_clip, speech, tmp_path / "out.mp4", cache_dir=tmp_path / "cache")
    assert seen["loaded"] is model and seen["device"] == fake_gpu
    parts = [p for p in (model.autoencoder, model.dubber, model.completion) if p is not None]
    assert len(parts) == (1 if renderer == "native" else 3)
    assert {p.device for part in parts for p in part.parameters()} == {fake_gpu}
