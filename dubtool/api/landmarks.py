"""``dubtool landmarks``: the face track of a video, drawn on it and written as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dubtool.errors import OutputError
from dubtool.options import FaceChoice

if TYPE_CHECKING:
    from dubtool.pipeline.cache import StageRecord
    from dubtool.pipeline.extract import Extracted
    from dubtool.pipeline.landmarks import FaceTrack
    from dubtool.pipeline.progress import StageProgress


@dataclass
class LandmarksResult:
    extracted: Extracted
    track: FaceTrack
    output: Path | None
    json_path: Path | None
    stages: list[StageRecord] = field(default_factory=list)
    cache_dir: Path | None = None


def landmarks(video: str | Path, output: str | Path | None = None,
              json_path: str | Path | None = None, *, detector: str = "mediapipe",
              face: FaceChoice = "largest", cache_dir: str | Path | None = None,
              force: bool = False, progress: StageProgress | None = None) -> LandmarksResult:
    """Detect the face in every frame; optionally draw a debugging video and write the points.

    The video at ``output`` shows the 131 points (pose and lip/jaw in two colours) and the crop
    box on every frame, with the original audio. ``json_path`` gets the points per frame.
    """
    from dubtool.media.frames import check_output_path, check_video_output
    from dubtool.pipeline.run import Inputs, run_front

    inputs = Inputs.of(video)
    checked = [check(p, [inputs.video]) for p, check in
               ((output, check_video_output), (json_path, check_output_path)) if p is not None]
    if len(set(checked)) < len(checked):
        raise OutputError("the video and JSON outputs must be different files", checked[0])
    with inputs.open_cache(cache_dir) as cache:
        front = run_front(cache, inputs, detector=detector, face=face, force=force,
                          progress=progress)
    result = LandmarksResult(front.extracted, front.track,
                             None if output is None else check_output_path(output),
                             None if json_path is None else check_output_path(json_path),
                             cache.records, cache.dir)
    if result.output is not None:
        _write_debug_video(result, progress)
    if result.json_path is not None:
        _write_points_json(result)
    return result


def _write_debug_video(result: LandmarksResult, progress: StageProgress | None) -> None:
    from dubtool.face.draw import draw_face
    from dubtool.media.frames import VideoWriter, read_frames

    video, track = result.extracted.video, result.track
    with VideoWriter(result.output, video.width, video.height, video.fps,
                     audio=video.path if video.has_audio else None) as writer:
        for i, frame in enumerate(read_frames(video)):
            found = bool(track.detected[i])
            label = None if found else f"frame {i}: no face"
            writer.write(draw_face(frame, track.points[i] if found else None,
                                   track.box(i) if track.detected.any() else None, label))
            if progress is not None:
                progress("draw", i + 1, video.frame_count)


def _write_points_json(result: LandmarksResult) -> None:
    from dubtool.face.indices import NUM_POSE, ORDER
    from dubtool.media.frames import partial_path, replace_output

    video, track = result.extracted.video, result.track
    frames = []
    for i in range(track.frames):
        found = bool(track.detected[i])
        frames.append({
            "index": i,
            "time": round(i / float(video.fps), 4),
            "face": found,
            "box": [int(v) for v in track.boxes[i]] if found else None,
            "points": [[round(float(x), 2), round(float(y), 2)] for x, y in track.points[i]]
            if found else None,
        })
    data = {
        "video": video.path, "width": video.width, "height": video.height,
        "fps": float(video.fps), "frame_count": track.frames, "detector": track.detector,
        "points": "131 MediaPipe FaceMesh points in pixels, smoothed; the first "
                  f"{NUM_POSE} are pose points, the rest lip/jaw",
        "mediapipe_indices": list(ORDER), "frames": frames,
    }
    tmp = partial_path(result.json_path)
    try:
        tmp.write_text(json.dumps(data))
        replace_output(tmp, result.json_path)
    finally:
        tmp.unlink(missing_ok=True)
