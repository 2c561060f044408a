import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import ffmpeg, make_tone, make_video

from dubtool.arrays import BlockRows, DiskArray, gaussian_in_time, mean_in_time
from dubtool.errors import InputNotFound, InvalidMedia, OutputError
from dubtool.media import audio
from dubtool.media.audio import (
    MEL_FLOOR_DB,
    N_MELS,
    SAMPLE_RATE,
    decode_speech,
    feature_window,
    load_speech,
    mel_length,
    mel_normalisation,
    mel_spectrogram,
    voice_activity,
)
from dubtool.media.frames import (
    VideoWriter,
    check_output_path,
    read_frames,
    read_frames_in_order,
)
from dubtool.media.probe import VideoInfo, ffprobe, probe_audio, probe_video

# -- probe ------------------------------------------------------------------------------


def test_probe_plain_video(tmp_path: Path) -> None:
    info = probe_video(make_video(tmp_path / "v.mp4", seconds=1.0, size="64x48"))
    assert (info.width, info.height, info.fps, info.frame_count) == (64, 48, Fraction(25), 25)
    assert info.rotation == 0 and not info.is_image and info.has_audio
    assert info.audio[0].codec == "aac"
    assert info.duration == pytest.approx(1.0)


def test_probe_ntsc_rate_kept_exact(tmp_path: Path) -> None:
    info = probe_video(make_video(tmp_path / "ntsc.mp4", seconds=1.0, rate="30000/1001"))
    assert info.fps == Fraction(30000, 1001)
    assert info.frame_count == 30


def test_probe_odd_rate_and_odd_size_in_mkv(tmp_path: Path) -> None:
    # Matroska stores no frame count: it has to be counted.
    info = probe_video(make_video(tmp_path / "odd.mkv", seconds=1.0, size="33x21", rate="12.5",
                                  extra=("-c:v", "ffv1")))
    assert (info.width, info.height) == (33, 21)
    assert info.fps == Fraction(25, 2)
    assert info.frame_count == 13  # ceil(12.5)
    frames = list(read_frames(info))
    assert len(frames) == info.frame_count and frames[0].shape == (21, 33, 3)


def test_rotation_metadata_gives_upright_frames(tmp_path: Path) -> None:
    plain = make_video(tmp_path / "plain.mp4", seconds=0.4, size="64x48", audio=False)
    rotated = tmp_path / "phone.mp4"
    ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(rotated))
    info = probe_video(rotated)
    assert info.rotation == 90 and (info.width, info.height) == (48, 64)
    frame = next(read_frames(info))
    original = next(read_frames(probe_video(plain)))
    assert frame.shape == (64, 48, 3)
    assert np.array_equal(frame, np.rot90(original, 1))


def test_still_image_is_one_frame(tmp_path: Path) -> None:
    image = tmp_path / "face.png"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=40x30", "-frames:v", "1", str(image))
    info = probe_video(image)
    assert info.is_image and info.frame_count == 1 and (info.width, info.height) == (40, 30)
    assert len(list(read_frames(info))) == 1


@pytest.mark.parametrize("name, content, error, words", [
    ("missing.mp4", None, InputNotFound, "no such file"),
    ("empty.mp4", b"", InvalidMedia, "empty"),
    ("notes.mp4", b"this is a text file, not a video\n" * 10, InvalidMedia, "not readable"),
])
def test_probe_bad_files(tmp_path: Path, name: str, content: bytes | None, error: type,
                         words: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=words) as info:
        probe_video(path)
    assert str(path.name) in str(info.value)


def test_audio_only_file_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(InvalidMedia, match="no video stream"):
        probe_video(make_tone(tmp_path / "speech.wav"))


def test_video_without_audio_is_not_speech(tmp_path: Path) -> None:
    silent = make_video(tmp_path / "silent.mp4", audio=False)
    with pytest.raises(InvalidMedia, match="no audio stream"):
        probe_audio(silent)
    with pytest.raises(InvalidMedia, match="no audio stream"):
        load_speech(silent)


# -- audio ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, rate, channels", [
    ("a.wav", 8000, 1), ("b.wav", 44100, 2), ("c.flac", 48000, 6), ("d.mp3", 22050, 2),
    ("e.m4a", 32000, 1), ("f.opus", 48000, 2),
])
def test_speech_any_format_to_16k_mono(tmp_path: Path, name: str, rate: int,
                                       channels: int) -> None:
    path = make_tone(tmp_path / name, seconds=1.5, rate=rate, channels=channels)
    assert probe_audio(path).channels == channels
    samples = load_speech(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    # Encoders pad a little (mp3, aac, opus priming): within 60 ms of 1.5 s.
    assert abs(len(samples) / SAMPLE_RATE - 1.5) < 0.06
    assert 0.05 < np.abs(samples).max() <= 1.0


def test_mel_shape_and_frame_alignment() -> None:
    # A 1 kHz burst from 1.00 s to 1.04 s in 2 s of silence: at 25 fps that is video frame 25.
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    samples = np.where((t >= 1.0) & (t < 1.04), np.sin(2 * np.pi * 1000 * t), 0.0)
    mel = mel_spectrogram(samples.astype(np.float32))
    assert mel.shape == (N_MELS, 1 + len(samples) // 200)
    # The loudest mel column sits at 1.02 s * 80 steps/s.
    assert abs(int(mel.max(axis=0).argmax()) - round(1.02 * 80)) <= 1
    window = feature_window(mel, 25, 25)
    assert window.shape == (N_MELS, 16)
    loud = window.max(axis=0)
    assert abs(int(loud.argmax()) - 8) <= 1  # centred in the frame's window
    # Frames far from the burst see only silence.
    assert feature_window(mel, 5, 25).max() < loud.max() - 40


@pytest.mark.filterwarnings("ignore:n_fft=800 is too large")
@pytest.mark.parametrize("seconds", [0.003, 1.0, 4.3])
def test_mel_equals_librosas(seconds: float) -> None:
    # The models were trained on librosa's mel; dubbing computes it with numpy. Speech-like
    # input: a gliding tone over noise; 0.003 s is shorter than one window, 4.3 s spans
    # several STFT blocks.
    import librosa

    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    samples = (0.3 * np.sin(2 * np.pi * (150 + 400 * t) * t)
               + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    expected = librosa.feature.melspectrogram(
        y=samples, sr=SAMPLE_RATE, n_fft=800, hop_length=200, win_length=800, n_mels=N_MELS,
        fmin=55.0, fmax=7600.0, power=2.0, center=True)
    expected = np.maximum(10.0 * np.log10(np.maximum(expected, 1e-10)), MEL_FLOOR_DB)
    assert np.abs(mel_spectrogram(samples) - expected).max() < 1e-3  # dB


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A gliding tone over noise, with quiet gaps (pauses for the statistics to skip)."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    loud = np.where((t % 3.0) < 2.2, 1.0, 1e-3)
    return (loud * (0.3 * np.sin(2 * np.pi * (150 + 40 * (t % 5)) * t)
                    + 0.05 * rng.standard_normal(len(t)))).astype(np.float32)


def test_mel_by_blocks_from_disk_equals_the_whole_array_at_once(tmp_path: Path,
                                                               monkeypatch) -> None:
    # extract writes the speech to disk and computes its mel MEL_BLOCK columns at a time into
    # a file: the same numbers as one transform of the whole array (2.4 blocks, a ragged end).
    samples = _speech_like(2.4 * audio.MEL_BLOCK / 80 + 0.0071)
    padded = np.pad(samples, audio.WIN_LENGTH // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, 800)[::200]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 800)
    power = np.abs(np.fft.rfft(window * frames, axis=-1).astype(np.complex64)) ** 2
    whole = np.maximum(10.0 * np.log10(np.maximum(audio.mel_filters() @ power.T, 1e-10)),
                       MEL_FLOOR_DB).astype(np.float32)
    samples.tofile(tmp_path / "speech.f32")
    on_disk = DiskArray.raw(tmp_path / "speech.f32", np.float32)
    out = DiskArray.create(tmp_path / "mel.npy", (N_MELS, mel_length(len(samples))), np.float32)
    mel_spectrogram(on_disk, out=out)
    # Equal up to float32 rounding: BLAS may sum a block's product in another order than the
    # whole one's, on some processors.
    np.testing.assert_allclose(np.load(tmp_path / "mel.npy"), whole, rtol=0, atol=1e-3)
    monkeypatch.setattr(audio, "MEL_BLOCK", 1000)  # block edges elsewhere
    np.testing.assert_allclose(mel_spectrogram(samples), whole, rtol=0, atol=1e-3)


def test_speech_decoded_to_a_file_is_the_speech_decoded_to_memory(tmp_path: Path) -> None:
    path = make_tone(tmp_path / "s.m4a", seconds=1.3, rate=22050, channels=2)
    on_disk = decode_speech(path, tmp_path / "speech.f32")
    assert np.array_equal(on_disk[:], load_speech(path))
    # The first 0.5 s alone: those samples, no more.
    first = decode_speech(path, tmp_path / "first.f32", 0.5)
    assert abs(len(first) - 8000) <= 2
    np.testing.assert_allclose(first[:], load_speech(path)[:len(first)], atol=1e-6)
    silent = make_video(tmp_path / "silent.mp4", audio=False)
    with pytest.raises(InvalidMedia, match="no audio stream"):
        decode_speech(silent, tmp_path / "none.f32")


def test_streamed_statistics_equal_the_whole_arrays(monkeypatch) -> None:
    # Normalisation and voice activity read the mel MEL_BLOCK columns at a time: the mean and
    # spread of its voiced columns and the voiced frames are those of the whole array.
    mel = mel_spectrogram(_speech_like(70.0))
    energy = mel.mean(axis=0)
    voiced = energy >= np.percentile(energy, 95) - audio.VOICED_RANGE_DB
    assert 0.5 < voiced.mean() < 0.9  # the pauses are left out
    stats = mel_normalisation(mel)
    picked = mel[:, voiced].astype(np.float64)
    assert np.allclose(stats.mean[:, 0], picked.mean(axis=1), rtol=1e-6, atol=1e-5)
    assert np.allclose(stats.spread[:, 0], picked.std(axis=1) + 1.0, rtol=1e-6)
    active = voice_activity(mel, 25, 1750)
    monkeypatch.setattr(audio, "MEL_BLOCK", 37)
    small = mel_normalisation(mel)
    assert np.allclose(small.mean, stats.mean, rtol=1e-6) and np.allclose(small.spread,
                                                                          stats.spread, rtol=1e-6)
    assert np.array_equal(voice_activity(mel, 25, 1750), active)


def test_mel_needs_no_librosa() -> None:
    # librosa's numba kernels take a second to load on every run and half a minute to
    # compile on the first: the dub's extract stage must not import it.
    code = ("import sys, numpy as np\nfrom dubtool.pipeline.extract import extract\n"
            "from dubtool.media.audio import mel_spectrogram\n"
            "mel_spectrogram(np.ones(4000, np.float32))\nprint('librosa' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "False"


def test_mel_window_outside_speech_is_silence() -> None:
    mel = np.zeros((N_MELS, 10), np.float32)
    before = feature_window(mel, 0, 25)
    assert (before[:, :5] == MEL_FLOOR_DB).all() and (before[:, 6:] == 0).all()
    assert (feature_window(mel, 100, 25) == MEL_FLOOR_DB).all()


# -- frames -----------------------------------------------------------------------------


def test_writer_round_trip_with_audio_and_odd_size(tmp_path: Path) -> None:
    speech = make_tone(tmp_path / "s.wav", seconds=1.0)
    out = tmp_path / "out.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (21, 33, 3), dtype=np.uint8)
    with VideoWriter(out, 33, 21, Fraction(30000, 1001), audio=speech) as writer:
        for _ in range(30):
            writer.write(base)
    info = probe_video(out)
    assert info.fps == Fraction(30000, 1001) and info.frame_count == 30
    assert (info.width, info.height) == (34, 22)  # padded to even sides for yuv420p
    assert info.has_audio
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize(("suffix", "video", "audio", "container"), [
    (".mp4", "h264", "aac", "mp4"),
    (".m4v", "h264", "aac", "mp4"),
    (".mov", "h264", "aac", "mov"),
    (".mkv", "h264", "aac", "matroska"),
    (".webm", "vp9", "opus", "webm"),
])
def test_writer_codecs_follow_the_container(tmp_path: Path, suffix: str, video: str,
                                            audio: str, container: str) -> None:
    """Issue 26.2: `-o out.webm` held H.264 + AAC (as MP4). Each container the README names
    holds codecs it supports: WebM VP9 + Opus, the others H.264 + AAC."""
    speech = make_tone(tmp_path / "s.wav", seconds=0.5)
    out = tmp_path / f"out{suffix}"
    frame = np.random.default_rng(0).integers(0, 255, (21, 33, 3), dtype=np.uint8)
    with VideoWriter(out, 33, 21, Fraction(25), audio=speech) as writer:
        for _ in range(12):
            writer.write(frame)
    probe = ffprobe(out)
    codecs = {s["codec_type"]: s["codec_name"] for s in probe["streams"]}
    assert codecs == {"video": video, "audio": audio}
    assert container in probe["format"]["format_name"].split(",")
    assert probe_video(out).frame_count == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["s.wav", out.name])


def test_writer_refuses_a_container_it_cannot_fill(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"\.avi video: .* one of \.mp4, \.m4v, \.mov, "
                                          r"\.mkv, \.webm"):
        VideoWriter(tmp_path / "out.avi", 16, 16, Fraction(25))
    assert list(tmp_path.iterdir()) == []


def test_writer_leaves_no_file_when_interrupted(tmp_path: Path) -> None:
    """Nor an open pipe to the killed ffmpeg (its stdin stayed open: one file descriptor lost
    for each failed dub of a long batch)."""
    out = tmp_path / "out.mp4"
    for error in (KeyboardInterrupt, RuntimeError):
        with pytest.raises(error), VideoWriter(out, 16, 16, Fraction(25)) as writer:
            for _ in range(30):  # past the encoder's delay: ffmpeg has begun the file
                writer.write(np.zeros((16, 16, 3), np.uint8))
            raise error
        assert writer._proc.stdin.closed and writer._proc.returncode is not None
        assert list(tmp_path.iterdir()) == []


def test_output_checks(tmp_path: Path) -> None:
    video = make_video(tmp_path / "in.mp4")
    with pytest.raises(OutputError, match="same as an input"):
        check_output_path(video, [video])
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "out.mp4")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path)
    assert check_output_path(tmp_path / "fine.mp4") == (tmp_path / "fine.mp4").resolve()


def test_selected_frames_are_those_frames(tmp_path: Path, face_clip: Path) -> None:
    info = probe_video(face_clip)  # 50 frames of a real video
    decoded = np.stack([f.copy() for f in read_frames(info)])
    picks = [0, 3, 17, 18, 49]
    selected = np.stack([f.copy() for f in read_frames(info, select=picks)])
    assert np.array_equal(selected, decoded[picks])
    # Upright as read_frames gives them: a video stored turned, with a rotation tag.
    turned = make_video(tmp_path / "turned.mp4", seconds=0.4, size="64x48",
                        extra=("-metadata:s:v:0", "rotate=90"))
    info = probe_video(turned)
    upright = np.stack([f.copy() for f in read_frames(info)])
    assert np.array_equal(np.stack(list(read_frames(info, select=[2, 7]))), upright[[2, 7]])


def test_frames_in_any_order_decode_only_what_is_used_with_a_small_scratch(
        tmp_path: Path, face_clip: Path, monkeypatch) -> None:
    import dubtool.media.frames as frames_module
    from dubtool.pipeline.plan import frame_plan

    info = probe_video(face_clip)  # 50 frames of 256x256
    decoded = np.stack([f.copy() for f in read_frames(info)])
    scratch = tmp_path / "scratch"
    raw_size = decoded.nbytes
    sizes: list[int] = []
    counts: list[int | None] = []
    real_read = frames_module.read_frames

    def counting(info, frames=None, **options):
        counts.append(frames)
        return real_read(info, frames, **options)

    monkeypatch.setattr(frames_module, "read_frames", counting)
    order = frame_plan(50, 130, "pingpong")  # forward, back, forward
    served = []
    for frame in read_frames_in_order(info, order, scratch):
        served.append(frame.copy())
        sizes.append(scratch.stat().st_size)
    served = np.stack(served)
    forward = np.arange(50)
    assert np.array_equal(served[forward], decoded)  # the first pass: straight from ffmpeg
    assert np.abs(served.astype(int) - decoded[order]).mean() < 2  # the way back: JPEGs
    assert max(sizes) < raw_size / 4 and not scratch.exists()
    assert counts == [50, 50]  # decoded again from frame 0 after the turn, not kept raw
    # A speech shorter than the video: only the first frames are decoded, no scratch.
    counts.clear()
    short = list(read_frames_in_order(info, frame_plan(50, 12, "pingpong"), scratch))
    assert len(short) == 12 and counts == [12] and not scratch.exists()
    looped = np.stack([f.copy() for f in read_frames_in_order(info, frame_plan(50, 120, "loop"),
                                                             scratch)])
    assert np.array_equal(looped, decoded[frame_plan(50, 120, "loop")])  # loops: exact
    # In the decoder's yuv420p (the blend's frames): the way back as JPEGs too.
    yuv = np.stack([f.copy() for f in read_frames(info, pixel_format="yuv420p")])
    back = np.stack([f.copy() for f in read_frames_in_order(info, order, scratch, "yuv420p")])
    assert back.shape == (len(order), 256 * 256 * 3 // 2)
    assert np.array_equal(back[forward], yuv)
    assert np.abs(back.astype(int) - yuv[order]).mean() < 2 and not scratch.exists()


def _cover_art_first(video: Path, out: Path) -> Path:
    """``video`` with a 32x32 cover picture that the demuxer lists as stream 0: the mp4
    muxer writes the cover (moov/udta) after the tracks, so the udta box is moved first."""
    import struct

    cover = out.with_suffix(".png")
    ffmpeg("-f", "lavfi", "-i", "color=red:size=32x32:d=1", "-frames:v", "1", str(cover))
    tagged = out.with_name("tagged.mp4")
    ffmpeg("-i", str(cover), "-i", str(video), "-map", "0", "-map", "1", "-c", "copy",
           "-c:v:0", "mjpeg", "-disposition:v:0", "attached_pic", str(tagged))

    def boxes(data: bytes) -> list[tuple[bytes, bytes]]:
        found, i = [], 0
        while i < len(data):
            size, kind = struct.unpack(">I4s", data[i:i + 8])
            found.append((kind, data[i:i + size]))
            i += size
        return found

    parts = []
    for kind, box in boxes(tagged.read_bytes()):
        if kind == b"moov":  # same size: the tracks' absolute sample offsets stay right
            children = boxes(box[8:])
            box = box[:8] + b"".join([c for k, c in children if k in (b"mvhd", b"udta")]
                                     + [c for k, c in children if k not in (b"mvhd", b"udta")])
        parts.append(box)
    out.write_bytes(b"".join(parts))
    return out


def test_cover_art_as_first_video_stream_is_not_what_is_decoded(tmp_path: Path) -> None:
    """probe skips an attached picture; the decoder maps the stream probe chose, not 0:v:0
    (which dubbed the thumbnail, repeated)."""
    video = make_video(tmp_path / "v.mp4", seconds=1.0, size="64x48")
    covered = _cover_art_first(video, tmp_path / "covered.mp4")
    streams = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                              "stream=index,codec_type:stream_disposition=attached_pic", "-of",
                              "json", str(covered)], capture_output=True, check=True).stdout
    assert '"attached_pic": 1' in streams.decode().split('"index": 1')[0]  # the cover is 0
    info = probe_video(covered)
    assert (info.stream, info.width, info.height, info.frame_count) == (1, 64, 48, 25)
    assert VideoInfo.from_json(info.to_json()) == info
    frames = np.stack([f.copy() for f in read_frames(info)])
    plain = np.stack([f.copy() for f in read_frames(probe_video(video))])
    assert frames.shape == (25, 48, 64, 3)
    np.testing.assert_array_equal(frames, plain)
    np.testing.assert_array_equal(next(read_frames(info, select=[7])), plain[7])


@pytest.mark.parametrize("shape", [(60, 131, 2), (3, 4), (1, 5), (200,)])
def test_filters_in_time_equal_scipys(shape: tuple[int, ...]) -> None:
    """The dub smooths without importing scipy.ndimage (0.2 s of its start): the same
    numbers as its gaussian_filter1d and uniform_filter1d along the first axis, the ends
    repeated, in the series' dtype."""
    from scipy.ndimage import gaussian_filter1d, uniform_filter1d

    series = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    for sigma in (0.4, 1.0, 7.3):
        ours, theirs = gaussian_in_time(series, sigma), gaussian_filter1d(
            series, sigma, axis=0, mode="nearest")
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    for size in (1, 2, 3, 4, 25, 61):
        np.testing.assert_allclose(mean_in_time(series, size),
                                   uniform_filter1d(series, size, axis=0, mode="nearest"),
                                   atol=1e-6)


def test_yuv420p_frames_pass_through_the_encoder_as_they_came(face_clip: Path,
                                                              tmp_path: Path) -> None:
    """The blend's frames: the decoder's yuv420p written back unchanged (but for x264's
    own loss), where an RGB round trip darkens every pixel; odd sides have no yuv420p."""
    info = probe_video(face_clip)
    yuv = np.stack([f.copy() for f in read_frames(info, 10, pixel_format="yuv420p")])
    with VideoWriter(tmp_path / "yuv.mp4", info.width, info.height, info.fps,
                     pixel_format="yuv420p", crf=0) as writer:
        for frame in yuv:
            writer.write(frame)
    again = np.stack(list(read_frames(probe_video(tmp_path / "yuv.mp4"), pixel_format="yuv420p")))
    assert np.array_equal(again, yuv)  # CRF 0: lossless
    with pytest.raises(ValueError, match="even sides"):
        VideoWriter(tmp_path / "odd.mp4", 33, 21, Fraction(25), pixel_format="yuv420p")
    with pytest.raises(ValueError, match=r"expected \(384,\)"), VideoWriter(
            tmp_path / "shape.mp4", 16, 16, Fraction(25), pixel_format="yuv420p") as writer:
        writer.write(np.zeros((16, 16, 3), np.uint8))  # an RGB frame


def test_block_rows_read_any_order_as_the_array(tmp_path: Path) -> None:
    values = np.random.default_rng(0).normal(size=(700, 3, 2)).astype(np.float32)
    array = DiskArray.create(tmp_path / "a.npy", values.shape, np.float32)
    array[:] = values
    rows = BlockRows(array, block=64)
    order = [*range(0, 300), *range(650, 200, -1), 699, 0, 350]  # forwards, back, jumps
    assert len(rows) == 700
    for i in order:
        assert np.array_equal(rows[i], values[i])
