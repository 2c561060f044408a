"""The networks on tiny sizes: shapes, the paper's structural claims, sampling, save/load."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from dubtool.errors import ModelError
from dubtool.nets.autoencoder import FaceAutoencoder
from dubtool.nets.config import (
    AdaptSettings,
    AutoencoderConfig,
    CompleteSettings,
    CompletionConfig,
    DenoiserConfig,
    DiffusionConfig,
    InferenceConfig,
    ModelConfig,
    NativeSettings,
    SourceSettings,
    TrainingConfig,
)
from dubtool.nets.dubber import DubbingModel, complete_landmarks
from dubtool.nets.io import load_model, load_weights, save_model, save_weights
from dubtool.nets.sampling import (
    inpaint_lower_half,
    lower_half_mask,
    make_scheduler,
    sampling_timesteps,
    start_timestep,
)
from dubtool.nets.talkformer import TalkFormer
from dubtool.training.dubber import dubber_losses


def tiny_config(temporal: bool = True) -> ModelConfig:
    return ModelConfig(
        name="tiny", crop_size=32,
        autoencoder=AutoencoderConfig(image_size=32, channels=(8, 16, 16), norm_groups=4),
        completion=CompletionConfig(frames=3, window=6, references=2, d_model=32, layers=1,
                                    heads=2, ff_dim=64, dropout=0.0),
        denoiser=DenoiserConfig(channels=(16, 32), norm_groups=4, head_dim=8, landmark_dim=16,
                                temporal_attention=temporal),
        diffusion=DiffusionConfig(train_steps=100, sample_steps=4),
        training=TrainingConfig(batch_size=2, autoencoder_batch_size=4))


def save_tiny_model(folder: Path) -> Path:
    """A model folder with tiny random networks (32 px crops): fast dubs through every stage.
    Its TalkFormer outputs are moved off zero so that the conditioning matters."""
    torch.manual_seed(0)
    config = tiny_config()
    dubber = DubbingModel(config)
    for name, p in dubber.named_parameters():
        if ".out." in name or name.startswith("completion.head"):
            torch.nn.init.normal_(p, std=0.02)
    return save_model(folder, config, FaceAutoencoder(config.autoencoder), dubber)


def tiny_batch(config: ModelConfig, batch: int = 2, motion: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    frames, refs, size = config.completion.frames, config.completion.references, config.crop_size
    points = 0.2 + 0.6 * torch.rand(batch, frames, 131, 2, generator=g)
    return {
        "frames": torch.rand(batch, frames, 3, size, size, generator=g) * 2 - 1,
        "points": points,
        "references": 0.2 + 0.6 * torch.rand(batch, refs, 131, 2, generator=g),
        "speech": torch.randn(batch, frames, 80, 16, generator=g) * 20 - 40,
        "reference_image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
        "motion": torch.rand(batch, motion, 3, size, size, generator=g) * 2 - 1,
    }


@pytest.fixture
def models() -> tuple[ModelConfig, FaceAutoencoder, DubbingModel]:
    torch.manual_seed(0)
    config = tiny_config()
    return config, FaceAutoencoder(config.autoencoder).eval(), DubbingModel(config)


def test_shapes_through_every_module(models) -> None:
    config, ae, model = models
    batch = tiny_batch(config)
    latents = ae.encode(batch["frames"].flatten(0, 1))
    assert latents.shape == (6, 4, 8, 8)
    assert ae.decode(latents).shape == (6, 3, 32, 32)
    content = model.completion(batch["points"][:, :, :74], batch["references"], batch["speech"])
    assert content.shape == (2, 3, 57, 2)
    landmarks = complete_landmarks(model.completion, batch["points"], batch["references"],
                                   batch["speech"])
    assert landmarks.shape == (2, 3, 131, 2)
    assert torch.equal(landmarks[:, :, :74], batch["points"][:, :, :74])
    features = model.appearance(latents[:2])
    assert [tuple(f.shape) for f in features] == [(2, 16, 8, 8), (2, 32, 4, 4)]
    motion = ae.encode(batch["motion"].flatten(0, 1)).unflatten(0, (2, 2))
    mask = lower_half_mask(8).expand(6, -1, -1, -1)
    t = torch.full((6,), 10)
    for motion_latents in (motion, None):
        cond = model.conditioning(landmarks, latents[:2], motion_latents)
        assert cond.landmarks.shape == (6, 131, 2) and cond.reference[1].shape == (6, 32, 4, 4)
        out = model.denoiser(latents, latents * (1 - mask), mask, t, cond)
        assert out.shape == latents.shape


def test_fresh_talkformer_is_the_identity() -> None:
    torch.manual_seed(0)
    block = TalkFormer(16, landmark_dim=8, head_dim=8, groups=4, temporal=True)
    hidden = torch.randn(6, 16, 4, 4)
    out = block(hidden, torch.randn(6, 131, 8), torch.randn(6, 16, 4, 4), frames=3,
                motion=torch.randn(4, 16, 4, 4))
    assert torch.equal(out, hidden)
    # ... and stops being one once its zero-initialised outputs move.
    torch.nn.init.normal_(block.motion_alignment.out.weight)
    assert not torch.equal(block(hidden, torch.randn(6, 131, 8), torch.randn(6, 16, 4, 4), 3),
                           hidden)


def _completion_grads(model: DubbingModel) -> float:
    return sum(float(p.grad.abs().sum()) for p in model.completion.parameters()
               if p.grad is not None)


@pytest.mark.parametrize("end2end", [True, False])
def test_ldm_gradient_reaches_landmark_completion_only_end_to_end(models, end2end) -> None:
    config, ae, model = models
    scheduler = make_scheduler(config.diffusion)
    batch = tiny_batch(config)

    def losses() -> dict:
        return dubber_losses(model, ae, batch, scheduler, config.training,
                             end2end=end2end, generator=torch.Generator().manual_seed(0))

    # One training step first: at initialisation the zero convs of TalkFormer (and the zero
    # head of the completion module) block every path, in both modes.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses()["total"].backward()
    optimizer.step()
    optimizer.zero_grad()
    losses()["ldm"].backward()
    grads = _completion_grads(model)
    assert (grads > 0) == end2end
    if end2end:
        # Deep inside the module too, not only at its output layer.
        audio = model.completion.audio_embed.convs[0].weight.grad
        assert audio is not None and float(audio.abs().sum()) > 0
    assert float(model.denoiser.conv_in.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("end2end", [True, False])
def test_l1_trains_completion_in_both_modes(models, end2end) -> None:
    """The landmark loss reaches the completion, end to end or not, and through the total
    the training steps on."""
    config, ae, model = models
    for name in ("l1", "total"):
        model.zero_grad(set_to_none=True)
        losses = dubber_losses(model, ae, tiny_batch(config), make_scheduler(config.diffusion),
                               config.training, end2end=end2end,
                               generator=torch.Generator().manual_seed(0))
        losses[name].backward()
        assert _completion_grads(model) > 0, name


def test_refine_objective_takes_the_warped_start_to_the_real_frame(models) -> None:
    """With ``refine`` the lower half starts from the (noised) warped reference, at times
    below refine x T, and the loss is on the clean latent against the real frame's."""
    config, ae, model = models
    scheduler = make_scheduler(config.diffusion)
    batch = tiny_batch(config)
    batch["warped"] = torch.rand_like(batch["frames"]) * 2 - 1
    with torch.no_grad():
        real = ae.encode(batch["frames"].flatten(0, 1))
        warped = ae.encode(batch["warped"].flatten(0, 1))
    alphas = scheduler.alphas_cumprod
    seen = []

    def denoiser_heading_to(clean: torch.Tensor):
        def predict(noisy, masked, mask, t, cond):
            seen.append(t)
            a = alphas[t].view(-1, 1, 1, 1)
            return (noisy - a.sqrt() * clean) / (1 - a).sqrt()
        return predict

    def ldm(clean: torch.Tensor) -> float:
        model.denoiser.forward = denoiser_heading_to(clean)
        return float(dubber_losses(model, ae, batch, scheduler, config.training, end2end=False,
                                   generator=torch.Generator().manual_seed(0),
                                   refine=0.3)["ldm"])

    assert ldm(real) < 1e-8
    mask = lower_half_mask(real.shape[-1])
    expected = float(((warped - real) ** 2 * mask).sum() / (mask.expand_as(real).sum()))
    assert abs(ldm(warped) - expected) < 1e-4 * max(expected, 1.0)
    # It trains on the times that sampling at strength 0.3 runs at (T = 100 here): 1 up to
    # the start, 30, which is reached.
    seen.clear()
    for seed in range(60):
        dubber_losses(model, ae, batch, scheduler, config.training, end2end=False,
                      generator=torch.Generator().manual_seed(seed), refine=0.3)
    times = {int(t) for ts in seen for t in ts}
    sampled = sampling_timesteps(config.diffusion.train_steps, 10, 0.3)
    assert sampled[0] == start_timestep(0.3, config.diffusion.train_steps) == 30
    assert min(times) >= 1 and max(times) == sampled[0]
    assert set(sampled) <= set(range(min(times), max(times) + 1))


def test_ddim_same_seed_same_sample_and_upper_half_kept(models) -> None:
    config, ae, model = models
    model.eval()
    batch = tiny_batch(config)
    known = ae.encode(batch["frames"].flatten(0, 1))
    cond = model.conditioning(batch["points"], known[:2])
    torch.nn.init.normal_(model.denoiser.conv_out.weight, std=0.1)
    scheduler = make_scheduler(config.diffusion)

    def sample(seed: int, eta: float = 0.0) -> torch.Tensor:
        return inpaint_lower_half(model.denoiser, known, cond, scheduler, steps=4, eta=eta,
                                  generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(sample(3, eta=1.0), sample(3, eta=1.0))
    assert torch.equal(a[:, :, :4], known[:, :, :4])  # upper half exactly the input's
    assert not torch.allclose(a[:, :, 4:], known[:, :, 4:])


def test_bf16_sampling_keeps_the_latents_and_the_ddim_update_in_float32(models) -> None:
    """Under bf16 autocast (the dub's precision on CPUs with native bf16) only the denoiser
    runs in bf16: the latents stay float32, as diffusers keeps them, and 50 steps from noise
    (strength 1) stay near the float32 sample. Measured here: mean |difference| over the
    lower half 0.35% of the sample's mean size (1.8% with the latents in bf16)."""
    config, ae, model = models
    config = config.replace(diffusion=DiffusionConfig(train_steps=1000))
    model.eval()
    torch.nn.init.normal_(model.denoiser.conv_out.weight, std=0.1)
    batch = tiny_batch(config, batch=1)
    frames = batch["frames"].flatten(0, 1)
    scheduler = make_scheduler(config.diffusion)

    def sample() -> torch.Tensor:
        # As the dub does: the known latent and the conditioning made under the same autocast.
        known = ae.encode(frames)
        cond = model.conditioning(batch["points"], known[:1])
        return inpaint_lower_half(model.denoiser, known, cond, scheduler, steps=50,
                                  generator=torch.Generator().manual_seed(0), strength=1.0)

    with torch.inference_mode():
        exact = sample()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = sample()
    assert exact.dtype == mixed.dtype == torch.float32
    lower = (slice(None), slice(None), slice(4, None))
    error = (mixed - exact)[lower].abs().mean() / exact[lower].abs().mean()
    assert error < 0.007, float(error)


def test_tiny_model_overfits_a_fixed_batch(models) -> None:
    """A fixed batch of frames, with a new diffusion time and noise every step, as training
    draws them: the loss on a fixed set of (time, noise) draws, held out, falls."""
    config, ae, model = models
    batch = tiny_batch(config, batch=1, motion=0)
    scheduler = make_scheduler(config.diffusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    draws = torch.Generator().manual_seed(0)

    def held_out() -> float:  # the same 8 (time, noise) draws each time, none trained on
        with torch.no_grad():
            return sum(float(dubber_losses(
                model, ae, batch, scheduler, config.training,
                generator=torch.Generator().manual_seed(1000 + k))["total"])
                for k in range(8)) / 8

    before = held_out()
    for _ in range(60):
        losses = dubber_losses(model, ae, batch, scheduler, config.training, generator=draws)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    after = held_out()
    assert after < before / 4, (before, after)  # measured: 15.8 -> 1.8


def test_save_load_gives_bit_identical_outputs(models, tmp_path: Path) -> None:
    config, ae, model = models
    model.eval()
    torch.nn.init.normal_(model.denoiser.conv_out.weight, std=0.1)
    folder = save_model(tmp_path / "m", config, ae, model)
    loaded = load_model(folder)
    assert loaded.config == config
    batch = tiny_batch(config)
    images = batch["frames"].flatten(0, 1)
    assert torch.equal(loaded.autoencoder.decode(loaded.autoencoder.encode(images)),
                       ae.decode(ae.encode(images)))
    known = ae.encode(images)

    def generate(m: DubbingModel) -> torch.Tensor:
        with torch.no_grad():
            landmarks = complete_landmarks(m.completion, batch["points"], batch["references"],
                                           batch["speech"])
        cond = m.conditioning(landmarks, known[:2])
        return inpaint_lower_half(m.denoiser, known, cond, make_scheduler(config.diffusion), 3,
                                  generator=torch.Generator().manual_seed(1))

    assert torch.equal(generate(loaded.dubber), generate(model))


def test_only_matching_safetensors_are_loaded(models, tmp_path: Path) -> None:
    config, ae, model = models
    pickle_file = tmp_path / "weights.pt"
    torch.save(ae.state_dict(), pickle_file)
    with pytest.raises(ModelError, match=r"only \.safetensors"):
        load_weights(ae, pickle_file)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle_file.read_bytes())
    with pytest.raises(ModelError, match="not a readable safetensors"):
        load_weights(ae, fake)
    folder = save_model(tmp_path / "m", config, ae, model)
    torch.save({"x": torch.zeros(1)}, folder / "extra.pth")
    with pytest.raises(ModelError, match="pickle-format"):
        load_model(folder)
    (folder / "extra.pth").unlink()
    # Weights of other sizes than the config says.
    bigger = tiny_config().replace(denoiser=DenoiserConfig(channels=(16, 48), norm_groups=4,
                                                           head_dim=8, landmark_dim=16))
    bigger.save(folder / "config.json")
    with pytest.raises(ModelError, match="do not match the config"):
        load_model(folder)
    save_weights(ae, tmp_path / "ae.safetensors")
    with pytest.raises(ModelError, match="missing"):
        load_weights(model, tmp_path / "ae.safetensors")


def test_a_config_without_inference_settings_gets_the_defaults(tmp_path: Path) -> None:
    """Model folders written before the inference settings were saved load with today's
    values; a section names only the fields it changes, the rest keep their defaults."""
    old = ModelConfig.named("cpu-128").to_dict()
    del old["inference"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert ModelConfig.load(tmp_path / "config.json").inference == InferenceConfig()
    assert InferenceConfig() == InferenceConfig(AdaptSettings(), CompleteSettings(),
                                                SourceSettings(), NativeSettings())
    partial = ModelConfig.from_dict({**old, "inference": {"complete": {"articulation_gain": 2}}})
    gain = partial.inference.complete.articulation_gain
    assert gain == 2.0 and isinstance(gain, float)  # one value, one fingerprint
    assert partial.inference.complete.pause_seconds == CompleteSettings().pause_seconds
    assert partial.inference.adapt == AdaptSettings()
    assert ModelConfig.from_dict(partial.to_dict()) == partial


@pytest.mark.parametrize(("inference", "named"), [
    ({"adapt": {"steps": -1}}, "inference.adapt.steps must be at least 1"),
    ({"adapt": {"learning_rate": 0}}, "inference.adapt.learning_rate must be above 0"),
    ({"adapt": {"batch": 2.5}}, "inference.adapt.batch must be an integer"),
    ({"complete": {"articulation_gain": 0.0}}, "inference.complete.articulation_gain"),
    ({"complete": {"closed_fraction": 1.5}}, "inference.complete.closed_fraction must be in"),
    ({"complete": {"fade_frames": -1}}, "inference.complete.fade_frames"),
    ({"complete": {"pause_seconds": "long"}}, "inference.complete.pause_seconds must be a"),
    ({"sources": {"narrowing_share": 0}}, "inference.sources.narrowing_share"),
    ({"sources": {"candidates": True}}, "inference.sources.candidates"),
    ({"native": {"max_size": 1}}, "inference.native.max_size must be at least 2"),
    ({"native": {"detail_tolerance": -0.1}}, "inference.native.detail_tolerance"),
    ({"complete": {"gain": 1.5}}, "inference.complete has no field(s) gain"),
    ({"rendering": {}}, "inference has no field(s) rendering"),
    ({"complete": 1.5}, "inference.complete must be an object"),
])
def test_an_inference_setting_out_of_range_or_unknown_is_named(inference: dict,
                                                               named: str) -> None:
    config = {**ModelConfig.named("cpu-128").to_dict(), "inference": inference}
    with pytest.raises(ModelError, match=re.escape(named)) as error:
        ModelConfig.from_dict(config)
    assert "\n" not in str(error.value) and str(error.value).startswith("invalid model config")


def test_inference_settings_are_checked_however_they_are_made() -> None:
    with pytest.raises(ModelError, match=r"inference\.complete\.articulation_gain"):
        CompleteSettings(articulation_gain=-1.0)
    with pytest.raises(ModelError, match=r"inference\.sources\.switch_cost"):
        dataclasses.replace(SourceSettings(), switch_cost=-0.1)
    # The edges of the ranges are allowed: none of a cost, a whole share, one step.
    assert SourceSettings(anchor_preference=0, narrowing_share=1.0).narrowing_share == 1.0
    assert AdaptSettings(steps=1, min_seconds=0).steps == 1
    assert NativeSettings(max_sharpening=0, detail_tolerance=1).max_sharpening == 0.0


def test_shipped_configs() -> None:
    paper = ModelConfig.named("paper-256")
    assert paper.crop_size == 256 and paper.autoencoder.latent_size == 64
    assert paper.denoiser.scales == 4
    assert (paper.completion.frames, paper.completion.references) == (5, 5)
    assert paper.training.l1_weight == 10 and paper.training.learning_rate == 4e-5
    assert paper.diffusion.train_steps == 1000
    cpu = ModelConfig.named("cpu-128")
    assert cpu.crop_size == 128 and cpu.autoencoder.latent_size == 32
    assert ModelConfig.from_dict(cpu.to_dict()) == cpu
    with pytest.raises(ModelError, match="no field"):
        ModelConfig.from_dict({**cpu.to_dict(), "denoiser": {"channelz": [1]}})
    with pytest.raises(ModelError, match="no such config"):
        ModelConfig.named("gpu-9000")
    with pytest.raises(ModelError, match="crop_size"):
        cpu.replace(crop_size=64)



def test_half_precision_model_folder_loads_close(models, tmp_path: Path) -> None:
    config, ae, model = models
    full = save_model(tmp_path / "full", config, ae, model)
    half = save_model(tmp_path / "half", config, ae, model, half=True)
    size = lambda f: sum(p.stat().st_size for p in f.glob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    loaded = load_model(half)
    assert next(loaded.dubber.parameters()).dtype == torch.float32
    images = tiny_batch(config)["frames"].flatten(0, 1)
    assert torch.allclose(loaded.autoencoder.encode(images), ae.encode(images), atol=1e-2)


def test_partial_strength_starts_from_the_init_latent(models) -> None:
    config, ae, model = models
    model.eval()
    batch = tiny_batch(config)
    known = ae.encode(batch["frames"].flatten(0, 1))
    init = ae.encode(batch["reference_image"][:1])
    cond = model.conditioning(batch["points"], known[:2])
    scheduler = make_scheduler(config.diffusion)

    def sample(strength: float, steps: int = 10) -> torch.Tensor:
        return inpaint_lower_half(model.denoiser, known, cond, scheduler, steps,
                                  generator=torch.Generator().manual_seed(0), init=init,
                                  strength=strength)

    light, full = sample(0.1), sample(1.0)
    assert torch.equal(light[:, :, :4], known[:, :, :4])
    assert torch.equal(sample(0.1), light)
    # A light touch stays near the init's lower half; from pure noise it does not.
    near = (light[:, :, 4:] - init[:, :, 4:]).abs().mean()
    assert near < (full[:, :, 4:] - init[:, :, 4:]).abs().mean()
    with pytest.raises(ValueError, match="init"):
        inpaint_lower_half(model.denoiser, known, cond, scheduler, 4, strength=0.5)


def test_strength_starts_at_the_time_nearest_s_t_whatever_the_steps(models) -> None:
    config, ae, model = models
    config = config.replace(diffusion=DiffusionConfig(train_steps=1000))
    batch = tiny_batch(config)
    known = ae.encode(batch["frames"].flatten(0, 1))
    cond = model.conditioning(batch["points"], known[:2])
    scheduler = make_scheduler(config.diffusion)
    seen: list[list[int]] = []

    def denoiser(latent, masked, mask, t, cond):
        seen[-1].append(int(t[0]))
        return torch.zeros_like(latent)

    def times(steps: int, strength: float) -> list[int]:
        seen.append([])
        inpaint_lower_half(denoiser, known, cond, scheduler, steps, init=known,
                           strength=strength, generator=torch.Generator().manual_seed(0))
        return seen[-1]

    for steps in (5, 10, 25, 50):
        run = times(steps, 0.1)
        assert run[0] == 100 and len(run) == max(1, round(steps * 0.1)), (steps, run)
        assert run == sorted(run, reverse=True) and run[-1] >= 1
    assert times(50, 0.1) == [100, 80, 60, 40, 20]  # evenly spaced down to 0
    assert times(10, 0.5) == [500, 400, 300, 200, 100]
    assert times(10, 0.001) == times(5, 0.001) == [1]  # the shipped default: one step at t = 1
    assert times(10, 1.0)[0] == 999 and len(seen[-1]) == 10  # from noise: the whole schedule


def test_sketch_draws_each_line_in_its_channel() -> None:
    from dubtool.nets.sketch import SKETCH_LINES, sketch

    points = torch.full((1, 131, 2), 0.1)  # everything in the top-left corner...
    jaw_start, jaw_end = (int(i) for i in SKETCH_LINES[0][0])
    points[0, jaw_start] = torch.tensor([0.25, 0.75])  # ...but one jaw segment, horizontal
    points[0, jaw_end] = torch.tensor([0.75, 0.75])
    drawing = sketch(points, 32)
    assert drawing.shape == (1, 3, 32, 32)
    row = round(0.75 * 32 - 0.5)
    assert drawing[0, 0, row, 10:22].min() > 0.8          # on the segment
    assert drawing[0, 0, row - 4:row + 5:8, 8:14].max() < 0.01  # 4 pixels off it
    assert drawing[0, 1:, 16:, :].max() < 1e-3             # the lips stayed in the corner


def test_sketch_encoder_starts_at_zero_and_a_plain_model_grows_into_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = tiny_config()
    sketched = plain.replace(denoiser=dataclasses.replace(plain.denoiser, sketch_scale=2))
    base, grown = DubbingModel(plain).eval(), DubbingModel(sketched).eval()
    save_weights(base, tmp_path / "base.safetensors")
    with pytest.raises(ModelError, match="missing"):
        load_weights(grown, tmp_path / "base.safetensors")
    load_weights(grown, tmp_path / "base.safetensors", new_modules=("denoiser.sketch.",))
    torch.nn.init.normal_(base.denoiser.conv_out.weight, std=0.1)
    grown.denoiser.conv_out.load_state_dict(base.denoiser.conv_out.state_dict())
    batch = tiny_batch(sketched)
    latents = torch.randn(6, 4, 8, 8)
    mask = lower_half_mask(8).expand(6, -1, -1, -1)
    t = torch.full((6,), 10)

    def predict(model: DubbingModel) -> torch.Tensor:
        cond = model.conditioning(batch["points"], latents[:2])
        return model.denoiser(latents, latents * (1 - mask), mask, t, cond)

    assert torch.equal(predict(grown), predict(base))  # zero-initialised: same function
    torch.nn.init.normal_(grown.denoiser.sketch.layers[-1].weight, std=0.1)
    moved = batch["points"].clone()
    moved[:, :, 74:] += 0.1  # other lips, same cross-attention input otherwise
    first = predict(grown)
    batch["points"] = moved
    assert not torch.allclose(predict(grown), first)


def test_shipped_model_samples_one_step_from_t_1_by_default() -> None:
    """The shipped default keeps the output it had when strength 0.1 meant the last of 10
    steps: the warped reference noised to t = 1, one denoiser step."""
    from dubtool.api import DEFAULT_MODEL
    from dubtool.nets.io import resolve_model_folder

    diffusion = ModelConfig.load(resolve_model_folder(DEFAULT_MODEL) / "config.json").diffusion
    assert sampling_timesteps(diffusion.train_steps, diffusion.sample_steps,
                              diffusion.strength) == [1]


def test_each_chunk_draws_its_own_noise_whatever_the_batch(models) -> None:
    """With eta > 0, a chunk's result is the same alone or batched with others: its starting
    noise and its noise at every step come from its own generator."""
    config, ae, model = models
    batch = tiny_batch(config)
    known = ae.encode(batch["frames"].flatten(0, 1))  # two chunks of 3 frames
    cond = model.conditioning(batch["points"], known[:2])
    scheduler = make_scheduler(config.diffusion)

    def denoiser(latent, masked, mask, t, cond):  # row by row: no batch effect of its own
        return 0.5 * latent

    def sample(rows: slice, seeds: list[int], eta: float) -> torch.Tensor:
        return inpaint_lower_half(denoiser, known[rows], cond, scheduler, 4, eta=eta,
                                  generator=[torch.Generator().manual_seed(s) for s in seeds])

    both = sample(slice(0, 6), [10, 11], eta=1.0)
    assert torch.equal(both[3:], sample(slice(3, 6), [11], eta=1.0))
    assert torch.equal(both[:3], sample(slice(0, 3), [10], eta=1.0))
    assert not torch.equal(both, sample(slice(0, 6), [10, 11], eta=0.0))  # eta took effect


def _hand_written_ddim(denoiser, known: torch.Tensor, scheduler, steps: int, eta: float,
                       seeds: list[int], init: torch.Tensor, strength: float) -> torch.Tensor:
    """The oracle: the DDIM sampling dubtool wrote by hand before it went through diffusers'
    scheduler interface (Song et al., eq. 12, over ``sampling_timesteps``)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    rows = known.shape[0] // len(generators)

    def noise() -> torch.Tensor:
        return torch.cat([torch.randn((rows, *known.shape[1:]), generator=g) for g in generators])

    mask = lower_half_mask(known.shape[-1])
    masked = known * (1 - mask)
    times = sampling_timesteps(scheduler.config.num_train_timesteps, steps, strength)
    latent = noise()
    if strength < 1.0:
        start = torch.full((known.shape[0],), times[0], dtype=torch.long)
        latent = scheduler.add_noise(init.expand_as(known), latent, start)
    latent = latent * mask + masked
    alphas = scheduler.alphas_cumprod
    for i, t in enumerate(times):
        eps = denoiser(latent, masked, mask, torch.full((known.shape[0],), t), None)
        a_t = float(alphas[t])
        a_prev = float(alphas[times[i + 1]] if i + 1 < len(times)
                       else scheduler.final_alpha_cumprod)
        clean = (latent - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        latent = a_prev ** 0.5 * clean + (1 - a_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            latent = latent + std * noise()
        latent = latent * mask + masked
    return latent


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("strength", "steps"), [(1.0, 4), (1.0, 10), (0.001, 10), (0.4, 10)])
def test_scheduler_sampling_equals_the_hand_written_ddim(strength: float, steps: int,
                                                         eta: float) -> None:
    """Sampling through diffusers' set_timesteps/step/add_noise gives the hand-written DDIM's
    result over the same times (strength 1 at T = 1000, 4 steps: 999, 749, 500, 250, gaps no
    integer num_inference_steps gives), with the same generators, two chunks. Measured: at
    most 7e-7 apart (diffusers' plain DDIM step rule: 2e-3 at 4 steps)."""
    scheduler = make_scheduler(DiffusionConfig(train_steps=1000))
    g = torch.Generator().manual_seed(0)
    known, init = torch.randn(6, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)

    def denoiser(latent, masked, mask, t, cond):  # about the noise's part of the latent at t
        noise_level = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        return noise_level * latent + 0.2 * torch.tanh(latent + masked)

    new = inpaint_lower_half(denoiser, known, None, scheduler, steps, eta=eta,
                             generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
                             init=init, strength=strength)
    old = _hand_written_ddim(denoiser, known, scheduler, steps, eta, [5, 6], init, strength)
    assert torch.equal(new[:, :, :4], known[:, :, :4])
    assert torch.allclose(new, old, atol=1e-5, rtol=0), float((new - old).abs().max())
