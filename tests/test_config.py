"""The config system: strict YAML -> dataclasses, --set overrides, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.errors import ConfigError
from pipeline.config import ExperimentConfig, dump_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig) and cfg.name != "experiment"
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_config(cfg))
    assert load_config(resolved) == cfg


def test_unknown_key_names_its_path_and_a_suggestion(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("prep:\n  shard_sise_mb: 3\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown config key 'prep.shard_sise_mb' \(did you mean 'shard_size_mb'\?\)"):
        load_config(path)


def test_wrong_types_are_errors():
    with pytest.raises(ConfigError, match=r"prep.seed: expected an integer, got 'x'"):
        load_config(None, ["prep.seed=x"])
    with pytest.raises(ConfigError, match=r"prep.expand_labels: expected true/false"):
        load_config(None, ["prep.expand_labels=3"])
    with pytest.raises(ConfigError, match=r"data.splits.train.imags"):
        load_config(None, ["data.splits.train.imags=x"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["prep.seed"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_overrides_parse_yaml_values_and_create_sections():
    cfg = load_config(CONFIGS / "tiny.yaml", ["prep.seed=7", "prep.splits=[train]", "prep.shard_size_mb=0.5",
                                              "prep.resize_short_side=null", "data.splits.extra.images=x"])
    assert cfg.prep.seed == 7 and cfg.prep.splits == ["train"] and cfg.prep.shard_size_mb == 0.5
    assert cfg.prep.resize_short_side is None
    assert cfg.data.splits["extra"].images == "x" and cfg.data.splits["extra"].boxes is None
    assert cfg.data.splits["train"].boxes == "train-annotations-bbox.csv"


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E-4", 1e-4), ("1.0e-4", 1e-4), ("5e3", 5e3),
                                         ("-2.5e+2", -250.0), (".5e1", 5.0), ("0.0001", 1e-4), ("3", 3.0)])
def test_every_number_a_user_writes_loads(text, value, tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(f"train:\n  weight_decay: {text}\n")
    assert load_config(path).train.weight_decay == value
    assert load_config(None, [f"train.base_lr_per_image={text}"]).train.base_lr_per_image == value
    assert load_config(None, [f"name={text}x"]).name == f"{text}x"  # not a number: still a string


def test_base_files_merge_under_the_config_and_can_be_replaced_or_chained(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "data.yaml").write_text(
        "name: base\ndata: {root: /data/oid, shards: s3://b/shards, splits: {train: {boxes: t.csv, images: train}}}\n"
        "prep: {seed: 3, splits: [train]}\n")
    (tmp_path / "common" / "model.yaml").write_text("_base_: data.yaml\nmodel: {num_classes: 7, roi: {head: sibling}}\n")
    (tmp_path / "exp.yaml").write_text(
        "_base_: [common/model.yaml]\nname: exp\ndata: {shards: /local/shards}\n"
        "model: {roi: {representation_size: 64}}\nprep: {_delete_: true, seed: 9}\n")
    cfg = load_config(tmp_path / "exp.yaml", ["model.num_classes=9"])
    assert cfg.name == "exp" and cfg.data.root == "/data/oid" and cfg.data.shards == "/local/shards"
    assert cfg.data.splits["train"].boxes == "t.csv"  # merged key by key, through two levels of bases
    assert (cfg.model.roi.head, cfg.model.roi.representation_size, cfg.model.num_classes) == ("sibling", 64, 9)
    assert cfg.prep.seed == 9 and cfg.prep.splits == ["train", "validation"]  # _delete_: the base's prep dropped
    (tmp_path / "loop_a.yaml").write_text("_base_: loop_b.yaml\n")
    (tmp_path / "loop_b.yaml").write_text("_base_: loop_a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "loop_a.yaml")
    (tmp_path / "missing.yaml").write_text("_base_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml: config file not found \(a _base_ of"):
        load_config(tmp_path / "missing.yaml")


def test_the_paper_oid_configs_share_one_data_config():
    shared = load_config(Path(__file__).parents[1] / "configs" / "oid_challenge_data.yaml")
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*_oid.yaml")):
        assert "_base_: oid_challenge_data.yaml" in path.read_text(), path
        assert load_config(path).data == shared.data and load_config(path).prep == shared.prep
