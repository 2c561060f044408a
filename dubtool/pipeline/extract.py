"""Stage ``extract``: probe the video, decode the speech, compute its mel, plan the frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dubtool.arrays import DiskArray
from dubtool.media.audio import N_MELS, SAMPLE_RATE, decode_speech, mel_length, mel_spectrogram
from dubtool.media.probe import AudioInfo, VideoInfo, probe_audio, probe_video
from dubtool.pipeline.plan import frame_plan, output_frame_count

MEL_FILE = "mel.npy"
SAMPLES_FILE = "speech.f32"  # the decoded speech, removed once its mel is written


@dataclass
class Extracted:
    """What the later stages need to know about the inputs.

    ``mel`` is the (80, T) log-mel of the speech, on disk (an hour is 320 MB), and ``plan``
    (output_frames,) gives the source frame of every output frame. Without speech
    (``dubtool landmarks``) the plan is every source frame once and there is no mel.
    """

    video: VideoInfo
    speech_info: AudioInfo | None
    mel: DiskArray | None
    plan: np.ndarray
    loop: str

    @property
    def output_seconds(self) -> float:
        return len(self.plan) / float(self.video.fps)

    @classmethod
    def load(cls, folder: Path) -> Extracted:
        info = json.loads((folder / "info.json").read_text())
        has_speech = info["speech"] is not None
        return cls(
            video=VideoInfo.from_json(info["video"]),
            speech_info=AudioInfo(**info["speech"]) if has_speech else None,
            mel=DiskArray.open(folder / MEL_FILE) if has_speech else None,
            plan=np.load(folder / "plan.npy"),
            loop=info["loop"],
        )


def extract(video_path: str | Path, speech_path: str | Path | None, loop: str,
            folder: Path) -> Extracted:
    """Probe ``video_path`` and, given speech, decode it and plan one output frame per 1/fps s.

    Writes the stage into the empty ``folder``: info.json, plan.npy and the speech's mel.npy.
    The speech goes through a file, never whole through memory: ffmpeg decodes it to
    SAMPLES_FILE, whose mel is computed block by block.
    """
    video = probe_video(video_path)
    speech_info = None
    if speech_path is None:
        plan = np.arange(video.frame_count, dtype=np.int64)
    else:
        speech_info = probe_audio(speech_path)
        samples = decode_speech(speech_path, folder / SAMPLES_FILE)
        mel = DiskArray.create(folder / MEL_FILE, (N_MELS, mel_length(len(samples))), np.float32)
        mel_spectrogram(samples, out=mel)
        samples.path.unlink()  # the later stages need the mel alone (an hour's samples: 230 MB)
        frames = output_frame_count(len(samples) / SAMPLE_RATE, video.fps, video.frame_count,
                                    loop)
        plan = frame_plan(video.frame_count, frames, loop)
    info = {"video": video.to_json(), "loop": loop,
            "speech": None if speech_info is None else vars(speech_info)}
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    np.save(folder / "plan.npy", plan)
    return Extracted.load(folder)
