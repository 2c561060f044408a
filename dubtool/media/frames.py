"""Frames through ffmpeg pipes: decode a video as RGB frames, encode RGB frames into a video.

Frames are streamed one at a time, so memory stays flat however long the video is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
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
    MissingDependency,
    OutputError,
    disk_full_error,
    disk_full_reported,
)
from dubtool.media.probe import VideoInfo


def _popen(cmd: list[str], **kwargs) -> subprocess.Popen:
    try:
        return subprocess.Popen(cmd, **kwargs)
    except FileNotFoundError as exc:
        raise MissingDependency("ffmpeg not found: apt-get install ffmpeg") from exc


def _tail(log) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "ffmpeg failed"


def read_frames(info: VideoInfo, frames: int | None = None,
                select: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Yield exactly ``frames`` (default ``info.frame_count``, at most that) frames from the
    start, of shape (height, width, 3), uint8 RGB; with ``select`` (increasing frame indices
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
    frame_bytes = info.width * info.height * 3
    # The stream probe chose, by its absolute index: the first video stream may be cover art.
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", info.path, "-map", f"0:{info.stream}", *picks,
           "-fps_mode", "passthrough", "-frames:v", str(count),
           "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    with tempfile.TemporaryFile() as log:
        proc = _popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        last = None
        produced = 0
        try:
            while produced < count:
                buf = proc.stdout.read(frame_bytes)
                if len(buf) < frame_bytes:
                    break
                last = np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
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


SCRATCH_JPEG_QUALITY = 95


def read_frames_in_order(info: VideoInfo, order: np.ndarray, scratch: Path) -> Iterator[np.ndarray]:
    """Yield frame ``order[i]`` for every i, decoding only the frames up to ``max(order)``.

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
    store = open(scratch, "w+b") if backwards else None  # noqa: SIM115 (closed below)
    frames, current, frame = None, -1, None
    try:
        for wanted in order:
            if frames is None or (wanted < current and wanted == 0):
                if frames is not None:
                    frames.close()
                frames, current = read_frames(info, count), -1
            if wanted < current:
                start, length = offsets[wanted]
                store.seek(start)
                data = np.frombuffer(store.read(length), np.uint8)
                yield cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                continue
            while current < wanted:
                frame = next(frames)
                current += 1
                if store is not None and current == len(offsets):
                    _keep_jpeg(store, frame, offsets, scratch)
            yield frame
    finally:
        if frames is not None:
            frames.close()
        if store is not None:
            store.close()
            scratch.unlink(missing_ok=True)


def _keep_jpeg(store, frame: np.ndarray, offsets: list[tuple[int, int]], path: Path) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, SCRATCH_JPEG_QUALITY])
    if not ok:
        raise OutputError("could not compress a frame into the scratch file", path)
    store.seek(0, os.SEEK_END)
    with disk_full_reported(path):
        offsets.append((store.tell(), len(data)))
        store.write(data.tobytes())


def check_output_path(output: str | Path, inputs: Sequence[str | Path] = ()) -> Path:
    """The absolute output path; OutputError if it cannot be written or would clobber an input."""
    output = Path(output).resolve()
    for given in inputs:
        if Path(given).resolve() == output:
            raise OutputError("output path is the same as an input; refusing to overwrite it",
                              output)
    if output.is_dir():
        raise OutputError("output path is a folder", output)
    parent = output.parent
    if not parent.is_dir():
        raise OutputError("output folder does not exist", parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", parent)
    return output


def _remove_dead_partials(paths: Iterator[Path]) -> None:
    """Delete partial outputs left by killed runs (their PID is in the name and is gone)."""
    for path in paths:
        pid = path.name.rsplit(".partial-", 1)[-1].split(".")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


class VideoWriter:
    """Encode RGB frames to H.264 (yuv420p) at a given rate, muxed with an optional audio track.

    The video is written under a temporary name beside the output and renamed only when ffmpeg
    finished without error, so the output path never holds a half-written file.

    >>> with VideoWriter("out.mp4", 640, 480, Fraction(25), audio="speech.wav") as w:
    ...     w.write(frame)                       # (480, 640, 3) uint8 RGB
    """

    def __init__(self, output: str | Path, width: int, height: int, fps: Fraction,
                 audio: str | Path | None = None, crf: int = 18, preset: str = "veryfast",
                 audio_seconds: float | None = None) -> None:
        """``audio_seconds``: keep only the audio's first seconds (the speech cut to a shorter
        video); None keeps it all."""
        self.output = Path(output)
        self.width, self.height = width, height
        suffix = self.output.suffix or ".mp4"
        self.partial = self.output.with_name(f".{self.output.stem}.partial-{os.getpid()}{suffix}")
        _remove_dead_partials(self.output.parent.glob(f".{self.output.stem}.partial-*{suffix}"))
        cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
               "-r", f"{fps.numerator}/{fps.denominator}", "-i", "pipe:0"]
        if audio is not None:
            if audio_seconds is not None:
                cmd += ["-t", f"{audio_seconds:.6f}"]  # an input option: cuts the audio alone
            cmd += ["-i", str(Path(audio).resolve()), "-map", "0:v:0", "-map", "1:a:0?",
                    "-c:a", "aac", "-b:a", "160k"]
        # yuv420p needs even sides: pad odd sizes by one pixel rather than rescaling.
        cmd += ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-preset", preset,
                "-crf", str(crf), "-pix_fmt", "yuv420p", "-movflags", "+faststart"]
        if self.output.suffix.lower() not in (".mp4", ".mov", ".mkv", ".m4v"):
            cmd += ["-f", "mp4"]
        cmd.append(str(self.partial))
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self._proc = _popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=self._log)
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(f"frame of shape {frame.shape} {frame.dtype}, expected "
                             f"({self.height}, {self.width}, 3) uint8")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
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
            os.replace(self.partial, self.output)
        finally:
            self._log.close()
            self.partial.unlink(missing_ok=True)
