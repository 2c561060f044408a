"""Clips of a prepared data set and the samplers that draw training windows from them:
what training and the per-video adaptation (``pipeline.adapt``) share.

A prepared data set (``training.dataset.prepare``) is a folder with ``dataset.json`` (crop
size, clips, people, split) and one folder per clip holding
    crops.npy     (F, S, S, 3) uint8   face crops at the stable crop box of each frame
    points.npy    (F, 131, 2) float32  the 131 points normalised to the crop
    detected.npy  (F,) bool            whether the face was found in the frame
    mel.npy       (80, T) float32      log-mel of the clip's own speech
    whisper.npy   (384, T) float16     the speech encoder's states of it (nets.speech_encoder)
    meta.json                          fps, source video, person
Crops are stored uncompressed so that training memory-maps them instead of loading all.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import torch

from dubtool.errors import InputNotFound
from dubtool.face.indices import CONTENT_SLICE, POSE_SLICE, mirror_points
from dubtool.face.warp import warp_face
from dubtool.media.audio import (
    MEL_WINDOW,
    NORMALISED_CLIP,
    NORMALISED_MEL,
    FeatureTiming,
    feature_window,
    normalise_mel,
)
from dubtool.nets.config import CompletionConfig
from dubtool.nets.linear_completion import LinearCompletion
from dubtool.pipeline.crops import load_crops
from dubtool.pipeline.plan import gap_frames

DATASET_FILE = "dataset.json"
OFFSETS_FILE = "offsets.json"  # measured audio-video offsets (training.offsets)
STATES_FILE = "whisper.npy"  # the speech encoder's states of a clip's sound


# -- reading a prepared data set -----------------------------------------------------------


@dataclass
class Clip:
    name: str
    person: str
    fps: Fraction
    crops: np.ndarray      # (F, S, S, 3) uint8, memory-mapped
    points: np.ndarray     # (F, 131, 2)
    detected: np.ndarray   # (F,)
    # (C, T) what the model hears: the log-mel normalised per utterance, or the speech
    # encoder's states
    features: np.ndarray
    offset: int = 0        # frames the picture lags the sound: frame f hears f - offset

    @classmethod
    def load(cls, folder: Path, speech_features: str = "mel") -> Clip:
        """The clip in ``folder``, hearing ``speech_features`` ("mel" or "whisper")."""

        meta = json.loads((folder / "meta.json").read_text())
        if speech_features == "whisper":
            if not (folder / STATES_FILE).is_file():
                raise InputNotFound(f"has no speech encoder states ({STATES_FILE}): run "
                                    "'dubtool prepare' again to add them", folder)
            features = np.load(folder / STATES_FILE).astype(np.float32)
        else:
            features = normalise_mel(np.load(folder / "mel.npy"))
        return cls(folder.name, meta["person"], Fraction(meta["fps"]),
                   load_crops(folder), np.load(folder / "points.npy"),
                   np.load(folder / "detected.npy"), features)

    def runs(self, length: int, before: int = 0) -> np.ndarray:
        """Start indices s such that frames s-before .. s+length-1 all hold a face."""
        ok = self.detected.astype(np.int64)
        span = length + before
        if len(ok) < span:
            return np.zeros(0, np.int64)
        window = np.convolve(ok, np.ones(span, np.int64), mode="valid")
        return np.nonzero(window == span)[0] + before


class PreparedData:
    """The clips of one split, with a sampler that picks people evenly, or by their footage
    to the power ``person_exponent`` (0: evenly; 1: by frames, as if every clip were one).
    The audio-video offsets of OFFSETS_FILE are applied (clips it drops are left out) unless
    ``ignore_offsets``. Samples hear the speech features of ``hearing`` (a completion's
    config: which features, how many steps a frame, when; default the mel's)."""

    def __init__(self, folder: str | Path, split: str, person_exponent: float = 0.0,
                 ignore_offsets: bool = False, hearing: CompletionConfig | None = None
                 ) -> None:
        self.folder = Path(folder)
        self.hearing = hearing or CompletionConfig()
        info_path = self.folder / DATASET_FILE
        if not info_path.is_file():
            raise InputNotFound("not a prepared data set (no dataset.json): run "
                                "'dubtool prepare' first", self.folder)
        info = json.loads(info_path.read_text())
        self.crop_size = info["crop_size"]
        names = info["split"].get(split, [])
        offsets_path = self.folder / OFFSETS_FILE
        offsets = (json.loads(offsets_path.read_text())
                   if offsets_path.is_file() and not ignore_offsets else {})
        dropped = set(offsets.get("dropped", []))
        clips = [Clip.load(self.folder / name, self.hearing.speech_features) for name in names
                 if name not in dropped]
        for clip in clips:
            clip.offset = int(offsets.get("applied", {}).get(clip.name, 0))
        self._index(clips, person_exponent)

    @classmethod
    def of_clips(cls, clips: list[Clip], crop_size: int = 0,
                 hearing: CompletionConfig | None = None) -> PreparedData:
        """A sampler over clips already in memory (people drawn evenly), not a folder."""
        data = cls.__new__(cls)
        data.folder, data.crop_size = None, crop_size
        data.hearing = hearing or CompletionConfig()
        data._index(clips, 0.0)
        return data

    def _index(self, clips: list[Clip], person_exponent: float) -> None:
        self.clips = clips
        self.by_person: dict[str, list[int]] = {}
        for i, clip in enumerate(self.clips):
            self.by_person.setdefault(clip.person, []).append(i)
        self.people = sorted(self.by_person)
        frames = np.array([sum(len(self.clips[i].detected) for i in self.by_person[p])
                           for p in self.people], np.float64)
        weights = frames ** person_exponent
        self.person_probability = weights / weights.sum() if len(weights) else weights

    def pick_clip(self, rng: np.random.Generator, usable: Callable[[Clip], bool] = lambda c: True
                  ) -> Clip:
        """A clip of a person drawn by ``person_probability`` (uniform by default, so that one
        long-recorded speaker cannot dominate), then a clip of theirs uniformly."""
        for _ in range(100):
            person = self.people[rng.choice(len(self.people), p=self.person_probability)]
            clips = self.by_person[person]
            clip = self.clips[clips[rng.integers(len(clips))]]
            if usable(clip):
                return clip
        raise ValueError("no clip in the data set has enough frames with a face")


# -- augmentation ---------------------------------------------------------------------------


@dataclass
class Augment:
    """One random augmentation, applied alike to every image and point set of a sample."""

    flip: bool
    scale: float
    shift: tuple[float, float]
    brightness: float
    contrast: float
    saturation: float

    @classmethod
    def draw(cls, rng: np.random.Generator, strength: float = 1.0) -> Augment:
        s = strength
        return cls(flip=bool(rng.random() < 0.5 * s), scale=float(1 + rng.uniform(-0.05, 0.05) * s),
                   shift=(float(rng.uniform(-0.03, 0.03) * s), float(rng.uniform(-0.03, 0.03) * s)),
                   brightness=float(rng.uniform(-0.1, 0.1) * s),
                   contrast=float(1 + rng.uniform(-0.15, 0.15) * s),
                   saturation=float(1 + rng.uniform(-0.2, 0.2) * s))

    @classmethod
    def none(cls) -> Augment:
        return cls(False, 1.0, (0.0, 0.0), 0.0, 1.0, 1.0)

    def _matrix(self, size: int) -> np.ndarray:
        # Scale about the centre, then shift; in pixel units of the crop.
        c = size / 2
        return np.array([[self.scale, 0, c - self.scale * c + self.shift[0] * size],
                         [0, self.scale, c - self.scale * c + self.shift[1] * size]], np.float64)

    def images(self, crops: np.ndarray) -> np.ndarray:
        """(K, S, S, 3) uint8 -> (K, 3, S, S) float32 in [-1, 1]."""
        size = crops.shape[1]
        out = np.empty((len(crops), 3, size, size), np.float32)
        m = self._matrix(size)
        for k, crop in enumerate(crops):
            img = crop[:, ::-1] if self.flip else crop
            if self.scale != 1.0 or self.shift != (0.0, 0.0):
                img = cv2.warpAffine(np.ascontiguousarray(img), m, (size, size),
                                     flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            x = img.astype(np.float32) / 127.5 - 1.0
            grey = x.mean(axis=2, keepdims=True)
            x = grey + (x - grey) * self.saturation
            x = (x - x.mean()) * self.contrast + x.mean() + self.brightness
            out[k] = np.clip(x, -1, 1).transpose(2, 0, 1)
        return out

    def points(self, points: np.ndarray) -> np.ndarray:
        """(..., 131, 2) crop-normalised points moved like the images."""
        p = mirror_points(points) if self.flip else points
        p = (p - 0.5) * self.scale + 0.5 + np.array(self.shift, np.float32)
        return p.astype(np.float32)


@dataclass
class SoundAugment:
    """One random change of the normalised mel, alike for every window of a sample, so that
    the model hears the words rather than the voice: a shift along the mel bins (another
    pitch and vocal tract), a spectral tilt (another microphone or room) and noise."""

    bin_shift: int
    tilt: float
    noise: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SoundAugment:
        return cls(int(rng.integers(-3, 4)), float(rng.uniform(-0.6, 0.6)),
                   float(rng.uniform(0.0, 0.3)))

    def apply(self, mel: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(..., bins, steps) normalised mel -> the same shape, changed."""
        bins = mel.shape[-2]
        index = np.clip(np.arange(bins) - self.bin_shift, 0, bins - 1)
        out = mel[..., index, :] + self.tilt * (np.linspace(-1, 1, bins)[:, None])
        out = out + rng.normal(0.0, self.noise, out.shape)
        return np.clip(out, -NORMALISED_CLIP, NORMALISED_CLIP).astype(np.float32)


@dataclass
class StateNoise:
    """Gaussian noise on the speech encoder's states (whose voice invariance the encoder
    already learned: no pitch or tilt to fake), alike in size for every window of a sample."""

    noise: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> StateNoise:
        return cls(float(rng.uniform(0.0, 0.3)))

    def apply(self, states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal(states.shape, dtype=np.float32)
        noise *= self.noise
        return noise + states


# -- samples --------------------------------------------------------------------------------


def sample_seeds(rng: np.random.Generator, batch: int, part: tuple[int, int] = (0, 1)
                 ) -> list[int]:
    """The seeds of one process's samples of a global batch: ``batch`` samples for each of
    ``part[1]`` processes drawn from the generator they all share (every process advances it
    alike), of which process ``part[0]`` takes its own ``batch``. A sample follows from its
    seed alone, so N processes at batch B draw what one process draws at batch N x B."""
    rank, processes = part
    seeds = rng.integers(0, 2**63 - 1, size=batch * processes)
    return [int(s) for s in seeds[rank * batch:(rank + 1) * batch]]


def autoencoder_batch(data: PreparedData, seeds: Sequence[int], augment: bool = True
                      ) -> np.ndarray:
    """(len(seeds), 3, S, S) face crops in [-1, 1], one per seed, people drawn evenly."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        clip = data.pick_clip(rng, lambda c: bool(c.detected.any()))
        frame = rng.choice(np.nonzero(clip.detected)[0])
        aug = Augment.draw(rng) if augment else Augment.none()
        out.append(aug.images(clip.crops[frame:frame + 1])[0])
    return np.stack(out)


@dataclass
class DubberSample:
    """One batched-sequential sample: L successive frames of one clip.

    frames (L, 3, S, S); points (L, 131, 2); references (N, 131, 2); speech (L, C, W): each
    frame's window of the clip's speech features;
    reference_image (1, 3, S, S); motion (M, 3, S, S), M may be 0; warped (L, 3, S, S): the
    reference image bent onto each frame's points (only when asked for). Without images, the
    picture arrays are empty.
    """

    frames: np.ndarray
    points: np.ndarray
    references: np.ndarray
    speech: np.ndarray
    reference_image: np.ndarray
    motion: np.ndarray
    warped: np.ndarray


def tempo_rate(rng: np.random.Generator, tempo: float) -> float:
    """A playback rate drawn log-uniformly between 1 / (1 + ``tempo``) and 1 + ``tempo``."""
    return float(np.exp(rng.uniform(-np.log1p(tempo), np.log1p(tempo))))


def interpolate_frames(points: np.ndarray, at: np.ndarray) -> np.ndarray:
    """(len(at), ...) ``points`` (F, ...) at the fractional frames ``at``, linearly."""
    low = np.clip(np.floor(at).astype(np.int64), 0, len(points) - 1)
    high = np.clip(low + 1, 0, len(points) - 1)
    part = (at - low).reshape(-1, *([1] * (points.ndim - 1)))
    return ((1 - part) * points[low] + part * points[high]).astype(np.float32)


def stretched_feature_window(features: np.ndarray, frame: float, fps: Fraction | float,
                             rate: float, width: int = MEL_WINDOW,
                             timing: FeatureTiming = NORMALISED_MEL) -> np.ndarray:
    """(C, width) the window ``feature_window`` gives of ``features`` (C, T) played ``rate``
    times as fast, centred on the middle of the fractional video frame ``frame``: its columns
    are ``rate`` columns apart, interpolated linearly (``timing.silence`` outside the
    speech)."""
    middle = (frame + 0.5) / float(fps) * timing.rate - timing.centre
    at = middle + rate * (np.arange(width) - width // 2)
    low = np.floor(at).astype(np.int64)
    part = (at - low)[None]
    columns = features.shape[1]

    def column(index: np.ndarray) -> np.ndarray:
        inside = (index >= 0) & (index < columns)
        out = np.full((features.shape[0], len(index)), timing.silence, np.float32)
        out[:, inside] = features[:, index[inside]]
        return out

    return ((1 - part) * column(low) + part * column(low + 1)).astype(np.float32)


def dubber_sample(data: PreparedData, frames: int, references: int, motion_frames: int,
                  rng: np.random.Generator, augment: bool = True,
                  images: bool = True, warp: bool = False, tempo: float = 0.0,
                  reference_gap: float = 0.0) -> DubberSample:
    """Draw one sample of ``frames`` successive frames, with the ``motion_frames`` before them.

    The reference image comes from the frame farthest in time among a few random candidates,
    so that the model cannot copy the target's mouth from it. ``images=False`` leaves out
    the pictures (empty arrays), for training the landmark completion alone; then, with
    ``augment``, ``tempo`` > 0 plays the clip at a rate drawn by ``tempo_rate``.
    ``reference_gap`` (seconds): the reference landmark sets come from frames at least that far
    from the sample's frames where the clip has any, as at inference, where no reference lies
    near the frames it helps draw; without a gap, a reference a frame away tells the mouth.
    """
    # A tempo other than 1 reads the clip faster or slower (points and sound alike): the
    # frames then span ``need`` of the clip's frames.
    rate = tempo_rate(rng, tempo) if augment and tempo > 0 and not images else 1.0
    need = frames if rate == 1.0 else int(np.ceil((frames - 1) * rate)) + 2
    clip = data.pick_clip(rng, lambda c: len(c.runs(need, motion_frames)) > 0)
    start = int(rng.choice(clip.runs(need, motion_frames)))
    span = np.arange(start, start + need)
    faces = np.nonzero(clip.detected)[0]
    others = np.setdiff1d(faces, span)
    if len(others) == 0:
        others = faces
    gap = gap_frames(reference_gap, clip.fps)
    far = others[(others < start - gap) | (others >= start + need + gap)]
    candidates = rng.choice(others, size=min(8, len(others)), replace=False)
    reference_frame = int(candidates[np.argmax(np.abs(candidates - start))])
    pool = far if len(far) else others
    reference_sets = rng.choice(pool, size=references, replace=len(pool) < references)
    aug = Augment.draw(rng) if augment else Augment.none()
    width, timing = data.hearing.speech_window, data.hearing.speech_timing
    if rate == 1.0:
        speech = np.stack([feature_window(clip.features, int(i) - clip.offset, clip.fps, width,
                                          timing) for i in span])
        points = clip.points[span]
    else:
        at = start + rate * np.arange(frames)
        speech = np.stack([stretched_feature_window(clip.features, t - clip.offset, clip.fps,
                                                    rate, width, timing) for t in at])
        points = interpolate_frames(clip.points, at)
    if augment:
        sound = SoundAugment if data.hearing.speech_features == "mel" else StateNoise
        speech = sound.draw(rng).apply(speech, rng)
    none = np.zeros((0, 3, data.crop_size, data.crop_size), np.float32)
    pictures = (lambda first, stop: aug.images(clip.crops[first:stop])) if images else (
        lambda first, stop: none)
    points = aug.points(points)
    reference_image = pictures(reference_frame, reference_frame + 1)
    warped = none
    if images and warp:
        face = np.ascontiguousarray(reference_image[0].transpose(1, 2, 0))
        reference_points = aug.points(clip.points[reference_frame])
        warped = np.stack([warp_face(face, reference_points, p).transpose(2, 0, 1)
                           for p in points])
    return DubberSample(
        frames=pictures(span[0], span[-1] + 1),
        points=points,
        references=aug.points(clip.points[reference_sets]),
        speech=speech.astype(np.float32),
        reference_image=reference_image,
        motion=pictures(start - motion_frames, start),
        warped=warped,
    )


def dubber_batch(data: PreparedData, seeds: Sequence[int], frames: int, references: int,
                 motion_frames: int, rng: np.random.Generator, augment: bool = True,
                 motion_probability: float = 0.5, images: bool = True,
                 warp: bool = False, tempo: float = 0.0,
                 reference_gap: float = 0.0) -> dict[str, np.ndarray]:
    """One sample per seed, stacked on a new first axis. Half of the batches (by default)
    carry motion frames, so that the model learns both the first chunk of a video and the next
    ones: drawn from ``rng``, which the processes of a run share, so that all the parts of a
    global batch agree. ``warp`` adds "warped" (B, L, 3, S, S): each sample's reference bent
    onto its frames. ``reference_gap``: as for ``dubber_sample``.
    """
    motion = motion_frames if rng.random() < motion_probability else 0
    samples = [dubber_sample(data, frames, references, motion, np.random.default_rng(seed),
                             augment, images, warp, tempo, reference_gap)
               for seed in seeds]
    names = ["frames", "points", "references", "speech", "reference_image", "motion"]
    batch = {name: np.stack([getattr(s, name) for s in samples])
             for name in names + (["warped"] if warp else [])}
    if images:  # one reference picture per sample: (B, 3, S, S)
        batch["reference_image"] = batch["reference_image"][:, 0]
    return batch


# -- rows of a linear completion's regression ----------------------------------------------


@dataclass
class RegressionRows:
    """R frames as a linear completion's regression sees them (``LinearCompletion.fit``):
    speech (R, Ds) pooled windows, moved (R, 148) the pose's offset from the clip's mean pose,
    offsets (R, 57, 2) the lip/jaw points' offset from the clip's mean lip/jaw."""

    speech: np.ndarray
    moved: np.ndarray
    offsets: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[RegressionRows]) -> RegressionRows:
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("speech", "moved", "offsets")))


def regression_rows(completion: LinearCompletion, clip: Clip, frames: np.ndarray,
                    chunk: int = 256) -> RegressionRows:
    """The rows of ``clip``'s ``frames`` (indices of frames with a face), the means taken over
    those frames (a person's mean mouth and pose, as a completion's many references give
    it). The windows are pooled ``chunk`` frames at a time: memory stays flat in the clip's
    length."""
    config = completion.config
    width, timing = config.speech_window, config.speech_timing
    points = clip.points[frames]
    pose, content = points[:, POSE_SLICE], points[:, CONTENT_SLICE]
    speech = []
    for start in range(0, len(frames), chunk):
        windows = np.stack([feature_window(clip.features, int(i) - clip.offset, clip.fps,
                                           width, timing)
                            for i in frames[start:start + chunk]])
        speech.append(completion.pooled_speech(torch.from_numpy(windows)).numpy())
    return RegressionRows(np.concatenate(speech).astype(np.float64),
                          (pose - pose.mean(axis=0)).reshape(len(frames), -1).astype(np.float64),
                          (content - content.mean(axis=0)).astype(np.float64))
