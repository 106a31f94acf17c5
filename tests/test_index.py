"""The columnar prep index (``data_prep.index``): written and read back with the one schema, its
label sets, and the samplers' guarantees at the real train split's size."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_prep.errors import InputError
from data_prep.index import (
    LabelSets,
    ShardIndex,
    columns_name,
    index_name,
    index_schema,
    index_table,
    write_index_table,
)
from data_prep.storage import open_storage
from pipeline.sampler import GlobalBatchSampler, SamplerSpec


def _columns(keys, labels, base=0):
    n = len(keys)
    return {"key": list(keys), "jpg_offset": [base + 1536 * (i + 1) for i in range(n)], "jpg_size": [1000] * n,
            "json_offset": [base + 1536 * (i + 1) + 1024 for i in range(n)], "json_size": [99] * n,
            "width": [640] * n, "height": [480 - i for i in range(n)], "labels": labels, "num_boxes": [2] * n}


def test_written_and_read_back_with_one_schema(tmp_path):
    out = open_storage(str(tmp_path))
    table = index_table([(0, "train-000000.tar", _columns(["a", "b"], [[3, 1], []])),
                         (1, "train-000001.tar", _columns(["c"], [[7]], base=10**10))])
    assert table.schema == index_schema()
    assert write_index_table(out, "train", table) == 3
    assert pq.read_schema(tmp_path / index_name("train")) == index_schema()
    ix = ShardIndex.load(out, "train")
    assert len(ix) == 3 and ix.key_list() == ["a", "b", "c"] and ix.key(2) == "c"
    assert [ix.shard(i) for i in range(3)] == ["train-000000.tar", "train-000000.tar", "train-000001.tar"]
    assert ix.starts.tolist() == [1536, 3072, 10**10 + 1536]  # beyond 4 GiB in a shard: int64
    assert ix.json_starts.tolist() == [1024] * 3 and ix.ends().tolist() == [1536 + 1123, 3072 + 1123,
                                                                              10**10 + 1536 + 1123]
    assert [ix.labels[i].tolist() for i in range(3)] == [[3, 1], [], [7]] and ix.heights.tolist() == [480, 479, 480]
    part = ix.take(np.array([2, 0]))
    assert part.key_list() == ["c", "a"] and [part.labels[i].tolist() for i in range(2)] == [[7], [3, 1]]
    assert part.shard(0) == "train-000001.tar" and part.starts.tolist() == [10**10 + 1536, 1536]


def _parquet_only(out, table) -> None:
    """An index as shards prepared before the column file have it: the Parquet file alone."""
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.put_bytes(index_name("train"), buf.getvalue())
    out.delete(columns_name("train"))


def test_the_published_column_file_is_mapped_where_it_lies_and_copied_once_from_s3(tmp_path, monkeypatch,
                                                                                  s3_server, s3_bucket):
    """Prep publishes the index's columns beside the Parquet file: a load copies it once into the
    node cache and maps it there (nothing decoded; a file overwritten in place under a mapping
    would kill the process, the cache is only replaced by renames); a re-made index (new mtime,
    new ETag) is copied again, never read stale."""
    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "cache"))
    table = index_table([(0, "train-000000.tar", _columns(["a", "b"], [[3], [4, 5]]))])
    local = open_storage(str(tmp_path / "shards"))
    write_index_table(local, "train", table)
    ix = ShardIndex.load(local, "train")
    assert ix.key_list() == ["a", "b"] and not ix.starts.flags.writeable  # a view of the mapped file
    (cached,) = (tmp_path / "cache" / "index").glob("*.arrow")
    assert cached.read_bytes() == (tmp_path / "shards" / columns_name("train")).read_bytes()
    (tmp_path / "shards" / columns_name("train")).write_bytes(b"")  # overwritten in place: the mapping lives on
    assert ix.key_list() == ["a", "b"] and ix.starts.tolist() == [1536, 3072]
    s3 = open_storage(f"s3://{s3_bucket}/shards", s3_server)
    write_index_table(s3, "train", table)
    assert ShardIndex.load(s3, "train").key_list() == ["a", "b"]
    assert len(list((tmp_path / "cache" / "index").glob("*.arrow"))) == 2
    write_index_table(s3, "train", index_table([(0, "train-000000.tar", _columns(["z", "y"], [[1], [2]]))]))
    assert ShardIndex.load(s3, "train").key_list() == ["z", "y"]  # same size, new ETag: copied again
    assert ShardIndex.load(s3, "train", cache=False).key_list() == ["z", "y"]


def test_a_load_from_s3_asks_one_head_request_when_the_node_has_the_index(tmp_path, monkeypatch, s3_server,
                                                                        s3_bucket):
    """Every training and loader process of a node loads the index at start: once the node has
    it, a load is one HEAD (the published columns' existence and version in one answer), then the
    mapped cache file. Counted by the relay in front of the S3 endpoint."""
    from bench.latency_proxy import LatencyProxy

    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "cache"))
    table = index_table([(0, "train-000000.tar", _columns(["a", "b"], [[3], [4, 5]]))])
    write_index_table(open_storage(f"s3://{s3_bucket}/shards", s3_server), "train", table)
    with LatencyProxy(int(s3_server.rsplit(":", 1)[1]), latency_s=0.0) as proxy:
        s3 = open_storage(f"s3://{s3_bucket}/shards", proxy.url)
        assert ShardIndex.load(s3, "train").key_list() == ["a", "b"]
        first = proxy.requests  # HEAD, then the copy into the node cache
        assert ShardIndex.load(s3, "train").key_list() == ["a", "b"]
        assert (first, proxy.requests - first) == (2, 1)
        with pytest.raises(InputError, match="no index for split 'validation'"):
            ShardIndex.load(s3, "validation")


def test_the_node_local_cache_is_mapped_rebuilt_when_stale_and_survives_damage(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TSD_CACHE", str(tmp_path / "cache"))
    out = open_storage(str(tmp_path / "shards"))
    _parquet_only(out, index_table([(0, "train-000000.tar", _columns(["a", "b"], [[3], [4, 5]]))]))
    first = ShardIndex.load(out, "train")
    (cached,) = (tmp_path / "cache" / "index").glob("*.arrow")
    again = ShardIndex.load(out, "train")
    assert again.key_list() == ["a", "b"] and [again.labels[i].tolist() for i in range(2)] == [[3], [4, 5]]
    assert not again.starts.flags.writeable  # a view of the mapped file, not a copy
    np.testing.assert_array_equal(again.starts, first.starts)
    _parquet_only(out, index_table([(0, "train-000000.tar", _columns(["c"], [[9]]))]))  # re-made
    os.utime(tmp_path / "shards" / index_name("train"), ns=(1, 1))
    assert ShardIndex.load(out, "train").key_list() == ["c"]  # never the stale cache
    cached.write_bytes(b"garbage")
    os.utime(tmp_path / "shards" / index_name("train"), ns=(2, 2))
    for path in (tmp_path / "cache" / "index").glob("*.arrow"):
        path.write_bytes(b"garbage")
    assert ShardIndex.load(out, "train").key_list() == ["c"]  # a damaged cache is rebuilt
    assert ShardIndex.load(out, "train", cache=False).key_list() == ["c"]


def test_positions_that_prep_cannot_write_are_refused(tmp_path):
    cols = _columns(["a"], [[1]])
    cols["json_offset"] = [10]  # before the jpg data
    out = open_storage(str(tmp_path))
    with pytest.raises(InputError, match="sample positions are not those `tsd prep` writes"):
        write_index_table(out, "train", index_table([(0, "train-000000.tar", cols)]))  # prep refuses to publish it
    _parquet_only(out, index_table([(0, "train-000000.tar", cols)]))
    with pytest.raises(InputError, match="sample positions are not those `tsd prep` writes"):
        ShardIndex.load(out, "train")  # and a load refuses to read it


def test_label_sets_map_take_and_count():
    sets = LabelSets.from_lists([[0, 5], [], [5], [2, 0, 9]])
    assert sets.counts().tolist() == [2, 0, 1, 3] and sets.sample_of_each().tolist() == [0, 0, 2, 3, 3, 3]
    label_map = np.full(10, -1)
    label_map[[5, 9]] = [0, 1]
    mapped = sets.mapped(label_map)
    assert [mapped[i].tolist() for i in range(4)] == [[0], [], [0], [1]]
    taken = sets.take(np.array([3, 3, 1]))
    assert [taken[i].tolist() for i in range(3)] == [[2, 0, 9], [2, 0, 9], []]


@pytest.mark.parametrize("mode", ["uniform", "class_aware", "repeat_factor"])
def test_samplers_at_the_real_train_split_size(mode):
    """1,743,042 images, 500 long-tailed classes, ~7 per image, 64 ranks of 2 images: an epoch's
    plan is world-size independent, the ranks are disjoint slices of it, and the class-aware plan
    visits every class; plans are vectorised (no timing asserted here: see bench_index_scale.py)."""
    rng = np.random.default_rng(0)
    n, classes = 1_743_042, 500
    counts = np.clip(rng.poisson(6, n) + 1, 1, 40)
    weights = 1.0 / np.arange(1, classes + 1) ** 1.2
    values = rng.choice(classes, int(counts.sum()), p=weights / weights.sum()).astype(np.int16)
    labels = LabelSets(values, np.concatenate([[0], np.cumsum(counts)]))
    landscape = rng.random(n) < 0.7
    ipe = n // 128

    def sampler(world: int, rank: int, per_rank: int) -> GlobalBatchSampler:
        return GlobalBatchSampler(labels, landscape, classes, per_rank, world, rank, 3, ipe, SamplerSpec(mode=mode))

    plan, flips = sampler(64, 0, 2).epoch_batches(5)
    assert plan.shape == flips.shape == (ipe, 128)
    assert (landscape[plan].all(axis=1) | ~landscape[plan].any(axis=1)).all()  # aspect groups never mix
    other, _ = sampler(32, 1, 4).epoch_batches(5)
    np.testing.assert_array_equal(other, plan)  # the same global batches for 32 x 4 as for 64 x 2
    rank0 = np.array([[i for i, _ in batch] for batch in sampler(64, 0, 2).rank_batches(5, start=ipe - 3)])
    np.testing.assert_array_equal(rank0, plan[-3:, :2])  # a resumed rank gets its slice of the same plan
    if mode == "uniform":
        uses = np.bincount(plan.ravel(), minlength=n)  # an epoch is about one permutation of the data
        assert uses.max() <= 2 and (uses == 1).mean() > 0.99
    if mode == "class_aware":
        seen = np.zeros(classes, bool)
        seen[labels.values[np.concatenate([np.arange(labels.offsets[i], labels.offsets[i + 1])
                                           for i in plan[:40].ravel()])]] = True
        assert seen.all()  # 40 global batches = 5,120 draws reach every one of the 500 classes
        rare = np.unique(labels.sample_of_each()[values == classes - 1])  # the images of the rarest class
        assert np.isin(plan, rare).mean() > 2 * len(rare) / n  # it gets at least its 1/500 of the draws
