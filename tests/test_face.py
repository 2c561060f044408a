from pathlib import Path

import cv2
import numpy as np
import pytest

from dubtool.errors import MissingDependency
from dubtool.face import indices
from dubtool.face.crop import CropBox, box_arrays, face_box
from dubtool.face.detect import FaceAlignmentDetector, FaceMeshDetector, ibug68_to_points131
from dubtool.face.warp import thin_plate_map, warp_face
from dubtool.media.frames import read_frames
from dubtool.media.probe import probe_video

# -- the 131 indices --------------------------------------------------------------------


def test_index_order_and_groups() -> None:
    assert indices.NUM_POINTS == 131 and indices.NUM_POSE == 74 and indices.NUM_CONTENT == 57
    assert len(set(indices.ORDER)) == 131
    assert all(0 <= i < 478 for i in indices.ORDER)
    # Fixed order from DESIGN.md: pose (cheeks, brows, nose, eyes) then jaw and lips.
    assert indices.ORDER[:8] == (162, 127, 234, 93, 389, 356, 454, 323)
    assert indices.ORDER[74:91] == (132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378,
                                    379, 365, 397, 288, 361)
    assert indices.ORDER[91] == 61 and indices.ORDER[-1] == 95
    assert indices.ORDER[indices.LIPS_SLICE] == indices.LIPS_OUTER + indices.LIPS_INNER
    mesh = np.arange(478 * 3, dtype=np.float32).reshape(478, 3)
    assert np.array_equal(indices.select_points(mesh)[:, 0], np.array(indices.ORDER) * 3)


def test_mirror_map_is_an_involution_within_groups() -> None:
    m = indices.MIRROR
    assert np.array_equal(m[m], np.arange(131))
    assert set(m[indices.POSE_SLICE]) == set(range(74))
    assert set(m[indices.CONTENT_SLICE]) == set(range(74, 131))
    # Points on the mid-line (chin, lip centres, nose ridge) are their own twins.
    for mp_index in (152, 0, 17, 13, 14, 168, 4):
        k = indices.ORDER.index(mp_index)
        assert m[k] == k
    points = np.random.default_rng(0).random((3, 131, 2))
    assert np.allclose(indices.mirror_points(indices.mirror_points(points)), points)


# -- crops ------------------------------------------------------------------------------


def test_crop_then_paste_is_exact_at_scale_one() -> None:
    frame = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    box = CropBox(30, 10, 64)
    face_crop = box.crop(frame, 64)
    assert np.array_equal(face_crop, frame[10:74, 30:94])
    assert np.array_equal(box.paste(np.zeros_like(frame), face_crop)[10:74, 30:94], face_crop)
    assert np.array_equal(box.paste(frame, face_crop), frame)


def test_crop_past_the_edge_repeats_edge_pixels_and_pastes_back_inside() -> None:
    frame = np.random.default_rng(2).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    box = CropBox(-10, 20, 40)  # sticks out left and bottom
    face_crop = box.crop(frame, 40)
    assert face_crop.shape == (40, 40, 3)
    assert np.array_equal(face_crop[:30, 10:], frame[20:50, 0:30])
    assert np.array_equal(face_crop[:30, 0], frame[20:50, 0])  # replicated left edge
    assert np.array_equal(box.paste(frame, face_crop), frame)


def test_scaled_round_trip_is_close_and_mask_limits_the_change() -> None:
    # A smooth image survives downscale + upscale; pixels where the mask is 0 do not change.
    y, x = np.mgrid[0:200, 0:200]
    frame = np.stack([x, y, (x + y) // 2], -1).astype(np.uint8)
    box = CropBox(20, 30, 128)
    face_crop = box.crop(frame, 64)
    pasted = box.paste(frame, face_crop)
    region = pasted[30:158, 20:148].astype(int) - frame[30:158, 20:148]
    assert np.abs(region).mean() < 1.0
    mask = np.zeros((64, 64), np.float32)
    mask[32:] = 1.0
    half = box.paste(frame, np.zeros_like(face_crop), mask)
    assert np.array_equal(half[:90], frame[:90])  # upper half of the box and above untouched
    assert (half[100:150, 30:140] == 0).all()
    assert np.array_equal(half[:, 150:], frame[:, 150:])


def test_box_coordinates_round_trip() -> None:
    box = CropBox.from_centre(100.0, 80.0, 50.4)
    assert (box.x0, box.y0, box.size) == (75, 55, 50)
    pts = np.array([[75.0, 55.0], [125.0, 105.0], [90.5, 70.25]], np.float32)
    cx, cy, size = face_box(pts)
    assert (cx, cy) == (100.0, 80.0) and size > 50


def test_boxes_made_at_once_round_like_one_at_a_time() -> None:
    rng = np.random.default_rng(0)
    centre = rng.uniform(-20, 400, (500, 2))
    centre[:50] = np.round(centre[:50]) + 0.5  # halves: rounded to even either way
    size = np.concatenate([rng.uniform(0, 300, 450), np.arange(50) + 0.5])
    boxes = [CropBox.from_centre(cx, cy, s) for (cx, cy), s in zip(centre, size, strict=True)]
    one_by_one = [(b.x0, b.y0, b.size) for b in boxes]
    np.testing.assert_array_equal(box_arrays(centre, size), np.stack(one_by_one))
    # Python's own rounding of the same values (half to even, sides of at least 2 px).
    sides = [max(round(s), 2) for s in size]
    expected = [[round(cx - d / 2), round(cy - d / 2), d]
                for (cx, cy), d in zip(centre, sides, strict=True)]
    np.testing.assert_array_equal(box_arrays(centre, size), expected)


# -- detection on a real face -----------------------------------------------------------


def _first_face(detector, frame: np.ndarray) -> np.ndarray | None:
    faces = detector.detect_all(frame)
    return faces[0] if faces else None


@pytest.fixture(scope="module")
def first_frames(face_clip: Path) -> list[np.ndarray]:
    return [f.copy() for _, f in zip(range(5), read_frames(probe_video(face_clip)), strict=False)]


def test_facemesh_finds_the_face_and_its_parts(first_frames: list[np.ndarray]) -> None:
    with FaceMeshDetector() as detector:
        found = [_first_face(detector, f) for f in first_frames]
    assert all(f is not None and f.shape == (478, 3) for f in found)
    pts = indices.select_points(found[0])[:, :2]
    h, w = first_frames[0].shape[:2]
    assert (pts >= 0).all() and (pts[:, 0] < w).all() and (pts[:, 1] < h).all()
    eyes_y = pts[[indices.ORDER.index(i) for i in indices.EYES], 1].mean()
    lips_y = pts[indices.LIPS_SLICE, 1].mean()
    chin_y = pts[indices.ORDER.index(152), 1]
    assert eyes_y < lips_y < chin_y
    face_width = np.ptp(pts[:, 0])
    assert 0.25 * w < face_width < 0.9 * w


def test_facemesh_finds_nothing_in_a_test_pattern() -> None:
    y, x = np.mgrid[0:128, 0:128]
    pattern = np.stack([x * 2, y * 2, (x ^ y) * 2], -1).astype(np.uint8)
    with FaceMeshDetector(static_images=True) as detector:
        assert detector.detect_all(pattern) == []


def test_mirror_map_matches_a_flipped_face(first_frames: list[np.ndarray]) -> None:
    frame = first_frames[0]
    w = frame.shape[1]
    with FaceMeshDetector(static_images=True) as detector:
        pts = indices.select_points(_first_face(detector, frame))[:, :2]
        flipped = indices.select_points(_first_face(detector,
                                                    np.ascontiguousarray(frame[:, ::-1])))
    unflipped = indices.mirror_points(flipped[:, :2], width=w)
    error = np.linalg.norm(unflipped - pts, axis=1)
    wrong = np.linalg.norm(flipped[:, :2] * [-1, 1] + [w, 0] - pts, axis=1)  # twins not swapped
    face_width = np.ptp(pts[:, 0])
    assert error.max() < 0.05 * face_width
    assert wrong.mean() > 5 * error.mean()


# -- face-alignment backend -------------------------------------------------------------


def _ibug_like_face() -> np.ndarray:
    """68 iBUG points of a schematic frontal face, 200 px wide, image-left side first."""
    t = np.linspace(np.pi, 0, 17)
    jaw = np.stack([100 + 100 * np.cos(t), 100 + 110 * np.sin(t)], 1)  # ear -> chin -> ear
    brow_l = np.stack([np.linspace(30, 85, 5), np.full(5, 50)], 1)
    brow_r = np.stack([np.linspace(115, 170, 5), np.full(5, 50)], 1)
    bridge = np.stack([np.full(4, 100), np.linspace(70, 120, 4)], 1)
    base = np.stack([np.linspace(85, 115, 5), np.full(5, 130)], 1)

    def ring(cx: float, cy: float, rx: float, ry: float, n: int) -> np.ndarray:
        a = np.linspace(np.pi, -np.pi, n, endpoint=False)  # left corner, upper side first
        return np.stack([cx + rx * np.cos(a), cy - ry * np.sin(a)], 1)

    parts = [jaw, brow_l, brow_r, bridge, base, ring(60, 75, 15, 6, 6), ring(140, 75, 15, 6, 6),
             ring(100, 165, 35, 12, 12), ring(100, 165, 25, 4, 8)]
    return np.concatenate(parts).astype(np.float32)


def test_ibug68_to_131_puts_each_part_in_place() -> None:
    p68 = _ibug_like_face()
    assert p68.shape == (68, 2)
    p131 = ibug68_to_points131(p68)
    assert p131.shape == (131, 2)
    at = {mp: p131[k] for k, mp in enumerate(indices.ORDER)}
    assert np.allclose(at[61], p68[48]) and np.allclose(at[78], p68[60])  # lip corners
    assert np.allclose(at[291], p68[54], atol=1e-3)
    assert at[0][1] < at[17][1]  # upper lip above lower lip
    assert np.allclose(at[152], p68[8], atol=1.0)  # chin tip mid oval
    assert at[33][0] < 100 < at[263][0]  # eyes on their own side
    lips = p131[indices.LIPS_SLICE]
    assert (lips[:, 1] > 140).all()


def test_face_alignment_backend_without_package_or_weights_is_a_clear_error() -> None:
    with pytest.raises(MissingDependency, match="face-alignment") as info, FaceAlignmentDetector():
        pass
    assert info.value.exit_code == 7


def _spread_points(count: int = 12, seed: int = 0) -> np.ndarray:
    """count x count points spread over the middle of a crop (a stand-in for landmarks)."""
    axis = np.linspace(0.15, 0.85, count)
    points = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    return points + np.random.default_rng(seed).uniform(-0.01, 0.01, points.shape)


def test_warp_with_unmoved_points_is_the_identity() -> None:
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    points = _spread_points()
    map_x, map_y = thin_plate_map(points, points, 64)
    # The maps are float32: within 1e-4 px (remap itself resolves 1/32 px).
    np.testing.assert_allclose(map_x, np.broadcast_to(np.arange(64.0), (64, 64)), atol=1e-4)
    np.testing.assert_allclose(map_y, np.broadcast_to(np.arange(64.0)[:, None], (64, 64)),
                               atol=1e-4)
    np.testing.assert_array_equal(warp_face(image, points, points), image)


def test_warp_moves_what_is_at_a_landmark_to_its_target() -> None:
    size = 128
    image = np.zeros((size, size, 3), np.uint8)
    points = _spread_points(count=7)
    spot = 24  # the middle landmark (neighbours 15 px away), moved 6 px down and 4 px left
    x, y = (points[spot] * size - 0.5).round().astype(int)
    cv2.circle(image, (int(x), int(y)), 2, (255, 255, 255), -1)
    moved = points.copy()
    moved[spot] += np.array([-4, 6]) / size
    warped = warp_face(image, points, moved)
    ys, xs = np.nonzero(warped[..., 0] > 128)
    assert abs(xs.mean() - (x - 4)) < 1.0 and abs(ys.mean() - (y + 6)) < 1.0


def test_warp_survives_coinciding_targets() -> None:
    """A closed mouth puts inner-lip points on top of each other; the spline must stay finite."""
    points = _spread_points()
    closed = points.copy()
    closed[1] = closed[0]
    map_x, map_y = thin_plate_map(points, closed, 32)
    assert np.isfinite(map_x).all() and np.isfinite(map_y).all()


def test_facemesh_that_cannot_start_gives_stderr_back(monkeypatch) -> None:
    """FaceMesh failing in its constructor (a broken install) is a one-line MissingDependency,
    and file descriptor 2 is stderr again: it stayed on the native logs' scratch file, so the
    error line was never shown."""
    import os

    from mediapipe.python.solutions import face_mesh

    def broken(**options: object) -> None:
        raise RuntimeError("could not find face_landmark_with_attention.tflite")

    monkeypatch.delenv("DUBTOOL_NATIVE_LOGS", raising=False)
    monkeypatch.setattr(face_mesh, "FaceMesh", broken)
    saved = os.dup(2)
    before = os.fstat(2).st_ino
    try:
        with pytest.raises(Exception) as info, FaceMeshDetector():
            pass
        assert os.fstat(2).st_ino == before
        assert isinstance(info.value, MissingDependency) and info.value.exit_code == 7
        assert "FaceMesh could not start (could not find face_landmark" in str(info.value)
    finally:
        os.dup2(saved, 2)  # (for the other tests, should it fail)
        os.close(saved)


def test_lips_pushed_through_each_other_meet_and_others_stay() -> None:
    from dubtool.face.indices import INNER_LIP_PAIRS, lips_apart

    rng = np.random.default_rng(0)
    content = rng.uniform(0.3, 0.7, (4, 57, 2)).astype(np.float32)
    (upper, lower) = INNER_LIP_PAIRS[0]
    content[0, upper, 1], content[0, lower, 1] = 0.60, 0.50   # inside out by 0.1
    content[1, upper, 1], content[1, lower, 1] = 0.50, 0.60   # open: left alone
    out = lips_apart(content)
    assert out[0, upper, 1] == pytest.approx(0.55) and out[0, lower, 1] == pytest.approx(0.55)
    assert out[1, upper, 1] == pytest.approx(0.50) and out[1, lower, 1] == pytest.approx(0.60)
    for a, b in INNER_LIP_PAIRS:
        assert (out[..., b, 1] >= out[..., a, 1] - 1e-7).all()
    others = np.ones(57, bool)
    others[[i for pair in INNER_LIP_PAIRS for i in pair]] = False
    assert np.array_equal(out[:, others], content[:, others])
    assert np.array_equal(out[..., 0], content[..., 0])  # only heights move
    assert content[0, upper, 1] == pytest.approx(0.60)  # the input is not changed


@pytest.mark.parametrize("tag", ["", "bt709"])
def test_a_yuv_frames_face_box_is_the_rgb_ffmpeg_decodes_and_pastes_back(
        face_clip: Path, tmp_path: Path, tag: str) -> None:
    """The blend's yuv420p frames: the box in RGB as ffmpeg decodes the video (its colour
    matrix from the stream's tag), and a paste that leaves every sample outside the mask
    exactly as it was."""
    from conftest import ffmpeg

    from dubtool.face.pixels import RgbFrames, YuvFrames, colour_matrices, frame_pixels

    clip = face_clip
    if tag:
        clip = tmp_path / "tagged.mp4"
        ffmpeg("-i", str(face_clip), "-frames:v", "3", "-colorspace", tag, "-color_primaries",
               tag, "-color_trc", tag, str(clip))
    info = probe_video(clip)
    assert info.colour_space == tag or (not tag and info.colour_space in ("", "unknown"))
    rgb = next(iter(read_frames(info))).copy()
    yuv = next(iter(read_frames(info, pixel_format="yuv420p"))).copy()
    pixels = frame_pixels(info.width, info.height, info.colour_space)
    assert isinstance(pixels, YuvFrames) and pixels.pixel_format == "yuv420p"
    assert isinstance(frame_pixels(33, 20, ""), RgbFrames)
    to_yuv, to_rgb = colour_matrices(tag)
    assert np.allclose(to_rgb[:, :3] @ to_yuv[:, :3], np.eye(3))
    for box in (CropBox(31, 40, 150), CropBox(-21, 181, 101)):  # inside; past two edges
        mine = pixels.box_rgb(yuv, box).astype(int)
        assert mine.shape == (box.size, box.size, 3)
        # ffmpeg's RGB is about a grey level darker (it truncates); the same matrix.
        assert np.abs(mine - box.crop(rgb, box.size)).mean() < 2.0
        mask = np.zeros((box.size, box.size), np.float32)
        mask[30:70, 20:80] = 1.0
        face = np.full((box.size, box.size, 3), (200, 40, 40), np.uint8)
        out = pixels.paste(yuv, box, face, mask)
        changed = out != yuv
        y = changed[:info.width * info.height].reshape(info.height, info.width)
        rows, cols = np.nonzero(y)
        assert changed.any() and out is not yuv
        # Luma changes only under the mask (in frame coordinates), chroma by whole 2x2 blocks.
        assert rows.min() >= box.y0 + 30 and rows.max() < box.y0 + 70
        assert cols.min() >= max(box.x0 + 20, 0) and cols.max() < box.x0 + 80
        # The pasted colour, read back, is the face's.
        back = pixels.box_rgb(out, box)[40:60, 30:70].reshape(-1, 3).mean(axis=0)
        assert np.abs(back - (200, 40, 40)).max() < 4
    assert np.array_equal(pixels.paste(yuv, CropBox(900, 900, 50), face, mask), yuv)
