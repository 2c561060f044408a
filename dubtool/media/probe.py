"""ffprobe -> VideoInfo / AudioInfo: what a media file holds, in the terms the pipeline needs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

from dubtool.errors import InputNotFound, InvalidMedia, MissingDependency

# Containers ffmpeg reads single pictures with: a still image is a one-frame video.
_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe")
STILL_IMAGE_FPS = Fraction(25)


@dataclass(frozen=True)
class AudioInfo:
    codec: str
    sample_rate: int
    channels: int
    duration: float


@dataclass(frozen=True)
class VideoInfo:
    """A video (or still image) as the pipeline decodes it.

    ``width``/``height`` are the displayed size, after the rotation that ffmpeg applies on
    decode; ``frame_count`` is the number of frames the decoder yields; ``stream`` the
    absolute index of the stream described (what decoders map: ``0:v:0`` may be cover art).
    """

    path: str
    width: int
    height: int
    fps: Fraction
    frame_count: int
    duration: float
    rotation: int
    codec: str
    is_image: bool
    variable_frame_rate: bool
    audio: tuple[AudioInfo, ...]
    stream: int = 0
    colour_space: str = ""  # ffprobe's color_space ("bt709", ...; "" unknown)

    @property
    def has_audio(self) -> bool:
        return bool(self.audio)

    def to_json(self) -> dict:
        data = asdict(self)
        data["fps"] = f"{self.fps.numerator}/{self.fps.denominator}"
        return data

    @classmethod
    def from_json(cls, data: dict) -> VideoInfo:
        data = dict(data)
        data["fps"] = Fraction(data["fps"])
        data["audio"] = tuple(AudioInfo(**a) for a in data["audio"])
        return cls(**data)


def check_readable(path: str | Path) -> Path:
    """The absolute path of an existing, readable, non-empty regular file, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound("no such file", path)
    if not path.is_file():
        raise InputNotFound("not a regular file", path)
    if not os.access(path, os.R_OK):
        raise InputNotFound("permission denied", path)
    if path.stat().st_size == 0:
        raise InvalidMedia("file is empty", path)
    # Absolute paths keep names such as '-x.mp4' or 'a:b.mp4' from reading as options or protocols.
    return path.resolve()


# What execve says of a program that is there but cannot run: its interpreter or a library
# missing (ENOENT), not executable (EACCES), not a program for this machine (ENOEXEC, ...).
_CANNOT_RUN = {errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ELIBBAD, errno.EISDIR}


def start_tool(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` of ffmpeg or ffprobe (``cmd[0]``). MissingDependency
    (exit 7) "not found" only when the executable is not on the PATH; when it is there but
    cannot be run, MissingDependency saying so and why. Any other OSError (no memory, too
    many processes) is not about the tool: it propagates as it is."""
    try:
        return subprocess.Popen(cmd, **kwargs)
    except OSError as exc:
        found = shutil.which(cmd[0])
        if found is None and isinstance(exc, FileNotFoundError):
            raise MissingDependency(f"{cmd[0]} not found: apt-get install ffmpeg") from exc
        if exc.errno not in _CANNOT_RUN:
            raise
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENOENT:
            why += " (a program or library it needs is missing)"
        raise MissingDependency(f"{cmd[0]} could not be started: {why}", found) from exc


def run_tool(cmd: list[str], path: Path, failure: str) -> bytes:
    """Run ffmpeg or ffprobe to completion and return its stdout; on failure, InvalidMedia
    saying ``failure`` with the tool's last line of complaint."""
    with start_tool(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL) as proc:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        lines = stderr.decode(errors="replace").strip().splitlines()
        raise InvalidMedia(f"{failure} ({lines[-1] if lines else cmd[0] + ' failed'})", path)
    return stdout


def ffprobe(path: Path, *extra: str) -> dict:
    """ffprobe's JSON description of the file's format and streams."""
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
           *extra, str(path)]
    return json.loads(run_tool(cmd, path, "not readable as media"))


def _fraction(text: str | None) -> Fraction | None:
    if not text or text in ("0/0", "N/A"):
        return None
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []):
        if "rotation" in side:
            return round(float(side["rotation"])) % 360
    rotate = stream.get("tags", {}).get("rotate")
    return int(rotate) % 360 if rotate else 0


def _duration(*candidates: str | None) -> float:
    for value in candidates:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds > 0:
            return seconds
    return 0.0


def probe_audio(path: str | Path) -> AudioInfo:
    """The first audio stream of a file, or InvalidMedia if it has none."""
    path = check_readable(path)
    info = ffprobe(path)
    streams = [s for s in info.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise InvalidMedia("has no audio stream", path)
    return _audio_info(streams[0], info.get("format", {}))


def _audio_info(stream: dict, fmt: dict) -> AudioInfo:
    return AudioInfo(
        codec=stream.get("codec_name", "?"),
        sample_rate=int(stream.get("sample_rate") or 0),
        channels=int(stream.get("channels") or 0),
        duration=_duration(stream.get("duration"), fmt.get("duration")),
    )


def probe_video(path: str | Path) -> VideoInfo:
    """Describe a video or still image; InvalidMedia if it holds no video stream."""
    path = check_readable(path)
    info = ffprobe(path)
    fmt = info.get("format", {})
    streams = info.get("streams", [])
    # Cover art in audio files is a video stream with the attached_pic disposition: not a video.
    video = [s for s in streams if s.get("codec_type") == "video"
             and not s.get("disposition", {}).get("attached_pic")]
    if not video:
        raise InvalidMedia("has no video stream", path)
    stream = video[0]
    audio = tuple(_audio_info(s, fmt) for s in streams if s.get("codec_type") == "audio")

    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    if width <= 0 or height <= 0:
        raise InvalidMedia("video stream has no frame size", path)
    rotation = _rotation(stream)
    if rotation in (90, 270):
        width, height = height, width

    is_image = fmt.get("format_name", "") in _IMAGE_FORMATS
    if is_image:
        return VideoInfo(str(path), width, height, STILL_IMAGE_FPS, 1, 1 / float(STILL_IMAGE_FPS),
                         rotation, stream.get("codec_name", "?"), True, False, audio,
                         int(stream.get("index", 0)), stream.get("color_space", ""))

    avg = _fraction(stream.get("avg_frame_rate"))
    real = _fraction(stream.get("r_frame_rate"))
    fps = avg or real
    if fps is None or fps > 1000:
        raise InvalidMedia("video stream has no usable frame rate", path)
    # Keep exact NTSC-style rates (30000/1001) instead of a long average fraction.
    if real is not None and avg is not None and abs(float(real - avg)) < 1e-3 * float(avg):
        fps = real
    variable = real is not None and avg is not None and abs(float(real - avg)) >= 1e-3 * float(avg)

    frame_count = _count_frames(path, stream)
    duration = _duration(stream.get("duration"), fmt.get("duration"))
    if frame_count <= 0:
        frame_count = round(duration * float(fps))
    if frame_count <= 0:
        raise InvalidMedia("video stream holds no frames", path)
    return VideoInfo(str(path), width, height, fps, frame_count, frame_count / float(fps),
                     rotation, stream.get("codec_name", "?"), False, variable, audio,
                     int(stream.get("index", 0)), stream.get("color_space", ""))


def _count_frames(path: Path, stream: dict) -> int:
    # Counting packets reads the file without decoding it: fast, and exact for the streams
    # ffmpeg yields one frame per packet (everything but field-coded video).
    index = stream.get("index", 0)
    info = ffprobe(path, "-count_packets", "-select_streams", str(index))
    for s in info.get("streams", []):
        if s.get("index") == index and s.get("nb_read_packets"):
            return int(s["nb_read_packets"])
    return int(stream.get("nb_frames") or 0)
