"""Shared fixtures: small media made on the fly with ffmpeg, the shipped real face clip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Tiny models gain nothing from threads, and spinning OpenMP threads make them crawl when
# anything else runs on the machine; child processes inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_video(path: Path, seconds: float = 1.0, size: str = "64x48", rate: str = "25",
               audio: bool = True, extra: tuple[str, ...] = ()) -> Path:
    """A test-pattern video (with a 440 Hz tone unless audio=False)."""
    args = ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=frequency=440:duration={seconds}",
                 "-c:a", "aac", "-shortest"]
    ffmpeg(*args, "-pix_fmt", "yuv420p", *extra, str(path))
    return path


def make_tone(path: Path, seconds: float = 1.0, rate: int = 44100, channels: int = 1,
              extra: tuple[str, ...] = ()) -> Path:
    layout = {1: "mono", 2: "stereo", 6: "5.1"}[channels]
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency=300:duration={seconds}:sample_rate={rate}",
           "-af", f"aformat=channel_layouts={layout}", *extra, str(path))
    return path


def model_with_settings(model: Path, folder: Path, **groups: dict) -> Path:
    """A copy of the model folder ``model`` at ``folder`` whose config's inference settings
    differ by ``groups`` (group name -> {field: value}, e.g. ``adapt={"steps": 3}``)."""
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    for group, changes in groups.items():
        config["inference"][group].update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def face_clip() -> Path:
    """2 s of a real person talking (256x256, 25 fps, 50 frames, with her speech)."""
    return DATA / "face_2s.mp4"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A model folder with tiny random networks (test_nets.save_tiny_model)."""
    from test_nets import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed")
    return exe


@pytest.fixture(scope="session")
def videos(tmp_path_factory, face_clip: Path) -> Path:
    """Training videos of three people (copies of the face clip) and one without a face."""
    root = tmp_path_factory.mktemp("videos")
    for person in ("anna", "bert", "carl"):
        (root / person).mkdir()
        shutil.copy(face_clip, root / person / f"{person}_1.mp4")
    make_video(root / "carl" / "no_face.mp4", seconds=0.5, size="128x128")
    return root


@pytest.fixture(scope="session")
def dataset(videos: Path, tmp_path_factory) -> Path:
    """``videos`` prepared at 32 px crops: two people train, one validates."""
    from dubtool import api

    out = tmp_path_factory.mktemp("data")
    reports = api.prepare(videos, out, crop_size=32, validation_fraction=0.34,
                          cache_dir=tmp_path_factory.mktemp("cache"))
    status = {r.clip: r.status for r in reports}
    assert status["carl__no_face"].startswith("skipped: face in 0/")
    return out
