"""The adapt stage: the completion fine-tuned on the video's own sound and lips."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ffmpeg, make_video, model_with_settings
from test_lipsync import _speech_with_pause, _track
from test_nets import tiny_config

from dubtool.evaluation.metrics import opening_correlation
from dubtool.face.indices import CONTENT_SLICE, ORDER, inner_lip_opening
from dubtool.media.audio import load_speech, mel_energy, mel_spectrogram, normalise_mel
from dubtool.media.probe import probe_video
from dubtool.nets.completions import CompletionNet, build_completion
from dubtool.nets.config import AdaptSettings
from dubtool.nets.landmark_completion import LandmarkCompletion
from dubtool.pipeline import adapt as adapt_stage
from dubtool.pipeline.complete import predict_content, reference_frames

FPS = Fraction(25)
MAX_SECONDS = AdaptSettings().max_seconds


def test_no_frame_near_an_output_frame_is_learned_from() -> None:
    track = _track(400, np.random.default_rng(0))
    track.detected[300:310] = False
    plan = np.arange(100)
    usable = adapt_stage.learnable_frames(track, plan, 50, FPS, MAX_SECONDS)
    assert not usable[:149].any() and usable[149:300].all() and not usable[300:310].any()
    # Frames far from every frame of a plan with gaps stay usable, between them too.
    gappy = np.concatenate([np.arange(0, 20), np.arange(380, 400)])
    usable = adapt_stage.learnable_frames(track, gappy, 50, FPS, MAX_SECONDS)
    near = np.abs(np.arange(400)[:, None] - gappy[None]).min(axis=1) < 50
    assert not usable[near].any() and usable[~near & track.detected].all()
    # Without exclusion every frame with a face, up to max_seconds.
    assert np.array_equal(adapt_stage.learnable_frames(track, plan, 0, FPS, MAX_SECONDS),
                          track.detected)
    short = adapt_stage.learnable_frames(track, plan, 0, Fraction(1), MAX_SECONDS)
    assert short.sum() == MAX_SECONDS
    assert adapt_stage.learnable_frames(track, plan, 0, FPS, 2.0).sum() == 50


def _talking_video(folder: Path) -> tuple[Path, np.ndarray]:
    """A test-pattern video carrying espeak-ng speech (with a pause) and the inner-lip opening
    (F,) that a face speaking it would show: the sound's loudness, 2 frames late."""
    wav, _ = _speech_with_pause(folder)
    seconds = len(load_speech(wav)) / 16_000
    video = make_video(folder / "pattern.mp4", seconds=seconds, audio=False)
    talking = folder / "talking.mp4"
    ffmpeg("-i", str(video), "-i", str(wav), "-map", "0:v", "-map", "1:a", "-c:v", "copy",
           "-c:a", "aac", str(talking))
    energy = mel_energy(mel_spectrogram(load_speech(wav)))
    frames = probe_video(talking).frame_count
    columns = np.clip(((np.arange(frames) + 0.5) / 25 * 80).astype(int), 0, len(energy) - 1)
    loud = np.clip((energy[columns] - energy.max() + 40) / 40, 0, 1)
    return talking, np.roll(loud, 2)


def _completion(kind: str) -> CompletionNet:
    """The tiny test model's completion, or a linear one hearing the same mel (untrained:
    the references' mouth)."""
    config = tiny_config().completion
    if kind == "linear":
        config = dataclasses.replace(config, kind="linear", speech_pool=4)
    return build_completion(config)


@pytest.mark.parametrize("kind", ["transformer", "linear"])
def test_adaptation_teaches_the_completion_the_videos_own_lips(espeak: str, tmp_path: Path,
                                                               kind: str) -> None:
    talking, loud = _talking_video(tmp_path)
    video = probe_video(talking)
    track = _track(video.frame_count, np.random.default_rng(0))
    top, bottom = ORDER.index(13), ORDER.index(14)
    track.points[:, bottom, 1] = track.points[:, top, 1] + 2 + 20 * loud
    torch.manual_seed(0)
    completion = _completion(kind).eval()
    plan = np.arange(video.frame_count)
    points = track.crop_points()
    refs = reference_frames(track.detected, completion.config.references)
    mel = normalise_mel(mel_spectrogram(load_speech(talking)))
    real = inner_lip_opening(points)

    def correlation(net: CompletionNet) -> float:
        lips = points.copy()
        lips[:, CONTENT_SLICE] = predict_content(net, points, points[refs], plan,
                                                 mel, FPS)
        return opening_correlation(inner_lip_opening(lips), real)  # 0 for a still mouth

    settings = AdaptSettings(min_seconds=1.0, steps=60, learning_rate=3e-3)
    rng_state = torch.get_rng_state()
    result = adapt_stage.adapt(completion, video, track, plan, tmp_path,
                               tiny_config().training, settings)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's draws are its own
    # A linear completion is fitted in one solve, the transformer in the settings' steps.
    steps = 1 if kind == "linear" else 60
    assert result.adapted and result.loss_after < result.loss_before and result.steps == steps
    assert result.seconds == pytest.approx(video.frame_count / 25)
    adapted = adapt_stage.adapted_completion(completion, tmp_path)
    assert adapted is not completion and not adapted.training
    assert correlation(adapted) > correlation(completion) + 0.2
    assert correlation(adapted) > 0.5
    assert not (tmp_path / adapt_stage.SOUND_FILE).exists()  # the decoded sound is removed
    assert adapt_stage.Adaptation.load(tmp_path) == result
    # The same seed: the same weights.
    (tmp_path / "again").mkdir()
    adapt_stage.adapt(completion, video, track, plan, tmp_path / "again",
                      tiny_config().training, settings)
    again = adapt_stage.adapted_completion(completion, tmp_path / "again")
    for a, b in zip(adapted.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


def test_too_little_video_or_no_sound_leaves_the_completion_as_it_is(tmp_path: Path) -> None:
    completion = LandmarkCompletion(tiny_config().completion)
    silent = probe_video(make_video(tmp_path / "silent.mp4", seconds=2.0, audio=False))
    short = probe_video(make_video(tmp_path / "short.mp4", seconds=2.0))
    for video, reason in ((silent, "no sound"), (short, "fewer than")):
        folder = tmp_path / Path(video.path).stem
        folder.mkdir()
        track = _track(video.frame_count, np.random.default_rng(0))
        result = adapt_stage.adapt(completion, video, track, np.arange(10), folder,
                                   tiny_config().training, AdaptSettings())
        assert not result.adapted and reason in result.reason
        assert adapt_stage.adapted_completion(completion, folder) is completion
        assert not (folder / adapt_stage.WEIGHTS_FILE).exists()


def test_dub_adapts_once_per_video_and_says_so(tiny_model: Path, face_clip: Path,
                                               tmp_path: Path) -> None:
    """Through the cache: adapted on the video's own speech, cached for a rerun; --no-adapt
    has no adapt stage; the CLI's summary line tells which."""
    import dubtool

    model = model_with_settings(tiny_model, tmp_path / "model",
                                adapt={"min_seconds": 1.0, "steps": 3})
    cache = tmp_path / "cache"
    first = dubtool.dub(face_clip, face_clip, tmp_path / "a.mp4", model=model,
                        cache_dir=cache, steps=1)
    assert first.adaptation is not None and first.adaptation.adapted
    assert first.adaptation.steps == 3
    stages = {r.stage: r.status for r in first.stages}
    assert stages["adapt"] == "ran"
    second = dubtool.dub(face_clip, face_clip, tmp_path / "b.mp4", model=model,
                         cache_dir=cache, steps=1)
    assert {r.stage: r.status for r in second.stages}["adapt"] == "cached"
    assert second.adaptation == first.adaptation
    off = dubtool.dub(face_clip, face_clip, tmp_path / "c.mp4", model=model,
                      cache_dir=cache, steps=1, adapt=False)
    assert off.adaptation is None and "adapt" not in {r.stage for r in off.stages}
    assert not np.allclose(off.landmarks, second.landmarks)
    done = subprocess.run([sys.executable, "-m", "dubtool", "dub", "--model", str(tiny_model),
                           "--steps", "1",
                           "--cache-dir", str(tmp_path / "cli-cache"), "-o",
                           str(tmp_path / "d.mp4"),
                           str(face_clip), str(face_clip)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # rich wraps lines
    assert ("lips not adapted: 2.0 s of the video's frames can be learned from, fewer than 8"
            in text)


def test_enough_face_time_but_no_window_of_successive_faces_skips_adaptation(
        tmp_path: Path) -> None:
    """8 s of frames with a face, but a frame without one in every window: skipped with its
    reason (it raised ValueError from the sampler); one whole window is enough to adapt."""
    completion = LandmarkCompletion(tiny_config().completion)
    window = completion.config.window
    video = probe_video(make_video(tmp_path / "talk.mp4", seconds=10.0))
    track = _track(video.frame_count, np.random.default_rng(0))
    track.detected[::window] = False
    assert track.detected.sum() / 25 >= AdaptSettings().min_seconds
    (tmp_path / "gaps").mkdir()
    result = adapt_stage.adapt(completion, video, track, np.arange(10), tmp_path / "gaps",
                               tiny_config().training, AdaptSettings())
    assert not result.adapted and f"never {window} successive" in result.reason
    assert f"at most {window - 1}" in result.reason
    assert not (tmp_path / "gaps" / adapt_stage.WEIGHTS_FILE).exists()
    track.detected[window:2 * window] = True  # one run of exactly a window
    (tmp_path / "one").mkdir()
    result = adapt_stage.adapt(completion, video, track, np.arange(10), tmp_path / "one",
                               tiny_config().training, AdaptSettings(steps=1))
    assert result.adapted, result.reason
