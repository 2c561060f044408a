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
