"""Fitting a linear landmark completion (``nets.linear_completion``): one weighted ridge
regression over every training frame with a face, in closed form."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from dubtool.nets.config import ModelConfig
from dubtool.nets.io import save_weights, with_completion
from dubtool.nets.linear_completion import LinearCompletion
from dubtool.pipeline.clips import PreparedData, RegressionRows, regression_rows
from dubtool.training.dubber import COMPLETION_FILE, opening_scores
from dubtool.training.loop import RunFolder, TrainResult, load_splits


def training_rows(completion: LinearCompletion, data: PreparedData
                  ) -> tuple[RegressionRows, np.ndarray]:
    """Every frame with a face of ``data``'s clips as rows, and (R,) their weights: each
    person weighs as ``data`` draws people (``PreparedData.person_probability``), shared
    evenly among their frames; the weights average 1."""
    parts, weights = [], []
    for person, probability in zip(data.people, data.person_probability, strict=True):
        clips = [data.clips[i] for i in data.by_person[person]]
        frames = [np.nonzero(clip.detected)[0] for clip in clips]
        total = sum(len(f) for f in frames)
        for clip, chosen in zip(clips, frames, strict=True):
            if len(chosen) < 2:
                continue
            parts.append(regression_rows(completion, clip, chosen))
            weights.append(np.full(len(chosen), probability / total))
    weights = np.concatenate(weights)
    return RegressionRows.concatenate(parts), weights / weights.mean()


def fit_completion(config: ModelConfig, data_dir: str | Path, run_dir: str | Path, *,
                   into: str | Path | None = None) -> TrainResult:
    """Fit ``config``'s linear completion on the training people of ``data_dir`` (penalties
    ``training.completion_speech_ridge`` and ``completion_pose_ridge``, people weighed by
    their footage to the power ``completion_person_exponent``) and score it as
    ``train_completion`` validates. Writes RUN/model/completion.safetensors and its
    config.json; with ``into`` (a model folder), RUN/model is that model with this
    completion."""
    started = time.perf_counter()
    train, val = load_splits(data_dir, config, config.training.completion_person_exponent)
    heldout = PreparedData(data_dir, "heldout", hearing=config.completion)
    run = RunFolder(run_dir, config, resume=False)
    completion = LinearCompletion(config.completion)
    rows, weights = training_rows(completion, train)
    completion.fit(rows.speech, rows.moved, rows.offsets, weights,
                   config.training.completion_speech_ridge,
                   config.training.completion_pose_ridge)
    completion.eval()
    validation = opening_scores(completion, val)
    if heldout.clips:
        validation.update({f"heldout_{k}": v
                           for k, v in opening_scores(completion, heldout).items()})
    seconds = time.perf_counter() - started
    run.log(step=1, frames=len(weights), seconds=round(seconds, 1), **validation)
    model_dir = run.folder / "model"
    model_dir.mkdir(exist_ok=True)
    config.save(model_dir / "config.json")
    save_weights(completion, model_dir / COMPLETION_FILE)
    if into is not None:
        with_completion(into, model_dir / COMPLETION_FILE, config, model_dir)
    return TrainResult(run.folder, model_dir, 1, seconds, validation,
                       sum(p.numel() for p in completion.parameters()), 1, len(weights))
