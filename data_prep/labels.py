"""The label space: MID <-> contiguous class index <-> display name.

OpenImages identifies classes by MIDs (``/m/061hd_``); display names are not unique ("Bench" and
"Mouse" appear twice in the 500-class challenge list), so the MID is the only key. Class indices
are 0-based here; the detector adds its own background index, the data layer never does.
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from data_prep.errors import ConfigError, InputError


@dataclass(frozen=True)
class LabelSpace:
    """An ordered list of classes; the order of the class-description file defines the indices."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.mids) != len(self.names):
            raise ValueError("mids and names must have the same length")
        index: dict[str, int] = {}
        for i, mid in enumerate(self.mids):
            if mid in index:
                raise InputError(f"class MID {mid!r} is listed twice (rows {index[mid] + 1} and {i + 1})")
            index[mid] = i
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_csv_text(cls, text: str, source: str = "<classes>") -> LabelSpace:
        """Parse the official ``MID,Display name`` file (no header; a header row is tolerated)."""
        mids: list[str] = []
        names: list[str] = []
        for row_number, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if row_number == 1 and row[0].strip() in ("LabelName", "MID"):
                continue
            if len(row) < 2 or not row[0].startswith("/"):
                raise InputError(f"{source}:{row_number}: expected 'MID,Display name', got {row!r}")
            mids.append(row[0].strip())
            names.append(",".join(row[1:]).strip())
        if not mids:
            raise InputError(f"{source}: no classes found")
        return cls(tuple(mids), tuple(names))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str]]) -> LabelSpace:
        pairs = list(pairs)
        return cls(tuple(m for m, _ in pairs), tuple(n for _, n in pairs))

    def __len__(self) -> int:
        return len(self.mids)

    def __contains__(self, mid: object) -> bool:
        return mid in self._index

    def index(self, mid: str) -> int:
        """The class index of ``mid``; ``KeyError`` if unknown."""
        return self._index[mid]

    def get(self, mid: str, default: int = -1) -> int:
        return self._index.get(mid, default)

    def name(self, index: int) -> str:
        return self.names[index]

    def indices(self, mids: Sequence[str]) -> np.ndarray:
        """Vectorised lookup: an int32 array, -1 where a MID is unknown."""
        return np.fromiter((self._index.get(m, -1) for m in mids), dtype=np.int32, count=len(mids))

    def lookup(self, items: Sequence[str], key: str) -> np.ndarray:
        """Class indices of classes given by MID or display name, in the order given (a config's
        class list: ``key`` names it in errors). A name two classes share must be given by MID."""
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            by_name.setdefault(name, []).append(i)
        ids = []
        for item in items:
            if item in self._index:
                ids.append(self._index[item])
                continue
            found = by_name.get(item, [])
            if len(found) == 1:
                ids.append(found[0])
                continue
            if len(found) > 1:
                raise ConfigError(f"{key}: display name {item!r} is shared by {len(found)} classes; give its MID "
                                  f"({', '.join(self.mids[i] for i in found)})")
            close = difflib.get_close_matches(item, [*self.names, *self.mids], n=1)
            raise ConfigError(f"{key}: {item!r} is not a MID or display name of the label space"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{key}: a class is listed twice")
        return np.asarray(ids, dtype=np.int64)

    def to_csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for mid, name in zip(self.mids, self.names, strict=True):
            writer.writerow([mid, name])
        return out.getvalue()
