"""The ``diffusion`` renderer, the paper's model: stages ``crops`` and ``diffuse``. One
reference face at the model's crop size (128 px for ``cpu-128``), warped to the targets and
refined by the TalkFormer denoiser, then scaled up into the frame.

The output frames are generated in chunks of L frames (the number the model was trained on),
in order: each chunk's temporal attention also sees the last generated frames of the chunk
before it (the motion frames), so motion flows across chunk borders without a seam. Chunk k
is sampled with a generator seeded by (seed, k), so a resumed run equals an uninterrupted one.

With strength < 1 (image-to-image), sampling starts from the reference face bent by a
thin-plate spline onto each frame's target landmarks, noised part of the way: the warp puts
lips and jaw where the speech wants them, the denoiser redraws the mouth from there.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator

import numpy as np
import torch

from dubtool.arrays import DiskArray
from dubtool.devices import sampling_precision
from dubtool.errors import ModelError
from dubtool.face.mask import DETAIL_FROM, DETAIL_RAMP, lower_face_mask, match_colour
from dubtool.face.warp import warp_face
from dubtool.hashing import code_digest, fingerprint
from dubtool.nets.io import LoadedModel
from dubtool.nets.sampling import inpaint_lower_half, lower_half_mask, make_scheduler
from dubtool.pipeline import crops as crops_stage
from dubtool.pipeline.cache import load_chunk
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.renderers.base import DiffusionSettings, LowerFaces, RenderJob


class DiffusionRenderer:
    name = "diffusion"

    def __init__(self, model: LoadedModel, model_digest: str, settings: DiffusionSettings,
                 device: torch.device) -> None:
        self.model, self.model_digest = model, model_digest
        self.settings, self.device = settings, device

    def render(self, job: RenderJob) -> LowerFaces:
        model, settings, track, plan = self.model, self.settings, job.track, job.plan
        size = model.config.crop_size
        crops_fp = fingerprint("crops", code_digest(crops_stage), job.track_fp, size)
        folder = job.cache.run_stage(
            "crops", crops_fp, lambda out: crops_stage.write_crops(job.video, track, size, out),
            force=job.force)
        crops = crops_stage.load_crops(folder)
        precision = sampling_precision(self.device)
        diffuse_fp = fingerprint("diffuse", code_digest(sys.modules[__name__]), job.upstream,
                                 crops_fp, self.model_digest, settings.steps, settings.eta,
                                 settings.seed, settings.strength, settings.batch_size,
                                 job.reference_frame, str(precision))
        chunk_frames = model.config.completion.frames
        done = [0]

        @functools.cache  # built on first use: a warm run never needs it
        def generator() -> LowerFaceGenerator:
            return LowerFaceGenerator(
                model, crops, plan, job.target, track.detected, job.reference_frame,
                track.crop_points(job.reference_frame), settings, self.device, precision)

        def chunks(ks: list[int], previous: list[dict | None]) -> list[dict]:
            results = generator().generate(ks, previous)
            done[0] += len(ks)
            if job.progress is not None:
                job.progress("diffuse", min(done[0] * chunk_frames, len(plan)), len(plan))
            return results

        count = chunk_count(len(plan), chunk_frames)
        folder = job.cache.run_chunked_stage("diffuse", diffuse_fp, count, chunks,
                                             force=job.force, streams=settings.batch_size)
        generated = (crop for k in range(count) for crop in load_chunk(folder, k)["crops"])
        return DiffusionFaces(track, job.target, plan, crops, generated)


class DiffusionFaces:
    """The diffusion renderer's crops (one per output frame, read chunk by chunk), colour-
    matched to the source crops of the model's size."""

    def __init__(self, track: FaceTrack, target: np.ndarray, plan: np.ndarray,
                 crops: np.ndarray, generated: Iterator[np.ndarray]) -> None:
        self.track, self.target, self.plan, self.crops = track, target, plan, crops
        self.generated, self.next = generated, 0

    def lower_face(self, o: int, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        while self.next <= o:  # frames without a face have crops too: skip them
            crop = next(self.generated)
            self.next += 1
        source = int(self.plan[o])
        size = self.crops.shape[1]
        mask = lower_face_mask([self.track.crop_points(source), self.target[o]], size)
        return match_colour(crop, self.crops[source], mask), mask


def to_model(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(K, S, S, 3) uint8 -> (K, 3, S, S) in [-1, 1]."""
    x = torch.from_numpy(np.array(images)).to(device)  # a copy: memmaps are read-only
    return (x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).contiguous(
        memory_format=torch.channels_last)


def to_images(x: torch.Tensor) -> np.ndarray:
    """(K, 3, S, S) in [-1, 1] -> (K, S, S, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def chunk_count(output_frames: int, chunk_frames: int) -> int:
    return -(-output_frames // chunk_frames)


class LowerFaceGenerator:
    """What stays fixed across the chunks of one dub: model, reference features, targets."""

    def __init__(self, model: LoadedModel, crops: np.ndarray, plan: np.ndarray,
                 target: np.ndarray | DiskArray, has_face: np.ndarray, reference_frame: int,
                 reference_points: np.ndarray, settings: DiffusionSettings,
                 device: torch.device, precision: torch.dtype = torch.float32) -> None:
        """crops (F, S, S, 3) per source frame; plan (O,) source frame per output frame;
        target (O, 131, 2) landmarks (on disk: read a chunk's at a time); has_face (F,)
        whether the source frame has a face; reference_points (131, 2) the reference frame's
        landmarks in its crop; precision: the autocast type of the networks (weights stay
        float32)."""
        if model.dubber is None or model.autoencoder is None:
            raise ModelError("was loaded without the diffusion renderer's networks "
                             "(load_model(..., completion_only=False))", model.folder)
        self.model, self.crops, self.plan, self.target = model, crops, plan, target
        self.has_face = has_face
        self.settings, self.device, self.precision = settings, device, precision
        # Channels-last convolutions: the autoencoder 1.7x faster on this CPU.
        model.autoencoder.to(memory_format=torch.channels_last)
        self.chunk_frames = model.config.completion.frames
        self.motion_frames = model.config.denoiser.motion_frames
        self.scheduler = make_scheduler(model.config.diffusion)
        self.reference_crop = np.asarray(crops[reference_frame])
        size = crops.shape[1]
        rows = torch.clamp((torch.arange(size, dtype=torch.float32) - DETAIL_FROM * size)
                           / (DETAIL_RAMP * size), 0, 1)
        self._detail_rows = rows.to(device)[:, None]
        self.reference_points = reference_points
        with torch.inference_mode(), self._autocast():
            image = to_model(self.reference_crop[None], device)
            self.reference_latent = model.autoencoder.encode(image)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.precision,
                              enabled=self.precision != torch.float32)

    @torch.inference_mode()
    def generate(self, ks: list[int],
                 previous: list[dict[str, np.ndarray] | None]) -> list[dict[str, np.ndarray]]:
        """Chunks ``ks`` in one batch, each given its predecessor's arrays (or None); chunk k's
        starting noise comes from its own seed, so a chunk does not depend on its batch. Each
        result: generated crops (n, S, S, 3) uint8 and their latents (n, C, h, w)."""
        results: dict[int, dict[str, np.ndarray]] = {}
        ae = self.model.autoencoder
        spans = {k: np.arange(k * self.chunk_frames,
                              min((k + 1) * self.chunk_frames, len(self.plan))) for k in ks}
        todo = []
        for k, before in zip(ks, previous, strict=True):
            if self.has_face[self.plan[spans[k]]].any():
                todo.append((k, before))
                continue
            # Nothing here will be pasted back: keep the crops (their latents still serve as
            # the next chunk's motion frames).
            crops = np.asarray(self.crops[self.plan[spans[k]]])
            results[k] = {"crops": crops, "latents": ae.encode(
                to_model(crops, self.device)).float().cpu().numpy()}
        if todo:
            with self._autocast():
                self._diffuse(todo, spans, results)
        return [results[k] for k in ks]

    def _diffuse(self, todo: list[tuple[int, dict | None]], spans: dict[int, np.ndarray],
                 results: dict[int, dict[str, np.ndarray]]) -> None:
        ae, dubber = self.model.autoencoder, self.model.dubber
        length = self.chunk_frames
        # A short last chunk is padded with its last frame to the length the model knows.
        padded = [np.concatenate([spans[k], np.full(length - len(spans[k]), spans[k][-1])])
                  for k, _ in todo]
        frames = np.concatenate(padded)
        known = ae.encode(to_model(self.crops[self.plan[frames]], self.device))
        init = lost = None
        if self.settings.strength < 1:
            # Partial denoising starts from the reference face bent to each frame's target
            # landmarks: the mouth is already where the speech wants it.
            warped = to_model(np.stack([warp_face(self.reference_crop, self.reference_points,
                                                  self.target[o]) for o in frames]),
                              self.device)
            init = ae.encode(warped)
            # The autoencoder blurs what it rebuilds: the detail it loses of the warped face
            # (as the sampler composes it, below the known upper half) is added back, so that
            # only the denoiser's changes go through it.
            mask = lower_half_mask(known.shape[-1], self.device)
            lost = (warped - ae.decode(init * mask + known * (1 - mask))) * self._detail_rows
        landmarks = torch.from_numpy(self.target[np.stack(padded)]).to(self.device, torch.float32)
        motion = None
        if self.motion_frames and all(before is not None for _, before in todo):
            motion = torch.from_numpy(np.stack([before["latents"][-self.motion_frames:]
                                                for _, before in todo]))
            motion = motion.to(self.device, torch.float32)
        reference = self.reference_latent.expand(len(todo), -1, -1, -1)
        cond = dubber.conditioning(landmarks, reference, motion)
        # Each chunk's noise (at the start and, with eta > 0, at every step) comes from its
        # own generator: the result does not depend on the batch the chunk is in.
        generators = [torch.Generator().manual_seed(self.settings.seed * 1_000_003 + k)
                      for k, _ in todo]
        latents = inpaint_lower_half(dubber.denoiser, known, cond, self.scheduler,
                                     self.settings.steps, self.settings.eta, generators,
                                     init=init, strength=self.settings.strength)
        decoded = ae.decode(latents)
        crops = to_images(decoded if lost is None else decoded + lost)
        for i, (k, _) in enumerate(todo):
            count = len(spans[k])
            part = slice(i * length, i * length + count)
            results[k] = {"crops": crops[part],
                          "latents": latents[part].float().cpu().numpy()}
