"""Stages ``crops`` and ``diffuse``: face crops of the source frames, then new lower halves.

The output frames are generated in chunks of L frames (the number the model was trained on),
in order: each chunk's temporal attention also sees the last generated frames of the chunk
before it (the motion frames), so motion flows across chunk borders without a seam. Chunk k
is sampled with a generator seeded by (seed, k), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dubtool.media.frames import read_frames
from dubtool.media.probe import VideoInfo
from dubtool.nets.io import LoadedModel
from dubtool.nets.sampling import inpaint_lower_half, make_scheduler
from dubtool.pipeline.landmarks import FaceTrack

VERSION = 2
CROPS_FILE = "crops.npy"


def write_crops(video: VideoInfo, track: FaceTrack, size: int, folder: Path) -> None:
    """Every source frame's face crop, (F, size, size, 3) uint8, memory-mapped on disk."""
    crops = np.lib.format.open_memmap(folder / CROPS_FILE, mode="w+", dtype=np.uint8,
                                      shape=(video.frame_count, size, size, 3))
    has_box = bool(track.detected.any())
    for i, frame in enumerate(read_frames(video)):
        if has_box:
            crops[i] = track.box(i).crop(frame, size)
    crops.flush()


def load_crops(folder: Path) -> np.ndarray:
    return np.load(folder / CROPS_FILE, mmap_mode="r")


def to_model(images: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(K, S, S, 3) uint8 -> (K, 3, S, S) in [-1, 1]."""
    x = torch.from_numpy(np.array(images)).to(device)  # a copy: memmaps are read-only
    return (x.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0)


def to_images(x: torch.Tensor) -> np.ndarray:
    """(K, 3, S, S) in [-1, 1] -> (K, S, S, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass(frozen=True)
class DiffusionSettings:
    steps: int
    eta: float = 0.0
    seed: int = 0
    strength: float = 1.0


def chunk_count(output_frames: int, chunk_frames: int) -> int:
    return -(-output_frames // chunk_frames)


class LowerFaceGenerator:
    """What stays fixed across the chunks of one dub: model, reference features, targets."""

    def __init__(self, model: LoadedModel, crops: np.ndarray, plan: np.ndarray,
                 target: np.ndarray, has_face: np.ndarray, reference_frame: int,
                 settings: DiffusionSettings, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        """crops (F, S, S, 3) per source frame; plan (O,) source frame per output frame;
        target (O, 131, 2) landmarks; has_face (F,) whether the source frame has a face."""
        if model.dubber is None:
            raise ValueError("the model has no trained dubbing network")
        self.model, self.crops, self.plan, self.target = model, crops, plan, target
        self.has_face = has_face
        self.settings, self.device, self.dtype = settings, device, dtype
        self.chunk_frames = model.config.completion.frames
        self.motion_frames = model.config.denoiser.motion_frames
        self.scheduler = make_scheduler(model.config.diffusion)
        with torch.inference_mode():
            image = to_model(crops[reference_frame:reference_frame + 1], device, dtype)
            self.reference_latent = model.autoencoder.encode(image)

    @property
    def chunks(self) -> int:
        return chunk_count(len(self.plan), self.chunk_frames)

    @torch.inference_mode()
    def __call__(self, k: int, previous: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Chunk k: generated crops (n, S, S, 3) uint8 and their latents (n, C, h, w)."""
        frames = np.arange(k * self.chunk_frames,
                           min((k + 1) * self.chunk_frames, len(self.plan)))
        count = len(frames)
        # The last chunk is padded with its last frame to the length the model knows.
        padded = np.concatenate([frames, np.full(self.chunk_frames - count, frames[-1])])
        ae, dubber = self.model.autoencoder, self.model.dubber
        known = ae.encode(to_model(self.crops[self.plan[padded]], self.device, self.dtype))
        if not self.has_face[self.plan[frames]].any():
            # Nothing here will be pasted back: keep the crops (their latents still serve as
            # the next chunk's motion frames).
            return {"crops": np.asarray(self.crops[self.plan[frames]]),
                    "latents": known[:count].float().cpu().numpy()}
        landmarks = torch.from_numpy(self.target[padded][None]).to(self.device, self.dtype)
        motion = None
        if previous is not None and self.motion_frames:
            motion = torch.from_numpy(previous["latents"][-self.motion_frames:])
            motion = motion[None].to(self.device, self.dtype)
        cond = dubber.conditioning(landmarks, self.reference_latent, motion)
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + k)
        latents = inpaint_lower_half(dubber.denoiser, known, cond, self.scheduler,
                                     self.settings.steps, self.settings.eta, generator,
                                     init=self.reference_latent,
                                     strength=self.settings.strength)
        crops = to_images(ae.decode(latents))
        return {"crops": crops[:count], "latents": latents[:count].float().cpu().numpy()}
