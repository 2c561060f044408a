"""Quality metrics of a dub against the original frames (reconstruction protocol).

Definitions (also printed in reports):
- PSNR, SSIM: on the lower half of the face crop (the region the model regenerates).
- LMD: mean Euclidean distance between the 57 lip/jaw FaceMesh points of the generated and
  original frames, divided by the inter-ocular distance (outer eye corners 33-263) of the
  original frame.
- mouth sync: covariance between the mouth opening (inner lip gap 13-14 over the inter-ocular
  distance, x 100) and the z-scored speech loudness per frame, at offsets of +-15 frames.
  Reported: the best offset, and a confidence = the best value at natural offsets (mouth
  leading the sound by 0-3 frames, or lagging by 1) minus the median over all offsets. It is
  our own score, in the spirit of SyncNet's LSE-C but not it (SyncNet cannot be installed
  here); higher is better, a static mouth scores about 0.
- stability: mean absolute frame-to-frame change of the mouth region, relative to the
  original's (1.0 = as steady as the original; higher = flicker).
"""

from __future__ import annotations

import numpy as np

from dubtool.face.indices import CONTENT_SLICE, ORDER
from dubtool.media.audio import SAMPLE_RATE

_EYE_LEFT, _EYE_RIGHT = ORDER.index(33), ORDER.index(263)
_LIP_TOP, _LIP_BOTTOM = ORDER.index(13), ORDER.index(14)
MAX_SYNC_OFFSET = 15
SYNC_WINDOW = range(-3, 2)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def interocular(points: np.ndarray) -> np.ndarray:
    """(..., 131, 2) -> (...) distance between the outer eye corners."""
    return np.linalg.norm(points[..., _EYE_LEFT, :] - points[..., _EYE_RIGHT, :], axis=-1)


def lmd(generated: np.ndarray, original: np.ndarray) -> float:
    """Lip/jaw landmark distance, (F, 131, 2) each, normalised by the original's eye distance."""
    distance = np.linalg.norm(generated[:, CONTENT_SLICE] - original[:, CONTENT_SLICE], axis=-1)
    return float(np.mean(distance.mean(axis=1) / interocular(original)))


def mouth_opening(points: np.ndarray) -> np.ndarray:
    """(F, 131, 2) -> (F,) inner-lip gap over the eye distance."""
    gap = np.linalg.norm(points[:, _LIP_BOTTOM] - points[:, _LIP_TOP], axis=-1)
    return gap / interocular(points)


def speech_loudness(samples: np.ndarray, fps: float, frames: int) -> np.ndarray:
    """(frames,) log RMS energy of 16 kHz speech over each video frame's time span."""
    edges = np.round(np.arange(frames + 1) * SAMPLE_RATE / fps).astype(int)
    out = np.empty(frames)
    for i in range(frames):
        chunk = samples[edges[i]:max(edges[i + 1], edges[i] + 1)]
        out[i] = np.log(np.sqrt(np.mean(chunk.astype(np.float64) ** 2)) + 1e-4) if len(chunk) \
            else np.log(1e-4)
    return out


def sync_curve(opening: np.ndarray, loudness: np.ndarray,
               max_offset: int = MAX_SYNC_OFFSET) -> dict[int, float]:
    """Covariance of the mouth opening (in eye distances x 100) with the z-scored loudness,
    for every offset in frames (positive: the mouth moves after the sound).

    A covariance rather than a correlation: a mouth that hardly moves scores near zero instead
    of correlating its detection noise with the speech.
    """
    mouth = (opening - opening.mean()) * 100
    loud = (loudness - loudness.mean()) / max(float(loudness.std()), 1e-9)
    curve = {}
    for offset in range(-max_offset, max_offset + 1):
        a = mouth[max(offset, 0):len(mouth) + min(offset, 0)]
        b = loud[max(-offset, 0):len(loud) + min(-offset, 0)]
        n = min(len(a), len(b))
        curve[offset] = float(np.mean((a[:n] - a[:n].mean()) * (b[:n] - b[:n].mean()))) \
            if n >= 8 else 0.0
    return curve


def sync_score(opening: np.ndarray, loudness: np.ndarray) -> tuple[int, float, float]:
    """(best offset in frames, in-sync score, confidence).

    The in-sync score is the best covariance at the offsets of natural speech (SYNC_WINDOW: the
    mouth leads the sound by up to 3 frames); the confidence is that minus the median over all
    offsets. Speech shifted away from the video peaks elsewhere and scores low in the window.
    """
    curve = sync_curve(opening, loudness)
    best = max(curve, key=curve.get)
    in_sync = max(curve[o] for o in SYNC_WINDOW if o in curve)
    return best, in_sync, float(in_sync - np.median(list(curve.values())))


def stability(generated_mouths: np.ndarray, original_mouths: np.ndarray) -> float:
    """Frame-to-frame change of the mouth region, relative to the original's: (F, H, W, 3)."""
    def change(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x.astype(np.float32), axis=0)).mean())

    return change(generated_mouths) / max(change(original_mouths), 1e-6)
