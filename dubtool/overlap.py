"""Run a producer ahead of its consumer on another core.

numpy, OpenCV, MediaPipe and pipe reads and writes release the GIL while they work, so a
thread that makes the next frames while the main thread hands the last ones to ffmpeg keeps
both cores busy. The items, and their order, are those of the plain loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_DONE = object()


class Background(Generic[T]):
    """``work()`` started in a thread now; ``result()`` waits for it and returns its value
    or raises its exception. ``wait()`` only waits (for a caller that is failing anyway and
    must not leave the work running behind it)."""

    def __init__(self, work: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = work()
            except BaseException as exc:  # raised in the caller, by result()
                self._error = exc

        self._thread = threading.Thread(target=run, name="dubtool-background", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def ahead(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """``items``, made up to ``depth`` ahead in a thread. An exception in the producer is
    raised here, at the item it would have given; closing this iterator (or an exception in
    the consumer) stops the producer and closes ``items``."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((_DONE, exc))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="dubtool-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()
