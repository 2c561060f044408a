"""Stage ``sources``: which of the video's own frames each output frame's lower face is drawn
from.

An open mouth must come from a frame where the mouth was open (teeth, tongue, the dark inside)
and a closed one from a closed one, so each output frame gets the source frame whose lip/jaw
shape, in the face's own frame of reference, is nearest its target landmarks, with a similar
head pose. The choice is a best path through time (Viterbi) with a cost for every switch, so
the source changes only when the shapes call for it, and each switch is cross-faded over a few
frames.

The dub's reference frame (the anchor) is preferred: another frame replaces it only where its
mouth is nearer the target by ``anchor_preference`` or more, as for a wide-open mouth drawn
from a closed source. Every source's landmarks err a little differently (a detector's), and each
switch of source carries its error into the mouth's shape; one source for most frames keeps
the opening as steady as one source alone, and the others bring what it cannot show.

In the speech's pauses, where the targets are the video's closed mouth, neither holds: no
source is preferred, and a source more open than the target pays for all of its opening. The
warp presses the lips of an open source together, but FaceMesh (and a viewer) still see a
mouth parted by its dark inside: with the anchor kept through a 1.2 s pause, the dub's lips
measured 0.050 eye distances apart where the targets were 0.011.

The candidates are at most ``DEFAULT_SOURCES`` frames spread over the video's mouth shapes
(farthest-point sampling among at most ``SHAPE_FRAMES`` frames spread evenly over the video),
and, when the speech pauses, the frame whose mouth is most closed: this bounds the work, the
memory and the cache whatever the video's length.
``exclude_frames`` keeps every candidate that many frames or more away from the frame it would
be pasted on: the reconstruction protocol's rule, so that no ground-truth mouth is copied.

The weights, costs and fades are the model's (``SourceSettings``, the ``inference.sources``
section of its config.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dubtool.face.indices import (
    CONTENT_SLICE,
    POSE_SLICE,
    inner_lip_opening,
    interocular,
)
from dubtool.nets.config import SourceSettings
from dubtool.options import DEFAULT_SOURCES

SHAPE_FRAMES = 4096     # the candidates are chosen among at most this many frames
TARGET_CHUNK = 256      # output frames whose costs are computed at once (a part's pose
                        # differences with 48 candidates: 7 MB)


@dataclass
class SourcePlan:
    """For every output frame o: ``source[o]``, the source frame its lower face is drawn from
    (the best path), and ``outgoing[o]``, the one it replaced a few frames before, still
    showing with weight ``outgoing_weight[o]`` (a cross-fade in progress; elsewhere equal to
    ``source`` with weight 0). ``pool`` (K,): the candidate frames considered."""

    source: np.ndarray
    outgoing: np.ndarray
    outgoing_weight: np.ndarray
    pool: np.ndarray

    @property
    def used(self) -> np.ndarray:
        """The distinct source frames the output draws from, sorted."""
        return np.unique(np.concatenate([self.source, self.outgoing]))

    def save(self, folder: Path) -> None:
        np.savez(folder / "sources.npz", source=self.source, outgoing=self.outgoing,
                 outgoing_weight=self.outgoing_weight, pool=self.pool)

    @classmethod
    def load(cls, folder: Path) -> SourcePlan:
        with np.load(folder / "sources.npz", allow_pickle=False) as data:
            return cls(data["source"], data["outgoing"], data["outgoing_weight"], data["pool"])


def face_frame_shapes(points: np.ndarray, template: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Lip/jaw shape and pose of each face in a common frame of reference.

    ``points`` (N, 131, 2) in any units, ``template`` (131, 2). Each face is moved by the
    similarity (scale, rotation, shift) that best takes its pose points onto the template's,
    in units of the template's eye distance. Returns shapes (N, 57 x 2) and pose residuals
    (N, 74 x 2): what is left of the pose points after that similarity (head turn, nod).
    """
    scale = float(interocular(template))
    shapes = np.empty((len(points), 57 * 2), np.float32)
    poses = np.empty((len(points), 74 * 2), np.float32)
    anchor = template[POSE_SLICE].astype(np.float64)
    for i, p in enumerate(points.astype(np.float64)):
        matrix, _ = cv2.estimateAffinePartial2D(p[POSE_SLICE], anchor, method=cv2.LMEDS)
        if matrix is None:
            matrix = np.eye(2, 3)
        moved = (p @ matrix[:, :2].T + matrix[:, 2]) / scale
        shapes[i] = moved[CONTENT_SLICE].ravel()
        poses[i] = (moved[POSE_SLICE] - anchor / scale).ravel()
    return shapes, poses


def spread_pool(shapes: np.ndarray, frames: np.ndarray, size: int,
                first: int | None = None) -> np.ndarray:
    """At most ``size`` of ``frames`` whose ``shapes`` (one row per frame) cover the shapes seen:
    farthest-point sampling from ``first`` (default: the first frame). Sorted frame indices."""
    if len(frames) <= size:
        return np.sort(frames)
    chosen = [0 if first is None else int(np.nonzero(frames == first)[0][0])]
    distance = np.linalg.norm(shapes - shapes[chosen[0]], axis=1)
    for _ in range(size - 1):
        pick = int(np.argmax(distance))
        chosen.append(pick)
        distance = np.minimum(distance, np.linalg.norm(shapes - shapes[pick], axis=1))
    return np.sort(frames[chosen])


def best_path(cost: np.ndarray, switch_cost: float) -> np.ndarray:
    """Viterbi over (O, K) per-frame costs (inf: not allowed) with ``switch_cost`` for every
    change of column: (O,) the column of each row on the cheapest path."""
    frames, columns = cost.shape
    total = cost[0].astype(np.float64)  # sums over a long video: float32 would round them
    back = np.zeros((frames, columns), np.int16 if columns < 2**15 else np.int64)
    for o in range(1, frames):
        best = int(np.argmin(total))
        switch = total[best] + switch_cost
        stay = total
        back[o] = np.where(stay <= switch, np.arange(columns), best)
        total = np.minimum(stay, switch) + cost[o]
    path = np.empty(frames, np.int64)
    path[-1] = int(np.argmin(total))
    for o in range(frames - 1, 0, -1):
        path[o - 1] = back[o, path[o]]
    return path


def cross_fades(path: np.ndarray, fade: int) -> tuple[np.ndarray, np.ndarray]:
    """(outgoing, outgoing_weight) per frame of a path of sources: at each switch from a to
    b, a still shows on the ``fade`` frames from the switch on, fading out under b."""
    outgoing = path.copy()
    weight = np.zeros(len(path), np.float32)
    for o in np.nonzero(path[1:] != path[:-1])[0] + 1:
        for j in range(fade):
            if o + j >= len(path) or path[o + j] != path[o]:
                break
            outgoing[o + j] = path[o - 1]
            weight[o + j] = 1 - (j + 1) / (fade + 1)
    return outgoing, weight


def choose_sources(track_points: np.ndarray, detected: np.ndarray, target: np.ndarray,
                      plan: np.ndarray, *, anchor: int, exclude_frames: int = 0,
                      forced: int | None = None, pool_size: int = DEFAULT_SOURCES,
                      settings: SourceSettings | None = None,
                      closing: np.ndarray | None = None) -> SourcePlan:
    """The source plan of a dub.

    track_points (F, 131, 2) source landmarks (pixels; any array-like, e.g. the track's
    DiskArray); detected (F,) which have a face;
    target (O, 131, 2) each output frame's target landmarks in its source frame's crop box;
    plan (O,) the source frame of each output frame. ``anchor``: a frame with a face that the
    candidates always include (the dub's single reference, ``run.pick_reference_frame``: every
    output frame it is allowed for has a candidate); ``pool_size``: how many candidates at
    most (1: the anchor alone); ``settings``: the costs and the fades (default
    ``SourceSettings()``; its ``anchor_preference``: the cost, in shape units, every other
    candidate pays on every frame it serves). ``forced``: one frame for every output frame
    (``--reference-frame``). Output frames without an allowed candidate take the candidate
    farthest in time. ``closing`` (O,): the frames whose mouth is closed for a pause (1) or
    fading into one (``complete.closing_weight``): from 0.5 on, priced as a pause.
    """
    settings = settings or SourceSettings()
    paused = np.zeros(len(plan), bool) if closing is None else np.asarray(closing) >= 0.5
    frames = len(plan)
    if forced is not None:
        same = np.full(frames, forced, np.int64)
        return SourcePlan(same, same.copy(), np.zeros(frames, np.float32), same[:1])
    faces = np.nonzero(detected)[0]
    if len(faces) == 0:
        zeros = np.zeros(frames, np.int64)
        return SourcePlan(zeros, zeros.copy(), np.zeros(frames, np.float32), zeros[:1])
    if pool_size == 1 or len(faces) == 1:  # one source: nothing to choose
        same = np.full(frames, anchor, np.int64)
        return SourcePlan(same, same.copy(), np.zeros(frames, np.float32), same[:1])
    # The pool is spread over at most SHAPE_FRAMES frames (evenly over the video, the anchor
    # among them): what this holds stays the same however long the video.
    if len(faces) > SHAPE_FRAMES:
        spread = faces[np.linspace(0, len(faces) - 1, SHAPE_FRAMES).round().astype(np.int64)]
        faces = np.union1d(spread, [anchor])
    seen = track_points[faces]
    template = np.median(seen, axis=0)
    shapes, poses = face_frame_shapes(seen, template)
    pool = spread_pool(shapes, faces, pool_size, first=anchor)
    if paused.any():  # a closed mouth to draw the pauses from
        pool = np.union1d(pool, faces[np.argmin(inner_lip_opening(seen))])
    at = np.searchsorted(faces, pool)
    pool_shapes, pool_poses = shapes[at], poses[at]
    pool_opening = inner_lip_opening(seen[at])
    keep = min(settings.candidates, len(pool))
    preference = np.where(pool != anchor, settings.anchor_preference, 0.0)[None]
    share = np.where(paused, 1.0, settings.narrowing_share)
    # Target landmarks are in crop units: their shapes come out in the same eye-distance
    # units. Read and priced a part at a time: the targets of a long speech stay on disk, and
    # only each frame's costs are kept (the candidates' differences of them all would not fit).
    cost = np.empty((frames, len(pool)), np.float32)
    for start in range(0, frames, TARGET_CHUNK):
        part = np.asarray(target[start:start + TARGET_CHUNK])
        target_shapes, target_poses = face_frame_shapes(part, template / interocular(template))
        shape_cost = np.sqrt(((target_shapes[:, None] - pool_shapes[None]) ** 2).mean(-1))
        pose_cost = np.sqrt(((target_poses[:, None] - pool_poses[None]) ** 2).mean(-1))
        # How far the lips part decides what the inside of the mouth shows, so it is weighed
        # on its own, and a source less open than the target costs more than a more open one:
        # the warp can press lips together, but it has no inside to show between them.
        wider = inner_lip_opening(part)[:, None] - pool_opening[None]
        pause = paused[start:start + len(part), None]
        opening_cost = np.where(wider > 0, wider, -share[start:start + len(part), None] * wider)
        part_cost = (shape_cost + settings.pose_weight * pose_cost
                     + settings.opening_weight * opening_cost + np.where(pause, 0.0, preference))
        if exclude_frames > 0:
            distance = np.abs(plan[start:start + len(part), None] - pool[None])
            part_cost = np.where(distance < exclude_frames, np.inf, part_cost)
            stuck = np.nonzero(np.isinf(part_cost).all(axis=1))[0]
            part_cost[stuck, np.argmax(distance[stuck], axis=1)] = 0.0
        # Only each frame's best few take part: the rest are priced out.
        threshold = np.partition(part_cost, keep - 1, axis=1)[:, keep - 1:keep]
        cost[start:start + len(part)] = np.where(part_cost <= threshold, part_cost, np.inf)
    path = pool[best_path(cost, settings.switch_cost)]
    outgoing, weight = cross_fades(path, settings.fade_frames)
    if exclude_frames > 0:
        # A fade carries the last source on a few frames: not onto frames it is too near.
        near = np.abs(plan - outgoing) < exclude_frames
        outgoing[near], weight[near] = path[near], 0.0
    return SourcePlan(path, outgoing, weight, pool)
