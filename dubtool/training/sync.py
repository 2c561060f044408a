"""Training the lip-sync expert (``nets.sync_expert``) on a prepared data set.

Each member is trained on its own seed, one after the other. A step draws ``batch_size``
windows, people evenly (a long-recorded speaker weighs as much as a short one), a clip of the
person's, a frame of the clip; each window's motion is scored against its own speech at every
shift of -max_shift..max_shift frames and against the other windows' in-sync speech, and the
loss (InfoNCE) asks for the in-sync speech to score highest among its own and its shifts
beyond ``min_shift``. Samples are mirrored, scaled and noised (points), and noised (speech).

Validation: the pairwise accuracy (``SyncScores.pairwise``) of every window of the validation
clips, pooled and per person; at the end also the ensemble's, of the held-out clips, of a
still mouth (the first frame's points throughout: 0.5 is chance) and of the speech lagging
by ``control_shift`` frames (an out-of-sync video: chance at best, its in-sync cosine no
higher than the shifted ones). RUN/model is the expert's
model folder: config.json, sync_expert.safetensors (float16) and MODEL_CARD.md with these
numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dubtool.devices import resolve_device
from dubtool.errors import InputNotFound
from dubtool.face.indices import CONTENT_SLICE
from dubtool.nets.config import CompletionConfig
from dubtool.nets.speech_encoder import STATE_DIM
from dubtool.nets.sync_expert import (
    TRUNK_MARGIN,
    SyncExpert,
    SyncExpertConfig,
    SyncMember,
    SyncScores,
    frame_speech,
    load_sync_expert,
    mirrored,
    motion_features,
    normalised_points,
    save_sync_expert,
)
from dubtool.pipeline.clips import PreparedData
from dubtool.training.loop import RunFolder, TrainProgress, TrainResult, evaluating

HEARING = CompletionConfig(speech_features="whisper", speech_channels=STATE_DIM)


@dataclass
class SyncClip:
    name: str
    person: str
    points: np.ndarray   # (F, 57, 2) lip/jaw points, crop units
    speech: np.ndarray   # (F, C) per-frame speech states (``frame_speech``), raw


def load_split(data_dir: str | Path, split: str, config: SyncExpertConfig) -> list[SyncClip]:
    """The clips of one split of a prepared data set, with the speech encoder's states."""
    data = PreparedData(data_dir, split, hearing=HEARING)
    return [SyncClip(c.name, c.person, np.asarray(c.points[:, CONTENT_SLICE], np.float32),
                     frame_speech(c.features, len(c.points), c.fps, config, c.offset))
            for c in data.clips]


def score_people(expert: SyncExpert, clips: list[SyncClip], member: int | None = None,
                 still: bool = False, shift: int = 0) -> dict[str, SyncScores]:
    """Person -> the scores of their clips' windows pooled (``still``: the first frame's
    points throughout; ``shift``: the speech lagging the picture by that many frames)."""
    parts: dict[str, list[SyncScores]] = {}
    for clip in clips:
        points, speech = clip.points, clip.speech
        if still:
            points = np.broadcast_to(points[:1], points.shape)
        if shift:
            points, speech = points[shift:], speech[:-shift]
        parts.setdefault(clip.person, []).append(expert.score(points, speech, member))
    return {person: SyncScores.join(p, expert.config) for person, p in parts.items()}


def summary(people: dict[str, SyncScores], config: SyncExpertConfig, prefix: str = ""
            ) -> dict[str, float]:
    """The pooled pairwise accuracy, its mean over the people with windows, the mean cosines
    in sync and shifted, and the windows scored."""
    pooled = SyncScores.join(list(people.values()), config)
    scored = [s.accuracy for s in people.values() if s.windows]
    return {f"{prefix}pairwise": pooled.accuracy,
            f"{prefix}pairwise_per_person": float(np.mean(scored)) if scored else float("nan"),
            f"{prefix}cosine_in_sync": pooled.in_sync,
            f"{prefix}cosine_shifted": pooled.shifted,
            f"{prefix}windows": float(pooled.windows)}


class _Sampler:
    """Training windows: people drawn evenly, then a clip of theirs long enough, then a
    frame; the points normalised per clip and the speech standardised once."""

    def __init__(self, expert: SyncExpert, clips: list[SyncClip]) -> None:
        config = expert.config
        self.config = config
        self.before = config.window // 2 + config.max_shift + TRUNK_MARGIN
        self.after = config.window - config.window // 2 + config.max_shift + TRUNK_MARGIN
        usable = [c for c in clips if len(c.points) >= self.before + self.after + 2]
        if not usable:
            raise InputNotFound(f"no training clip has the {self.before + self.after + 2} "
                                "frames the sync expert's windows need")
        with torch.no_grad():
            self.points = [normalised_points(torch.from_numpy(c.points)).numpy()
                           for c in usable]
            self.speech = [expert.standardised(torch.from_numpy(c.speech)).numpy()
                           for c in usable]
        self.people: dict[str, list[int]] = {}
        for i, clip in enumerate(usable):
            self.people.setdefault(clip.person, []).append(i)
        self.names = sorted(self.people)

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, window + 2 margin, 4P) motion features and (B, span + 2 margin, C) speech:
        the motion's window in sync with the speech's middle one."""
        training, shifts = self.config.training, self.config.max_shift
        motion, speech = [], []
        for _ in range(training.batch_size):
            person = self.names[rng.integers(len(self.names))]
            clip = self.people[person][rng.integers(len(self.people[person]))]
            points, heard = self.points[clip], self.speech[clip]
            frame = int(rng.integers(self.before, len(points) - self.after + 1))
            span = slice(frame - self.before, frame + self.after)
            seen = torch.from_numpy(points[frame - self.before + shifts:
                                           frame + self.after - shifts])
            if rng.random() < training.mirror:
                seen = mirrored(seen)
            seen = seen * float(rng.uniform(1 / training.scale_jitter, training.scale_jitter))
            seen = seen + torch.from_numpy(
                rng.normal(0, training.point_noise, seen.shape).astype(np.float32))
            motion.append(motion_features(seen))
            noise = rng.normal(0, rng.uniform(0, training.speech_noise), heard[span].shape)
            speech.append(torch.from_numpy((heard[span] + noise).astype(np.float32)))
        return torch.stack(motion), torch.stack(speech)


def contrastive_loss(member: SyncMember, motion: torch.Tensor, speech: torch.Tensor,
                     config: SyncExpertConfig) -> torch.Tensor:
    """InfoNCE of B windows (``_Sampler.batch``): each window's motion against its in-sync
    speech (the answer), its own speech shifted by min_shift..max_shift frames either way,
    and the other windows' in-sync speech."""
    seen = member.motion(motion, TRUNK_MARGIN)[:, 0]       # (B, dim)
    heard = member.speech(speech, TRUNK_MARGIN)            # (B, 2 max_shift + 1, dim)
    s, m = config.max_shift, config.min_shift
    chosen = heard[:, np.r_[s, 0:s - m + 1, s + m:2 * s + 1]]
    scale = member.log_scale.exp().clamp(max=100)
    own = torch.einsum("bd,bkd->bk", seen, chosen) * scale
    others = (seen @ heard[:, s].T * scale).masked_fill(
        torch.eye(len(seen), dtype=torch.bool, device=seen.device), float("-inf"))
    answers = torch.zeros(len(seen), dtype=torch.long, device=seen.device)
    return F.cross_entropy(torch.cat([own, others], dim=1), answers)


def _fit_standardisation(expert: SyncExpert, clips: list[SyncClip]) -> None:
    """The speech standardisation of every training frame."""
    frames = np.concatenate([c.speech for c in clips])
    expert.speech_mean.copy_(torch.from_numpy(frames.mean(axis=0)))
    expert.speech_scale.copy_(torch.from_numpy(frames.std(axis=0) + 1e-3))


def train_sync_expert(config: SyncExpertConfig, data_dir: str | Path, run_dir: str | Path,
                      steps: int, *, device: str = "auto", epoch_steps: int = 100,
                      seed: int = 0, command: str = "",
                      progress: TrainProgress | None = None) -> TrainResult:
    """Train ``config.members`` members for ``steps`` steps each (member k from seed
    ``seed`` + k), validating every ``epoch_steps`` steps; write RUN/model (the model
    folder, with a card that quotes ``command``). Returns the ensemble's validation."""
    started = time.perf_counter()
    dev = resolve_device(device)
    train = load_split(data_dir, "train", config)
    if not train:
        raise InputNotFound("the data set has no training clips", data_dir)
    val = load_split(data_dir, "val", config) or train
    heldout = load_split(data_dir, "heldout", config)
    run = RunFolder(run_dir, config, resume=False)
    torch.manual_seed(seed)
    expert = SyncExpert(config)
    _fit_standardisation(expert, train)
    sampler = _Sampler(expert, train)
    expert.to(dev)
    training = config.training
    total = steps * config.members
    for k, member in enumerate(expert.members):
        torch.manual_seed(seed + k)
        rng = np.random.default_rng([seed, k])
        optimizer = torch.optim.AdamW(member.parameters(), lr=training.learning_rate,
                                      weight_decay=training.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, training.learning_rate, total_steps=steps, pct_start=training.warmup)
        member.train()
        for step in range(1, steps + 1):
            motion, speech = sampler.batch(rng)
            loss = contrastive_loss(member, motion.to(dev), speech.to(dev), config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress is not None:
                progress(k * steps + step, total, {"loss": loss.item()})
            if step % epoch_steps == 0 or step == steps:
                with evaluating(member):
                    scores = summary(score_people(expert, val, k), config)
                run.log(member=k, step=step, loss=round(loss.item(), 4),
                        seconds=round(time.perf_counter() - started, 1), **scores)
    expert.eval()
    validation = _final_scores(expert, val, heldout)
    model_dir = save_sync_expert(expert, run.folder / "model")
    shipped = load_sync_expert(model_dir).to(dev)
    validation["float16_pairwise"] = summary(score_people(shipped, val), config)["pairwise"]
    run.log(step=steps, final=True, **validation)
    seconds = time.perf_counter() - started
    (model_dir / "MODEL_CARD.md").write_text(model_card(
        config, data_dir, command, steps, seed, validation,
        {person: s.accuracy for person, s in score_people(expert, val).items()}, seconds))
    return TrainResult(run.folder, model_dir, steps, seconds / total, validation,
                       sum(p.numel() for p in expert.parameters()), 1, training.batch_size)


def control_shift(config: SyncExpertConfig) -> int:
    """Frames the shifted control's speech lags the picture: among the shifts scored, so
    that the true alignment is one of those it is compared with."""
    return (config.min_shift + config.max_shift) // 2


def _final_scores(expert: SyncExpert, val: list[SyncClip], heldout: list[SyncClip]
                  ) -> dict[str, float]:
    config = expert.config
    out = summary(score_people(expert, val), config)
    out.update(summary(score_people(expert, val, still=True), config, "still_"))
    out.update(summary(score_people(expert, val, shift=control_shift(config)), config, "shifted_"))
    out.update(summary(score_people(expert, heldout), config, "heldout_"))
    for k in range(config.members):
        out[f"member{k}_pairwise"] = summary(score_people(expert, val, k), config)["pairwise"]
    return out


def model_card(config: SyncExpertConfig, data_dir: str | Path, command: str, steps: int,
               seed: int, results: dict[str, float], people: dict[str, float],
               seconds: float) -> str:
    """The expert's MODEL_CARD.md: data, command, the validation and the controls, limits."""
    def f(name: str) -> str:
        return f"{results[name]:.3f}"

    def row(label: str, prefix: str = "") -> str:
        return (f"| {label} | {f(prefix + 'pairwise')} ({f(prefix + 'pairwise_per_person')}) | "
                f"{f(prefix + 'cosine_in_sync')} / {f(prefix + 'cosine_shifted')} | "
                f"{results[prefix + 'windows']:.0f} |")

    members = ", ".join(f(f"member{k}_pairwise") for k in range(config.members))
    people_rows = "\n".join(f"| {person} | {value:.3f} |"
                            for person, value in sorted(people.items()))
    shifts = f"{config.min_shift}..{config.max_shift}"
    return f"""# Lip-sync expert

Scores whether lip/jaw motion goes with speech (`dubtool/nets/sync_expert.py`): two small
convolutional encoders, one of the 57 lip/jaw points (normalised per clip, with their
frame-to-frame change), one of Whisper tiny.en's encoder states (one per frame: the mean of
{config.speech_steps} states {config.speech_lead} states after the frame), embed windows of
{config.window} frames; trained contrastively (InfoNCE) so that a window's in-sync speech
scores above the same clip's speech shifted by {shifts} frames. An ensemble of
{config.members} members trained from seeds {seed}..{seed + config.members - 1}, their
cosines averaged. `dubtool eval` reports its score as `sync_expert`.

**Data.** The prepared data set `{data_dir}`: the training split's clips (people drawn
evenly), scored on the validation split (its own people) and the held-out split.

**Training.** `{command or 'dubtool train sync'}`: {steps} steps a member, batch
{config.training.batch_size}, {seconds / 60:.1f} min in all on this machine.

## Results

Pairwise accuracy: the share of (window, shift) pairs, |shift| in {shifts} frames, in which
the in-sync speech scores higher than the shifted one (ties half; 0.5 is chance), pooled over
every window and, in brackets, the mean over the people.

| scored | pairwise accuracy | mean cosine in sync / shifted | windows |
|---|---|---|---|
{row("validation, ensemble")}
| validation, each member | {members} | | |
| validation, float16 weights as shipped | {f('float16_pairwise')} | | |
{row("still mouth (the first frame's points throughout)", "still_")}
{row(f"speech {control_shift(config)} frames late", "shifted_")}
{row("held-out clips", "heldout_")}

Per validation person:

| person | pairwise accuracy |
|---|---|
{people_rows}

## Limits

- The window (1.5 s), the sizes and the augmentations were chosen on these validation
  people themselves: there is no separate test set, so the numbers above flatter it.
- Seeds vary by a few points of accuracy; the ensemble is steadier than any one member.
- A window needs {config.span} frames with a face in a row (the window and every shift):
  shorter runs are not scored.
- It learned from the points of the face tracker that prepared the data (smoothed over
  time); FaceMesh's raw points of a rendered frame are noisier.
- A still mouth that follows the head (eval's static variant) is not the still control
  above: the head's motion is normalised like a mouth's, and it scores off chance.
"""
