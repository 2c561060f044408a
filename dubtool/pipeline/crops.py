"""Stage ``crops``: the face crop of every source frame at one size, memory-mapped on disk
(the diffusion renderer's inputs, and a prepared clip's pictures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dubtool.media.frames import read_frames
from dubtool.media.probe import VideoInfo
from dubtool.pipeline.landmarks import FaceTrack

CROPS_FILE = "crops.npy"


def write_crops(video: VideoInfo, track: FaceTrack, size: int, folder: Path) -> None:
    """The face crop of every source frame the track covers, (F, size, size, 3) uint8,
    memory-mapped on disk."""
    crops = np.lib.format.open_memmap(folder / CROPS_FILE, mode="w+", dtype=np.uint8,
                                      shape=(track.frames, size, size, 3))
    has_box = bool(track.detected.any())
    for i, frame in enumerate(read_frames(video, track.frames)):
        if has_box:
            crops[i] = track.box(i).crop(frame, size)
    crops.flush()


def load_crops(folder: Path) -> np.ndarray:
    return np.load(folder / CROPS_FILE, mmap_mode="r")

