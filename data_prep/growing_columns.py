"""Columns filled batch by batch, for readers of large CSV files.

Collecting each batch's arrays in lists and concatenating them at the end holds every column
twice at the peak, and the freed batch arrays stay in the process: glibc keeps freed heap memory
for reuse, so reading the 12.2M-row train box file held ~0.5 GiB more than its columns
(BENCHMARKS.md). ``GrowingColumns`` writes each batch into arrays allocated once, sized from an
estimate of the row count (an estimate too high costs nothing: pages never written are never
resident), grown by half when a batch does not fit.
"""

from __future__ import annotations

import numpy as np


class GrowingColumns:
    """Named columns ``{name: (dtype, trailing shape)}`` with ``capacity`` rows to begin with."""

    def __init__(self, specs: dict[str, tuple[np.dtype | type, tuple[int, ...]]], capacity: int) -> None:
        self._arrays = {name: np.empty((max(capacity, 1), *shape), dtype=dtype) for name, (dtype, shape) in specs.items()}
        self.rows = 0

    def append(self, values: dict[str, np.ndarray]) -> None:
        """One batch: an array for every column, all of the same length."""
        if values.keys() != self._arrays.keys():
            raise ValueError(f"a batch of columns {sorted(values)}, expected {sorted(self._arrays)}")
        lengths = {len(v) for v in values.values()}
        if len(lengths) != 1:
            raise ValueError(f"a batch whose columns have different lengths {sorted(lengths)}")
        (n,) = lengths
        capacity = len(next(iter(self._arrays.values())))
        if self.rows + n > capacity:
            grown = max(self.rows + n, capacity + capacity // 2)
            for name, array in self._arrays.items():
                bigger = np.empty((grown, *array.shape[1:]), dtype=array.dtype)
                bigger[: self.rows] = array[: self.rows]
                self._arrays[name] = bigger
        for name, array in self._arrays.items():
            array[self.rows : self.rows + n] = values[name]
        self.rows += n

    def column(self, name: str) -> np.ndarray:
        """The column's rows so far (a view: valid until the next append)."""
        return self._arrays[name][: self.rows]

    def keep(self, start: int, stop: int, mask: np.ndarray) -> None:
        """Keep only the rows of ``[start, stop)`` where ``mask`` is True; the rows after them move up."""
        if len(mask) != stop - start:
            raise ValueError(f"a mask of {len(mask)} rows for rows [{start}, {stop})")
        kept = int(mask.sum())
        for array in self._arrays.values():
            array[start : start + kept] = array[start:stop][mask]
            array[start + kept : self.rows - (stop - start - kept)] = array[stop : self.rows]
        self.rows -= stop - start - kept

    def pop(self, name: str) -> np.ndarray:
        """The column's rows so far (a view of its array), no longer held here."""
        return self._arrays.pop(name)[: self.rows]
