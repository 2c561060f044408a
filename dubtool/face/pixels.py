"""Face boxes of the frames the blend moves from the decoder to the encoder: the box's
pixels in RGB for the renderer, and the new lower face pasted back.

Two kinds of frames behind one interface (``frame_pixels`` picks):
- ``YuvFrames``, a video with even sides (as H.264's 4:2:0 has them): the decoder's own
  yuv420p. Every pixel outside the face passes through exactly, and ffmpeg turns no whole
  frame into RGB and back (at 1080p 9 ms of CPU a frame, measured, and 1.25 grey levels of
  luma lost each round trip). Only the face box goes to RGB and its new lower face back,
  with the colour matrix ffmpeg decodes the video with (BT.709 where the stream says so,
  else BT.601), in the limited range the pipe carries. A frame is a flat uint8 buffer: W x H
  luma, then two (H/2) x (W/2) chroma planes (I420).
- ``RgbFrames``, any other: (H, W, 3) RGB frames, ``CropBox.crop`` and ``CropBox.paste``.
"""

from __future__ import annotations

from typing import Protocol

import cv2
import numpy as np

from dubtool.face.crop import CropBox

# Kr, Kb of the two colour matrices ffmpeg decodes 8-bit video with.
_KR_KB = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114)}


def colour_matrices(colour_space: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB -> limited-range YCbCr, YCbCr -> RGB) as 3 x 4 affine matrices for
    ``cv2.transform``, for a stream whose ffprobe ``color_space`` is ``colour_space``."""
    kr, kb = _KR_KB["bt709" if colour_space == "bt709" else "bt601"]
    kg = 1.0 - kr - kb
    full = np.array([[kr, kg, kb],
                     [-kr / (2 * (1 - kb)), -kg / (2 * (1 - kb)), 0.5],
                     [0.5, -kg / (2 * (1 - kr)), -kb / (2 * (1 - kr))]])
    to_yuv = np.diag([219 / 255, 224 / 255, 224 / 255]) @ full
    offset = np.array([16.0, 128.0, 128.0])
    to_rgb = np.linalg.inv(to_yuv)
    return (np.concatenate([to_yuv, offset[:, None]], axis=1),
            np.concatenate([to_rgb, (-to_rgb @ offset)[:, None]], axis=1))


class FramePixels(Protocol):
    pixel_format: str  # the frames' format through ffmpeg's pipes (``media.frames``)

    def box_rgb(self, frame: np.ndarray, box: CropBox) -> np.ndarray:
        """The box's pixels (size, size, 3) uint8 RGB, the frame's edge repeated where the
        box reaches past it."""
        ...

    def paste(self, frame: np.ndarray, box: CropBox, face: np.ndarray,
              mask: np.ndarray) -> np.ndarray:
        """A copy of ``frame`` with the RGB ``face`` (S, S, 3) weighed in by ``mask`` (S, S)
        in [0, 1], both scaled to the box; pixels outside the box untouched."""
        ...


def frame_pixels(width: int, height: int, colour_space: str) -> FramePixels:
    """The frames the blend moves for a ``width`` x ``height`` video whose ffprobe
    ``color_space`` is ``colour_space``."""
    if width % 2 or height % 2:
        return RgbFrames()
    return YuvFrames(width, height, colour_space)


class RgbFrames:
    """Face boxes of (H, W, 3) uint8 RGB frames."""

    pixel_format = "rgb24"

    def box_rgb(self, frame: np.ndarray, box: CropBox) -> np.ndarray:
        return box.crop(frame, box.size)

    def paste(self, frame: np.ndarray, box: CropBox, face: np.ndarray,
              mask: np.ndarray) -> np.ndarray:
        return box.paste(frame, face, mask)


class YuvFrames:
    """Face boxes of the (W * H * 3 / 2,) uint8 I420 frames of an even-sided video."""

    pixel_format = "yuv420p"

    def __init__(self, width: int, height: int, colour_space: str) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"a {width}x{height} frame has no whole 4:2:0 chroma samples")
        self.width, self.height = width, height
        self.to_yuv, self.to_rgb = colour_matrices(colour_space)

    def planes(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (H, W), (H/2, W/2), (H/2, W/2) of the frame's Y, U and V."""
        w, h = self.width, self.height
        size = w * h
        return (frame[:size].reshape(h, w), frame[size:size * 5 // 4].reshape(h // 2, w // 2),
                frame[size * 5 // 4:].reshape(h // 2, w // 2))

    def _region(self, box: CropBox) -> tuple[int, int, int, int] | None:
        """The part of ``box`` inside the frame widened to even rows and columns (x0, y0, x1,
        y1), whose chroma samples lie wholly in it; None if the box misses the frame."""
        x0, y0 = max(box.x0, 0), max(box.y0, 0)
        x1, y1 = min(box.x0 + box.size, self.width), min(box.y0 + box.size, self.height)
        if x1 <= x0 or y1 <= y0:
            return None
        return x0 - x0 % 2, y0 - y0 % 2, x1 + x1 % 2, y1 + y1 % 2

    def box_rgb(self, frame: np.ndarray, box: CropBox) -> np.ndarray:
        """The box's pixels (size, size, 3) uint8 RGB, the frame's edge repeated where the box
        reaches past it (``CropBox.crop`` of the region turned into RGB)."""
        region = self._region(box)
        if region is None:
            raise ValueError(f"crop box {box} lies outside the {self.width}x{self.height} frame")
        x0, y0, x1, y1 = region
        y, u, v = self.planes(frame)
        chroma = [cv2.resize(np.ascontiguousarray(c[y0 // 2:y1 // 2, x0 // 2:x1 // 2]),
                             (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
                  for c in (u, v)]
        rgb = cv2.transform(cv2.merge([np.ascontiguousarray(y[y0:y1, x0:x1]), *chroma]),
                            self.to_rgb)
        return _in_region(box, x0, y0).crop(rgb, box.size)

    def paste(self, frame: np.ndarray, box: CropBox, face: np.ndarray,
              mask: np.ndarray) -> np.ndarray:
        """A copy of ``frame`` with the RGB ``face`` (S, S, 3) weighed in by ``mask`` (S, S) in
        [0, 1], both scaled to the box: luma at full resolution, chroma by 2 x 2 blocks.
        Where the mask is 0 the frame's samples stay exactly as they were."""
        out = frame.copy()
        region = self._region(box)
        if region is None:
            return out
        if face.shape[0] != box.size:
            face = cv2.resize(face, (box.size, box.size), interpolation=cv2.INTER_CUBIC)
            mask = cv2.resize(mask.astype(np.float32), (box.size, box.size),
                              interpolation=cv2.INTER_LINEAR)
        x0, y0, x1, y1 = region
        # The face and mask on the region (mask 0 outside the box).
        inside = _in_region(box, x0, y0)
        canvas = inside.paste(np.zeros((y1 - y0, x1 - x0, 3), np.uint8), face)
        weight = inside.paste(np.zeros((y1 - y0, x1 - x0), np.float32),
                              np.clip(mask, 0.0, 1.0).astype(np.float32))
        new = cv2.transform(canvas, self.to_yuv)
        y, u, v = self.planes(out)
        half = ((x1 - x0) // 2, (y1 - y0) // 2)
        small = cv2.resize(weight, half, interpolation=cv2.INTER_AREA)
        for plane, channel, w, (r0, r1, c0, c1) in (
                (y, new[..., 0], weight, (y0, y1, x0, x1)),
                (u, cv2.resize(new[..., 1], half, interpolation=cv2.INTER_AREA), small,
                 (y0 // 2, y1 // 2, x0 // 2, x1 // 2)),
                (v, cv2.resize(new[..., 2], half, interpolation=cv2.INTER_AREA), small,
                 (y0 // 2, y1 // 2, x0 // 2, x1 // 2))):
            plane[r0:r1, c0:c1] = cv2.blendLinear(
                np.ascontiguousarray(channel), np.ascontiguousarray(plane[r0:r1, c0:c1]),
                w, 1.0 - w)
        return out


def _in_region(box: CropBox, x0: int, y0: int) -> CropBox:
    """``box`` in the coordinates of a region of the frame whose top-left pixel is (x0, y0)."""
    return CropBox(box.x0 - x0, box.y0 - y0, box.size)
