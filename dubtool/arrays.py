"""Arrays that grow with the speech's length, kept on disk and read or written a part at a time.

A memory map that stays open keeps every page it has touched in the process's resident memory
(clean file pages, which the kernel could drop, but counted in the RSS until the map closes):
one pass over an hour's mel or landmarks through a long-lived map grows the RSS by their size.
A DiskArray maps its file only for the moment of one read or write, so memory holds only the
part asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class DiskArray:
    """An array in a file (an .npy, or raw samples): ``a[index]`` reads a copy of that part,
    ``a[index] = values`` writes it in place. Shape and dtype are fixed when it is made."""

    def __init__(self, path: str | Path, dtype: np.dtype, shape: tuple[int, ...],
                 offset: int = 0) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(n) for n in shape)
        self.offset = offset

    @classmethod
    def open(cls, path: str | Path) -> DiskArray:
        """An existing .npy file (C order)."""
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
        if fortran_order:
            raise ValueError(f"{path}: a Fortran-ordered array cannot be read by parts")
        return cls(path, dtype, shape, offset)

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, ...], dtype: np.dtype) -> DiskArray:
        """A new .npy file of ``shape``, its values left to be written."""
        # The map open_memmap returns writes the header; dropped at once, unused.
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        return cls.open(path)

    @classmethod
    def raw(cls, path: str | Path, dtype: np.dtype) -> DiskArray:
        """A headerless file of ``dtype`` values (what ffmpeg writes with ``-f f32le``)."""
        itemsize = np.dtype(dtype).itemsize
        return cls(path, dtype, (Path(path).stat().st_size // itemsize,))

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, mode: str) -> np.memmap:
        return np.memmap(self.path, self.dtype, mode, self.offset, self.shape)

    def __getitem__(self, index: object) -> np.ndarray:
        return np.array(self._map("r")[index])  # a copy: the map closes when this returns

    def __setitem__(self, index: object, values: np.ndarray) -> None:
        self._map("r+")[index] = values


def true_runs(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the runs of consecutive True values of the (F,) bool ``flags``."""
    edges = np.diff(np.concatenate([[0], np.asarray(flags).astype(np.int8), [0]]))
    return np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]


def _filtered_in_time(series: np.ndarray, weights: np.ndarray, before: int) -> np.ndarray:
    """``series`` (T, ...) filtered along time: out[t] = sum_k weights[k] series[t - before +
    k], the first and last values repeated past the ends; computed in float64, returned in
    the series' floating dtype."""
    x = np.asarray(series)
    after = len(weights) - 1 - before
    padded = np.concatenate([np.repeat(x[:1], before, axis=0), x,
                             np.repeat(x[-1:], after, axis=0)]).astype(np.float64)
    out = np.zeros(x.shape, np.float64)
    for k, w in enumerate(weights):
        out += w * padded[k:k + len(x)]
    return out.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)


def gaussian_in_time(series: np.ndarray, sigma: float) -> np.ndarray:
    """``series`` (T, ...) smoothed along time by a Gaussian of ``sigma`` steps reaching
    ``gaussian_reach(sigma)`` steps each way, the end values repeated past the ends (what
    scipy.ndimage.gaussian_filter1d(axis=0, mode="nearest") gives, without the 0.2 s that
    importing scipy.ndimage adds to every dub's start)."""
    reach = gaussian_reach(sigma)
    offsets = np.arange(-reach, reach + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    return _filtered_in_time(series, weights / weights.sum(), reach)


def gaussian_reach(sigma: float) -> int:
    """How many steps each way ``gaussian_in_time`` reads: four sigmas."""
    return int(4.0 * sigma + 0.5)


def mean_in_time(series: np.ndarray, size: int) -> np.ndarray:
    """The mean of ``size`` successive steps of ``series`` (T, ...) about each, from ``size
    // 2`` before it, the end values repeated past the ends (scipy.ndimage's
    uniform_filter1d(axis=0, mode="nearest"))."""
    return _filtered_in_time(series, np.full(size, 1.0 / size), size // 2)


class BlockRows:
    """Single rows of ``array`` (a DiskArray, or any array) read ``block`` rows at a time
    around the one asked for: for a caller walking through them in order, forwards or back
    (each read of a DiskArray maps its file: 0.3 ms, a frame's worth of the blend's time)."""

    def __init__(self, array: DiskArray | np.ndarray, block: int = 256) -> None:
        self.array, self.block = array, block
        self.start, self.rows = 0, np.asarray(array[0:0])

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not self.start <= index < self.start + len(self.rows):
            self.start = max(0, index - self.block // 2)
            self.rows = np.asarray(self.array[self.start:self.start + self.block])
        return self.rows[index - self.start]
