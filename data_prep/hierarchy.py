"""The OpenImages class hierarchy: ancestors and descendants of every class, multi-parent aware.

Built once from the official JSON (``LabelName`` + ``Subcategory`` lists, root ``/m/0bl9f``).
``Subcategory`` edges are "is-a" edges and drive label expansion, exactly as the official
expansion tool does. The OIDv6 hierarchy also has ``Part`` lists ("a wheel is part of a car"):
those are *not* is-a relations, so they never expand labels; they are kept in ``part_of`` and the
classes that appear under them are still known nodes. The root is a container, never a class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from data_prep.errors import InputError
from data_prep.labels import LabelSpace

OID_ROOT_MID = "/m/0bl9f"


@dataclass(frozen=True)
class Hierarchy:
    """Is-a parents of every node (several for some classes) and part-of relations, by MID."""

    root: str
    parents: dict[str, frozenset[str]]
    part_of: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_json_text(cls, text: str, source: str = "<hierarchy>") -> Hierarchy:
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(tree, dict) or "LabelName" not in tree:
            raise InputError(f"{source}: the top level must be an object with 'LabelName'")
        parents: dict[str, set[str]] = {}
        part_of: dict[str, set[str]] = {}
        root = tree["LabelName"]
        stack: list[tuple[dict, str]] = [(tree, "$")]
        while stack:
            node, where = stack.pop()
            mid = node.get("LabelName")
            if not isinstance(mid, str):
                raise InputError(f"{source}: node at {where} has no string 'LabelName'")
            unknown = set(node) - {"LabelName", "Subcategory", "Part"}
            if unknown:
                raise InputError(f"{source}: node {mid} at {where} has unsupported keys {sorted(unknown)}")
            parents.setdefault(mid, set())
            for key, relation in (("Subcategory", parents), ("Part", part_of)):
                children = node.get(key, [])
                if not isinstance(children, list):
                    raise InputError(f"{source}: '{key}' of {mid} at {where} must be a list")
                for i, child in enumerate(children):
                    if not isinstance(child, dict):
                        raise InputError(f"{source}: {where}.{key}[{i}] must be an object")
                    child_mid = child.get("LabelName")
                    if isinstance(child_mid, str):
                        relation.setdefault(child_mid, set())
                        if mid != root or key == "Part":
                            relation[child_mid].add(mid)
                    stack.append((child, f"{where}.{key}[{i}]"))
        hierarchy = cls(
            root=root,
            parents={m: frozenset(p) for m, p in parents.items() if m != root},
            part_of={m: frozenset(p) for m, p in part_of.items() if p},
        )
        hierarchy._check_acyclic(source)
        return hierarchy

    def _check_acyclic(self, source: str) -> None:
        state: dict[str, int] = {}
        for start in self.parents:
            if state.get(start) == 2:
                continue
            stack = [(start, iter(self.parents[start]))]
            state[start] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                elif state.get(nxt) == 1:
                    raise InputError(f"{source}: the is-a relation has a cycle through {nxt}")
                elif state.get(nxt) is None:
                    state[nxt] = 1
                    stack.append((nxt, iter(self.parents.get(nxt, ()))))

    @property
    def mids(self) -> frozenset[str]:
        """Every class node (the root excluded), reached through Subcategory or Part lists."""
        return frozenset(self.parents)

    def ancestors(self, mid: str) -> frozenset[str]:
        """All is-a ancestors over every path, the node itself and the root excluded."""
        seen: set[str] = set()
        stack = list(self.parents.get(mid, ()))
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(self.parents.get(node, ()))
        return frozenset(seen)

    def descendants(self, mid: str) -> frozenset[str]:
        """All is-a descendants, the node itself excluded."""
        children = self._children()
        seen: set[str] = set()
        stack = list(children.get(mid, ()))
        while stack:
            node = stack.pop()
            if node not in seen:
                seen.add(node)
                stack.extend(children.get(node, ()))
        return frozenset(seen)

    def _children(self) -> dict[str, set[str]]:
        cached = self.__dict__.get("_children_cache")
        if cached is None:
            cached = {}
            for child, ps in self.parents.items():
                for p in ps:
                    cached.setdefault(p, set()).add(child)
            object.__setattr__(self, "_children_cache", cached)
        return cached

    def depth(self) -> int:
        """Longest is-a chain from a top-level class down to a leaf, counted in nodes."""
        memo: dict[str, int] = {}

        def level(m: str) -> int:
            if m not in memo:
                memo[m] = 1 + max((level(p) for p in self.parents.get(m, ())), default=0)
            return memo[m]

        return max((level(m) for m in self.parents), default=0)

    def ancestor_matrix(self, labels: LabelSpace) -> np.ndarray:
        """Boolean ``[C, C]`` matrix: ``M[i, j]`` is True when class j is class i or an ancestor of it.

        Rows expand a class up the hierarchy (ground-truth boxes, positive image labels); the
        transpose expands down (negative image labels). Ancestors outside the label space are skipped.
        """
        n = len(labels)
        matrix = np.eye(n, dtype=bool)
        for i, mid in enumerate(labels.mids):
            for anc in self.ancestors(mid):
                j = labels.get(anc)
                if j >= 0:
                    matrix[i, j] = True
        return matrix

    def class_levels(self, labels: LabelSpace) -> tuple[np.ndarray, np.ndarray]:
        """Per class of the label space: whether it is a leaf (no descendant in the label space) and
        its depth (1 = a top-level class; the longest is-a chain from the top, counted in nodes).
        What the per-level AP of a report groups classes by."""
        up = self.ancestor_matrix(labels)
        is_leaf = up.sum(axis=0) == 1  # no other class has it as an ancestor
        memo: dict[str, int] = {}

        def level(m: str) -> int:
            if m not in memo:
                memo[m] = 1 + max((level(p) for p in self.parents.get(m, ())), default=0)
            return memo[m]

        return is_leaf, np.array([level(m) for m in labels.mids], dtype=np.int64)

    def check_label_space(self, labels: LabelSpace) -> tuple[list[str], list[str]]:
        """MIDs of the label space missing from the hierarchy, and hierarchy MIDs not in the label space."""
        return (
            [m for m in labels.mids if m not in self.parents],
            sorted(m for m in self.parents if m not in labels),
        )


def expand_up(indices: Iterable[int], matrix: np.ndarray) -> np.ndarray:
    """Sorted class indices of ``indices`` and all their ancestors."""
    idx = np.fromiter(indices, dtype=np.int64)
    if idx.size == 0:
        return idx
    return np.flatnonzero(matrix[idx].any(axis=0))


def expand_down(indices: Iterable[int], matrix: np.ndarray) -> np.ndarray:
    """Sorted class indices of ``indices`` and all their descendants."""
    idx = np.fromiter(indices, dtype=np.int64)
    if idx.size == 0:
        return idx
    return np.flatnonzero(matrix[:, idx].any(axis=1))
