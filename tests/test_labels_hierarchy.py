"""LabelSpace and Hierarchy on the real OID files (500-class challenge, 600-class OIDv6 with Parts)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data_prep.errors import InputError
from data_prep.hierarchy import Hierarchy, expand_down, expand_up
from data_prep.labels import LabelSpace
from tests.conftest import CHALLENGE_CLASSES, CHALLENGE_HIERARCHY, FIXTURES, OIDV6_HIERARCHY, SHARED_FIXTURES


@pytest.fixture(scope="module")
def challenge():
    labels = LabelSpace.from_csv_text(CHALLENGE_CLASSES.read_text(), str(CHALLENGE_CLASSES))
    hierarchy = Hierarchy.from_json_text(CHALLENGE_HIERARCHY.read_text(), str(CHALLENGE_HIERARCHY))
    return labels, hierarchy


def _mid(labels: LabelSpace, name: str) -> str:
    matches = [m for m, n in zip(labels.mids, labels.names, strict=True) if n == name]
    assert len(matches) == 1, name
    return matches[0]


def test_label_space_has_500_classes_with_non_unique_names(challenge):
    labels, _ = challenge
    assert len(labels) == 500
    assert labels.mids[0] == "/m/061hd_" and labels.name(0) == "Infant bed"
    duplicated = sorted(n for n, c in Counter(labels.names).items() if c > 1)
    assert duplicated == ["Bench", "Mouse"]
    mice = [m for m, n in zip(labels.mids, labels.names, strict=True) if n == "Mouse"]
    assert len({labels.index(m) for m in mice}) == 2  # the MID, not the name, is the key
    assert labels.indices(["/m/06m11", "/m/unknown"]).tolist() == [labels.index("/m/06m11"), -1]


def test_label_space_round_trips_and_rejects_bad_rows():
    text = '/m/a,"Name, with comma"\n/m/b,Other\n'
    labels = LabelSpace.from_csv_text(text)
    assert labels.names == ("Name, with comma", "Other")
    assert LabelSpace.from_csv_text(labels.to_csv_text()) == labels
    with pytest.raises(InputError, match=r"classes.csv:2"):
        LabelSpace.from_csv_text("/m/a,A\nnot-a-mid\n", "classes.csv")
    with pytest.raises(InputError, match="listed twice"):
        LabelSpace.from_csv_text("/m/a,A\n/m/a,B\n")


def test_challenge_hierarchy_structure(challenge):
    labels, hierarchy = challenge
    assert len(hierarchy.mids) == 500
    assert hierarchy.check_label_space(labels) == ([], [])
    assert sum(len(p) == 2 for p in hierarchy.parents.values()) == 16
    children = {p for ps in hierarchy.parents.values() for p in ps}
    assert len(children) == 57 and len(hierarchy.mids - children) == 443
    assert hierarchy.depth() == 5
    assert "/m/0bl9f" not in hierarchy.mids


@pytest.mark.parametrize("child, parents", [
    ("Tomato", {"Fruit", "Vegetable"}),
    ("Teddy bear", {"Bear", "Toy"}),
    ("Oyster", {"Shellfish", "Invertebrate"}),
])
def test_two_parent_classes_expand_over_every_path(challenge, child, parents):
    labels, hierarchy = challenge
    mid = _mid(labels, child)
    assert {labels.name(labels.index(p)) for p in hierarchy.parents[mid]} == parents
    ancestors = {labels.name(labels.index(a)) for a in hierarchy.ancestors(mid)}
    assert parents <= ancestors
    for p in hierarchy.parents[mid]:
        assert mid in hierarchy.descendants(p)
        assert hierarchy.ancestors(p) <= hierarchy.ancestors(mid)


def test_ancestor_matrix_expands_up_and_down(challenge):
    labels, hierarchy = challenge
    up = hierarchy.ancestor_matrix(labels)
    assert up.shape == (500, 500) and np.all(np.diag(up))
    tomato, fruit, veg = (labels.index(_mid(labels, n)) for n in ("Tomato", "Fruit", "Vegetable"))
    assert set(expand_up([tomato], up)) >= {tomato, fruit, veg}
    assert tomato in set(expand_down([fruit], up)) and tomato in set(expand_down([veg], up))
    # matrix rows agree with the graph walk for every class
    for i, mid in enumerate(labels.mids):
        expected = {labels.index(a) for a in hierarchy.ancestors(mid)} | {i}
        assert set(np.flatnonzero(up[i])) == expected


def test_oidv6_hierarchy_parts_are_not_is_a():
    hierarchy = Hierarchy.from_json_text(OIDV6_HIERARCHY.read_text())
    assert len(hierarchy.mids) == 601
    assert sum(len(p) > 1 for p in hierarchy.parents.values()) == 45
    assert hierarchy.part_of, "Part lists must be read"
    # Human eye (/m/014sv8) is listed as a Part of Human body (/m/02p0tk3): a known node, not a kind of it
    eye, body = "/m/014sv8", "/m/02p0tk3"
    assert eye in hierarchy.mids and body in hierarchy.part_of[eye]
    assert body not in hierarchy.ancestors(eye) and eye not in hierarchy.descendants(body)
    assert sum(len(hierarchy.parents[m] | hierarchy.part_of.get(m, frozenset())) > 1 for m in hierarchy.mids) == 46


def test_hierarchy_rejects_malformed_input():
    with pytest.raises(InputError, match="not valid JSON"):
        Hierarchy.from_json_text("{", "h.json")
    with pytest.raises(InputError, match="unsupported keys"):
        Hierarchy.from_json_text('{"LabelName": "/m/r", "Subcategory": [{"LabelName": "/m/a", "Kids": []}]}')
    cyclic = ('{"LabelName": "/m/r", "Subcategory": [{"LabelName": "/m/a", "Subcategory": '
              '[{"LabelName": "/m/b", "Subcategory": [{"LabelName": "/m/a"}]}]}]}')
    with pytest.raises(InputError, match="cycle"):
        Hierarchy.from_json_text(cyclic)


def test_fixture_copies_equal_the_shared_originals():
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("the workplace's shared fixtures are not next to this checkout")
    originals = sorted(p for p in SHARED_FIXTURES.rglob("*") if p.is_file() and p.suffix in (".csv", ".json"))
    assert originals
    for original in originals:
        assert (FIXTURES / original.relative_to(SHARED_FIXTURES)).read_bytes() == original.read_bytes()


def test_a_class_subset_of_the_real_hierarchy_is_closed_both_ways():
    """prep.classes on the 500 challenge classes: the selected classes keep their descendants
    (Person: Man, Woman, Boy, Girl) and gain every ancestor along every parent (Tomato is a Fruit
    and a Vegetable), so that the hierarchy restricted to the kept classes is the official one."""
    from data_prep.class_subset import class_subset
    from data_prep.errors import ConfigError

    labels = LabelSpace.from_csv_text(CHALLENGE_CLASSES.read_text())
    hierarchy = Hierarchy.from_json_text(CHALLENGE_HIERARCHY.read_text())
    subset = class_subset(["Car", "Person", "Dog", "Tomato"], labels, hierarchy)
    kept = {labels.names[labels.index(m)] for m in subset.kept_mids(labels)}
    assert {"Man", "Woman", "Boy", "Girl", "Limousine", "Van"} <= kept  # descendants
    assert {"Land vehicle", "Vehicle", "Carnivore", "Animal", "Fruit", "Vegetable"} <= kept  # ancestors
    assert "Cat" not in kept and "Truck" not in kept
    up = hierarchy.ancestor_matrix(labels)
    keep = subset.keep
    assert not (up[keep] & ~keep).any()  # closed under ancestors
    for s in labels.lookup(["Car", "Person", "Dog", "Tomato"], "x"):
        assert keep[up[:, s]].all()  # every descendant of a selected class is kept
    with pytest.raises(ConfigError, match=r"prep.classes: display name 'Bench' is shared by 2 classes"):
        class_subset(["Bench"], labels, hierarchy)
