"""Work run ahead in a thread: the same items in the same order, errors where they belong, and
nothing left running; a dub made so is the sequential dub, frame for frame."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tone

from dubtool.overlap import ahead


def test_the_items_come_in_order_and_the_producer_runs_ahead() -> None:
    made = []

    def produce():
        for i in range(20):
            made.append(i)
            yield i

    items = ahead(produce(), depth=3)
    assert next(items) == 0
    time.sleep(0.2)
    assert len(made) >= 4  # the first, and three more waiting in the buffer
    assert [0, *items] == list(range(20))


def test_a_producer_error_is_raised_at_its_item() -> None:
    def produce():
        yield 1
        yield 2
        raise ValueError("frame 3 is bad")

    seen = []
    with pytest.raises(ValueError, match="frame 3"):
        for item in ahead(produce()):
            seen.append(item)
    assert seen == [1, 2]


def test_stopping_early_stops_and_closes_the_producer() -> None:
    closed = threading.Event()

    def produce():
        try:
            yield from range(10**6)
        finally:
            closed.set()

    before = threading.active_count()
    items = ahead(produce(), depth=2)
    assert next(items) == 0
    items.close()
    assert closed.is_set() and threading.active_count() == before


def test_the_dub_made_ahead_is_the_sequential_dub(face_clip: Path, tiny_model: Path,
                                                  tmp_path: Path, monkeypatch) -> None:
    from dubtool.media.frames import read_frames
    from dubtool.media.probe import probe_video
    from dubtool.pipeline import dubber as dubber_module
    from dubtool.pipeline.dubber import Dubber

    speech = make_tone(tmp_path / "speech.wav", seconds=1.5)
    dubber = Dubber.from_pretrained(tiny_model, device="cpu")
    ahead_dub = dubber.dub(face_clip, speech, tmp_path / "ahead.mp4", cache_dir=tmp_path / "c")
    monkeypatch.setattr(dubber_module, "ahead", lambda items: items)
    plain = dubber.dub(face_clip, speech, tmp_path / "plain.mp4", cache_dir=tmp_path / "c")
    assert ahead_dub.dubbed_frames == plain.dubbed_frames > 0
    frames = [np.stack(list(read_frames(probe_video(p)))) for p in (ahead_dub.output,
                                                                    plain.output)]
    assert np.array_equal(frames[0], frames[1])


def test_background_work_runs_beside_the_caller_and_returns_or_raises() -> None:
    from dubtool.overlap import Background

    started = threading.Event()
    release = threading.Event()

    def work() -> int:
        started.set()
        release.wait(5)
        return 42

    job = Background(work)
    assert started.wait(5)  # running before anyone asks for its result
    release.set()
    assert job.result() == 42

    def failing() -> int:
        raise OSError("speech unreadable")

    job = Background(failing)
    job.wait()  # waiting alone does not raise
    with pytest.raises(OSError, match="speech unreadable"):
        job.result()
