"""Stage ``speech``: the speech encoder's states of the new speech, for a completion that hears
them (``CompletionConfig.speech_features == "whisper"``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dubtool.arrays import DiskArray
from dubtool.media.audio import decode_speech
from dubtool.nets.speech_encoder import STATE_DIM, SpeechEncoder, encode_speech, state_count

STATES_FILE = "states.npy"
SAMPLES_FILE = "speech.f32"  # the decoded speech, removed once it is encoded


def encode_file(path: str | Path, folder: Path, seconds: float | None = None,
                encoder: SpeechEncoder | None = None) -> DiskArray:
    """(384, T) float16 states of the first audio stream of ``path`` (its first ``seconds``
    at most), written to ``folder``/STATES_FILE; the samples go through a file, never whole
    through memory."""
    samples = decode_speech(path, folder / SAMPLES_FILE, seconds)
    states = DiskArray.create(folder / STATES_FILE, (STATE_DIM, state_count(len(samples))),
                              np.float16)
    encode_speech(samples, encoder, states)
    samples.path.unlink()
    return states


def load(folder: Path) -> DiskArray:
    return DiskArray.open(folder / STATES_FILE)
