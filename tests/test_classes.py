"""Class-subset experts: choosing the classes (by name, MID or frequency band), the model's own
hierarchy, and the loader's targets in the model's ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_prep.errors import ConfigError
from pipeline.classes import band_classes, model_classes, resolve_class_selection
from pipeline.loader import training_targets
from tests.conftest import CHALLENGE_CLASSES, CHALLENGE_HIERARCHY, tiny_config


def challenge_config(tmp_path, *overrides: str):
    return tiny_config(CHALLENGE_CLASSES.parent, tmp_path / "shards", f"data.classes={CHALLENGE_CLASSES.name}",
                       f"data.hierarchy={CHALLENGE_HIERARCHY.name}", "model.num_classes=500", *overrides)


def test_classes_by_name_or_mid_map_both_ways_and_keep_their_hierarchy(tmp_path):
    cfg = resolve_class_selection(challenge_config(tmp_path, "model.classes=[Cat, /m/0jbk, Tiger]"))
    assert cfg.model.num_classes == 3
    classes = model_classes(cfg)
    assert classes.model.names == ("Cat", "Animal", "Tiger") and classes.is_subset
    assert [classes.data.names[i] for i in classes.to_data] == ["Cat", "Animal", "Tiger"]
    to_model = classes.data_to_model()
    assert to_model[classes.to_data].tolist() == [0, 1, 2] and (to_model >= 0).sum() == 3
    assert classes.covers().sum() == 3
    up = classes.model_ancestor_matrix()  # Cat and Tiger are animals (through Carnivore, left out)
    assert up.tolist() == [[True, True, False], [False, True, False], [False, True, True]]
    full = model_classes(challenge_config(tmp_path))
    assert not full.is_subset and len(full.model) == 500


def test_bad_class_selections_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'Strawbery' is not a MID or display name.*did you mean 'Strawberry'"):
        model_classes(resolve_class_selection(challenge_config(tmp_path, "model.classes=[Strawbery]")))
    with pytest.raises(ConfigError, match="listed twice"):
        model_classes(resolve_class_selection(challenge_config(tmp_path, "model.classes=[Cat, Cat]")))
    with pytest.raises(ConfigError, match="num_classes is 500 but model.classes lists 1"):
        model_classes(challenge_config(tmp_path, "model.classes=[Cat]"))  # not resolved: the count disagrees
    with pytest.raises(ConfigError, match="give one of them"):
        resolve_class_selection(challenge_config(tmp_path, "model.classes=[Cat]", "model.classes_band=[0, 0.2]"))
    with pytest.raises(ConfigError, match="manifest.json is missing"):
        resolve_class_selection(challenge_config(tmp_path, "model.classes_band=[0, 0.2]"))


def test_a_frequency_band_picks_the_rarest_classes_from_the_manifest(tmp_path):
    stats = [{"index": i, "mid": f"/m/{i}", "name": str(i), "boxes": b} for i, b in enumerate([50, 3, 9, 3, 70, 1, 20,
                                                                                              8, 2, 40])]
    assert band_classes(stats, 0.0, 0.2) == ["/m/5", "/m/8"]  # 1 and 2 boxes
    assert band_classes(stats, 0.2, 0.4) == ["/m/1", "/m/3"]  # the tie at 3 boxes by label index
    assert band_classes(stats, 0.8, 1.0) == ["/m/0", "/m/4"]
    with pytest.raises(ConfigError, match="not a range"):
        band_classes(stats, 0.5, 0.2)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"splits": {"train": {"classes": [
        {"index": i, "mid": mid, "name": name, "boxes": boxes}
        for i, (mid, name, boxes) in enumerate([("/m/01yrx", "Cat", 5), ("/m/0jbk", "Animal", 900),
                                                ("/m/07dm6", "Tiger", 2), ("/m/0bt9lr", "Dog", 30)])]}}}))
    cfg = resolve_class_selection(challenge_config(tmp_path, "model.classes_band=[0.0, 0.5]"))
    assert cfg.model.classes == ["/m/01yrx", "/m/07dm6"] and cfg.model.num_classes == 2
    assert cfg.model.classes_band is None  # resolved: what a run saves


def test_targets_in_the_model_ids_drop_other_classes():
    meta = {"boxes": [[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]], "labels": [7, 2, 9], "is_expanded": [0, 0, 1]}
    label_map = np.full(12, -1, np.int64)
    label_map[[2, 9]] = [0, 1]
    boxes, labels = training_targets(meta, use_expanded_labels=True, label_map=label_map)
    assert labels.tolist() == [0, 1] and torch.equal(boxes, torch.tensor([[5.0, 5, 20, 20], [1, 1, 4, 4]]))
    boxes, labels = training_targets(meta, use_expanded_labels=False, label_map=label_map)
    assert labels.tolist() == [0] and boxes.shape == (1, 4)
    boxes, labels = training_targets(meta, use_expanded_labels=False)
    assert labels.tolist() == [7, 2]
