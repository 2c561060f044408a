"""Stage ``extract``: probe the video, decode the speech, compute its mel, plan the frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dubtool.media.audio import SAMPLE_RATE, load_speech, mel_spectrogram
from dubtool.media.probe import AudioInfo, VideoInfo, probe_audio, probe_video
from dubtool.pipeline.plan import frame_plan, output_frame_count


@dataclass
class Extracted:
    """What the later stages need to know about the inputs.

    ``speech`` is 16 kHz mono float32 (samples,), ``mel`` is (80, T) log-mel of it, and
    ``plan`` (output_frames,) gives the source frame of every output frame. Without speech
    (``dubtool landmarks``) the plan is every source frame once and there is no mel.
    """

    video: VideoInfo
    speech_info: AudioInfo | None
    speech: np.ndarray | None
    mel: np.ndarray | None
    plan: np.ndarray
    loop: str

    @property
    def output_seconds(self) -> float:
        return len(self.plan) / float(self.video.fps)

    def save(self, folder: Path) -> None:
        info = {"video": self.video.to_json(), "loop": self.loop,
                "speech": None if self.speech_info is None else vars(self.speech_info)}
        (folder / "info.json").write_text(json.dumps(info, indent=1))
        np.save(folder / "plan.npy", self.plan)
        if self.speech is not None:
            np.save(folder / "speech.npy", self.speech)
            np.save(folder / "mel.npy", self.mel)

    @classmethod
    def load(cls, folder: Path) -> Extracted:
        info = json.loads((folder / "info.json").read_text())
        has_speech = info["speech"] is not None
        return cls(
            video=VideoInfo.from_json(info["video"]),
            speech_info=AudioInfo(**info["speech"]) if has_speech else None,
            speech=np.load(folder / "speech.npy") if has_speech else None,
            mel=np.load(folder / "mel.npy") if has_speech else None,
            plan=np.load(folder / "plan.npy"),
            loop=info["loop"],
        )


def extract(video_path: str | Path, speech_path: str | Path | None = None,
            loop: str = "pingpong") -> Extracted:
    """Probe ``video_path`` and, given speech, decode it and plan one output frame per 1/fps s."""
    video = probe_video(video_path)
    if speech_path is None:
        plan = np.arange(video.frame_count, dtype=np.int64)
        return Extracted(video, None, None, None, plan, loop)
    speech_info = probe_audio(speech_path)
    speech = load_speech(speech_path)
    mel = mel_spectrogram(speech)
    frames = output_frame_count(len(speech) / SAMPLE_RATE, video.fps, video.frame_count, loop)
    plan = frame_plan(video.frame_count, frames, loop)
    return Extracted(video, speech_info, speech, mel, plan, loop)
