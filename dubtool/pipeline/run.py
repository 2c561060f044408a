"""The stages in order, each through the run cache."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dubtool.errors import InvalidMedia, UsageError
from dubtool.face.detect import make_detector
from dubtool.face.indices import mouth_opening
from dubtool.hashing import code_digest, file_digest, fingerprint
from dubtool.media.probe import check_readable, probe_video
from dubtool.options import FaceChoice
from dubtool.overlap import Background
from dubtool.pipeline import extract as extract_stage
from dubtool.pipeline import landmarks as landmarks_stage
from dubtool.pipeline.cache import RunCache, default_cache_dir
from dubtool.pipeline.extract import Extracted
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.plan import gap_frames
from dubtool.pipeline.progress import StageProgress

if TYPE_CHECKING:  # the model stages need torch: `dubtool landmarks` runs without it
    import torch

    from dubtool.arrays import DiskArray
    from dubtool.nets.io import LoadedModel
    from dubtool.pipeline.adapt import Adaptation
    from dubtool.pipeline.complete import Completion
    from dubtool.pipeline.renderers import LowerFaces, Renderer



@dataclass
class Inputs:
    """The user's files, checked, with their content digests."""

    video: Path
    speech: Path | None
    video_digest: str
    speech_digest: str | None

    @classmethod
    def of(cls, video: str | Path, speech: str | Path | None = None) -> Inputs:
        video = check_readable(video)
        speech = check_readable(speech) if speech is not None else None
        return cls(video, speech, file_digest(video),
                   file_digest(speech) if speech is not None else None)

    def open_cache(self, cache_dir: str | Path | None = None,
                   lock_timeout: float = 0.0) -> RunCache:
        key = fingerprint("run", self.video_digest, self.speech_digest)
        description = {"video": str(self.video), "speech": str(self.speech or "")}
        return RunCache(cache_dir or default_cache_dir(), key, description, lock_timeout)


@dataclass
class FrontResult:
    extracted: Extracted
    track: FaceTrack
    extract_fp: str
    landmarks_fp: str


def run_front(cache: RunCache, inputs: Inputs, *, loop: str = "pingpong",
              detector: str = "mediapipe", face: FaceChoice = "largest", force: bool = False,
              progress: StageProgress | None = None, whole_video: bool = False) -> FrontResult:
    """Stages ``extract`` and ``landmarks``: what every command needs before the models.
    ``whole_video``: track every frame, not only those the plan uses."""
    extract_fp = fingerprint("extract", code_digest(extract_stage), inputs.video_digest,
                             inputs.speech_digest, loop)
    folder = cache.run_stage(
        "extract", extract_fp,
        lambda out: extract_stage.extract(inputs.video, inputs.speech, loop, out), force=force)
    extracted = Extracted.load(folder)

    # Only the source frames the plan uses are tracked (and cropped): a short speech over a
    # long video reads its first seconds alone.
    used = extracted.video.frame_count if whole_video else int(extracted.plan.max()) + 1

    def detect(out: Path) -> None:
        def step(done: int, total: int) -> None:
            if progress is not None:
                progress("landmarks", done, total)

        track = landmarks_stage.track_faces(extracted.video, make_detector(detector), face, step,
                                            used, out)
        track.save(out)

    # The face track depends on the video and how much of it is used: a new speech as long as
    # the video or longer, or another loop mode, keeps it.
    landmarks_fp = fingerprint("landmarks", code_digest(landmarks_stage), inputs.video_digest,
                               detector, face, used)
    folder = cache.run_stage("landmarks", landmarks_fp, detect, force=force)
    track = FaceTrack.load(folder)
    if isinstance(face, int) and face >= track.faces_seen:
        # Otherwise the whole video would pass through undubbed, as if all went well.
        raise InvalidMedia(f"--face {face}: no frame has {face + 1} faces (found at most "
                           f"{track.faces_seen} in a frame; 0 is the leftmost)", inputs.video)
    return FrontResult(extracted, track, extract_fp, landmarks_fp)


@dataclass
class DubStages:
    front: FrontResult
    completion: Completion
    faces: LowerFaces
    reference_frame: int
    adaptation: Adaptation | None = None  # None: not asked for


def pick_reference_frame(track: FaceTrack, plan: np.ndarray | None = None,
                         exclude_frames: int = 0) -> int:
    """A source frame with a face and a typical mouth (the median lip opening); with
    ``exclude_frames``, one at least that far from as many of the ``plan``'s frames as any."""
    faces = np.nonzero(track.detected)[0]
    if len(faces) == 0:
        return 0
    opening = landmarks_stage.map_points(track.points, mouth_opening, faces)
    typical = np.abs(np.argsort(np.argsort(opening)) - len(faces) // 2)
    if exclude_frames > 0 and plan is not None:
        # Per face frame f, the plan's frames p with |p - f| >= exclude_frames: all but those
        # within f +- (exclude_frames - 1), counted by binary search in the sorted plan (a
        # faces x plan matrix was tens of GB for a 10-minute clip).
        ordered = np.sort(plan)
        near = (np.searchsorted(ordered, faces + exclude_frames - 1, side="right")
                - np.searchsorted(ordered, faces - exclude_frames + 1, side="left"))
        allowed = len(plan) - near
        return int(faces[np.lexsort((typical, -allowed))[0]])
    return int(faces[np.argmin(typical)])


def check_reference_frame(frame: int, track: FaceTrack, video: str | Path) -> None:
    """``--reference-frame``, once the faces are tracked: within the frames the speech uses
    (InvalidMedia), and one with a face (UsageError, as the other option errors, naming the
    nearest frames that have one). With no face in any frame the video passes through."""
    if not 0 <= frame < track.frames:
        # Within the video (api.dub checked that) but past the frames this speech uses.
        raise InvalidMedia(f"--reference-frame {frame} is outside the {track.frames} frames "
                           "of the video that the speech uses", video)
    faces = np.nonzero(track.detected)[0]
    if len(faces) == 0 or track.detected[frame]:
        return
    before, after = faces[faces < frame], faces[faces > frame]
    nearest = ([f"{before[-1]} (before)"] if len(before) else []) + (
        [f"{after[0]} (after)"] if len(after) else [])
    raise UsageError(f"--reference-frame {frame}: no face was found in frame {frame}; the "
                     f"nearest {'frames' if len(nearest) > 1 else 'frame'} with one: "
                     f"{' and '.join(nearest)}")


def run_dub_stages(cache: RunCache, inputs: Inputs, model: LoadedModel, model_digest: str,
                   renderer: Renderer, *, loop: str = "pingpong", face: FaceChoice = "largest",
                   reference_frame: int | None = None, reconstruction_gap: float | None = None,
                   adapt: bool = True, seed: int = 0, device: torch.device | None = None,
                   force: bool = False, progress: StageProgress | None = None) -> DubStages:
    """extract, landmarks, adapt, speech (for a completion that hears the speech encoder),
    complete and the renderer's stages, each through the cache.

    ``reconstruction_gap`` (seconds): the reconstruction protocol's rule. References are drawn
    from the whole video (all of it is tracked) but never from within that many seconds of
    the frame they are pasted on, the completion is not adapted on those frames either, and
    its reference landmarks and closed mouth come from frames as far from the scored ones
    (``complete.reference_candidates``), so a clip dubbed from its own speech copies no
    ground truth. ``adapt``: fine-tune the
    completion on the video's own sound and lips first (``pipeline.adapt``; ``seed``).
    The stages' settings are the model's (``model.config.inference``), each group part of its
    stage's fingerprint.
    """
    import torch

    from dubtool.pipeline import adapt as adapt_stage
    from dubtool.pipeline import speech as speech_stage

    device = device or torch.device("cpu")
    speech, speech_fp, sound = None, None, None
    config = model.completion.config
    if config.speech_features == "whisper":
        # The speech encoder needs the speech alone: it runs on the other core while the
        # video is tracked (both release the GIL).
        speech_fp = fingerprint("speech", code_digest(speech_stage), inputs.speech_digest)
        speech = Background(lambda: speech_stage.load(cache.run_stage(
            "speech", speech_fp, lambda out: speech_stage.encode_file(inputs.speech, out),
            force=force)))
        if adapt:
            # So does the video's own sound, which the adapt stage learns from; after the
            # speech, and it is the speech's states when the video is the speech.
            settings = model.config.inference.adapt
            seconds = adapt_stage.sound_seconds(config, settings)
            sound = Background(lambda: _video_sound(cache, inputs, speech, seconds,
                                                    settings.min_seconds, force))
    try:
        return _after_speech(cache, inputs, model, model_digest, renderer, speech, speech_fp,
                             sound, loop=loop, face=face, reference_frame=reference_frame,
                             reconstruction_gap=reconstruction_gap, adapt=adapt, seed=seed,
                             device=device, force=force, progress=progress)
    finally:
        for job in (speech, sound):
            if job is not None:
                job.wait()  # never left writing into the cache after the run has ended


def _video_sound(cache: RunCache, inputs: Inputs, speech: Background[DiskArray],
                 seconds: float, min_seconds: float, force: bool) -> DiskArray | None:
    """Stage ``sound``: the speech encoder's states of the video's own sound, its first
    ``seconds`` (None: it has none, or lasts less than ``min_seconds``, too short to adapt
    on: the adapt stage will skip)."""
    from dubtool.pipeline import speech as speech_stage

    states = speech.result()
    if inputs.video_digest == inputs.speech_digest:
        return states
    video = probe_video(inputs.video)
    if not video.has_audio or video.duration < min_seconds:
        return None
    fp = fingerprint("sound", code_digest(speech_stage), inputs.video_digest, seconds)
    return speech_stage.load(cache.run_stage(
        "sound", fp, lambda out: speech_stage.encode_file(inputs.video, out, seconds),
        force=force))


def _after_speech(cache: RunCache, inputs: Inputs, model: LoadedModel, model_digest: str,
                  renderer: Renderer, speech: Background[DiskArray] | None,
                  speech_fp: str | None, sound: Background[DiskArray | None] | None,
                  *, loop: str, face: FaceChoice, reference_frame: int | None,
                  reconstruction_gap: float | None, adapt: bool, seed: int,
                  device: torch.device, force: bool, progress: StageProgress | None
                  ) -> DubStages:
    """``run_dub_stages`` but the speech and sound stages, which ``speech`` and ``sound`` run
    beside them."""
    from dubtool.pipeline import adapt as adapt_stage
    from dubtool.pipeline import complete as complete_stage
    from dubtool.pipeline.complete import Completion
    from dubtool.pipeline.renderers import RenderJob

    front = run_front(cache, inputs, loop=loop, face=face, force=force, progress=progress,
                      whole_video=reconstruction_gap is not None)
    video, track, plan = front.extracted.video, front.track, front.extracted.plan
    exclude = gap_frames(reconstruction_gap, video.fps)
    inference = model.config.inference
    if reference_frame is not None:
        check_reference_frame(reference_frame, track, video.path)
    completion_model, adaptation, adapt_fp = model.completion, None, None
    if adapt:
        # The speech matters only through the plan, and only when frames near it are excluded.
        adapt_fp = fingerprint("adapt", code_digest(adapt_stage), front.landmarks_fp,
                               model_digest, seed, exclude,
                               front.extract_fp if exclude else None, asdict(inference.adapt))
        folder = cache.run_stage(
            "adapt", adapt_fp,
            lambda out: adapt_stage.adapt(model.completion, video, track, plan, out,
                                          model.config.training, inference.adapt,
                                          exclude_frames=exclude, seed=seed, device=device,
                                          sound=None if sound is None else sound.result()),
            force=force)
        adaptation = adapt_stage.Adaptation.load(folder)
        completion_model = adapt_stage.adapted_completion(model.completion, folder)
    forced = reference_frame is not None
    if reference_frame is None:
        reference_frame = pick_reference_frame(track, plan, exclude)
    states = None if speech is None else speech.result()
    complete_fp = fingerprint("complete", code_digest(complete_stage), front.extract_fp,
                              front.landmarks_fp, model_digest, adapt_fp, speech_fp, exclude,
                              reference_frame if exclude else None, asdict(inference.complete))
    folder = cache.run_stage(
        "complete", complete_fp,
        lambda out: complete_stage.complete(completion_model, track, plan,
                                            front.extracted.mel, video.fps, out,
                                            inference.complete, device,
                                            states=states, exclude_frames=exclude,
                                            reference_frame=reference_frame),
        force=force)
    completion = Completion.load(folder)
    job = RenderJob(cache, video, track, plan, completion.target, completion.closing, complete_fp,
                    front.landmarks_fp, reference_frame, forced, exclude, force, progress)
    return DubStages(front, completion, renderer.render(job), reference_frame, adaptation)


