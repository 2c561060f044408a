"""The command line: exit codes, one-line errors, outputs, through Typer and as a real process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tone, make_video
from typer.testing import CliRunner

from dubtool import api
from dubtool.cli import app
from dubtool.devices import resolve_device
from dubtool.errors import UsageError
from dubtool.media.probe import probe_video

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("content, code, words", [
    (None, 3, "no such file"),
    (b"", 4, "file is empty"),
    (b"plain text, not a video\n" * 20, 4, "not readable as media"),
])
def test_bad_video_inputs(tmp_path: Path, cache_dir: Path, content: bytes | None, code: int,
                          words: str) -> None:
    video = tmp_path / "clip with spaces.mp4"
    if content is not None:
        video.write_bytes(content)
    result = invoke("landmarks", video, "--cache-dir", cache_dir)
    assert result.exit_code == code
    line = one_line_error(result)
    assert str(video) in line and words in line


def test_audio_file_given_as_video(tmp_path: Path, cache_dir: Path) -> None:
    speech = make_tone(tmp_path / "speech.wav")
    result = invoke("landmarks", speech, "--cache-dir", cache_dir)
    assert result.exit_code == 4
    assert "has no video stream" in one_line_error(result)


def test_output_problems(face_clip: Path, tmp_path: Path, cache_dir: Path) -> None:
    result = invoke("landmarks", face_clip, "-o", tmp_path / "missing" / "out.mp4",
                    "--cache-dir", cache_dir)
    assert result.exit_code == 5 and "output folder does not exist" in one_line_error(result)
    result = invoke("landmarks", face_clip, "-o", face_clip, "--cache-dir", cache_dir)
    assert result.exit_code == 5 and "same as an input" in one_line_error(result)
    assert not (cache_dir.exists() and any(cache_dir.iterdir()))  # refused before any work


def test_unknown_detector_is_a_usage_error(face_clip: Path) -> None:
    result = invoke("landmarks", face_clip, "--detector", "magic")
    assert result.exit_code == 2


def test_face_alignment_without_weights_exits_7(face_clip: Path, cache_dir: Path) -> None:
    result = invoke("landmarks", face_clip, "--detector", "face-alignment", "--cache-dir",
                    cache_dir)
    assert result.exit_code == 7 and "face-alignment" in one_line_error(result)


def test_landmarks_writes_debug_video_and_json(face_clip: Path, tmp_path: Path,
                                               cache_dir: Path) -> None:
    out, points = tmp_path / "debug.mp4", tmp_path / "points.json"
    result = invoke("landmarks", face_clip, "-o", out, "--json", points, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    assert "faces found" in result.stdout and "50" in result.stdout
    info = probe_video(out)
    assert (info.width, info.height, info.frame_count) == (256, 256, 50)
    assert info.has_audio  # the original audio is kept
    data = json.loads(points.read_text())
    assert data["frame_count"] == 50 and len(data["mediapipe_indices"]) == 131
    frame = data["frames"][10]
    assert frame["face"] and len(frame["points"]) == 131 and len(frame["box"]) == 3
    # Second run: everything from the cache.
    again = invoke("landmarks", face_clip, "--cache-dir", cache_dir)
    assert "extract cached, landmarks cached" in again.stdout


def test_cache_list_and_clean(face_clip: Path, cache_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("DUBTOOL_CACHE_LIMIT_GB", raising=False)
    assert "no cached runs" in invoke("cache", "list", "--cache-dir", cache_dir).stdout
    assert invoke("landmarks", face_clip, "--cache-dir", cache_dir).exit_code == 0
    listing = invoke("cache", "list", "--cache-dir", cache_dir)
    assert "face_2s.mp4" in listing.stdout and "1 runs" in listing.stdout
    assert "in all; limit 10.0 GB ($DUBTOOL_CACHE_LIMIT_GB)" in " ".join(listing.stdout.split())
    cleaned = invoke("cache", "clean", "--cache-dir", cache_dir)
    assert cleaned.exit_code == 0 and "removed 1 runs" in cleaned.stdout
    assert list(cache_dir.iterdir()) == []


def test_real_process_output_is_clean(face_clip: Path, tmp_path: Path, cache_dir: Path) -> None:
    # A leading dash and unicode in the name, MediaPipe's native logs kept off the terminal.
    video = tmp_path / "-caf\u00e9 'clip'.mp4"
    video.write_bytes(face_clip.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "dubtool", "landmarks", "--cache-dir",
                           str(cache_dir), "--", str(video)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "faces found" in proc.stdout


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dubtool", "--debug", "landmarks",
                           str(tmp_path / "missing.mp4")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputNotFound" in proc.stderr


HEAVY = {"numpy", "torch", "diffusers", "cv2", "scipy", "librosa", "mediapipe"}


@pytest.mark.parametrize("args", [[], ["--help"], ["dub", "--help"], ["train", "--help"],
                                  ["cache", "list"]])
def test_the_command_line_answers_without_loading_the_heavy_libraries(args: list[str],
                                                                      tmp_path: Path) -> None:
    # Importing torch and diffusers alone takes seconds, numpy a tenth of one: only the
    # commands that compute may load them, not the help or the cache listing.
    code = (f"import sys\nfrom dubtool.cli import app\nsys.argv = ['dubtool', *{args!r}]\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(set(sys.modules) & {HEAVY!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "DUBTOOL_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_the_library_api_is_importable_from_the_package() -> None:
    import dubtool

    assert dubtool.dub is api.dub and dubtool.landmarks is api.landmarks


# -- every numeric option is range-checked before any work: exit 2 naming option and range ----

@pytest.mark.parametrize("command, option, value, valid", [
    ("dub", "--steps", "-3", ">= 1"),
    ("dub", "--steps", "0", ">= 1"),              # was: silently the model's default
    ("dub", "--strength", "2", "> 0 and <= 1"),
    ("dub", "--strength", "0", "> 0 and <= 1"),
    ("dub", "--batch-size", "0", ">= 1"),
    ("dub", "--seed", "-1", ">= 0 and <= 4294967295"),
    ("dub", "--reference-frame", "-1", ">= 0"),
    ("dub", "--reference-frame", "50", ">= 0 and <= 49"),  # the clip has 50 frames
    ("dub", "--device", "tpu", "auto, cpu, cuda or cuda:N"),
    ("dub", "--renderer", "magic", "native, diffusion"),
    ("dub", "--sources", "0", ">= 1"),
    ("batch", "--jobs", "0", ">= 1"),
    ("batch", "--sources", "0", ">= 1"),
    ("batch", "--steps", "0", ">= 1"),
    ("eval", "--seconds", "0", "> 0"),
    ("eval", "--strength", "1.5", "> 0 and <= 1"),
    ("eval", "--reference-gap", "-1", ">= 0"),
    ("bench", "--renderer", "magic", "native, diffusion"),
    ("bench", "--repeat", "-1", ">= 0"),
    ("bench", "--batch-size", "0", ">= 1"),
    ("train", "--steps", "0", ">= 1"),
    ("train", "--epoch-steps", "0", ">= 1"),
    ("train", "--checkpoint-every", "0", ">= 1"),
    ("train", "--decay-steps", "-1", ">= 0"),
    ("train", "--refine", "2", ">= 0 and <= 1"),
    ("prepare", "--crop-size", "4", ">= 16"),
    ("prepare", "--min-face", "1.5", ">= 0 and <= 1"),
    ("prepare", "--validation", "-0.1", ">= 0 and <= 1"),
    ("cache clean", "--older-than", "-1", ">= 0"),
])
def test_numeric_options_out_of_range_exit_2_before_any_work(
        command: str, option: str, value: str, valid: str, face_clip: Path, tmp_path: Path,
        cache_dir: Path) -> None:
    (tmp_path / "videos").mkdir()
    args = {"dub": [face_clip, face_clip, "-o", tmp_path / "out.mp4"],
            "batch": [face_clip.parent, "--speech", face_clip, "-o", tmp_path / "out"],
            "eval": [face_clip, "--work-dir", tmp_path / "eval"],
            "bench": [face_clip],
            "train": ["autoencoder", "--data", tmp_path, "--out", tmp_path / "run"],
            "prepare": [tmp_path / "videos", "-o", tmp_path / "data"],
            "cache clean": []}[command]
    if command not in ("train", "bench"):  # bench uses a scratch cache, train none
        args += ["--cache-dir", cache_dir]
    result = invoke(*command.split(), *args, option, value)
    assert result.exit_code == 2, result.output
    line = one_line_error(result)
    assert f"{option} {value}: must be {valid}" in line
    assert not cache_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["videos"]


@pytest.mark.parametrize("command", ["dub", "batch", "eval", "bench"])
def test_references_is_still_a_name_of_the_sources_option(command: str, face_clip: Path,
                                                            tmp_path: Path) -> None:
    """``--references N`` (the option's former name) parses to the same option as
    ``--sources N``: the same exit code and the same error, before any work."""
    args = {"dub": [face_clip, face_clip, "-o", tmp_path / "out.mp4"],
            "batch": [face_clip.parent, "--speech", face_clip, "-o", tmp_path / "out"],
            "eval": [face_clip, "--work-dir", tmp_path / "eval"],
            "bench": [face_clip]}[command]
    cache = ["--cache-dir", tmp_path / "cache"] if command != "bench" else []
    new = invoke(command, *args, *cache, "--sources", "0")
    old = invoke(command, *args, *cache, "--references", "0")
    assert new.exit_code == old.exit_code == 2, (new.output, old.output)
    assert one_line_error(new) == one_line_error(old)
    assert "--sources 0: must be >= 1" in one_line_error(old)
    assert not (tmp_path / "cache").exists()


def test_steps_beyond_the_models_schedule_exit_2(face_clip: Path, tiny_model: Path,
                                                 cache_dir: Path, tmp_path: Path) -> None:
    result = invoke("dub", face_clip, face_clip, "-o", tmp_path / "out.mp4", "--model",
                    tiny_model, "--steps", "101", "--cache-dir", cache_dir)
    assert result.exit_code == 2
    assert "--steps 101: must be >= 1 and <= 100" in one_line_error(result)
    assert not cache_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_asked_for_but_absent_is_a_usage_error(face_clip: Path, tmp_path: Path,
                                                    cache_dir: Path) -> None:
    with pytest.raises(UsageError, match="--device cuda: torch sees no CUDA GPU"):
        resolve_device("cuda")  # what training calls too
    result = invoke("dub", face_clip, face_clip, "-o", tmp_path / "out.mp4", "--device",
                    "cuda", "--cache-dir", cache_dir)
    assert result.exit_code == 2 and "no CUDA GPU" in one_line_error(result)
    assert not cache_dir.exists()


def test_face_index_that_no_frame_has_exits_4_naming_the_faces_found(
        face_clip: Path, cache_dir: Path) -> None:
    result = invoke("landmarks", face_clip, "--face", "99", "--cache-dir", cache_dir)
    assert result.exit_code == 4
    line = one_line_error(result)
    assert str(face_clip) in line and "--face 99: no frame has 100 faces" in line
    assert "found at most 1 in a frame" in line


def test_dub_without_any_face_warns_in_one_line(tiny_model: Path, tmp_path: Path,
                                                cache_dir: Path) -> None:
    video = make_video(tmp_path / "pattern.mp4", seconds=0.5, size="64x64")
    out = tmp_path / "out.mp4"
    result = invoke("dub", video, video, "-o", out, "--model", tiny_model, "--device", "cpu",
                    "--cache-dir", cache_dir)
    assert result.exit_code == 0  # documented: the output is written, undubbed
    assert one_line_error(result).startswith("warning: no frame could be dubbed")
    assert "0 frames dubbed" in " ".join(result.stdout.split())
    assert probe_video(out).frame_count == 13


def test_final_line_counts_from_process_start() -> None:
    code = ("import time\ntime.sleep(1.0)\nfrom dubtool.cli import process_seconds\n"
            "print(process_seconds())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert 1.0 <= float(proc.stdout) < 30  # the sleep before the import is counted
