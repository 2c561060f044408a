"""Quality metrics of a dub against the original frames (reconstruction protocol).

Definitions (also printed in reports):
- no leak: each clip is dubbed from its own speech, and no reference (a frame the dub's lower
  face is drawn from, or the static mouth's frame) lies within the reference gap (2 s by
  default) of the frame it is pasted on; references come from anywhere in the clip, and the
  frames within the gap of the static mouth's reference frame are not scored, for any variant
  (their count is the "scored" column). The lip model is not adapted on frames within the
  gap of an output frame, and its reference landmarks and the closed mouth of the pauses
  come from frames at least the gap from every output frame, or, where the clip has too few,
  from within half the gap of the reference frame.
- PSNR, SSIM: on the lower half of the face crop (the region the model regenerates).
- LMD: mean Euclidean distance between the 57 lip/jaw FaceMesh points of the generated and
  original frames, divided by the inter-ocular distance (outer eye corners 33-263) of the
  original frame.
- opening correlation: Pearson correlation over time, at lag 0, between the inner-lip opening
  (13-14 over the eye distance 33-263) found on the dub and on the original; 1 = opens and
  closes exactly when the real mouth does, 0 = unrelated. For the completion's landmarks
  alone (completion_opening_correlation), the opening of the predicted points.
- articulation: standard deviation over time of the dub's inner-lip opening over the
  original's (1 = opens as wide as the real mouth, 0 = still).
- LMD lips, LMD jaw: LMD over the 40 lip points and the 17 jaw points alone.
- at the video's own resolution, in the box of the 57 lip/jaw points of the face track (the
  mouth and jaw as the viewer sees them, not the model's 128 px crop): psnr_native,
  ssim_native, and sharpness, the variance of the Laplacian of the box (grey) in the variant
  over that in the original, mean over frames (1 = as sharp as the source; a softer mouth
  scores lower).
- energy sync (no reference; sync_offset, sync_confidence): Pearson correlation between the mouth
  opening (mean of the inner 13-14 and outer 0-17 lip gaps over the inter-ocular distance) and the
  speech envelope (log energy of the 250-2800 Hz band per video frame), both with their 1 s moving
  average removed, at offsets of +-15 frames. Reported: the best offset, and a confidence = the
  best value at natural offsets (mouth leading the sound by 0-3 frames, or lagging by 1) minus the
  median over all offsets. The mouth's spread is floored at FaceMesh's jitter (0.01 eye
  distances), so a still mouth scores about 0. It is our own score, in the spirit of SyncNet's
  LSE-C but not it (SyncNet cannot be installed here); higher is better. It needs no real mouth,
  but it rewards a mouth driven by the voice's loudness: a dub can beat the real footage on it, so
  it is only a check, not a measure of lip sync.
- sync expert (no reference; sync_expert, sync_expert_cosine): the lip-sync expert
  (models/sync-expert, its MODEL_CARD.md) scores 1.5 s windows of the variant's 57 lip/jaw
  FaceMesh points against the speech encoder's states of the clip's speech, in sync and
  shifted by 5 to 15 frames either way. sync_expert: the share of (window, shift) pairs in
  which the in-sync speech scores higher (0.5 = chance, as a still mouth scores; real footage
  of its validation people 0.9); sync_expert_cosine: the mean in-sync cosine. Only scored
  frames with a face, in runs long enough for a window and every shift (67 frames at 25 fps);
  none: no value.
- stability: mean absolute frame-to-frame change of the mouth region, relative to the
  original's (1.0 = as steady as the original; higher = flicker).
- identity (with the optional dlib extra): distance between dlib's face recognition
  descriptors of the generated and original frames, mean over up to 32 scored frames spread
  over the clip (0 = same face; dlib calls two faces the same person below 0.6).
"""

from __future__ import annotations

import numpy as np

from dubtool.arrays import mean_in_time
from dubtool.face.indices import CONTENT_SLICE, interocular
from dubtool.media.audio import SAMPLE_RATE

MAX_SYNC_OFFSET = 15
SYNC_WINDOW = range(-3, 2)
SYNC_DETREND_S = 1.0
SPEECH_BAND_HZ = (250.0, 2800.0)
MOUTH_JITTER = 0.01  # eye distances: FaceMesh's frame-to-frame noise on a still mouth


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def lmd(generated: np.ndarray, original: np.ndarray, part: slice = CONTENT_SLICE) -> float:
    """Landmark distance of the lip/jaw points (or ``part``: LIPS_SLICE, JAW_SLICE), (F, 131, 2)
    each, normalised by the original's eye distance."""
    distance = np.linalg.norm(generated[:, part] - original[:, part], axis=-1)
    return float(np.mean(distance.mean(axis=1) / interocular(original)))


def sharpness(generated: np.ndarray, original: np.ndarray) -> float:
    """Variance of the Laplacian of ``generated`` over that of ``original`` ((H, W, 3) uint8
    regions, compared in grey)."""
    import cv2

    def detail(region: np.ndarray) -> float:
        grey = cv2.cvtColor(region, cv2.COLOR_RGB2GRAY)
        return float(cv2.Laplacian(grey, cv2.CV_64F).var())

    return detail(generated) / max(detail(original), 1e-9)


def opening_correlation(opening: np.ndarray, reference: np.ndarray) -> float:
    """Pearson correlation at lag 0 of two (F,) opening series over the frames where both are
    finite; 0 when either does not move, NaN with fewer than 3 frames."""
    a, b = np.asarray(opening, np.float64), np.asarray(reference, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    spread = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / spread) if spread > 1e-12 else 0.0


def articulation(opening: np.ndarray, reference: np.ndarray) -> float:
    """Standard deviation of an (F,) opening series over the reference's, on the frames where
    both are finite (1: as wide as the reference, 0: still); NaN with fewer than 3 frames."""
    a, b = np.asarray(opening, np.float64), np.asarray(reference, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or b[ok].std() < 1e-12:
        return float("nan")
    return float(a[ok].std() / b[ok].std())


ENVELOPE_BLOCK = 2048  # columns (20 s) of the envelope's spectrogram computed at once


def speech_envelope(samples: np.ndarray, fps: float, frames: int) -> np.ndarray:
    """(frames,) log energy of 16 kHz speech in the voice band over each video frame's span.

    ``samples`` may be on disk (a DiskArray): it is read, and its spectrogram computed,
    ENVELOPE_BLOCK columns at a time (whole, ten minutes of it took 200 MB). Column t is
    librosa's centred frame t (zeros past both ends, as its constant padding)."""
    import librosa

    hop, n_fft = SAMPLE_RATE // 100, 512
    columns = 1 + len(samples) // hop
    power = np.empty(columns, np.float32)
    for start in range(0, columns, ENVELOPE_BLOCK):
        stop = min(start + ENVELOPE_BLOCK, columns)
        lo, hi = start * hop - n_fft // 2, (stop - 1) * hop + n_fft // 2
        segment = np.zeros(hi - lo, np.float32)
        first, last = max(lo, 0), min(hi, len(samples))
        if last > first:
            segment[first - lo:last - lo] = samples[first:last]
        power[start:stop] = librosa.feature.melspectrogram(
            y=segment, sr=SAMPLE_RATE, n_fft=n_fft, hop_length=hop, n_mels=24, center=False,
            fmin=SPEECH_BAND_HZ[0], fmax=SPEECH_BAND_HZ[1]).sum(axis=0)
    times = np.arange(len(power)) * hop / SAMPLE_RATE
    index = np.minimum((times * fps).astype(int), frames)
    log_energy = np.bincount(index, np.log(power + 1e-6), minlength=frames + 1)[:frames]
    counts = np.bincount(index, minlength=frames + 1)[:frames]
    return np.where(counts > 0, log_energy / np.maximum(counts, 1), np.log(1e-6))


def _detrended(series: np.ndarray, fps: float) -> np.ndarray:
    """Fill gaps (NaN) by interpolation, then remove the moving average over SYNC_DETREND_S:
    slow drifts (head moving closer, a louder passage) say nothing about sync."""
    x = np.asarray(series, np.float64)
    bad = ~np.isfinite(x)
    if bad.all():
        return np.zeros_like(x)
    if bad.any():
        x[bad] = np.interp(np.nonzero(bad)[0], np.nonzero(~bad)[0], x[~bad])
    width = max(3, round(fps * SYNC_DETREND_S) | 1)
    return x - mean_in_time(x, width)


def sync_curve(opening: np.ndarray, envelope: np.ndarray, fps: float,
               max_offset: int = MAX_SYNC_OFFSET) -> dict[int, float]:
    """Correlation of the detrended mouth opening with the detrended speech envelope for every
    offset in frames (positive: the mouth moves after the sound)."""
    mouth, speech = _detrended(opening, fps), _detrended(envelope, fps)
    curve = {}
    for offset in range(-max_offset, max_offset + 1):
        a = mouth[max(offset, 0):len(mouth) + min(offset, 0)]
        b = speech[max(-offset, 0):len(speech) + min(-offset, 0)]
        n = min(len(a), len(b))
        a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
        spread = max(float(a.std()), MOUTH_JITTER) * max(float(b.std()), 1e-9)
        curve[offset] = float(np.mean(a * b) / spread) if n >= 8 else 0.0
    return curve


def sync_score(opening: np.ndarray, envelope: np.ndarray,
               fps: float) -> tuple[int, float, float]:
    """(best offset in frames, in-sync score, confidence).

    The in-sync score is the best correlation at the offsets of natural speech (SYNC_WINDOW:
    the mouth leads the sound by up to 3 frames); the confidence is that minus the median over
    all offsets. Speech shifted away from the video peaks elsewhere and scores low in the window.
    """
    curve = sync_curve(opening, envelope, fps)
    best = max(curve, key=curve.get)
    in_sync = max(curve[o] for o in SYNC_WINDOW if o in curve)
    return best, in_sync, float(in_sync - np.median(list(curve.values())))


def stability(generated_mouths: np.ndarray, original_mouths: np.ndarray) -> float:
    """Frame-to-frame change of the mouth region, relative to the original's: (F, H, W, 3)."""
    def change(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x.astype(np.float32), axis=0)).mean())

    return change(generated_mouths) / max(change(original_mouths), 1e-6)
