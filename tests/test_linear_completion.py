"""The linear landmark completion: its closed-form fit, its fine-tuning pulled towards the
trained weights, and fitting one as ``dubtool train completion`` does."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import model_with_settings
from test_nets import tiny_config

from dubtool.face.indices import CONTENT_SLICE, NUM_CONTENT, NUM_POSE
from dubtool.nets.completions import build_completion
from dubtool.nets.config import CompletionConfig, ModelConfig
from dubtool.nets.linear_completion import LinearCompletion

CONFIG = CompletionConfig(kind="linear", window=6, references=4, speech_channels=80,
                          speech_window=16, speech_pool=4)


def _rows(rng: np.random.Generator, count: int, truth: np.ndarray, moved_truth: np.ndarray,
          bias: np.ndarray) -> tuple[np.ndarray, ...]:
    speech = rng.normal(3.0, 2.0, (count, 80 * 4))
    moved = rng.normal(0.0, 0.02, (count, NUM_POSE * 2))
    offsets = ((speech - 3.0) / 2.0) @ truth + moved @ moved_truth + bias
    return speech, moved, offsets.reshape(count, NUM_CONTENT, 2)


def test_the_fit_finds_a_linear_map_and_the_network_applies_it() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 1e-3, (320, NUM_CONTENT * 2))
    moved_truth = rng.normal(0, 0.3, (NUM_POSE * 2, NUM_CONTENT * 2))
    bias = rng.normal(0, 1e-3, NUM_CONTENT * 2)
    speech, moved, offsets = _rows(rng, 4000, truth, moved_truth, bias)
    net = LinearCompletion(CONFIG)
    net.fit(speech, moved, offsets, np.ones(len(speech)), 1e-6, 1e-9)
    np.testing.assert_allclose(net.predicted_offsets(speech, moved), offsets, atol=2e-5)
    np.testing.assert_allclose(net.speech_mean.numpy(), 3.0, atol=0.15)
    # The network: the references' mean mouth plus the offsets of each frame's pooled window
    # (a window whose runs of 4 steps are constant pools to those values) and moved pose.
    frames = 3
    windows = torch.from_numpy(np.repeat(speech[:frames].reshape(frames, 80, 4), 4, axis=-1)
                               ).float()
    references = torch.rand(4, 131, 2)
    pose = references[:, :NUM_POSE].mean(0) + torch.from_numpy(
        moved[:frames].reshape(frames, NUM_POSE, 2)).float()
    out = net(pose[None], references[None], windows[None])[0]
    expected = references[:, CONTENT_SLICE].mean(0) + torch.from_numpy(offsets[:frames]).float()
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)


def test_a_fine_tuning_moves_the_map_only_as_far_as_the_frames_show() -> None:
    rng = np.random.default_rng(1)
    first = rng.normal(0, 1e-3, (320, NUM_CONTENT * 2))
    second = rng.normal(0, 1e-3, (320, NUM_CONTENT * 2))
    still = np.zeros((NUM_POSE * 2, NUM_CONTENT * 2))
    zero = np.zeros(NUM_CONTENT * 2)
    net = LinearCompletion(CONFIG)
    net.fit(*_rows(rng, 4000, first, still, zero), np.ones(4000), 1e-6, 1e-6)
    trained = {k: v.clone() for k, v in net.state_dict().items()}
    speech, moved, offsets = _rows(rng, 2000, second, still, zero)

    def error() -> float:
        return float(np.abs(net.predicted_offsets(speech, moved) - offsets).mean())

    before = error()
    stiff = LinearCompletion(CONFIG)
    stiff.load_state_dict(trained)
    stiff.fit(speech, moved, offsets, np.ones(2000), 1e6, 1e6, prior=True)
    # The weights and the standardisation stay; the bias, not penalised, is the one thing
    # that moves: the person's mean speech maps to their mean mouth.
    for name, value in stiff.state_dict().items():
        if name != "speech.bias":
            torch.testing.assert_close(value, trained[name], atol=1e-6, rtol=1e-3)
    net.fit(speech, moved, offsets, np.ones(2000), 1e-6, 1e-6, prior=True)
    assert error() < before / 50
    torch.testing.assert_close(net.speech_mean, trained["speech_mean"])


def test_a_linear_config_is_checked() -> None:
    from dubtool.errors import ModelError

    base = tiny_config()
    for bad, words in (({"kind": "lstm"}, "completion.kind"),
                       ({"kind": "linear", "speech_pool": 0}, "speech_pool"),
                       ({"kind": "linear", "speech_pool": 5}, "speech_pool")):
        data = base.to_dict()
        data["completion"].update(bad)
        with pytest.raises(ModelError, match=words):
            ModelConfig.from_dict(data)
    assert isinstance(build_completion(dataclasses.replace(base.completion, kind="linear",
                                                           speech_pool=4)), LinearCompletion)


def test_train_completion_fits_a_linear_one_into_a_whole_model(
        dataset: Path, tiny_model: Path, face_clip: Path, tmp_path: Path) -> None:
    """``dubtool train completion`` with a linear config: one solve over the training
    people's frames, scored on the validation people, written as a model folder that loads,
    and dubs (adapted in one solve)."""
    import dubtool
    from dubtool import api
    from dubtool.nets.io import load_model

    config = tiny_config().to_dict()
    config["completion"].update(kind="linear", references=8, speech_pool=4)
    path = tmp_path / "linear.json"
    path.write_text(json.dumps(config))
    result = api.train("completion", path, dataset, tmp_path / "run", steps=1, into=tiny_model)
    assert result.steps == 1 and result.global_batch > 50
    assert -1 <= result.validation["opening_correlation"] <= 1
    loaded = load_model(result.model, completion_only=True).completion
    assert isinstance(loaded, LinearCompletion) and loaded.config.references == 8
    assert loaded.speech.weight.abs().sum() > 0  # fitted, not the untrained zeros
    whole = load_model(result.model).dubber.completion
    for a, b in zip(whole.state_dict().values(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)  # stored in half precision
    model = tmp_path / "adapting"
    model_with_settings(result.model, model, adapt={"min_seconds": 1.0})
    dubbed = dubtool.dub(face_clip, face_clip, tmp_path / "dub.mp4", model=model,
                         cache_dir=tmp_path / "cache")
    assert dubbed.adaptation.adapted and dubbed.adaptation.steps == 1
    assert dubbed.adaptation.loss_after < dubbed.adaptation.loss_before
    assert (tmp_path / "dub.mp4").stat().st_size > 0


def test_a_model_folder_from_before_the_kinds_loads_its_transformer(tmp_path: Path) -> None:
    """A config.json written before ``completion.kind`` existed is a transformer's, and its
    weights load into one; the shipped model says linear."""
    from test_nets import save_tiny_model

    from dubtool.nets.io import load_model
    from dubtool.nets.landmark_completion import LandmarkCompletion

    folder = save_tiny_model(tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["completion"]["kind"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(folder, completion_only=True).completion
    assert isinstance(loaded, LandmarkCompletion) and loaded.config.kind == "transformer"
    assert ModelConfig.named("cpu-128").completion.kind == "linear"
