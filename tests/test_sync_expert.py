"""The lip-sync expert: its shapes and normalisation, its weights' round trip, its config's
checks, ``dubtool train sync`` on synthetic data whose lips follow the speech exactly, and
the eval metric's windows."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dubtool.errors import ModelError
from dubtool.face.indices import NUM_CONTENT, NUM_POINTS, NUM_POSE
from dubtool.nets.speech_encoder import STATE_DIM
from dubtool.nets.sync_expert import (
    SyncExpert,
    SyncExpertConfig,
    SyncScores,
    SyncTrainingConfig,
    frame_speech,
    load_sync_expert,
    save_sync_expert,
)

TINY = SyncExpertConfig(window=7, min_shift=2, max_shift=5, hidden=16, dim=8, members=2,
                        dropout=0.0, training=SyncTrainingConfig(batch_size=16))
FPS = 25
LOADINGS = np.random.default_rng(7).normal(0, 1, (3, STATE_DIM))


def _speaking(rng: np.random.Generator, frames: int, mapping: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, T) speech encoder states of ``frames`` video frames (three random sounds a state,
    spread over the channels), (F, C) their per-frame states and (F, 131, 2) crop points
    whose lip/jaw are a fixed linear function of them."""
    sounds = rng.normal(0, 1, (2 * frames, 3))
    states = (sounds @ LOADINGS + rng.normal(0, 0.1, (2 * frames, STATE_DIM))).T
    heard = frame_speech(states, frames, FPS, TINY)
    points = np.tile(rng.uniform(0.3, 0.7, (1, NUM_POINTS, 2)), (frames, 1, 1))
    points[:, NUM_POSE:] += (heard @ mapping).reshape(frames, NUM_CONTENT, 2)
    return states, heard, points.astype(np.float32)


def test_the_expert_embeds_windows_and_scores_every_shift() -> None:
    torch.manual_seed(0)
    expert = SyncExpert(TINY).eval()
    frames = 40
    points = torch.rand(2, frames, NUM_CONTENT, 2)
    speech = torch.randn(2, frames, STATE_DIM)
    motion, heard = expert.embed(points, speech, 0)
    assert motion.shape == heard.shape == (2, frames - TINY.window + 1, TINY.dim)
    torch.testing.assert_close(motion.norm(dim=-1), torch.ones(2, frames - TINY.window + 1))
    cosines = expert.cosines(points, speech)
    assert cosines.shape == (2, frames - TINY.span + 1, 2 * TINY.max_shift + 1)
    # Column max_shift is in sync: window j's motion with window j's speech.
    first, count = TINY.max_shift, cosines.shape[1]
    in_sync = sum((m[:, first:first + count] * h[:, first:first + count]).sum(-1)
                  for m, h in (expert.embed(points, speech, k) for k in range(2))) / 2
    torch.testing.assert_close(cosines[..., TINY.max_shift], in_sync)
    # Points in any unit and place score alike; too few frames give no windows.
    scores = expert.score(points[0].numpy(), speech[0].numpy())
    moved = expert.score(points[0].numpy() * 300 + 40, speech[0].numpy())
    np.testing.assert_allclose(scores.cosines, moved.cosines, atol=1e-5)
    short = expert.score(points[0, :TINY.span - 1].numpy(), speech[0, :TINY.span - 1].numpy())
    assert short.windows == 0 and math.isnan(short.accuracy)


def test_pairwise_accuracy_counts_ties_half() -> None:
    cosines = np.zeros((2, 11), np.float32)  # max_shift 5; the shifts 2..5 either way
    cosines[0, 5] = 1.0   # in sync above every shift
    scores = SyncScores(cosines, 2)
    np.testing.assert_allclose(scores.pairwise(), [1.0, 0.5])
    assert scores.accuracy == 0.75 and scores.in_sync == 0.5 and scores.shifted == 0.0


def test_weights_round_trip_through_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    expert = SyncExpert(TINY).eval()
    expert.speech_mean.normal_()
    rng = np.random.default_rng(0)
    points, speech = rng.random((30, NUM_CONTENT, 2)), rng.normal(size=(30, STATE_DIM))
    save_sync_expert(expert, tmp_path / "full", half=False)
    loaded = load_sync_expert(tmp_path / "full")
    assert loaded.config == TINY and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    np.testing.assert_array_equal(loaded.score(points, speech).cosines,
                                  expert.score(points, speech).cosines)
    save_sync_expert(expert, tmp_path / "half")
    assert (tmp_path / "half" / "sync_expert.safetensors").stat().st_size < (
        tmp_path / "full" / "sync_expert.safetensors").stat().st_size * 0.6
    np.testing.assert_allclose(load_sync_expert(tmp_path / "half").score(points, speech)
                               .cosines, expert.score(points, speech).cosines, atol=5e-3)
    (tmp_path / "half" / "sync_expert.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="safetensors"):
        load_sync_expert(tmp_path / "half")


def test_a_sync_expert_config_is_checked(tmp_path: Path) -> None:
    for bad, words in (({"min_shift": 0}, "min_shift"), ({"max_shift": 1}, "min_shift"),
                       ({"window": 0}, "window"), ({"members": 0}, "members"),
                       ({"dropout": 1.0}, "dropout")):
        with pytest.raises(ModelError, match=words):
            dataclasses.replace(TINY, **bad)
    data = TINY.to_dict()
    data["training"]["momentum"] = 0.9
    with pytest.raises(ModelError, match="momentum"):
        SyncExpertConfig.from_dict(data)
    TINY.save(tmp_path / "config.json")
    assert SyncExpertConfig.load(tmp_path / "config.json") == TINY
    assert SyncExpertConfig().span == 37 + 2 * 15


def _synthetic_dataset(folder: Path) -> Path:
    """A prepared data set whose lip/jaw points are a fixed linear function of the speech
    states: four training people, one validating."""
    rng = np.random.default_rng(0)
    mapping = rng.normal(0, 0.01, (STATE_DIM, NUM_CONTENT * 2)).astype(np.float32)
    split: dict[str, list[str]] = {"train": [], "val": []}
    people = {}
    for n, person in enumerate(("ann", "bob", "cid", "dee", "eve")):
        for k in range(2):
            name = f"{person}_{k}"
            clip = folder / name
            clip.mkdir(parents=True)
            frames = 120
            states, _, points = _speaking(rng, frames, mapping)
            np.save(clip / "points.npy", points)
            np.save(clip / "detected.npy", np.ones(frames, bool))
            np.save(clip / "whisper.npy", states.astype(np.float16))
            np.save(clip / "crops.npy", np.zeros((frames, 4, 4, 3), np.uint8))
            (clip / "meta.json").write_text(json.dumps({"fps": "25/1", "person": person}))
            split["val" if n == 4 else "train"].append(name)
            people[name] = person
    (folder / "dataset.json").write_text(json.dumps(
        {"crop_size": 4, "source": "synthetic", "split": split, "people": people}))
    return folder


def test_train_sync_learns_lips_that_follow_the_speech(tmp_path: Path) -> None:
    """``dubtool train sync`` on lips that are a function of the speech: the in-sync speech
    scores above its shifts on the validation person's clips; a still mouth scores chance,
    and so does speech that lags (its in-sync cosine drops). The model folder loads."""
    from dubtool import api

    data = _synthetic_dataset(tmp_path / "data")
    config = tmp_path / "sync.json"
    TINY.save(config)
    result = api.train("sync", config, data, tmp_path / "run", steps=150, epoch_steps=75,
                       device="cpu", seed=3)
    v = result.validation
    assert v["pairwise"] > 0.95 and v["member0_pairwise"] > 0.9 and v["member1_pairwise"] > 0.9
    assert abs(v["still_pairwise"] - 0.5) < 0.15
    assert v["shifted_pairwise"] < 0.55 and v["shifted_cosine_in_sync"] < 0.5
    assert abs(v["float16_pairwise"] - v["pairwise"]) < 0.02
    assert v["cosine_in_sync"] > v["cosine_shifted"] + 0.3
    log = [json.loads(line) for line in (result.run / "log.jsonl").read_text().splitlines()]
    assert [(e["member"], e["step"]) for e in log if "member" in e] == [
        (0, 75), (0, 150), (1, 75), (1, 150)]
    card = (result.model / "MODEL_CARD.md").read_text()
    assert "| eve |" in card and "still mouth" in card
    expert = load_sync_expert(result.model)
    assert expert.config == TINY


def test_the_eval_metric_scores_only_runs_long_enough(tmp_path: Path) -> None:
    """Runs of scored frames shorter than a window and its shifts are not scored: with none
    long enough the metric is NaN, not 0 or chance."""
    from dubtool.evaluation.evaluate import expert_sync, runs_of

    usable = np.array([1, 1, 0, 1, 1, 1, 0, 0, 1], bool)
    assert [(r.start, r.stop) for r in runs_of(usable, 2)] == [(0, 2), (3, 6)]
    assert [(r.start, r.stop) for r in runs_of(usable, 1)] == [(0, 2), (3, 6), (8, 9)]
    torch.manual_seed(0)
    expert = SyncExpert(TINY).eval()
    rng = np.random.default_rng(0)
    frames = 3 * TINY.span
    content = rng.random((frames, NUM_CONTENT, 2)).astype(np.float32)
    speech = rng.normal(size=(frames, STATE_DIM)).astype(np.float32)
    gappy = np.ones(frames, bool)
    gappy[TINY.span - 1::TINY.span - 1] = False  # every run one frame short
    scores = expert_sync(expert, content, gappy, speech)
    assert scores.windows == 0 and math.isnan(scores.accuracy) and math.isnan(scores.in_sync)
    gappy[: 2 * TINY.span] = True
    scores = expert_sync(expert, content, gappy, speech)
    first = next(runs_of(gappy, TINY.span))
    assert scores.windows == first.stop - first.start - TINY.span + 1
    np.testing.assert_allclose(scores.cosines,
                               expert.score(content[first], speech[first]).cosines)


def test_the_frozen_expert_loss_trains_the_completion_and_not_the_expert() -> None:
    """``TrainingConfig.completion_sync_weight``: minus the expert's in-sync cosine of the
    predicted lips joins a transformer completion's loss; its gradient reaches the completion,
    the expert stays frozen, and it reads each frame's speech as ``frame_speech`` does."""
    from test_nets import tiny_config

    from dubtool.media.audio import feature_window
    from dubtool.nets.completions import build_completion
    from dubtool.nets.config import CompletionConfig, TrainingConfig
    from dubtool.training.dubber import completed_landmarks

    hearing = CompletionConfig(frames=3, window=8, references=2, d_model=32, layers=1, heads=2,
                               ff_dim=64, dropout=0.0, speech_features="whisper",
                               speech_channels=STATE_DIM, speech_window=6, speech_lead=5)
    torch.manual_seed(0)
    completion = build_completion(hearing)
    expert = frozen_expert(TINY)
    expert.check_hearing(hearing)
    with pytest.raises(ModelError, match="window >= 7"):
        expert.check_hearing(tiny_config().completion)
    # The middle of a completion's window of states is the frame's speech for the expert.
    rng = np.random.default_rng(0)
    states = rng.normal(size=(STATE_DIM, 80)).astype(np.float32)
    windows = np.stack([feature_window(states, f, FPS, 6, hearing.speech_timing)
                        for f in range(30)])
    np.testing.assert_allclose(expert.window_speech(torch.from_numpy(windows)).numpy(),
                               frame_speech(states, 30, FPS, TINY), atol=1e-6)
    batch = {"points": torch.rand(2, 8, NUM_POINTS, 2),
             "references": torch.rand(2, 2, NUM_POINTS, 2),
             "speech": torch.randn(2, 8, STATE_DIM, 6)}
    training = TrainingConfig(completion_sync_weight=0.5)
    _, losses = completed_landmarks(completion, batch, training, expert)
    _, plain = completed_landmarks(completion, batch, training)
    assert "sync" not in plain and -1 <= losses["sync"].item() <= 1
    torch.testing.assert_close(losses["total"], plain["total"] + 0.5 * losses["sync"])
    losses["sync"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in completion.parameters())
    assert all(p.grad is None and not p.requires_grad for p in expert.parameters())
    assert not expert.training


def frozen_expert(config: SyncExpertConfig) -> SyncExpert:
    """A random expert frozen as ``load_sync_expert`` leaves one."""
    torch.manual_seed(2)
    return SyncExpert(config).eval().requires_grad_(False)
