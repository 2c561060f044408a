"""Frames through ffmpeg pipes: decode a video as RGB frames, encode RGB frames into a video.

Frames are streamed one at a time, so memory stays flat however long the video is.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from dubtool.errors import (
    InvalidMedia,
    OutputError,
    disk_full_error,
    disk_full_reported,
)
from dubtool.media.probe import VideoInfo, start_tool
from dubtool.overlap import ahead

READ_AHEAD = 3  # frames decoded ahead of the caller (18 MB at 1080p)
PIXEL_FORMATS = ("rgb24", "yuv420p")


def _frame_pipe_bytes() -> int:
    """The size the frame pipes are given (``Popen(pipesize=)``; -1: the system's 64 KB):
    1 MB where Linux allows it, so that a 1080p frame (6 MB) crosses in 6 reads, not 95."""
    try:
        return min(1 << 20, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
    except (OSError, ValueError):
        return -1


FRAME_PIPE_BYTES = _frame_pipe_bytes()


def _tail(log) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "ffmpeg failed"


def read_frames(info: VideoInfo, frames: int | None = None,
                select: Sequence[int] | None = None,
                pixel_format: str = "rgb24") -> Iterator[np.ndarray]:
    """Yield exactly ``frames`` (default ``info.frame_count``, at most that) frames from the
    start, of shape (height, width, 3), uint8 RGB (``pixel_format`` "yuv420p", for a video
    with even sides: the flat (width * height * 3 / 2,) I420 buffer, ``face.pixels``); with
    ``select`` (increasing frame indices
    within the video), exactly those frames: ffmpeg still decodes up to the last of them but
    converts and pipes only them, several times faster than reading every frame.

    ffmpeg applies the rotation metadata, so frames come out upright. A decoder that stops
    short (a damaged tail) has its last good frame repeated, so frame indices stay aligned with
    the plan made from the probe; a file that decodes no frame at all is an InvalidMedia error.
    """
    picks: list[str] = []
    if select is not None:
        count = len(select)
        # Quoted: the commas of eq(n,K) stay inside the select filter's expression.
        picks = ["-vf", "select='" + "+".join(f"eq(n,{int(k)})" for k in select) + "'"]
    else:
        count = info.frame_count if frames is None else min(frames, info.frame_count)
    # The stream probe chose, by its absolute index: the first video stream may be cover art.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", info.path, "-map", f"0:{info.stream}", *picks,
           "-fps_mode", "passthrough", "-frames:v", str(count),
           "-f", "rawvideo", "-pix_fmt", pixel_format, "pipe:1"]
    with tempfile.TemporaryFile() as log:
        proc = start_tool(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                          pipesize=FRAME_PIPE_BYTES)
        last = None
        produced = 0
        try:
            # Read a few frames ahead in a thread: a pipe holds 64 KB, so without it ffmpeg
            # would wait for the caller to take each frame before decoding the next.
            for last in ahead(_piped_frames(proc.stdout, count,
                                            frame_shape(info.width, info.height, pixel_format)),
                              depth=READ_AHEAD):
                produced += 1
                yield last
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if last is None:
            raise InvalidMedia(f"no frame could be decoded ({_tail(log)})", info.path)
        for _ in range(count - produced):
            yield last


def frame_shape(width: int, height: int, pixel_format: str) -> tuple[int, ...]:
    """The shape of a ``pixel_format`` frame (``PIXEL_FORMATS``)."""
    if pixel_format == "rgb24":
        return height, width, 3
    if pixel_format == "yuv420p" and width % 2 == 0 and height % 2 == 0:
        return (width * height * 3 // 2,)
    raise ValueError(f"no {pixel_format} frames of {width}x{height}: the formats are "
                     f"{', '.join(PIXEL_FORMATS)} (yuv420p: even sides)")


def _piped_frames(pipe, count: int, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Up to ``count`` frames of ``shape`` uint8 from ``pipe``, each a new writable array;
    fewer when the pipe ends."""
    for _ in range(count):
        frame = np.empty(shape, np.uint8)
        if pipe.readinto(memoryview(frame).cast("B")) < frame.nbytes:
            return
        yield frame


SCRATCH_JPEG_QUALITY = 95


def read_frames_in_order(info: VideoInfo, order: np.ndarray, scratch: Path,
                         pixel_format: str = "rgb24") -> Iterator[np.ndarray]:
    """Yield frame ``order[i]`` for every i, decoding only the frames up to ``max(order)``,
    in ``read_frames``' ``pixel_format``.

    Forward runs come straight from the decoder, which restarts when the order goes back to
    frame 0 (a loop, ping-pong's turn at the start). Frames wanted again going backwards
    (ping-pong) come from ``scratch``, where each decoded frame is kept as a JPEG (quality 95,
    about 2 grey levels off) rather than raw: about a sixteenth of the raw frames' 9 GB a
    minute of 1080p. It is removed at the end.
    """
    if len(order) == 0:
        return
    count = int(order.max()) + 1
    steps = np.diff(order)
    backwards = bool(np.any((steps < 0) & (order[1:] != 0)))
    offsets: list[tuple[int, int]] = []  # (start, length) of each kept frame's JPEG
    frame_shape(info.width, info.height, pixel_format)  # a ValueError before any work
    if pixel_format == "rgb24":
        def to_bgr(f: np.ndarray) -> np.ndarray:
            return cv2.cvtColor(f, cv2.COLOR_RGB2BGR)

        def from_bgr(f: np.ndarray) -> np.ndarray:
            return cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
    else:
        def to_bgr(f: np.ndarray) -> np.ndarray:
            return cv2.cvtColor(f.reshape(-1, info.width), cv2.COLOR_YUV2BGR_I420)

        def from_bgr(f: np.ndarray) -> np.ndarray:
            return cv2.cvtColor(f, cv2.COLOR_BGR2YUV_I420).reshape(-1)
    store = open(scratch, "w+b") if backwards else None  # noqa: SIM115 (closed below)
    frames, current, frame = None, -1, None
    try:
        for wanted in order:
            if frames is None or (wanted < current and wanted == 0):
                if frames is not None:
                    frames.close()
                frames, current = read_frames(info, count, pixel_format=pixel_format), -1
            if wanted < current:
                start, length = offsets[wanted]
                store.seek(start)
                data = np.frombuffer(store.read(length), np.uint8)
                yield from_bgr(cv2.imdecode(data, cv2.IMREAD_COLOR))
                continue
            while current < wanted:
                frame = next(frames)
                current += 1
                if store is not None and current == len(offsets):
                    _keep_jpeg(store, to_bgr(frame), offsets, scratch)
            yield frame
    finally:
        if frames is not None:
            frames.close()
        if store is not None:
            store.close()
            scratch.unlink(missing_ok=True)


def _keep_jpeg(store, frame: np.ndarray, offsets: list[tuple[int, int]], path: Path) -> None:
    """Append the BGR ``frame`` to ``store`` as a JPEG."""
    ok, data = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, SCRATCH_JPEG_QUALITY])
    if not ok:
        raise OutputError("could not compress a frame into the scratch file", path)
    store.seek(0, os.SEEK_END)
    with disk_full_reported(path):
        offsets.append((store.tell(), len(data)))
        store.write(data.tobytes())


def check_output_path(output: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """The absolute output path; OutputError if it cannot be written or would clobber an input,
    or if it exists and is not a regular file: a device, FIFO or socket would be replaced by
    the rename that ends the writing (``-o /dev/null`` as root made /dev/null a file)."""
    output = Path(output).resolve()
    try:
        most = os.pathconf(output.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        most = 255
    if len(os.fsencode(output.name)) > most:  # before the stat calls, which it would fail
        raise OutputError(f"file name is too long ({len(os.fsencode(output.name))} bytes; the "
                          f"file system takes at most {most})", output)
    for given in inputs:
        if Path(given).resolve() == output:
            raise OutputError("output path is the same as an input; refusing to overwrite it",
                              output)
    if output.is_dir():
        raise OutputError("output path is a folder", output)
    kind = _special_file(output)
    if kind is not None:
        raise OutputError(f"output path is {kind}, not a regular file; refusing to replace "
                          "it (give a file name)", output)
    parent = output.parent
    if not parent.is_dir():
        raise OutputError("output folder does not exist", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", parent)
    return output


def replace_output(partial: Path, output: Path) -> None:
    """Rename the finished ``partial`` over ``output``, unless ``output`` has become a device,
    FIFO or socket since ``check_output_path``: it is never replaced."""
    kind = _special_file(output)
    if kind is not None:
        raise OutputError(f"output path is {kind}, not a regular file; refusing to replace "
                          "it (give a file name)", output)
    os.replace(partial, output)


def _special_file(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # not there (or not reachable: the folder checks say why)
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), None)


# Partial outputs: a short hidden name of fixed length beside the output (the output's own
# name plus a suffix could pass the file system's 255 bytes), with this machine and process.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_PARTIAL_PREFIX = f".dubtool-{_HOST}-"


def partial_path(output: Path) -> Path:
    """A temporary name for ``output`` while it is written: in the same folder (so that the
    rename that ends the writing is atomic), hidden, short whatever the output's name, with
    this process's id (``_remove_dead_partials``) and the output's extension."""
    return output.with_name(f"{_PARTIAL_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.partial"
                            f"{output.suffix[:16]}")


def _remove_dead_partials(folder: Path) -> None:
    """Delete the partial outputs that processes of this machine left in ``folder`` when they
    were killed (the process in the name is gone)."""
    for path in folder.glob(f"{_PARTIAL_PREFIX}*.partial*"):
        pid = path.name[len(_PARTIAL_PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def _h264(crf: int, preset: str) -> list[str]:
    return ["-c:v", "libx264", "-preset", preset, "-crf", str(crf)]


def _vp9(crf: int, preset: str) -> list[str]:
    # libvpx's realtime mode at its fastest: a few times the frame rate of its good mode, for a
    # file a little larger; constant quality (-b:v 0), H.264's CRF 18 taken as VP9's 24.
    return ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1",
            "-crf", str(min(63, crf + 6)), "-b:v", "0"]


# The containers an output may be, by extension: ffmpeg's muxer, the video encoder's options
# and the audio's. WebM holds only VP8/VP9/AV1 and Vorbis/Opus.
CONTAINERS = {
    ".mp4": ("mp4", _h264, ["-c:a", "aac", "-b:a", "160k"]),
    ".m4v": ("mp4", _h264, ["-c:a", "aac", "-b:a", "160k"]),
    ".mov": ("mov", _h264, ["-c:a", "aac", "-b:a", "160k"]),
    ".mkv": ("matroska", _h264, ["-c:a", "aac", "-b:a", "160k"]),
    ".webm": ("webm", _vp9, ["-c:a", "libopus", "-b:a", "128k"]),
}
DEFAULT_CONTAINER = ".mp4"  # an output without an extension


def check_video_output(output: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """``check_output_path`` for a video, whose extension must be one of ``CONTAINERS``'s
    (or none: MP4): OutputError naming the supported ones otherwise, before any work."""
    output = check_output_path(output, inputs)
    suffix = output.suffix.lower()
    if suffix and suffix not in CONTAINERS:
        raise OutputError(f"cannot write a {output.suffix} video: the output's extension "
                          f"must be one of {', '.join(CONTAINERS)}", output)
    return output


class VideoWriter:
    """Encode RGB frames (yuv420p) at a given rate, muxed with an optional audio track, in the
    container the output's extension names (``CONTAINERS``): H.264 and AAC in MP4, MOV and
    Matroska, VP9 and Opus in WebM.

    The video is written under a temporary name beside the output and renamed only when ffmpeg
    finished without error, so the output path never holds a half-written file.

    >>> with VideoWriter("out.mp4", 640, 480, Fraction(25), audio="speech.wav") as w:
    ...     w.write(frame)                       # (480, 640, 3) uint8 RGB
    """

    def __init__(self, output: str | Path, width: int, height: int, fps: Fraction,
                 audio: str | Path | None = None, crf: int = 18, preset: str = "veryfast",
                 audio_seconds: float | None = None, pixel_format: str = "rgb24") -> None:
        """``audio_seconds``: keep only the audio's first seconds (the speech cut to a shorter
        video); None keeps it all. ``crf`` and ``preset``: H.264's (VP9 takes ``crf`` + 6).
        ``pixel_format``: the frames' (``read_frames``)."""
        self.output = Path(output)
        self.width, self.height = width, height
        self.shape = frame_shape(width, height, pixel_format)
        suffix = self.output.suffix.lower() or DEFAULT_CONTAINER
        if suffix not in CONTAINERS:
            raise OutputError(f"cannot write a {suffix} video: the output's extension must "
                              f"be one of {', '.join(CONTAINERS)}", self.output)
        muxer, video_codec, audio_codec = CONTAINERS[suffix]
        self.partial = partial_path(self.output)
        _remove_dead_partials(self.output.parent)
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", pixel_format, "-s", f"{width}x{height}",
               "-r", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0"]
        if audio is not None:
            if audio_seconds is not None:
                cmd += ["-t", f"{audio_seconds:.6f}"]  # an input option: cuts the audio alone
            cmd += ["-i", str(Path(audio).resolve()), "-map", "0:v:0", "-map", "1:a:0?",
                    *audio_codec]
        # yuv420p needs even sides: pad odd sizes by one pixel rather than rescaling.
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", *video_codec(crf, preset),
                "-pix_fmt", "yuv420p"]
        if muxer in ("mp4", "mov"):
            cmd += ["-movflags", "+faststart"]
        cmd += ["-f", muxer, str(self.partial)]
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self._proc = start_tool(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=self._log, pipesize=FRAME_PIPE_BYTES)
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != self.shape or frame.dtype != np.uint8:
            raise ValueError(f"frame of shape {frame.shape} {frame.dtype}, expected "
                             f"{self.shape} uint8")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame))
        except BrokenPipeError:
            self._proc.wait()
            raise self._failure() from None
        self.frames_written += 1

    def _failure(self) -> OutputError:
        tail = _tail(self._log)
        # ffmpeg says so when the disk is full; past a file size limit it dies of SIGXFSZ.
        if ("No space left" in tail or "File too large" in tail
                or self._proc.returncode == -signal.SIGXFSZ):
            return disk_full_error(OSError(errno.ENOSPC, tail), self.output)
        return OutputError(f"encoding failed ({tail})", self.output)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is not None:
                self._proc.kill()
                self._proc.wait()
                # Its pipe too (a file descriptor per failed write otherwise), and what it wrote.
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
                self.partial.unlink(missing_ok=True)
                return
            with contextlib.suppress(BrokenPipeError):
                self._proc.stdin.close()
            if self._proc.wait() != 0 or self.frames_written == 0:
                raise self._failure()
            replace_output(self.partial, self.output)
        finally:
            self._log.close()
            self.partial.unlink(missing_ok=True)
