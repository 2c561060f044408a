"""Stage ``blend``: paste the new lower faces into the original frames and mux the speech.

Each renderer's lower face goes back through the soft mask of the lower face that it made with
``face.mask.lower_face_mask``, colour-corrected by ``face.mask.match_colour``. Frames without a
face are written untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from dubtool.face.pixels import FramePixels, frame_pixels
from dubtool.media.frames import VideoWriter, read_frames_in_order
from dubtool.media.probe import VideoInfo
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.renderers.base import LowerFaces


def blend_pixels(video: VideoInfo) -> FramePixels:
    """The frames the blend moves: the decoder's yuv420p where the sides allow it."""
    return frame_pixels(video.width, video.height, video.colour_space)


def blended_frames(video: VideoInfo, track: FaceTrack, plan: np.ndarray, faces: LowerFaces,
                   scratch: Path) -> Iterator[tuple[np.ndarray, bool]]:
    """(frame, dubbed) for every output frame, the renderer's ``faces`` pasted in; frames
    as ``blend_pixels`` has them."""
    pixels = blend_pixels(video)
    for o, frame in enumerate(read_frames_in_order(video, plan, scratch,
                                                   pixels.pixel_format)):
        source = int(plan[o])
        if not track.detected[source]:
            yield frame, False
            continue
        box = track.box(source)
        face, mask = faces.lower_face(o, pixels.box_rgb(frame, box))
        yield pixels.paste(frame, box, face, mask), True


def write_video(frames: Iterator[tuple[np.ndarray, bool]], video: VideoInfo, total: int,
                output: Path, speech: Path, progress: Callable[[int, int], None] | None = None
                ) -> int:
    """Encode the ``total`` frames with the speech, cut to their duration (``--loop cut``:
    a video shorter than the speech); returns how many were dubbed (had a face)."""
    dubbed = 0
    with VideoWriter(output, video.width, video.height, video.fps, audio=speech,
                     audio_seconds=total / float(video.fps),
                     pixel_format=blend_pixels(video).pixel_format) as writer:
        for i, (frame, was_dubbed) in enumerate(frames):
            writer.write(frame)
            dubbed += was_dubbed
            if progress is not None:
                progress(i + 1, total)
    return dubbed
