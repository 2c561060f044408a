"""Speech: any audio ffmpeg reads -> 16 kHz mono -> log-mel spectrogram -> per-frame windows."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from dubtool.arrays import DiskArray
from dubtool.errors import InvalidMedia
from dubtool.media.probe import check_readable, probe_audio, run_tool, start_tool

SAMPLE_RATE = 16_000
N_MELS = 80
HOP_LENGTH = 200  # 12.5 ms: 80 mel steps per second
WIN_LENGTH = 800  # 50 ms
MEL_STEPS_PER_SECOND = SAMPLE_RATE / HOP_LENGTH
MEL_WINDOW = 16  # mel steps seen per video frame (0.2 s), as in the paper's lineage
MEL_FLOOR_DB = -100.0
# Per-utterance standardisation (``normalise_mel``): statistics over the frames within this
# many dB of the utterance's loud frames, values clipped to +-NORMALISED_CLIP.
VOICED_RANGE_DB = 30.0
NORMALISED_CLIP = 5.0
# Voice activity (``voice_activity``): a mel frame is speech when its energy is within this
# many dB of the utterance's loud frames (and above an absolute floor).
VAD_RANGE_DB = 35.0
VAD_FLOOR_DB = -75.0


def _decode_command(path: Path, seconds: float | None = None) -> list[str]:
    duration = [] if seconds is None else ["-t", f"{seconds:.6f}"]
    return ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
            *duration, "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "pipe:1"]


def load_speech(path: str | Path) -> np.ndarray:
    """Decode the first audio stream of any file ffmpeg reads to float32 mono at 16 kHz.

    Returns shape (samples,). Multi-channel audio is down-mixed.
    """
    path = check_readable(path)
    probe_audio(path)  # a clear error for files without an audio stream
    raw = run_tool(_decode_command(path), path, "audio could not be decoded")
    samples = np.frombuffer(raw, np.float32)
    if samples.size == 0:
        raise InvalidMedia("audio stream holds no samples", path)
    return samples.copy()


def decode_speech(path: str | Path, target: Path, seconds: float | None = None) -> DiskArray:
    """``load_speech`` into the file ``target`` (raw float32) rather than memory, a block at a
    time: an hour of speech (230 MB) never sits whole in this process. ``seconds``: only the
    first that many seconds. This process writes the
    file, not ffmpeg, so that a full disk is an OSError like any other write of the stage."""
    path = check_readable(path)
    probe_audio(path)
    with tempfile.TemporaryFile() as log, open(target, "wb") as out:
        proc = start_tool(_decode_command(path, seconds), stdout=subprocess.PIPE, stderr=log,
                          stdin=subprocess.DEVNULL)
        try:
            shutil.copyfileobj(proc.stdout, out, 1 << 20)
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if proc.returncode != 0:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            tail = lines[-1] if lines else "ffmpeg failed"
            raise InvalidMedia(f"audio could not be decoded ({tail})", path)
    samples = DiskArray.raw(target, np.float32)
    if len(samples) == 0:
        raise InvalidMedia("audio stream holds no samples", path)
    return samples


# The mel spectrogram is librosa's melspectrogram (Slaney mel scale and norm, periodic Hann
# window, zero padding of half a window at both ends) computed with numpy: the same numbers
# (test_media checks them against librosa) without importing librosa, whose numba kernels
# take a second to load on every run and half a minute to compile on the first one.
MEL_FMIN, MEL_FMAX = 55.0, 7600.0
_MEL_BREAK_HZ, _MEL_BREAK, _HZ_PER_MEL = 1000.0, 15.0, 200.0 / 3  # linear below 1 kHz, log above
_MEL_LOG_STEP = np.log(6.4) / 27
MEL_BLOCK = 512  # mel columns (6.4 s) computed or read at once: flat memory for hours of speech


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    log = _MEL_BREAK + np.log(np.maximum(hz, 1e-10) / _MEL_BREAK_HZ) / _MEL_LOG_STEP
    return np.where(hz >= _MEL_BREAK_HZ, log, hz / _HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log = _MEL_BREAK_HZ * np.exp(_MEL_LOG_STEP * (mel - _MEL_BREAK))
    return np.where(mel >= _MEL_BREAK, log, mel * _HZ_PER_MEL)


@functools.cache
def mel_filter_bank(n_fft: int, fmin: float, fmax: float, bands: int) -> np.ndarray:
    """(bands, n_fft // 2 + 1) Slaney triangular filters over the STFT bins, each normalised
    to unit area (librosa's ``filters.mel`` with its defaults)."""
    edges = _mel_to_hz(np.linspace(*_hz_to_mel(np.array([fmin, fmax])), bands + 2))
    ramps = edges[:, None] - np.fft.rfftfreq(n_fft, 1.0 / SAMPLE_RATE)[None, :]
    widths = np.diff(edges)
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    filters = np.maximum(0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return filters.astype(np.float32)


def mel_filters() -> np.ndarray:
    """(80, 401) the filters of the dub's own log-mel."""
    return mel_filter_bank(WIN_LENGTH, MEL_FMIN, MEL_FMAX, N_MELS)


def mel_length(samples: int) -> int:
    """Columns of the log-mel of ``samples`` samples."""
    return 1 + samples // HOP_LENGTH


def _mel_columns(samples: np.ndarray | DiskArray, start: int, stop: int) -> np.ndarray:
    """Columns start:stop of the log-mel, reading only the samples they need."""
    # Column t is the window over samples t * HOP - WIN / 2 .. t * HOP + WIN / 2, zeros outside.
    lo, hi = start * HOP_LENGTH - WIN_LENGTH // 2, (stop - 1) * HOP_LENGTH + WIN_LENGTH // 2
    segment = np.zeros(hi - lo, np.float32)
    first, last = max(lo, 0), min(hi, len(samples))
    if last > first:
        segment[first - lo:last - lo] = samples[first:last]
    frames = np.lib.stride_tricks.sliding_window_view(segment, WIN_LENGTH)[::HOP_LENGTH]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)
    # float64 transform stored as complex64, as librosa does, for the same rounding
    power = np.abs(np.fft.rfft(window * frames, axis=-1).astype(np.complex64)) ** 2
    mel = mel_filters() @ power.T
    return np.maximum(10.0 * np.log10(np.maximum(mel, 1e-10)), MEL_FLOOR_DB).astype(np.float32)


def mel_spectrogram(samples: np.ndarray | DiskArray, out: DiskArray | None = None
                    ) -> np.ndarray | DiskArray:
    """Log-mel spectrogram in dB, shape (80, 1 + samples // 200).

    Column t is centred on time t / 80 s (half a window of zeros is padded at both ends).
    Computed MEL_BLOCK columns at a time, from samples on disk into ``out`` (an (80, T)
    DiskArray) if given: memory stays flat however long the speech.
    """
    columns = mel_length(len(samples))
    mel = np.empty((N_MELS, columns), np.float32) if out is None else out
    for start in range(0, columns, MEL_BLOCK):
        stop = min(start + MEL_BLOCK, columns)
        mel[:, start:stop] = _mel_columns(samples, start, stop)
    return mel


def mel_energy(mel: np.ndarray | DiskArray) -> np.ndarray:
    """(T,) the mean dB of each column of a log-mel (80, T), read MEL_BLOCK columns at a time."""
    blocks = [mel[:, start:start + MEL_BLOCK].mean(axis=0)
              for start in range(0, mel.shape[1], MEL_BLOCK)]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def _loud_level(energy: np.ndarray) -> float:
    """The level of an utterance's loud frames (dB): its 95th percentile frame energy."""
    return float(np.percentile(energy, 95)) if energy.size else MEL_FLOOR_DB


@dataclass(frozen=True)
class MelNormalisation:
    """An utterance's per-bin statistics (80, 1): what ``apply`` standardises a log-mel by."""

    mean: np.ndarray
    spread: np.ndarray

    def apply(self, mel: np.ndarray) -> np.ndarray:
        """(80, n) dB columns of the utterance -> (80, n) unitless, clipped to +-NORMALISED_CLIP."""
        return np.clip((mel - self.mean) / self.spread, -NORMALISED_CLIP,
                       NORMALISED_CLIP).astype(np.float32)


def mel_normalisation(mel: np.ndarray | DiskArray) -> MelNormalisation:
    """Per-utterance, per-bin statistics of a log-mel (80, T) dB, T >= 1.

    Mean and spread come from the voiced frames (within VOICED_RANGE_DB of the loud ones), so
    a voice's pitch, a microphone or a room's colour shift the features far less than in dB,
    and long pauses do not skew the statistics. Accumulated MEL_BLOCK columns at a time
    (Chan's merge of block means and squared deviations, in float64): flat memory.
    """
    energy = mel_energy(mel)
    voiced = energy >= _loud_level(energy) - VOICED_RANGE_DB
    count, mean, squares = 0, np.zeros(N_MELS), np.zeros(N_MELS)
    for start in range(0, mel.shape[1], MEL_BLOCK):
        block = mel[:, start:start + MEL_BLOCK][:, voiced[start:start + MEL_BLOCK]]
        n = block.shape[1]
        if n == 0:
            continue
        block = block.astype(np.float64)
        block_mean = block.mean(axis=1)
        delta = block_mean - mean
        total = count + n
        mean = mean + delta * (n / total)
        squares = (squares + ((block - block_mean[:, None]) ** 2).sum(axis=1)
                   + delta**2 * (count * n / total))
        count = total
    spread = np.sqrt(squares / count) + 1.0  # +1 dB: flat bins stay finite
    return MelNormalisation(mean[:, None].astype(np.float32), spread[:, None].astype(np.float32))


def normalise_mel(mel: np.ndarray) -> np.ndarray:
    """Per-utterance, per-bin standardisation of a whole log-mel (80, T) dB -> (80, T)
    unitless (``mel_normalisation``); silence sits near the low clip."""
    if mel.shape[1] == 0:
        return mel.astype(np.float32)
    return mel_normalisation(mel).apply(mel)


def voice_activity(mel: np.ndarray | DiskArray, fps: Fraction | float, frames: int) -> np.ndarray:
    """(frames,) bool: whether speech sounds during each video frame of a log-mel (80, T) dB.

    A mel frame is voiced when its mean energy is within VAD_RANGE_DB of the utterance's loud
    frames and above VAD_FLOOR_DB; a video frame is voiced when any mel frame of its span is.
    """
    energy = mel_energy(mel)
    voiced = (energy >= _loud_level(energy) - VAD_RANGE_DB) & (energy > VAD_FLOOR_DB)
    spans = np.arange(frames + 1) / float(fps) * MEL_STEPS_PER_SECOND
    out = np.zeros(frames, bool)
    for i in range(frames):
        lo, hi = int(np.floor(spans[i])), int(np.ceil(spans[i + 1]))
        out[i] = bool(voiced[max(lo, 0):max(hi, 0)].any())
    return out


def pauses(active: np.ndarray, fps: Fraction | float, min_seconds: float) -> np.ndarray:
    """(frames,) bool: the frames of silent runs that last ``min_seconds`` or longer, and all
    silence before the first voiced frame and after the last, whatever its length."""
    silent = ~np.asarray(active, bool)
    out = np.zeros_like(silent)
    min_frames = max(1, round(min_seconds * float(fps)))
    start = None
    for i, s in enumerate(np.append(silent, False)):
        if s and start is None:
            start = i
        elif not s and start is not None:
            if i - start >= min_frames or start == 0 or i == len(silent):
                out[start:i] = True
            start = None
    return out


@dataclass(frozen=True)
class FeatureTiming:
    """How the columns of speech features (C, T) line up with time: ``rate`` columns a second,
    column t centred on (t + ``centre``) / ``rate`` s, ``silence`` the value outside the
    speech."""

    rate: float
    centre: float
    silence: float

    def window_start(self, frame_index: int, fps: Fraction | float, width: int) -> int:
        """The first column (maybe outside the speech) of video frame ``frame_index``'s window
        of ``width`` columns, centred on the frame's middle."""
        return round((frame_index + 0.5) / float(fps) * self.rate - self.centre) - width // 2


MEL_DB = FeatureTiming(MEL_STEPS_PER_SECOND, 0.0, MEL_FLOOR_DB)  # ``mel_spectrogram``
NORMALISED_MEL = FeatureTiming(MEL_STEPS_PER_SECOND, 0.0, -NORMALISED_CLIP)  # ``normalise_mel``


def feature_window(features: np.ndarray, frame_index: int, fps: Fraction | float,
                   width: int = MEL_WINDOW, timing: FeatureTiming = MEL_DB,
                   first_column: int = 0, columns: int | None = None) -> np.ndarray:
    """The (C, width) window of ``features`` (C, T) centred on the middle of video frame
    ``frame_index``.

    Outside the speech the window holds ``timing.silence``, so the first and last frames hear
    silence, not a copy of the edge. ``features`` may be a part of longer features of
    ``columns`` columns, starting at its column ``first_column``, that holds every column of
    the window within the speech.
    """
    columns = features.shape[1] if columns is None else columns
    start = timing.window_start(frame_index, fps, width)
    out = np.full((features.shape[0], width), timing.silence, np.float32)
    lo, hi = max(start, 0), min(start + width, columns)
    if hi > lo:
        out[:, lo - start:hi - start] = features[:, lo - first_column:hi - first_column]
    return out
