"""The renderers: native warp, the choice of source frames, cross-fades, no leaks."""

from __future__ import annotations

import itertools
import tracemalloc

import cv2
import numpy as np

from dubtool.evaluation.evaluate import scored_frames
from dubtool.face.indices import (
    CONTENT_SLICE,
    LIPS_SLICE,
    NUM_POINTS,
    ORDER,
    inner_lip_opening,
    mouth_opening,
)
from dubtool.face.warp import warp_face
from dubtool.nets.config import CompleteSettings, NativeSettings, SourceSettings
from dubtool.options import DEFAULT_SOURCES
from dubtool.pipeline import sources
from dubtool.pipeline.landmarks import FaceTrack
from dubtool.pipeline.renderers.native import NativeFaces
from dubtool.pipeline.run import pick_reference_frame
from dubtool.pipeline.sources import (
    SourcePlan,
    best_path,
    choose_sources,
    cross_fades,
)

NATIVE = NativeSettings()  # the native renderer's defaults
NEAREST = SourceSettings(anchor_preference=0.0)  # no source preferred
LOWER_LIP = np.arange(LIPS_SLICE.start, NUM_POINTS)[[11, 12, 13, 14, 15, 16, 17, 18, 19,
                                                      31, 32, 33, 34, 35, 36, 37, 38, 39]]


def _face(opening: float, rng: np.random.Generator) -> np.ndarray:
    """(131, 2) a fixed face layout (crop units, eye corners 0.4 apart) whose lower lip and
    jaw drop by ``opening``, with a little detector noise."""
    base = np.random.default_rng(7).uniform(0.2, 0.8, (NUM_POINTS, 2))
    base[CONTENT_SLICE, 1] = 0.6 + 0.2 * (base[CONTENT_SLICE, 1] - 0.2)  # mouth below
    base[:CONTENT_SLICE.start, 1] *= 0.6                               # pose above
    base[[ORDER.index(33), ORDER.index(263)]] = [[0.3, 0.35], [0.7, 0.35]]  # eye corners
    base[[ORDER.index(13), ORDER.index(14)]] = [0.5, 0.7]  # inner lips closed
    points = base.copy()
    points[LOWER_LIP, 1] += opening
    points[CONTENT_SLICE.start:LIPS_SLICE.start, 1] += 0.5 * opening   # the jaw follows
    return points + rng.normal(0, 0.0005, points.shape)


def _moved(points: np.ndarray, scale: float, angle: float, shift: tuple[float, float]
           ) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return scale * points @ np.array([[c, -s], [s, c]]).T + np.array(shift)


def _track(points: np.ndarray, size: int = 100) -> FaceTrack:
    frames = len(points)
    boxes = np.tile(np.array([0, 0, size], np.int32), (frames, 1))
    return FaceTrack("test", np.zeros((frames, 478, 3), np.float32), np.ones(frames, bool),
                     (points * size).astype(np.float32), boxes, 0.0)


def test_native_warp_with_identical_landmarks_returns_the_same_pixels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    points = _face(0.05, rng)
    np.testing.assert_array_equal(warp_face(image, points, points, 300, cv2.INTER_CUBIC),
                                  image)
    # At another size it is the same face resampled: equal to a plain resize.
    half = warp_face(image, points, points, 150, cv2.INTER_LINEAR).astype(int)
    plain = cv2.resize(image, (150, 150), interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(half - plain).mean() < 1.0


def test_the_source_is_the_frame_whose_mouth_is_nearest_in_any_pose() -> None:
    rng = np.random.default_rng(1)
    openings = np.linspace(0.0, 0.12, 25)
    rng.shuffle(openings)
    # Each source frame in its own pose: the shapes are compared in the face's own frame.
    sources = np.stack([_moved(_face(v, rng), rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2),
                               tuple(rng.uniform(-0.1, 0.1, 2))) for v in openings])
    track = _track(sources)
    wanted = np.repeat([0.0, 0.06, 0.12, 0.03], 10)  # each held for 10 frames
    target = np.stack([_moved(_face(v, rng), 1.1, 0.1, (0.05, 0.0)) for v in wanted])
    chosen = choose_sources(track.points, track.detected, target, np.zeros(40, np.int64),
                               anchor=pick_reference_frame(track), settings=NEAREST)
    # The nearest shape, or one a step more open (the warp can close a mouth, not open one).
    wider = openings[chosen.source] - wanted
    assert (wider >= -1e-9).all() and (wider <= 0.0051).all()


def test_the_reference_frame_serves_unless_another_mouth_is_much_nearer() -> None:
    rng = np.random.default_rng(8)
    openings = np.linspace(0.0, 0.12, 25)
    track = _track(np.stack([_face(v, rng) for v in openings]))
    anchor = 12  # opening 0.06
    wanted = np.repeat([0.06, 0.065, 0.055, 0.12, 0.0], 10)
    target = np.stack([_face(v, rng) for v in wanted])
    plan = np.zeros(len(wanted), np.int64)
    preferred = choose_sources(track.points, track.detected, target, plan, anchor=anchor)
    nearest = choose_sources(track.points, track.detected, target, plan, anchor=anchor,
                                settings=NEAREST)
    # Near the anchor's shape the anchor serves; the wide-open and the closed mouths come from
    # frames that have them.
    assert (preferred.source[:30] == anchor).all()
    assert (nearest.source[10:30] != anchor).all()  # the test can see the preference
    assert (np.abs(openings[preferred.source[30:40]] - 0.12) <= 0.0051).all()
    assert (openings[preferred.source[40:]] <= 0.0051).all()


def test_no_source_is_taken_from_near_the_frame_it_is_pasted_on() -> None:
    """Reconstruction: each frame's target is its own landmarks, so without the rule frames
    near it (its ground truth among them) are the best sources; with it, none within
    the gap."""
    rng = np.random.default_rng(2)
    openings = 0.06 + 0.05 * np.sin(np.arange(120) * 0.7)
    sources = np.stack([_face(v, rng) for v in openings])
    track = _track(sources)
    plan = np.arange(120)
    target = track.crop_points()
    gap = 25
    leaky = choose_sources(track.points, track.detected, target, plan,
                              anchor=pick_reference_frame(track))
    assert (np.abs(leaky.source - plan) < gap).mean() > 0.3  # the test can see a leak
    anchor = 110
    safe = choose_sources(track.points, track.detected, target, plan, exclude_frames=gap,
                             anchor=anchor)
    assert anchor in safe.pool
    scored = scored_frames(120, anchor, gap)
    for drawn in (safe.source, np.where(safe.outgoing_weight > 0, safe.outgoing, safe.source)):
        assert (np.abs(drawn - plan)[scored] >= gap).all()
    assert scored.sum() == 120 - (2 * gap - 1 - (anchor + gap - 120))


def test_candidates_are_bounded_whatever_the_length() -> None:
    rng = np.random.default_rng(3)
    openings = rng.uniform(0, 0.12, 2000)
    sources = np.stack([_face(v, rng) for v in openings])
    track = _track(sources)
    plan = np.arange(2000)
    chosen = choose_sources(track.points, track.detected, track.crop_points(), plan,
                               anchor=pick_reference_frame(track))
    assert len(chosen.pool) == DEFAULT_SOURCES
    assert len(chosen.used) <= DEFAULT_SOURCES


def test_choosing_sources_holds_a_few_megabytes_whatever_the_speech_length() -> None:
    rng = np.random.default_rng(9)
    track = _track(np.stack([_face(v, rng) for v in rng.uniform(0, 0.12, 200)]))
    peaks = []
    for frames in (1000, 5000):
        target = np.stack([_face(v, rng) for v in rng.uniform(0, 0.12, frames)]
                          ).astype(np.float32)
        plan = np.zeros(frames, np.int64)
        tracemalloc.start()
        choose_sources(track.points, track.detected, target, plan, anchor=10)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # The per-frame costs (48 candidates, float32) and the path's back-pointers (int16):
    # 288 bytes a frame; the candidates' differences are computed a part at a time (before:
    # all at once, 23 KB a frame).
    assert (peaks[1] - peaks[0]) / 4000 < 600
    assert peaks[1] < 20 * 2**20


def test_reference_frame_pick_is_the_same_with_memory_flat_in_the_plan(monkeypatch) -> None:
    """pick_reference_frame with a gap: the same choice as counting over a faces x plan
    matrix, without that matrix (a 10-minute clip's took tens of GB): memory grows by the
    plan's sorted copy and a few numbers per face frame (the track's points are read
    FRAME_CHUNK frames at a time)."""
    from dubtool.pipeline import landmarks as landmarks_stage

    rng = np.random.default_rng(3)
    for frames, gap in ((60, 5), (200, 25), (90, 1)):
        points = np.stack([_face(v, rng) for v in rng.uniform(0, 0.12, frames)])
        track = _track(points)
        track.detected[rng.random(frames) < 0.2] = False
        plan = rng.integers(0, frames, 150)
        faces = np.nonzero(track.detected)[0]
        opening = mouth_opening(track.points[faces])
        typical = np.abs(np.argsort(np.argsort(opening)) - len(faces) // 2)
        allowed = (np.abs(plan[None] - faces[:, None]) >= gap).sum(axis=1)
        assert pick_reference_frame(track, plan, gap) == faces[np.lexsort((typical, -allowed))[0]]
    monkeypatch.setattr(landmarks_stage, "FRAME_CHUNK", 256)
    peaks = []
    for frames in (1000, 4000):
        track = _track(np.repeat(_face(0.05, rng)[None], frames, axis=0))
        plan = np.arange(frames)
        tracemalloc.start()
        pick_reference_frame(track, plan, 25)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # Measured: 20 bytes a frame (before: the matrix, 4000 x 4000 x 16 bytes at its peak).
    assert (peaks[1] - peaks[0]) / 3000 < 100, peaks
    assert peaks[1] < 5 * 2**20, peaks


def test_best_path_switches_only_when_it_pays() -> None:
    cost = np.array([[0.0, 1.0]] * 5 + [[0.03, 0.0]] * 2 + [[1.0, 0.0]] * 5)
    np.testing.assert_array_equal(best_path(cost, switch_cost=0.1), [0] * 5 + [1] * 7)
    cost = np.array([[0.0, 1.0]] * 5 + [[0.03, 0.0]] * 2 + [[0.0, 1.0]] * 5)
    np.testing.assert_array_equal(best_path(cost, switch_cost=0.1), [0] * 12)
    np.testing.assert_array_equal(best_path(cost, switch_cost=0.0), [0] * 5 + [1] * 2 + [0] * 5)


def test_a_switch_is_cross_faded() -> None:
    outgoing, weight = cross_fades(np.array([3] * 4 + [8] * 6), fade=3)
    np.testing.assert_array_equal(outgoing, [3] * 7 + [8] * 3)
    np.testing.assert_allclose(weight, [0] * 4 + [0.75, 0.5, 0.25] + [0] * 3)


def test_switching_sources_makes_no_jump_larger_than_the_source_own() -> None:
    """A video whose light brightens by 2 levels a frame, drawn from two sources 60 frames
    apart: however the source switches, the output changes as the video does."""
    rng = np.random.default_rng(4)
    frames, size = 80, 100
    points = np.stack([_face(0.04, rng) for _ in range(frames)])
    track = _track(points, size)
    video = [np.full((size, size, 3), 60 + 2 * i, np.uint8) for i in range(frames)]
    path = np.array([10] * 40 + [70] * 40)
    plan = SourcePlan(path, *cross_fades(path, SourceSettings().fade_frames),
                         np.array([10, 70]))
    crops = {10: video[10], 70: video[70]}
    faces = NativeFaces(track, track.crop_points(), np.arange(frames), plan, crops,
                        NATIVE.max_size)
    out = []
    for o in range(frames):
        box = track.box(o)
        face, mask = faces.lower_face(o, box.crop(video[o], box.size))
        out.append(box.paste(video[o], face, mask).astype(int))
    steps = [np.abs(b - a).max() for a, b in itertools.pairwise(out)]
    source_steps = [np.abs(b.astype(int) - a).max() for a, b in itertools.pairwise(video)]
    assert max(steps) <= max(source_steps) + 1


def test_a_forced_source_serves_every_frame() -> None:
    rng = np.random.default_rng(5)
    track = _track(np.stack([_face(v, rng) for v in np.linspace(0, 0.1, 30)]))
    chosen = choose_sources(track.points, track.detected, track.crop_points(),
                               np.arange(30), anchor=7, forced=7)
    assert (chosen.source == 7).all() and (chosen.outgoing_weight == 0).all()
    assert chosen.used.tolist() == [7]


def test_the_single_reference_is_far_from_as_many_frames_as_can_be() -> None:
    rng = np.random.default_rng(6)
    track = _track(np.stack([_face(v, rng) for v in rng.uniform(0, 0.1, 100)]))
    plan = np.arange(40)  # the first 40 frames are dubbed
    frame = pick_reference_frame(track, plan, exclude_frames=50)
    assert frame >= 89  # at least 50 frames past every dubbed frame
    # Without the rule: the frame of median opening.
    opening = mouth_opening(track.points)
    assert opening[pick_reference_frame(track)] == np.sort(opening)[50]


def test_a_soft_source_is_sharpened_to_the_videos_typical_detail() -> None:
    """``match_detail`` brings a blurred face's mouth detail up to the typical one (within the
    bisection's step), leaves a face that already holds it as it is, and never sharpens past
    max_sharpening."""
    from dubtool.pipeline.renderers.native import match_detail, mouth_detail

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8), (0, 0), 1.5)
    points = _face(0.05, rng)
    typical = mouth_detail(texture, points)
    soft = cv2.GaussianBlur(texture, (0, 0), 0.8)
    assert mouth_detail(soft, points) < 0.6 * typical
    sharpened = match_detail(soft, points, typical, NATIVE)
    assert typical <= mouth_detail(sharpened, points) < 1.05 * typical
    assert np.array_equal(match_detail(texture, points, typical, NATIVE), texture)
    assert np.array_equal(match_detail(sharpened, points, 0.5 * typical, NATIVE), sharpened)
    # Far softer than any unsharp mask can mend: the largest amount, no more.
    flat = cv2.GaussianBlur(texture, (0, 0), 6.0)
    most = match_detail(flat, points, typical, NATIVE)
    assert mouth_detail(most, points) < typical
    blurred = cv2.GaussianBlur(flat, (0, 0), 1.0)
    expected = cv2.addWeighted(flat, 1 + NATIVE.max_sharpening, blurred,
                               -NATIVE.max_sharpening, 0.0)
    assert np.array_equal(most, expected)
    # A smaller largest amount is the limit, and none leaves the face as it is.
    less = match_detail(flat, points, typical, NativeSettings(max_sharpening=0.5))
    assert np.array_equal(less, cv2.addWeighted(flat, 1.5, blurred, -0.5, 0.0))
    assert np.array_equal(match_detail(flat, points, typical,
                                       NativeSettings(max_sharpening=0.0)), flat)


def test_source_crops_past_the_detail_sample_are_the_frames_own(face_clip,
                                                                  tmp_path) -> None:
    """Sources after the first detail_frames are read by themselves: the same crops as
    from reading every frame."""
    from dubtool.media.frames import read_frames
    from dubtool.media.probe import probe_video
    from dubtool.pipeline.renderers import native as render
    from dubtool.pipeline.run import Inputs, run_front

    inputs = Inputs.of(face_clip)
    with inputs.open_cache(tmp_path / "cache") as cache:
        track = run_front(cache, inputs).track
    video = probe_video(face_clip)
    # (no sharpening: the crops are compared as read)
    settings = NativeSettings(detail_frames=10, max_sharpening=0.0)
    render.write_source_crops(video, track, np.array([30, 5, 45, 30]), tmp_path, settings)
    crops = render.load_source_crops(tmp_path)
    assert sorted(crops) == [5, 30, 45]
    frames = list(read_frames(video))
    for i, face in crops.items():
        box = track.box(i)
        assert np.array_equal(face, box.crop(frames[i], render.native_size(box.size,
                                                                           settings.max_size)))


def test_the_pool_is_drawn_from_a_bounded_spread_of_frames(monkeypatch, tmp_path) -> None:
    """A long video's candidates come from at most SHAPE_FRAMES frames spread evenly over it,
    the anchor always among them; a track read from disk gives the plan it gives in memory."""
    rng = np.random.default_rng(4)
    openings = 0.06 + 0.05 * np.sin(np.arange(200) * 0.3)
    track = _track(np.stack([_face(v, rng) for v in openings]))
    target = np.stack([_face(v, rng) for v in (0.0, 0.1, 0.05)])
    plan = np.zeros(3, np.int64)
    monkeypatch.setattr(sources, "SHAPE_FRAMES", 9)
    anchor = 101  # not on the spread of 9 frames over 200
    spread = np.linspace(0, 199, 9).round().astype(int)
    chosen = choose_sources(track.points, track.detected, target, plan, anchor=anchor,
                               pool_size=6)
    assert len(chosen.pool) == 6 and anchor in chosen.pool
    assert set(chosen.pool) <= {*spread, anchor}
    track.save(tmp_path)
    loaded = FaceTrack.load(tmp_path)
    from_disk = choose_sources(loaded.points, loaded.detected, target, plan, anchor=anchor,
                                  pool_size=6)
    np.testing.assert_array_equal(from_disk.source, chosen.source)
    np.testing.assert_array_equal(from_disk.pool, chosen.pool)


def test_the_closed_shape_is_the_median_of_a_bounded_number_of_frames() -> None:
    """The closed mouth: the median of the closed_fraction least open frames, but of no more
    than closed_max_frames, read from a track on disk the same as from memory."""
    from dubtool.pipeline import complete as complete_stage

    rng = np.random.default_rng(5)
    openings = rng.permutation(np.linspace(0.0, 0.1, 100))
    track = _track(np.stack([_face(v, rng) for v in openings]))
    points = track.crop_points()
    order = np.argsort(inner_lip_opening(points))
    fraction = CompleteSettings().closed_fraction  # 0.1
    ten = complete_stage.closed_mouth(points, track.detected, fraction, 500)
    np.testing.assert_allclose(ten, np.median(points[order[:10]][:, CONTENT_SLICE], axis=0))
    three = complete_stage.closed_mouth(track.cropped, track.detected, fraction, 3)
    np.testing.assert_allclose(three, np.median(points[order[:3]][:, CONTENT_SLICE], axis=0))
    assert not np.allclose(three, ten)


def test_in_a_pause_a_closed_mouth_is_drawn_from_a_closed_source() -> None:
    """The warp presses an open source's lips onto closed targets, but its dark inside still
    shows: in the speech's pauses the anchor is not preferred and a more open source pays for
    all of its opening, and the most closed frame is always a candidate."""
    rng = np.random.default_rng(3)
    openings = np.linspace(0.0, 0.12, 25)
    track = _track(np.stack([_face(v, rng) for v in openings]))
    anchor = 12  # opening 0.06
    target = np.stack([_face(0.045, rng) for _ in range(40)])
    plan = np.zeros(40, np.int64)
    closing = np.zeros(40, np.float32)
    closing[10:30] = 1.0
    before = choose_sources(track.points, track.detected, target, plan, anchor=anchor)
    assert (before.source == anchor).all()  # the test can see the change
    after = choose_sources(track.points, track.detected, target, plan, anchor=anchor,
                              closing=closing)
    assert (openings[after.source[10:30]] <= 0.0451).all()
    assert (after.source[:5] == anchor).all() and (after.source[-5:] == anchor).all()
    def pool(closing: np.ndarray | None) -> list[int]:
        return list(choose_sources(track.points, track.detected, target, plan, anchor=6,
                                      closing=closing, pool_size=2).pool)

    assert pool(None) == [6, 24] and pool(closing) == [0, 6, 24]
