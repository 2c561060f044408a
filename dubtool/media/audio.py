"""Speech: any audio ffmpeg reads -> 16 kHz mono -> log-mel spectrogram -> per-frame windows."""

from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path

import numpy as np

from dubtool.errors import InvalidMedia
from dubtool.media.probe import check_readable, probe_audio, run_tool

SAMPLE_RATE = 16_000
N_MELS = 80
HOP_LENGTH = 200  # 12.5 ms: 80 mel steps per second
WIN_LENGTH = 800  # 50 ms
MEL_STEPS_PER_SECOND = SAMPLE_RATE / HOP_LENGTH
MEL_WINDOW = 16  # mel steps seen per video frame (0.2 s), as in the paper's lineage
MEL_FLOOR_DB = -100.0


def load_speech(path: str | Path) -> np.ndarray:
    """Decode the first audio stream of any file ffmpeg reads to float32 mono at 16 kHz.

    Returns shape (samples,). Multi-channel audio is down-mixed.
    """
    path = check_readable(path)
    probe_audio(path)  # a clear error for files without an audio stream
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
           "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "pipe:1"]
    raw = run_tool(cmd, path, "audio could not be decoded")
    samples = np.frombuffer(raw, np.float32)
    if samples.size == 0:
        raise InvalidMedia("audio stream holds no samples", path)
    return samples.copy()


# The mel spectrogram is librosa's melspectrogram (Slaney mel scale and norm, periodic Hann
# window, zero padding of half a window at both ends) computed with numpy: the same numbers
# (test_media checks them against librosa) without importing librosa, whose numba kernels
# take a second to load on every run and half a minute to compile on the first one.
MEL_FMIN, MEL_FMAX = 55.0, 7600.0
_MEL_BREAK_HZ, _MEL_BREAK, _HZ_PER_MEL = 1000.0, 15.0, 200.0 / 3  # linear below 1 kHz, log above
_MEL_LOG_STEP = np.log(6.4) / 27
_STFT_BLOCK = 2048  # frames transformed at once: flat memory for hours of speech


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    log = _MEL_BREAK + np.log(np.maximum(hz, 1e-10) / _MEL_BREAK_HZ) / _MEL_LOG_STEP
    return np.where(hz >= _MEL_BREAK_HZ, log, hz / _HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    log = _MEL_BREAK_HZ * np.exp(_MEL_LOG_STEP * (mel - _MEL_BREAK))
    return np.where(mel >= _MEL_BREAK, log, mel * _HZ_PER_MEL)


@functools.cache
def mel_filters() -> np.ndarray:
    """(80, 401) triangular filters over the STFT bins, each normalised to unit area."""
    edges = _mel_to_hz(np.linspace(*_hz_to_mel(np.array([MEL_FMIN, MEL_FMAX])), N_MELS + 2))
    ramps = edges[:, None] - np.fft.rfftfreq(WIN_LENGTH, 1.0 / SAMPLE_RATE)[None, :]
    widths = np.diff(edges)
    rising, falling = -ramps[:-2] / widths[:-1, None], ramps[2:] / widths[1:, None]
    filters = np.maximum(0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return filters.astype(np.float32)


def mel_spectrogram(samples: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram in dB, shape (80, 1 + samples // 200).

    Column t is centred on time t / 80 s (half a window of zeros is padded at both ends).
    """
    padded = np.pad(samples.astype(np.float32), WIN_LENGTH // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, WIN_LENGTH)[::HOP_LENGTH]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)
    mel = np.empty((N_MELS, len(frames)), np.float32)
    for start in range(0, len(frames), _STFT_BLOCK):
        # float64 transform stored as complex64, as librosa does, for the same rounding
        block = np.fft.rfft(window * frames[start:start + _STFT_BLOCK], axis=-1)
        power = np.abs(block.astype(np.complex64)) ** 2
        mel[:, start:start + _STFT_BLOCK] = mel_filters() @ power.T
    return np.maximum(10.0 * np.log10(np.maximum(mel, 1e-10)), MEL_FLOOR_DB).astype(np.float32)


def mel_window(mel: np.ndarray, frame_index: int, fps: Fraction | float,
               width: int = MEL_WINDOW) -> np.ndarray:
    """The (80, width) mel window centred on the middle of video frame ``frame_index``.

    Outside the speech the window is filled with the silence floor, so the first and last
    frames see silence, not a copy of the edge.
    """
    centre = (frame_index + 0.5) / float(fps) * MEL_STEPS_PER_SECOND
    start = round(centre) - width // 2
    out = np.full((mel.shape[0], width), MEL_FLOOR_DB, np.float32)
    lo, hi = max(start, 0), min(start + width, mel.shape[1])
    if hi > lo:
        out[:, lo - start:hi - start] = mel[:, lo:hi]
    return out
