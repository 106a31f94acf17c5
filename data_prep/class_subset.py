"""A class subset for a smaller first run (``prep.classes``), closed under the hierarchy.

The OID metric counts a box of a class for every ancestor of that class too, so a subset that
keeps the annotations of some classes must keep them consistently:

- a selected class keeps its own boxes and those of all its descendants (a box of "Sports car"
  is a box of "Car"), each under its own class;
- every ancestor of a kept class is kept as well (its ground truth is the expansion of its
  descendants' boxes: the hierarchy restricted to the kept classes is the original relation);
- everything else is dropped and counted (``box_rows_outside_class_subset`` and friends in the
  manifest), images left with no annotation are not sharded.

Label ids stay those of the full label space, so shards, index, metric and submissions need no
second mapping; ``tsd train`` takes the manifest's kept classes as ``model.classes`` (a model of
that many classes) unless the config chooses its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_prep.hierarchy import Hierarchy
from data_prep.labels import LabelSpace


@dataclass(frozen=True)
class ClassSubset:
    selected: tuple[str, ...]  # the MIDs asked for
    keep: np.ndarray  # [C] bool over the label space: the selected classes, their descendants and ancestors

    def kept_mids(self, labels: LabelSpace) -> list[str]:
        return [labels.mids[i] for i in np.flatnonzero(self.keep)]

    def to_json(self, labels: LabelSpace) -> dict:
        return {"selected": list(self.selected), "classes": self.kept_mids(labels)}


def class_subset(items: Sequence[str], labels: LabelSpace, hierarchy: Hierarchy) -> ClassSubset | None:
    """The subset ``prep.classes`` asks for (MIDs or display names); None for an empty list (all classes)."""
    if not items:
        return None
    selected = labels.lookup(list(items), "prep.classes")
    up = hierarchy.ancestor_matrix(labels)  # up[i, j]: j is i or an ancestor of i
    down = up[:, selected].any(axis=1)  # the selected classes and their descendants
    keep = down | up[down].any(axis=0)  # ... and every ancestor of those
    return ClassSubset(tuple(labels.mids[i] for i in selected), keep)
