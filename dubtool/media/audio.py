"""Speech: any audio ffmpeg reads -> 16 kHz mono -> log-mel spectrogram -> per-frame windows."""

from __future__ import annotations

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


def mel_spectrogram(samples: np.ndarray) -> np.ndarray:
    """Log-mel spectrogram in dB, shape (80, 1 + samples // 200).

    Column t is centred on time t / 80 s (librosa pads half a window at both ends).
    """
    import librosa

    mel = librosa.feature.melspectrogram(
        y=samples.astype(np.float32), sr=SAMPLE_RATE, n_fft=WIN_LENGTH, hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH, n_mels=N_MELS, fmin=55.0, fmax=7600.0, power=2.0, center=True)
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
