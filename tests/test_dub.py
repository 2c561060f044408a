"""`dub` end to end on a tiny model built here: outputs, resume, plans, still images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ffmpeg, make_tone
from test_nets import tiny_config

from dubtool import api
from dubtool.media.frames import read_frames
from dubtool.media.probe import probe_video
from dubtool.nets.autoencoder import FaceAutoencoder
from dubtool.nets.dubber import DubbingModel
from dubtool.nets.io import save_model
from dubtool.pipeline.diffuse import LowerFaceGenerator


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = tiny_config()
    dubber = DubbingModel(config)
    # Untrained TalkFormer outputs start at zero; move them so the conditioning matters.
    for name, p in dubber.named_parameters():
        if ".out." in name or name.startswith("completion.head"):
            torch.nn.init.normal_(p, std=0.02)
    return save_model(tmp_path_factory.mktemp("model") / "tiny", config,
                      FaceAutoencoder(config.autoencoder), dubber)


def frames_of(path: Path) -> np.ndarray:
    return np.stack([f.copy() for f in read_frames(probe_video(path))])


def test_dub_end_to_end(face_clip: Path, tiny_model: Path, tmp_path: Path) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=1.5)
    result = api.dub(face_clip, speech, tmp_path / "out.mp4", model=tiny_model,
                     cache_dir=tmp_path / "cache", device="cpu")
    info = probe_video(result.output)
    assert (info.width, info.height, info.fps) == (256, 256, 25)
    assert abs(info.frame_count - 1.5 * 25) <= 1
    assert info.has_audio and abs(info.audio[0].duration - 1.5) < 0.05
    assert result.dubbed_frames == result.frames == info.frame_count
    assert [r.stage for r in result.stages] == ["extract", "landmarks", "crops", "complete",
                                                "diffuse"]
    # The upper face is the original's; the lower face is new.
    original = frames_of(face_clip)[:info.frame_count].astype(int)
    dubbed = frames_of(result.output).astype(int)
    assert np.abs(dubbed[:, :60] - original[:, :60]).mean() < 4
    assert np.abs(dubbed[:, 150:200, 90:170] - original[:, 150:200, 90:170]).mean() > 10


def test_interrupted_diffuse_resumes_to_the_same_video(face_clip: Path, tiny_model: Path,
                                                       tmp_path: Path, monkeypatch) -> None:
    speech = make_tone(tmp_path / "speech.wav", seconds=1.0)
    whole = api.dub(face_clip, speech, tmp_path / "whole.mp4", model=tiny_model,
                    cache_dir=tmp_path / "cache_a", device="cpu")

    real_call = LowerFaceGenerator.__call__

    def dies_at_chunk_4(self, k, previous):
        if k == 4:
            raise KeyboardInterrupt
        return real_call(self, k, previous)

    monkeypatch.setattr(LowerFaceGenerator, "__call__", dies_at_chunk_4)
    out = tmp_path / "resumed.mp4"
    with pytest.raises(KeyboardInterrupt):
        api.dub(face_clip, speech, out, model=tiny_model, cache_dir=tmp_path / "cache_b",
                device="cpu")
    assert not out.exists() and not list(tmp_path.glob(".resumed*"))
    monkeypatch.setattr(LowerFaceGenerator, "__call__", real_call)
    resumed = api.dub(face_clip, speech, out, model=tiny_model, cache_dir=tmp_path / "cache_b",
                      device="cpu")
    statuses = {r.stage: r.status for r in resumed.stages}
    assert statuses["diffuse"] == "resumed at chunk 4"
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
