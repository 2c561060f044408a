"""On a CUDA GPU (marked ``cuda``: skipped without one; ``make gpu-check`` runs them)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tone
from safetensors.torch import load_file
from test_nets import tiny_config

from dubtool import api

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_dubber_trains_on_cuda_in_each_precision(precision: str, dataset: Path,
                                                 tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    tiny_config().save(config)
    result = api.train("dubber", config, dataset, tmp_path / "run", steps=3,
                       autoencoder=tiny_model, device="cuda", mixed_precision=precision,
                       epoch_steps=3, checkpoint_every=3)
    assert all(np.isfinite(v) for v in result.validation.values()), result.validation
    trained = load_file(str(result.run / "checkpoint" / "dubber.safetensors"))
    start = load_file(str(tiny_model / "dubber.safetensors"))
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], start[k].float()) for k in trained if k in start)


@pytest.mark.parametrize("renderer", ["native", "diffusion"])
def test_dub_on_cuda_is_the_cpu_dub(face_clip: Path, tiny_model: Path, tmp_path: Path,
                                    renderer: str) -> None:
    """A model loaded on the CPU and given to a Dubber on CUDA is moved there whole, and
    dubs (the diffusion renderer's DDIM sampling and autoencoder included) as on the CPU."""
    from dubtool.nets.io import load_model
    from dubtool.pipeline.dubber import Dubber

    speech = make_tone(tmp_path / "speech.wav", seconds=1.0)
    results = []
    for device in ("cpu", "cuda"):
        model = load_model(tiny_model, completion_only=renderer == "native")
        dubber = Dubber(model, device=device, renderer=renderer, steps=2)
        parts = [p for p in (model.autoencoder, model.dubber, model.completion) if p is not None]
        assert {p.device.type for part in parts for p in part.parameters()} == {device}
        results.append(dubber.dub(face_clip, speech, tmp_path / f"{renderer}-{device}.mp4",
                                  cache_dir=tmp_path / f"cache-{device}"))
    assert results[0].dubbed_frames == results[1].dubbed_frames > 0
    landmarks = [r.landmarks for r in results]
    # The CPU may sample in bfloat16 (devices.sampling_precision): 2% of the crop at most.
    assert np.abs(landmarks[0] - landmarks[1]).max() < 0.02
