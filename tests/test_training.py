"""Data preparation, samplers, augmentation and short training runs (tiny sizes)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_nets import tiny_config
from typer.testing import CliRunner

from dubtool import api
from dubtool.cli import app
from dubtool.errors import DubtoolError, InputNotFound, OutputError
from dubtool.face.indices import MIRROR, ORDER
from dubtool.media.audio import NORMALISED_CLIP, NORMALISED_MEL, feature_window
from dubtool.pipeline import clips as clips_module
from dubtool.pipeline.clips import (
    Augment,
    Clip,
    PreparedData,
    SoundAugment,
    dubber_batch,
    sample_seeds,
    stretched_feature_window,
)
from dubtool.training import dataset as dataset_module
from dubtool.training.dataset import person_of


def test_prepare_splits_by_person(dataset: Path) -> None:
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["crop_size"] == 32
    train, val = info["split"]["train"], info["split"]["val"]
    assert len(train) == 2 and len(val) == 1
    people = info["people"]
    assert not {people[c] for c in train} & {people[c] for c in val}
    clip = PreparedData(dataset, "train").clips[0]
    assert clip.crops.shape == (50, 32, 32, 3) and clip.crops.dtype == np.uint8
    assert clip.points.shape == (50, 131, 2) and clip.detected.all()
    assert ((clip.points > 0) & (clip.points < 1)).all()
    assert clip.features.shape[0] == 80 and abs(clip.features.shape[1] - 160) <= 5  # AAC pads
    assert np.abs(clip.features).max() <= NORMALISED_CLIP  # normalised, not dB


def test_people_file_names_the_person(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "PEOPLE.tsv").write_text("clip\tperson\nx.mp4\tMay\n")
    assert person_of(tmp_path / "clips" / "x.mp4", tmp_path) == "May"
    assert person_of(tmp_path / "clips" / "y.mp4", tmp_path) == "clips"
    assert person_of(tmp_path / "z.mp4", tmp_path) == "z"


def test_prepare_skips_bad_clips_only_and_follows_a_changed_person(
        tmp_path: Path, face_clip: Path, monkeypatch) -> None:
    import dubtool.training.dataset as dataset_module
    from dubtool.errors import CacheError

    videos, out, cache = tmp_path / "videos", tmp_path / "data", tmp_path / "cache"
    videos.mkdir()
    shutil.copy(face_clip, videos / "x.mp4")
    (videos / "broken.mp4").write_bytes(b"not a video" * 50)
    (videos / "PEOPLE.tsv").write_text("x.mp4\tAnna\n")
    status = {r.clip: r.status for r in api.prepare(videos, out, crop_size=32, cache_dir=cache)}
    assert status["broken"].startswith("skipped: ") and "not readable as media" in status["broken"]
    assert PreparedData(out, "train").clips[0].person == "Anna"
    (videos / "PEOPLE.tsv").write_text("x.mp4\tBert\n")
    api.prepare(videos, out, crop_size=32, cache_dir=cache)  # the clip itself is unchanged
    assert PreparedData(out, "train").clips[0].person == "Bert"
    assert json.loads((out / "dataset.json").read_text())["people"]["x"] == "Bert"
    # A busy cache or a bug is not a bad clip: it stops prepare instead of skipping the clip.
    for error in (CacheError("another dubtool run is using this cache entry"),
                  ZeroDivisionError("a bug")):
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(dataset_module, "run_front", failing)
        with pytest.raises(type(error)):
            api.prepare(videos, out, crop_size=32, cache_dir=cache)


def test_prepare_refuses_bad_folders(tmp_path: Path, videos: Path) -> None:
    with pytest.raises(InputNotFound):
        api.prepare(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(OutputError, match="outside"):
        api.prepare(videos, videos / "data")


def test_sampler_draws_successive_frames_and_a_distant_reference(dataset: Path) -> None:
    data = PreparedData(dataset, "train")
    rng = np.random.default_rng(0)
    batch = dubber_batch(data, sample_seeds(rng, 3), frames=5, references=4, motion_frames=2,
                         rng=rng, augment=False, motion_probability=1.0)
    assert batch["frames"].shape == (3, 5, 3, 32, 32)
    assert batch["points"].shape == (3, 5, 131, 2)
    assert batch["references"].shape == (3, 4, 131, 2)
    assert batch["speech"].shape == (3, 5, 80, 16)
    assert batch["reference_image"].shape == (3, 3, 32, 32)
    assert batch["motion"].shape == (3, 2, 3, 32, 32)
    assert batch["frames"].min() >= -1 and batch["frames"].max() <= 1
    # Which frames of the clip each picture is (the clips are copies of one video), found
    # by nearest crop: the sample's frames follow one another, its motion frames come just
    # before them, and its reference is a face frame away from them.
    clip = data.clips[0]
    crops = Augment.none().images(np.asarray(clip.crops))

    def index(image: np.ndarray) -> int:
        return int(np.abs(crops - image).mean(axis=(1, 2, 3)).argmin())

    for b in range(3):
        frames = [index(image) for image in batch["frames"][b]]
        start = frames[0]
        assert frames == list(range(start, start + 5))
        assert [index(image) for image in batch["motion"][b]] == [start - 2, start - 1]
        np.testing.assert_allclose(batch["points"][b], clip.points[start:start + 5], atol=1e-6)
        heard = feature_window(clip.features, start + 2, clip.fps, timing=NORMALISED_MEL)
        np.testing.assert_array_equal(batch["speech"][b][2], heard)
        reference = index(batch["reference_image"][b])
        assert clip.detected[reference] and not start <= reference < start + 5
        assert abs(reference - start) >= 10  # the farthest of a few random face frames
    no_motion = dubber_batch(data, sample_seeds(rng, 2), 5, 4, 2, rng, motion_probability=0.0)
    assert no_motion["motion"].shape == (2, 0, 3, 32, 32)


def test_reference_landmarks_keep_the_gap_from_the_sample_frames(dataset: Path) -> None:
    data = PreparedData(dataset, "train")
    clip = data.clips[0]
    gap = 0.4  # seconds

    def frame_of(points: np.ndarray) -> int:
        return int(np.abs(clip.points - points).sum(axis=(1, 2)).argmin())

    nearest = []
    for with_gap in (gap, 0.0):
        rng = np.random.default_rng(3)
        batch = dubber_batch(data, sample_seeds(rng, 8), frames=5, references=4,
                             motion_frames=0, rng=rng, augment=False, images=False,
                             reference_gap=with_gap)
        distances = []
        for b in range(8):
            start = frame_of(batch["points"][b][0])
            for reference in batch["references"][b]:
                frame = frame_of(reference)
                distances.append(min(abs(frame - start), abs(frame - (start + 4))))
        nearest.append(min(distances))
    assert nearest[0] >= round(gap * float(clip.fps))
    assert nearest[1] < round(gap * float(clip.fps))  # without it, references come close


def test_tempo_plays_points_and_sound_faster_or_slower_alike(monkeypatch) -> None:
    """With ``tempo`` the completion's samples are the clip played at another rate: the
    points step by the rate (interpolated between frames), each frame's mel window is the
    mel read at the rate around that frame's own time, rates spread over 1 / 1.25 .. 1.25;
    without it, the same draws as before."""
    frames, fps = 200, 25
    columns = int(frames / fps * 80) + 8
    ramp = np.arange(frames, dtype=np.float32)
    points = np.repeat(ramp[:, None, None], 131, axis=1).repeat(2, axis=2)
    features = np.tile(np.arange(columns, dtype=np.float32) * 0.001, (80, 1))
    clip = Clip("ramp", "p", fps, np.zeros((0, 0, 0, 3), np.uint8), points,
                np.ones(frames, bool), features)
    data = PreparedData.of_clips([clip])
    monkeypatch.setattr(Augment, "draw", classmethod(lambda cls, rng, strength=1.0: cls.none()))
    monkeypatch.setattr(SoundAugment, "draw", classmethod(lambda cls, rng: cls(0, 0.0, 0.0)))
    rng = np.random.default_rng(0)
    batch = dubber_batch(data, sample_seeds(rng, 32), 25, 3, 0, rng, images=False, tempo=0.25)
    at = batch["points"][:, :, 0, 0]  # the (fractional) clip frame each sample frame is
    rates = np.diff(at, axis=1)
    # A steady rate per sample, within the range.
    np.testing.assert_allclose(rates, np.repeat(rates[:, :1], 24, axis=1), atol=1e-3)
    assert rates.min() >= 1 / 1.25 - 1e-3 and rates.max() <= 1.25 + 1e-3
    assert rates[:, 0].max() - rates[:, 0].min() > 0.2
    middle = (at + 0.5) / fps * 80  # the mel column of each frame's middle
    heard = batch["speech"][:, :, 0, :] / 0.001
    np.testing.assert_allclose(heard[:, :, 8], middle, atol=1e-2)
    np.testing.assert_allclose(heard[:, :, 9] - heard[:, :, 8], np.repeat(rates[:, :1], 25, axis=1),
                               atol=1e-2)
    window = stretched_feature_window(features, 100.0, fps, 2.0)
    np.testing.assert_allclose(window[0] / 0.001, 321.6 + 2.0 * (np.arange(16) - 8), atol=1e-2)
    edge = stretched_feature_window(features, -3.0, fps, 1.0)
    assert (edge[:, :4] == -NORMALISED_CLIP).all()  # before the speech: silence
    plain = dubber_batch(data, sample_seeds(np.random.default_rng(1), 4), 25, 3, 0,
                         np.random.default_rng(1), images=False)
    steps = np.diff(plain["points"][:, :, 0, 0], axis=1)
    assert (steps == 1).all()
    assert clips_module.tempo_rate(np.random.default_rng(2), 0.25) != 1.0


def test_the_validation_takes_no_reference_from_near_a_scored_frame(monkeypatch) -> None:
    """The training's opening validation scores the first frames of a clip and takes the
    completion's reference landmarks a second or more after the last of them; without a gap
    (the offsets' measure, on training clips) from anywhere in the clip."""
    from dubtool.nets.landmark_completion import LandmarkCompletion
    from dubtool.training import dubber as dubber_module

    frames, fps = 120, 25
    rng = np.random.default_rng(0)
    points = rng.uniform(0.2, 0.8, (frames, 131, 2)).astype(np.float32)
    features = np.zeros((80, frames * 4 + 8), np.float32)
    clip = Clip("c", "p", fps, np.zeros((0, 0, 0, 3), np.uint8), points,
                np.ones(frames, bool), features)
    given = []
    real_predict = dubber_module.predict_content

    def recording(completion, track_points, references, *args, **kwargs):
        given.append(np.array([int(np.argmin(np.abs(points - r).sum(axis=(1, 2))))
                               for r in references]))
        return real_predict(completion, track_points, references, *args, **kwargs)

    monkeypatch.setattr(dubber_module, "predict_content", recording)
    completion = LandmarkCompletion(tiny_config().completion)
    mine, real = dubber_module.clip_openings(completion, clip, 500, gap_seconds=1.0)
    scored = len(mine)
    assert len(real) == scored and 50 <= scored <= frames - 25
    assert given[-1].min() >= scored - 1 + 25
    mine, _ = dubber_module.clip_openings(completion, clip, 60, gap_seconds=1.0)
    assert len(mine) == 60 and given[-1].min() >= 60 - 1 + 25
    mine, _ = dubber_module.clip_openings(completion, clip)
    assert len(mine) == frames and given[-1].min() < 25  # spread over the clip
    short = Clip("s", "p", fps, clip.crops, points[:20], np.ones(20, bool), features)
    assert len(dubber_module.clip_openings(completion, short, gap_seconds=1.0)[0]) == 0


def test_flip_moves_points_with_the_image() -> None:
    # A bright dot drawn at the left mouth corner must land on the flipped left-corner point.
    crop = np.zeros((1, 64, 64, 3), np.uint8)
    points = np.full((131, 2), 0.5, np.float32)
    corner = ORDER.index(61)
    points[corner] = (0.25, 0.75)
    crop[0, 48, 16] = 255
    aug = Augment(True, 1.0, (0.0, 0.0), 0.0, 1.0, 1.0)
    image = aug.images(crop)[0].mean(axis=0)
    moved = aug.points(points)
    y, x = np.unravel_index(np.argmax(image), image.shape)
    twin = MIRROR[corner]
    assert np.allclose(moved[twin] * 64, (x + 0.5, y), atol=1.0)
    assert np.allclose(aug.points(moved), points)


def test_scale_and_shift_move_points_with_the_image() -> None:
    crop = np.zeros((1, 64, 64, 3), np.uint8)
    crop[0, 20, 40] = 255
    points = np.full((131, 2), 0.5, np.float32)
    points[0] = (40 / 64, 20 / 64)
    aug = Augment(False, 1.05, (0.03, -0.02), 0.0, 1.0, 1.0)
    image = aug.images(crop)[0].mean(axis=0)
    y, x = np.unravel_index(np.argmax(image), image.shape)
    assert np.allclose(aug.points(points)[0] * 64, (x, y), atol=1.0)


def test_training_runs_checkpoint_and_resume(dataset: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from dubtool.training.autoencoder import train_autoencoder
    from dubtool.training.dubber import train_dubber

    config = tiny_config()
    ae = train_autoencoder(config, dataset, tmp_path / "ae", steps=3, epoch_steps=2,
                           checkpoint_every=2, validation_batches=1)
    assert ae.steps == 3 and (ae.model / "autoencoder.safetensors").is_file()
    assert {"l1", "psnr"} <= set(ae.validation)
    saved = json.loads((ae.model / "config.json").read_text())
    assert saved["autoencoder"]["scaling_factor"] != 1.0  # measured on the crops
    first = train_dubber(config, dataset, ae.model, tmp_path / "dub", steps=2, epoch_steps=2,
                         checkpoint_every=1, validation_batches=1)
    assert first.steps == 2 and {"ldm", "l1", "total"} <= set(first.validation)
    with pytest.raises(OutputError, match="--resume"):
        train_dubber(config, dataset, ae.model, tmp_path / "dub", steps=4)
    resumed = train_dubber(config, dataset, ae.model, tmp_path / "dub", steps=4, resume=True,
                           epoch_steps=2, checkpoint_every=1, validation_batches=1)
    assert resumed.steps == 4
    log = [json.loads(line) for line in (tmp_path / "dub" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "validation" in e] == [2, 4]
    assert (resumed.model / "dubber.safetensors").is_file()
    # The stopped and resumed run equals one that never stopped: weights, optimiser state,
    # random generators and losses.
    whole = train_dubber(config, dataset, ae.model, tmp_path / "whole", steps=4, epoch_steps=2,
                         checkpoint_every=1, validation_batches=1)
    assert whole.validation == resumed.validation
    for name in ("dubber.safetensors", "optimizer.safetensors"):
        ours, theirs = (load_file(str(run / "checkpoint" / name))
                        for run in (tmp_path / "dub", tmp_path / "whole"))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    states = [json.loads((run / "checkpoint" / "state.json").read_text())
              for run in (tmp_path / "dub", tmp_path / "whole")]
    assert states[0] == states[1]
    logs = [[{k: v for k, v in json.loads(line).items() if k != "time"}
             for line in (run / "log.jsonl").read_text().splitlines()]
            for run in (tmp_path / "dub", tmp_path / "whole")]
    # Each start of a run logs its processes and global batch; the rest is the same.
    starts = [e for e in logs[0] if "processes" in e]
    assert [(e["step"], e["processes"], e["global_batch"]) for e in starts] == [(0, 1, 2),
                                                                                  (2, 1, 2)]
    assert [e for e in logs[0] if "processes" not in e] == logs[1][1:]


def _train_tiny_completion(dataset: Path, run: Path, steps: int, batch: int):
    """train_completion of the tiny config on ``dataset``, validating at the end."""
    import dataclasses

    from dubtool.training.dubber import train_completion

    config = tiny_config()
    config = config.replace(training=dataclasses.replace(config.training,
                                                         completion_batch_size=batch))
    return config, train_completion(config, dataset, run, steps=steps, epoch_steps=steps,
                                    validation_batches=1)


def test_completion_pretraining_feeds_the_dubber(dataset: Path, tmp_path: Path) -> None:
    from dubtool.nets.io import load_model, load_weights
    from dubtool.nets.landmark_completion import LandmarkCompletion
    from dubtool.training.autoencoder import train_autoencoder
    from dubtool.training.dubber import COMPLETION_FILE, train_dubber

    config, pre = _train_tiny_completion(dataset, tmp_path / "completion", steps=3, batch=4)
    assert pre.steps == 3 and "l1" in pre.validation
    # Validation follows the lips over the validation people's whole clips.
    assert -1 <= pre.validation["opening_correlation"] <= 1
    assert pre.validation["articulation"] >= 0
    weights = pre.model / COMPLETION_FILE
    ae = train_autoencoder(config, dataset, tmp_path / "ae", steps=1, validation_batches=1)
    dub = train_dubber(config, dataset, ae.model, tmp_path / "dub", steps=1,
                       completion=weights, validation_batches=1)
    trained = load_model(dub.model).dubber.completion
    reference = LandmarkCompletion(config.completion)
    load_weights(reference, weights)
    # One joint step moved it a little from the pre-trained weights, not from a random start.
    drift = [float((a - b).detach().abs().max()) for a, b in
             zip(trained.parameters(), reference.parameters(), strict=True)]
    assert max(drift) < 0.05


def test_cli_prepare_and_train(videos: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    result = runner.invoke(app, ["prepare", str(videos), "-o", str(data), "--crop-size", "128",
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "skipped: 1 clips" in result.stdout
    result = runner.invoke(app, ["train", "dubber", "--data", str(data), "--out",
                                 str(tmp_path / "run")])
    assert result.exit_code == 3 and "--autoencoder" in result.stderr
    result = runner.invoke(app, ["train", "autoencoder", "--data", str(data), "--out",
                                 str(tmp_path / "run"), "--config", "paper-256", "--steps", "1"])
    assert result.exit_code == 4 and "--crop-size 256" in result.stderr


def test_split_by_person_with_heldout_clips_of_training_people() -> None:
    from dubtool.training.dataset import HELDOUT_EVERY, ClipReport, assign_splits

    reports = [ClipReport(f"grid{i}", "grid", 75, 75, "train") for i in range(30)]
    reports += [ClipReport(f"p{i}", f"person{i}", 100, 100, "train") for i in range(9)]
    reports.append(ClipReport("bad", "x", 10, 0, "skipped: face in 0/10 frames"))
    assign_splits(reports, validation_fraction=0.2)
    status = {r.clip: r.status for r in reports}
    assert status["bad"].startswith("skipped")
    val_people = {r.person for r in reports if r.status == "val"}
    assert len(val_people) == 2 and "grid" not in val_people  # the largest stays in training
    heldout = [r.clip for r in reports if r.status == "heldout"]
    assert len(heldout) == 30 // HELDOUT_EVERY and all(c.startswith("grid") for c in heldout)
    assert {r.person for r in reports if r.status == "train"}.isdisjoint(val_people)


def test_learning_rate_decays_over_the_last_steps_and_resumes_on_schedule(
        tmp_path: Path) -> None:
    import torch

    from dubtool.devices import training_processes
    from dubtool.training.loop import RunFolder, TrainState, optimise

    seen: list[float] = []

    def run(resume: bool, killed_at: int | None = None) -> None:
        torch.manual_seed(0)
        layer = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        folder = RunFolder(tmp_path / "run", tiny_config(), resume)
        state = (folder.load({"layer": layer}, optimizer) if resume
                 else TrainState(0, np.random.default_rng(0)))

        def step_losses(rng: np.random.Generator) -> dict[str, torch.Tensor]:
            if len(seen) == killed_at:
                raise KeyboardInterrupt
            seen.append(optimizer.param_groups[0]["lr"])
            return {"total": layer(torch.ones(1, 2)).pow(2).sum()}

        optimise(folder, {"layer": layer}, optimizer, state, 6, step_losses, dict,
                 processes=training_processes("cpu"), batch=1, grad_clip=1.0,
                 epoch_steps=100, checkpoint_every=1, progress=None, decay_steps=4)

    with pytest.raises(KeyboardInterrupt):
        run(resume=False, killed_at=4)
    run(resume=True)
    np.testing.assert_allclose(seen, [0.1, 0.1, 0.1, 0.075, 0.05, 0.025])


def test_sampler_warps_the_reference_onto_each_frame(dataset: Path) -> None:
    data = PreparedData(dataset, "train")
    rng = np.random.default_rng(1)
    batch = dubber_batch(data, sample_seeds(rng, 4), frames=5, references=2, motion_frames=0,
                         rng=rng, warp=True)
    assert batch["warped"].shape == batch["frames"].shape
    assert batch["warped"].min() >= -1 and batch["warped"].max() <= 1
    # Bent onto the frames' landmarks, the reference is nearer the frames than as it was.
    as_was = np.abs(batch["reference_image"][:, None] - batch["frames"]).mean()
    assert np.abs(batch["warped"] - batch["frames"]).mean() < as_was


def test_completion_into_a_model_folder(dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    """train completion --into: RUN/model is the base model with the new completion."""
    import dataclasses

    from dubtool.nets.io import load_model
    from dubtool.training.dubber import train_completion

    base = load_model(tiny_model)
    config = base.config.replace(training=dataclasses.replace(base.config.training,
                                                              completion_batch_size=2))
    run = train_completion(config, dataset, tmp_path / "lc", steps=2, epoch_steps=2,
                           validation_batches=1, into=tiny_model)
    merged = load_model(run.model)
    assert merged.config.completion == config.completion
    base_state, merged_state = base.dubber.state_dict(), merged.dubber.state_dict()
    for name, value in merged_state.items():
        if name.startswith("completion."):
            continue  # trained: moved away from the base's
        assert torch.allclose(value, base_state[name].half().float()), name
    moved = [float((merged_state[k] - base_state[k]).abs().max())
             for k in merged_state if k.startswith("completion.")]
    assert max(moved) > 0


def test_mixed_precision_takes_effect_on_cpu_or_is_refused(tmp_path: Path) -> None:
    import dataclasses

    import torch

    from dubtool.devices import training_processes
    from dubtool.errors import ModelError, UsageError
    from dubtool.training.loop import RunFolder, TrainState, optimise

    def run(precision: str) -> list[bool]:
        layer = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        folder = RunFolder(tmp_path / precision, tiny_config(), False)
        autocasting = []

        def step_losses(rng: np.random.Generator) -> dict[str, torch.Tensor]:
            autocasting.append(torch.is_autocast_enabled("cpu"))
            return {"total": layer(torch.ones(1, 2)).float().pow(2).sum()}

        optimise(folder, {"layer": layer}, optimizer, TrainState(0, np.random.default_rng(0)),
                 2, step_losses, dict, processes=training_processes("cpu", precision), batch=1,
                 grad_clip=1.0, epoch_steps=100, checkpoint_every=100, progress=None)
        return autocasting

    assert run("bf16") == [True, True] and run("no") == [False, False]
    with pytest.raises(UsageError, match=r"fp16 .* needs CUDA"):
        run("fp16")
    training = dataclasses.replace(tiny_config().training, mixed_precision="fp32")
    with pytest.raises(ModelError, match="mixed_precision must be"):
        tiny_config().replace(training=training)


def test_prepare_in_two_shards_and_merge_equals_one_go(videos: Path, tmp_path: Path) -> None:
    """prepare --shard 1/2 and 2/2 (separate folders, as on two machines) + merge gives the
    data set one prepare gives: the same split and byte-identical clip files."""
    import filecmp

    cache = tmp_path / "cache"
    whole = tmp_path / "whole"
    api.prepare(videos, whole, crop_size=32, validation_fraction=0.34, cache_dir=cache)
    parts = [tmp_path / f"part{k}" for k in (1, 2)]
    for k, folder in enumerate(parts, start=1):
        reports = api.prepare(videos, folder, crop_size=32, validation_fraction=0.34,
                              cache_dir=cache, shard=(k, 2))
        assert not (folder / "dataset.json").exists()
        assert (folder / f"shard-{k}-of-2.json").is_file() and len(reports) == 2
    with pytest.raises(DubtoolError, match="do not make one whole"):
        api.merge_shards(parts[:1], tmp_path / "half", validation_fraction=0.34)
    merged = tmp_path / "merged"
    api.merge_shards(parts, merged, validation_fraction=0.34)
    one, two = (json.loads((d / "dataset.json").read_text()) for d in (whole, merged))
    assert one["split"] == two["split"] and one["people"] == two["people"]
    assert one["crop_size"] == two["crop_size"] == 32
    for clip in [c for names in one["split"].values() for c in names]:
        names = sorted(p.name for p in (whole / clip).iterdir())
        assert names == sorted(p.name for p in (merged / clip).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(whole / clip, merged / clip, names, shallow=False)
        assert not mismatch and not errors, clip


def test_cli_offsets_measures_every_training_clip(dataset: Path, tmp_path: Path) -> None:
    from dubtool.training.dubber import COMPLETION_FILE

    _, run = _train_tiny_completion(dataset, tmp_path / "lc", steps=1, batch=2)
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    result = CliRunner().invoke(app, ["offsets", "--data", str(data), "--completion",
                                      str(run.model / COMPLETION_FILE), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    info = json.loads((data / "offsets.json").read_text())
    train = json.loads((data / "dataset.json").read_text())["split"]["train"]
    assert sorted(m["clip"] for m in info["measured"]) == sorted(train)
    assert "written:" in result.stdout
    missing = CliRunner().invoke(app, ["offsets", "--data", str(tmp_path / "none"),
                                       "--completion", str(run.model / COMPLETION_FILE)])
    assert missing.exit_code == 3


def _fake_shards(root: Path, people: int = 4) -> tuple[list[Path], dict[str, bytes]]:
    """Two prepared shards written by hand (a file per clip stands for its arrays)."""
    from dataclasses import asdict

    from dubtool.training.dataset import ClipReport, shard_file

    parts, contents = [root / "part1", root / "part2"], {}
    for k, folder in enumerate(parts, start=1):
        reports = []
        for i in range(k - 1, people, 2):
            name = f"p{i}__clip"
            (folder / name).mkdir(parents=True)
            contents[name] = f"crops of {name}".encode()
            (folder / name / "crops.npy").write_bytes(contents[name])
            reports.append(ClipReport(name, f"p{i}", 50, 50, "train"))
        (folder / shard_file((k, 2))).write_text(json.dumps({
            "crop_size": 32, "source": "videos", "shard": [k, 2],
            "clips": [asdict(r) for r in reports]}))
    return parts, contents


def _clips_in(folder: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in folder.glob("*/crops.npy")}


def test_merge_run_again_or_after_an_interruption_keeps_every_clip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second merge (to change the split) finds the clips the first one moved and keeps
    them; a merge interrupted at any of its renames, then run again, loses nothing."""
    parts, contents = _fake_shards(tmp_path / "again")
    out = tmp_path / "again" / "data"
    api.merge_shards(parts, out, validation_fraction=0.25)
    api.merge_shards(parts, out, validation_fraction=0.5)
    assert _clips_in(out) == contents
    split = json.loads((out / "dataset.json").read_text())["split"]
    assert sorted(c for names in split.values() for c in names) == sorted(contents)

    real_rename = dataset_module.os.rename
    # 2 renames a clip into an empty output; 3 over a clip merged before from an older shard.
    for again, stop in [(False, n) for n in range(8)] + [(True, n) for n in range(12)]:
        root = tmp_path / f"stop{stop}{'again' if again else ''}"
        out = root / "data"
        if again:
            api.merge_shards(_fake_shards(root / "old")[0], out)
        parts, contents = _fake_shards(root)
        for name in contents:  # prepared again: new contents, to replace the merged ones
            contents[name] = b"new " + contents[name]
            for part in parts:
                if (part / name).is_dir():
                    (part / name / "crops.npy").write_bytes(contents[name])
        calls = []

        def rename(src, dst, stop=stop, calls=calls):
            calls.append(dst)
            if len(calls) > stop:
                raise KeyboardInterrupt
            real_rename(src, dst)

        monkeypatch.setattr(dataset_module.os, "rename", rename)
        with pytest.raises(KeyboardInterrupt):
            api.merge_shards(parts, out, validation_fraction=0.25)
        monkeypatch.setattr(dataset_module.os, "rename", real_rename)
        api.merge_shards(parts, out, validation_fraction=0.25)
        assert _clips_in(out) == contents, (again, stop)
        assert not [p for p in out.iterdir() if p.suffix in (".merging", ".replaced")]
    # A clip in neither its shard nor the output: refused, naming it, before anything moves.
    parts, contents = _fake_shards(tmp_path / "lost")
    shutil.rmtree(parts[1] / "p3__clip")
    with pytest.raises(InputNotFound, match="p3__clip"):
        api.merge_shards(parts, tmp_path / "lost" / "data")
    assert len(_clips_in(parts[0]) | _clips_in(parts[1])) == 3


def test_dataset_json_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """A full disk while merge or prepare rewrites dataset.json leaves the earlier one as it
    was (it was written in place) and no scratch file."""
    import errno
    import os

    from dubtool.training.dataset import ClipReport, write_dataset

    def reports(count: int) -> list[ClipReport]:
        return [ClipReport(f"c{i}", f"p{i}", 50, 50, "train") for i in range(count)]

    write_dataset(tmp_path, reports(3), 32, "videos", 0.34)
    before = (tmp_path / "dataset.json").read_bytes()
    assert json.loads(before)["crop_size"] == 32

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_dataset(tmp_path, reports(5), 32, "videos", 0.34)
    assert (tmp_path / "dataset.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.json"]
