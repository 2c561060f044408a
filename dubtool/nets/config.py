"""Model dimensions and settings: dataclasses saved with the weights as config.json.

One ModelConfig describes a whole dubbing model: the autoencoder, the landmark completion
transformer, the denoiser U-Net (with its appearance encoder), the diffusion schedule, the
training settings and the inference settings its quality was measured with (``inference``:
read by the pipeline's stages and part of their fingerprints), plus the crop size and the
landmark order the weights were trained with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dubtool.errors import ModelError
from dubtool.face.indices import NUM_CONTENT, NUM_POINTS, NUM_POSE, ORDER
from dubtool.media.audio import MEL_WINDOW, N_MELS, NORMALISED_MEL, FeatureTiming
from dubtool.nets.speech_encoder import ENCODER_STATES, STATE_DIM
from dubtool.options import DEFAULT_SYNC_EXPERT, MIXED_PRECISIONS


def _models_dir() -> Path:
    """The shipped configs and models: ``models/`` at the top of a checkout (an editable
    install reads them there), ``dubtool/models`` inside an installed wheel (pyproject's
    package-dir puts them there)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "models"
    return installed if installed.is_dir() else package.parent / "models"


MODELS_DIR = _models_dir()
CONFIGS_DIR = MODELS_DIR / "configs"
# CompletionConfig.speech_features: each front end's channels and timing.
SPEECH_CHANNELS = {"mel": N_MELS, "whisper": STATE_DIM}
SPEECH_TIMING = {"mel": NORMALISED_MEL, "whisper": ENCODER_STATES}
# CompletionConfig.kind: the landmark completion's network (``nets.completions``).
COMPLETION_KINDS = ("transformer", "linear")
# Model folders written before the speech features could be chosen name them so.
LEGACY_COMPLETION_FIELDS = {"mel_bins": "speech_channels", "mel_window": "speech_window"}


@dataclass(frozen=True)
class AutoencoderConfig:
    """KL autoencoder on face crops; each entry of ``channels`` after the first halves the side."""

    image_size: int = 128
    latent_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    norm_groups: int = 16
    # Latents are multiplied by this before diffusion (1 / their standard deviation, measured
    # on the training crops once the autoencoder is trained).
    scaling_factor: float = 1.0

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsampling


@dataclass(frozen=True)
class CompletionConfig:
    """Audio -> lip/jaw landmarks (paper III-B): a transformer, or a linear map of the speech
    encoder's states fitted by ridge regression (``kind`` "linear": of the fields below it
    reads ``window``, ``references`` and the speech and point counts only)."""

    kind: str = "transformer"
    frames: int = 5          # L successive frames predicted together in joint training
    window: int = 25         # frames the completion sees at once on its own and at inference
    references: int = 5      # N reference full-face landmark sets
    d_model: int = 128
    layers: int = 3
    heads: int = 4
    ff_dim: int = 512
    dropout: float = 0.1
    # What the completion hears: "mel" (the per-utterance normalised log-mel, 80 bins at 80
    # steps a second) or "whisper" (Whisper tiny.en's encoder states, 384 at 50 a second:
    # nets.speech_encoder); speech_channels must be that front end's.
    speech_features: str = "mel"
    speech_channels: int = N_MELS
    speech_window: int = MEL_WINDOW  # steps of the features heard per frame (0.2 s of mel)
    speech_lead: int = 0  # steps the window's middle lies after the frame's (mouths lead sounds)
    speech_reduce: int = 0  # > 0: channels the features are first reduced to, at half the rate
    # > 0: instead of convolutions, the window's features are averaged over runs of this many
    # steps and read by one linear layer (a speech path of a linear probe's capacity)
    speech_pool: int = 0
    pose_points: int = NUM_POSE
    content_points: int = NUM_CONTENT

    @property
    def speech_timing(self) -> FeatureTiming:
        """How the features this completion hears line up with the video's frames: the
        front end's timing, each frame's window ``speech_lead`` steps later."""
        timing = SPEECH_TIMING[self.speech_features]
        return dataclasses.replace(timing, centre=timing.centre - self.speech_lead)


@dataclass(frozen=True)
class DenoiserConfig:
    """Lower-half inpainting U-Net with TalkFormer blocks at scales 2..I (paper III-C)."""

    latent_channels: int = 4
    channels: tuple[int, ...] = (64, 128, 128)   # one entry per scale: I = len(channels)
    layers_per_scale: int = 1
    norm_groups: int = 16
    head_dim: int = 32
    landmark_dim: int = 128      # size of the landmark embeddings used as keys/values
    landmark_points: int = NUM_POINTS
    temporal_attention: bool = True
    motion_frames: int = 2       # frames of the previous chunk seen by temporal attention
    sketch_scale: int = 0        # landmark sketch pixels per latent cell (power of 2); 0 = none

    @property
    def scales(self) -> int:
        return len(self.channels)


@dataclass(frozen=True)
class DiffusionConfig:
    train_steps: int = 1000      # T
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    sample_steps: int = 25       # DDIM steps at inference
    eta: float = 0.0
    strength: float = 1.0        # S < 1: start from the warped reference noised to ~S x T


@dataclass(frozen=True)
class TrainingConfig:
    learning_rate: float = 2e-4
    autoencoder_learning_rate: float = 5e-4
    batch_size: int = 4          # samples of L frames each
    autoencoder_batch_size: int = 16
    autoencoder_patch: int = 64  # side of the random patches it trains on (0: whole crops)
    l1_weight: float = 10.0      # lambda of L_total = L_ldm + lambda * L1
    completion_learning_rate: float = 5e-4  # pre-training the landmark completion alone
    completion_batch_size: int = 64
    # Completion loss = point L1 + these times the L1 of the lip gaps, of the points'
    # frame-to-frame motion and of the gaps' spread over time (training.dubber): point L1
    # alone is dominated by the jaw and outer lips and rewards a mouth that hardly moves.
    opening_weight: float = 2.0
    velocity_weight: float = 2.0
    spread_weight: float = 2.0
    correlation_weight: float = 0.0
    # The completion draws training people by footage ** this (0: evenly): speech-to-lip
    # mapping gains from every minute of speech, unlike the appearance the dubber learns.
    completion_person_exponent: float = 0.0
    # The completion hears its training clips played at rates from 1 / (1 + tempo) to
    # 1 + tempo (points and sound alike), so that it learns the words at any speaking rate.
    completion_tempo: float = 0.0
    # The completion's reference landmark sets lie at least this many seconds from the frames
    # it learns to draw (where the clip allows), as at inference.
    completion_reference_gap: float = 0.0
    # A linear completion's ridge penalties per unit of frame weight: on its standardised
    # speech inputs, and on its pose inputs (crop units)
    completion_speech_ridge: float = 3.0
    completion_pose_ridge: float = 1e-5
    # > 0: a transformer completion's loss also has minus this times the mean in-sync cosine
    # of the frozen lip-sync expert (``completion_sync_expert``: a model folder, or a shipped
    # one's name) over its predicted lips and the speech. Needs a completion that hears the
    # speech encoder's states with the expert's lead, in windows at least the expert's.
    completion_sync_weight: float = 0.0
    completion_sync_expert: str = DEFAULT_SYNC_EXPERT
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # "no", "bf16" (CUDA or CPU) or "fp16" (CUDA only)


# Checks of the inference settings' values: (test, what the message says the value must be).
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_2 = (lambda v: v >= 2, "at least 2")
_NOT_NEGATIVE = (lambda v: v >= 0, "at least 0")
_POSITIVE = (lambda v: v > 0, "above 0")
_FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")


class _Settings:
    """A group of inference settings: every field an int or a float, each checked on
    construction by ``checks`` (field -> (test, range in words)); a value of the wrong kind or
    out of range is a one-line ModelError naming ``section``.field."""

    section: ClassVar[str]
    checks: ClassVar[dict[str, tuple[Any, str]]]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value, name = getattr(self, f.name), f"{self.section}.{f.name}"
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if f.type == "int" and not (number and isinstance(value, int)):
                raise ModelError(f"invalid model config: {name} must be an integer "
                                 f"(got {value!r})")
            if f.type == "float":
                if not number:
                    raise ModelError(f"invalid model config: {name} must be a number "
                                     f"(got {value!r})")
                value = float(value)
                object.__setattr__(self, f.name, value)  # 1 and 1.0: one fingerprint
            test, words = self.checks[f.name]
            if not test(value):
                raise ModelError(f"invalid model config: {name} must be {words} "
                                 f"(got {value!r})")


@dataclass(frozen=True)
class AdaptSettings(_Settings):
    """The ``adapt`` stage (``pipeline.adapt``): the completion fine-tuned on the video."""

    section: ClassVar[str] = "inference.adapt"
    checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "steps": _AT_LEAST_1, "learning_rate": _POSITIVE, "batch": _AT_LEAST_1,
        "ridge": _POSITIVE, "min_seconds": _NOT_NEGATIVE, "max_seconds": _POSITIVE}

    steps: int = 50
    learning_rate: float = 1e-4
    batch: int = 16            # windows of CompletionConfig.window frames per step
    # A linear completion is fitted again in one solve instead, pulled towards its trained
    # weights by this penalty per frame learned from (``LinearCompletion.fit``)
    ridge: float = 3.0
    min_seconds: float = 8.0   # of frames with a face to learn from, or it is skipped
    max_seconds: float = 300.0  # the first this many seconds of the video are learned from at most


@dataclass(frozen=True)
class CompleteSettings(_Settings):
    """The ``complete`` stage (``pipeline.complete``): the target landmarks from the speech."""

    section: ClassVar[str] = "inference.complete"
    checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "pause_seconds": _POSITIVE, "fade_frames": _NOT_NEGATIVE,
        "closed_fraction": _FRACTION, "closed_max_frames": _AT_LEAST_1,
        "smooth_seconds": _NOT_NEGATIVE, "articulation_gain": _POSITIVE,
        "articulation_seconds": _POSITIVE}

    pause_seconds: float = 0.25  # silences this long or longer close the mouth
    fade_frames: int = 2         # frames over which the mouth closes into or opens out of one
    closed_fraction: float = 0.1  # the closed shape: median of this most-closed share of frames
    closed_max_frames: int = 500  # but of no more frames than this (20 s at 25 fps)
    smooth_seconds: float = 0.04  # the predicted lip/jaw smoothed over time by a Gaussian this wide
    articulation_gain: float = 1.5     # the lips' opening and closing about their local mean,
    articulation_seconds: float = 2.0  # amplified by this, over a mean this long


@dataclass(frozen=True)
class SourceSettings(_Settings):
    """The native renderer's ``sources`` stage (``pipeline.sources``): which of the
    video's frames each output frame's lower face is drawn from."""

    section: ClassVar[str] = "inference.sources"
    checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "anchor_preference": _NOT_NEGATIVE, "candidates": _AT_LEAST_1,
        "switch_cost": _NOT_NEGATIVE, "pose_weight": _NOT_NEGATIVE,
        "opening_weight": _NOT_NEGATIVE, "narrowing_share": _FRACTION,
        "fade_frames": _NOT_NEGATIVE}

    anchor_preference: float = 0.05  # shape units another source must gain on the anchor
    candidates: int = 8          # per output frame, the best this many enter the path search
    switch_cost: float = 0.08    # shape units (eye distances) a switch must gain at least
    pose_weight: float = 0.5     # pose residual against mouth-shape distance
    opening_weight: float = 2.0  # inner-lip opening (eye distances) against mouth shape
    narrowing_share: float = 0.25  # of that weight, for a source more open than the target
    fade_frames: int = 3         # a switch is cross-faded over this many frames


@dataclass(frozen=True)
class NativeSettings(_Settings):
    """The native renderer's source crops (``pipeline.renderers.native``)."""

    section: ClassVar[str] = "inference.native"
    checks: ClassVar[dict[str, tuple[Any, str]]] = {
        "max_size": _AT_LEAST_2, "detail_frames": _AT_LEAST_1, "detail_samples": _AT_LEAST_1,
        "detail_tolerance": _FRACTION, "max_sharpening": _NOT_NEGATIVE}

    # The largest side drawn at: a larger face box is drawn at this size and scaled up
    # (measured: ms/frame and sharpness in the README's speed table).
    max_size: int = 512
    # A source crop's detail is matched to the median over detail_samples frames with a
    # face spread over the video's first detail_frames (every fifth: the median moves little,
    # and the frames between are neither converted nor piped).
    detail_frames: int = 250
    detail_samples: int = 50
    detail_tolerance: float = 0.9  # sources with this share of that detail stay as they are
    max_sharpening: float = 1.5    # the unsharp mask's largest amount


@dataclass(frozen=True)
class InferenceConfig:
    """The inference settings a model's quality numbers were measured with, one group per
    stage that reads them (each group is part of that stage's fingerprint)."""

    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    complete: CompleteSettings = field(default_factory=CompleteSettings)
    sources: SourceSettings = field(default_factory=SourceSettings)
    native: NativeSettings = field(default_factory=NativeSettings)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cpu-128"
    crop_size: int = 128
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    completion: CompletionConfig = field(default_factory=CompletionConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    landmark_order: tuple[int, ...] = ORDER

    def __post_init__(self) -> None:
        problems = []
        if self.autoencoder.image_size != self.crop_size:
            problems.append("autoencoder.image_size must equal crop_size")
        if self.denoiser.latent_channels != self.autoencoder.latent_channels:
            problems.append("denoiser.latent_channels must equal autoencoder.latent_channels")
        if self.autoencoder.latent_size % 2 ** (self.denoiser.scales - 1):
            problems.append("the latent side must halve evenly at every denoiser scale")
        scale = self.denoiser.sketch_scale
        if scale < 0 or scale & (scale - 1):
            problems.append("denoiser.sketch_scale must be 0 or a power of two")
        features = SPEECH_CHANNELS.get(self.completion.speech_features)
        if features is None:
            problems.append("completion.speech_features must be one of "
                            + ", ".join(SPEECH_CHANNELS))
        elif self.completion.speech_channels != features:
            problems.append(f"completion.speech_channels must be {features}, the "
                            f"{self.completion.speech_features} front end's")
        if self.completion.kind not in COMPLETION_KINDS:
            problems.append("completion.kind must be one of " + ", ".join(COMPLETION_KINDS))
        elif self.completion.kind == "linear" and (
                self.completion.speech_pool < 1
                or self.completion.speech_window % self.completion.speech_pool):
            problems.append("a linear completion needs completion.speech_pool >= 1 dividing "
                            "completion.speech_window")
        if self.completion.window < self.completion.frames:
            problems.append("completion.window must be at least completion.frames")
        if self.training.mixed_precision not in MIXED_PRECISIONS:
            problems.append("training.mixed_precision must be no, bf16 or fp16")
        if tuple(self.landmark_order) != ORDER:
            problems.append("landmark_order differs from this version's 131-point order")
        for c in self.denoiser.channels:
            if c % self.denoiser.norm_groups or c % self.denoiser.head_dim:
                problems.append(f"denoiser channel count {c} must divide by norm_groups and "
                                "head_dim")
        if problems:
            raise ModelError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """The config ``data`` (a config.json's) describes: a section it lacks (the
        ``inference`` settings of model folders written before they were saved) takes the
        defaults; an unknown field or a value out of range is a ModelError naming it."""
        try:
            if "completion" in data and isinstance(data["completion"], dict):
                data = {**data, "completion": {LEGACY_COMPLETION_FIELDS.get(k, k): v
                                               for k, v in data["completion"].items()}}
            return build_dataclass(cls, data, "")
        except TypeError as exc:
            raise ModelError(f"invalid model config: {exc}") from exc

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_config(path))

    @classmethod
    def named(cls, name_or_path: str | Path) -> ModelConfig:
        """A config from models/configs by name (``cpu-128``, ``paper-256``) or from a
        path."""
        path = Path(name_or_path)
        if not path.suffix and not path.exists():
            path = CONFIGS_DIR / f"{name_or_path}.json"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
            raise ModelError(f"no such config (known: {known})", name_or_path)
        return cls.load(path)


def _section(f: dataclasses.Field) -> type | None:
    """The dataclass a field holds when it is a nested section (its default_factory is one)."""
    factory = f.default_factory
    return factory if dataclasses.is_dataclass(factory) else None  # type: ignore[return-value]


def read_config(path: str | Path) -> dict[str, Any]:
    """A config.json's contents; ModelError naming the file if it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError("config not found", path) from exc
    except ValueError as exc:
        raise ModelError(f"config is not valid JSON ({exc})", path) from exc


def build_dataclass(kind: type, value: Any, path: str) -> Any:
    """A ``kind`` dataclass from its dict ``value`` (JSON lists as tuples), its sections
    (``_section``) built the same way; ``path`` names it in errors ("" for the top)."""
    where = path or kind.__name__
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be an object (got {value!r})")
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(value) - set(names)
    if unknown:
        raise TypeError(f"{where} has no field(s) {', '.join(sorted(unknown))}")
    kwargs = {}
    for key, item in value.items():
        section = _section(names[key])
        if section is not None:
            kwargs[key] = build_dataclass(section, item, f"{path}.{key}" if path else key)
        else:
            kwargs[key] = tuple(item) if isinstance(item, list) else item
    return kind(**kwargs)
