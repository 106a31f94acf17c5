"""The prep job end to end on a real local Ray: shards read back with webdataset, index offsets,
reproducibility, resume, every bad-input case counted in the manifest, S3 in and out (moto server)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep import rejects as R
from data_prep.prep import MANIFEST_FILE, run_prep
from data_prep.synthetic import generate
from tests.conftest import jpeg_bytes, tiny_config

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=40, num_validation=12, seed=3)
    return root


def _prep(root, out, *overrides):
    cfg = tiny_config(root, out, "prep.shard_size_mb=0.1", *overrides)
    return run_prep(cfg.data, cfg.prep, progress=False)


@pytest.fixture(scope="module")
def prepared(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, _prep(synth, out)


def test_shards_read_back_with_webdataset(prepared, synth):
    out, manifest = prepared
    for split, n_images in (("train", 40), ("validation", 12)):
        info = manifest["splits"][split]
        assert info["counts"]["images_written"] == n_images and info["rejects"]["counts"] == {}
        assert len(info["shards"]) >= (2 if split == "train" else 1) and sum(s["samples"] for s in info["shards"]) == n_images
        urls = [str(out / s["name"]) for s in info["shards"]]
        samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert len(samples) == n_images
        for sample in samples:
            meta = json.loads(sample["json"])
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert sample["__key__"] == meta["image_id"] and image.size == (meta["width"], meta["height"])
            assert (synth / split / f"{meta['image_id']}.jpg").read_bytes() == sample["jpg"]  # original bytes
            norm, pixels = np.array(meta["boxes_norm"]), np.array(meta["boxes"])
            np.testing.assert_allclose(pixels, norm * np.array([meta["width"], meta["height"]] * 2), atol=0.02)
            n = len(meta["labels"])
            assert all(len(meta[k]) == n for k in ("is_group_of", "is_occluded", "is_truncated", "is_expanded"))


def test_labels_are_expanded_up_the_hierarchy(prepared):
    out, manifest = prepared
    names = [c["name"] for c in manifest["splits"]["train"]["classes"]]
    star, polygon, symbol, shape = (names.index(n) for n in ("Star", "Polygon", "Symbol", "Shape"))
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    seen_star = False
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        labels, expanded = np.array(meta["labels"]), np.array(meta["is_expanded"])
        boxes = [tuple(b) for b in meta["boxes_norm"]]
        for i in np.flatnonzero((labels == star) & (expanded == 0)):
            seen_star = True
            same_box = {int(labels[j]) for j in range(len(labels)) if boxes[j] == boxes[i]}
            assert {polygon, symbol, shape} <= same_box  # both parents and the grandparent
        assert set(meta["image_labels_pos"]).isdisjoint(meta["image_labels_neg"])
    assert seen_star
    counts = manifest["splits"]["train"]["counts"]
    assert counts["boxes_written"] > counts["box_rows_kept"] == counts["annotated_boxes_written"]


def test_index_offsets_point_at_the_members(prepared):
    out, manifest = prepared
    index = pq.read_table(out / manifest["splits"]["train"]["index"]).to_pylist()
    assert len(index) == 40
    for row in index:
        with open(out / row["shard"], "rb") as f:
            f.seek(row["jpg_offset"])
            jpg = f.read(row["jpg_size"])
            f.seek(row["json_offset"])
            meta = json.loads(f.read(row["json_size"]))
        assert meta["image_id"] == row["key"] and Image.open(io.BytesIO(jpg)).size == (row["width"], row["height"])
        assert row["labels"] == sorted(set(meta["labels"])) and row["num_boxes"] == len(meta["labels"])
    classes = manifest["splits"]["train"]["classes"]
    assert sum(c["boxes"] for c in classes) == manifest["splits"]["train"]["counts"]["boxes_written"]
    assert [c["images"] for c in classes] == [sum(c["index"] in row["labels"] for row in index) for c in classes]
    assert any(c["images"] for c in classes)


def test_rerun_is_byte_identical_and_resume_skips_complete_shards(prepared, synth, tmp_path):
    out, manifest = prepared
    again = _prep(synth, tmp_path / "again")
    for split in ("train", "validation"):
        assert [s["sha256"] for s in again["splits"][split]["shards"]] == [
            s["sha256"] for s in manifest["splits"][split]["shards"]]
    resumed = _prep(synth, tmp_path / "again")
    assert resumed["splits"]["train"]["counts"]["shards_skipped_complete"] == len(again["splits"]["train"]["shards"])
    # a different seed is a different plan: nothing is skipped, the assignment changes
    reseeded = _prep(synth, tmp_path / "again", "prep.seed=1")
    assert reseeded["splits"]["train"]["counts"]["shards_skipped_complete"] == 0
    assert (json.loads((tmp_path / "again" / MANIFEST_FILE).read_text())["prep"]["seed"]) == 1


def test_every_bad_input_is_counted_and_the_rest_written(synth, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(synth, root)
    images = sorted((root / "train").glob("*.jpg"))
    ids = [p.stem for p in images]
    images[0].write_bytes(images[0].read_bytes()[:-1500])  # truncated inside the image data
    images[1].write_bytes(b"")  # zero size
    images[2].write_bytes(b"GIF89a not really an image")  # corrupt
    images[3].unlink()  # missing
    images[4].write_bytes(jpeg_bytes(50, 40, mode="CMYK"))
    images[5].write_bytes(jpeg_bytes(50, 40, mode="L"))
    exif = Image.Exif()
    exif[0x0112] = 8
    images[6].write_bytes(jpeg_bytes(50, 40, exif=exif.tobytes()))
    shutil.copy(images[7], root / "train" / f"{ids[7]}.jpeg")  # a second file for one ImageID
    box_csv = root / "train-annotations-bbox.csv"
    lines = box_csv.read_text().splitlines()
    lines += [f"{ids[8]},xclick,/m/not_a_class,1,0.1,0.5,0.1,0.5,0,0,0,0,0",
              f"{ids[8]},xclick,/m/syn_circle,1,0.1,1.5,0.1,0.5,0,0,0,0,0",
              f"{ids[8]},xclick,/m/syn_circle,1,0.5,0.4,0.1,0.5,0,0,0,0,0",
              f"{ids[8]},xclick,/m/syn_circle,1,0.1,0.4,zero,0.5,0,0,0,0,0",
              lines[1]]
    box_csv.write_text("\n".join(lines) + "\n")
    manifest = _prep(root, tmp_path / "out", "prep.splits=[train]")
    info = manifest["splits"]["train"]
    assert info["rejects"]["counts"] == {
        R.TRUNCATED_IMAGE: 1, R.ZERO_SIZE_IMAGE: 1, R.CORRUPT_IMAGE: 1, R.MISSING_IMAGE: 1,
        R.DUPLICATE_IMAGE_ID: 1, R.UNKNOWN_MID: 1, R.BOX_OUTSIDE_IMAGE: 1, R.DEGENERATE_BOX: 1,
        R.MALFORMED_ROW: 1, R.DUPLICATE_BOX: 1,
    }
    records = info["rejects"]["records"]
    by_reason = {r["reason"]: r for r in records}
    assert by_reason[R.TRUNCATED_IMAGE]["image_id"] == ids[0]
    assert by_reason[R.UNKNOWN_MID]["line"] == len(lines) - 4 and by_reason[R.UNKNOWN_MID]["file"].endswith(
        "train-annotations-bbox.csv")
    assert info["changes"] == {R.CONVERTED_MODE: 2, R.EXIF_ROTATED: 1}
    assert info["counts"]["images_written"] == 40 - 4
    assert info["counts"]["images_planned"] == 40 - 1
    written = pq.read_table(tmp_path / "out" / info["index"]).column("key").to_pylist()
    assert set(ids[:4]).isdisjoint(written) and set(ids[4:]) <= set(written)
    rotated = next(r for r in pq.read_table(tmp_path / "out" / info["index"]).to_pylist() if r["key"] == ids[6])
    assert (rotated["width"], rotated["height"]) == (40, 50)


def test_s3_in_and_out(synth, s3_server, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    for path in synth.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"oid/{path.relative_to(synth)}")
    out_uri = f"s3://{s3_bucket}/shards"
    cfg = tiny_config(f"s3://{s3_bucket}/oid", out_uri, "prep.shard_size_mb=0.1",
                      f"data.s3_endpoint_url={s3_server}")
    manifest = run_prep(cfg.data, cfg.prep, progress=False)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="shards/")["Contents"]}
    info = manifest["splits"]["train"]
    assert {f"shards/{s['name']}" for s in info["shards"]} <= keys
    assert {"shards/manifest.json", "shards/train-index.parquet", "shards/classes-description.csv"} <= keys
    remote = json.loads(s3.get_object(Bucket=s3_bucket, Key="shards/manifest.json")["Body"].read())
    assert remote["splits"]["train"]["counts"]["images_written"] == 40
    shard = info["shards"][0]
    body = s3.get_object(Bucket=s3_bucket, Key=f"shards/{shard['name']}")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        names = tar.getnames()
    assert len(names) == 2 * shard["samples"] and names[0].endswith(".jpg") and names[1].endswith(".json")
    local = _prep(synth, tmp_path / "local")
    assert [s["sha256"] for s in local["splits"]["train"]["shards"]] == [s["sha256"] for s in info["shards"]]


def test_loader_leaves_out_truncated_shards_and_names_damaged_samples(prepared, tmp_path):
    from data_prep.errors import InputError
    from pipeline.loader import ShardDataset

    out, manifest = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    shard = manifest["splits"]["train"]["shards"][0]
    path = copy / shard["name"]
    path.write_bytes(path.read_bytes()[: shard["bytes"] // 2])  # truncated
    ds = ShardDataset(str(copy), "train", 160, 224)
    assert 0 < ds.skipped[shard["name"]] <= shard["samples"]
    assert len(ds) == 40 - ds.skipped[shard["name"]]
    shards = [ds.index.shard(k) for k in range(len(ds))]
    assert all(s != shard["name"] or ds.index.ends()[k] <= path.stat().st_size for k, s in enumerate(shards))
    # damage the bytes of one sample of another shard: a clear error naming shard and key
    other = manifest["splits"]["train"]["shards"][1]["name"]
    k = shards.index(other)
    data = bytearray((copy / other).read_bytes())
    json_at = int(ds.index.starts[k] + ds.index.json_starts[k])
    data[json_at : json_at + 5] = b"XXXXX"
    (copy / other).write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"{other} \[{ds.index.key(k)}\]: damaged sample"):
        ds[(k, False)]


def test_loader_random_access_into_s3_shards(prepared, s3_server, s3_bucket):
    import boto3

    from pipeline.loader import ShardDataset

    out, manifest = prepared
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for path in out.iterdir():
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"shards/{path.name}")
    local = ShardDataset(str(out), "train", 160, 224)
    remote = ShardDataset(f"s3://{s3_bucket}/shards", "train", 160, 224, endpoint_url=s3_server)
    assert len(remote) == len(local) == 40 and remote.skipped == {}
    for i in (0, 17, 39):
        a, b = local[(i, True)], remote[(i, True)]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])


def test_dataloader_workers_build_batches_in_one_shared_segment(prepared):
    """A worker writes every field of a batch into one shared-memory segment: the hand-over to
    the training process passes that one segment (each separate tensor cost a segment and a
    descriptor fetched over its own connection, ~0.8 ms each on a VM), and nothing is copied."""
    from torch.utils.data import DataLoader

    from pipeline.loader import ShardDataset, collate

    out, _ = prepared
    ds = ShardDataset(str(out), "train", 160, 224)
    batches = [[(i, i % 3 == 0), (i + 1, False)] for i in range(0, 20, 2)]
    loaded = list(DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=1))
    assert len(loaded) == 10 and all(b["images"].is_shared() for b in loaded)
    for batch, items in zip(loaded, batches, strict=True):
        assert len({t.untyped_storage().data_ptr() for t in batch.values()}) == 1  # one segment
        expected = collate([ds[item] for item in items])
        assert batch.keys() == expected.keys()
        assert all(batch[k].dtype == expected[k].dtype and torch.equal(batch[k], expected[k]) for k in expected)


@pytest.mark.parametrize("name, size", [("0123456789abcdef.jpg", 123456), ("a.json", 0), ("x" * 100, 7),
                                        ("é.jpg", 10), ("dir/" * 30 + "y.jpg", 1),
                                        ("big.jpg", 8**11 - 1)])
def test_fast_tar_headers_are_tarfiles_bytes(name, size):
    import tarfile

    from data_prep.shard import TAR_MTIME, ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, TAR_MTIME, 0o444, 0, 0, "", ""
    assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_source_reader_reads_whole_files_of_any_size_into_their_members(tmp_path):
    from data_prep.errors import InputError
    from data_prep.shard import _SourceReader, _TarStream
    from data_prep.storage import LocalStorage

    rng = np.random.default_rng(0)
    contents = {"empty.jpg": b"", "small.jpg": rng.bytes(1000), "big.jpg": rng.bytes(5 << 20),
                "after.jpg": rng.bytes(5)}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out.tar"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    tar = _TarStream(fd, capacity=4096)  # the big file grows the buffer; later members reuse it
    reader = _SourceReader(LocalStorage(tmp_path))
    offsets = {}
    for name, data in contents.items():
        raw = reader.read_into(name, tar)
        assert bytes(raw) == data
        offsets[name] = tar.add_in_place(name, len(raw))
        tar.end_sample()
    with pytest.raises(InputError, match="missing.jpg: no such file"):
        reader.read_into("missing.jpg", tar)
    # a file with more bytes than its size says (procfs reports 0) is read to its end, also while
    # a view from an earlier read is still held (a bytearray cannot be resized under a view)
    anywhere = _SourceReader(LocalStorage("/"))
    earlier = anywhere.read_into(str(tmp_path / "after.jpg").lstrip("/"), tar)
    expected = Path("/proc/self/cmdline").read_bytes()
    cmdline = anywhere.read_into("proc/self/cmdline", tar)
    assert bytes(cmdline) == expected
    tar.add_in_place("cmdline", len(cmdline))
    earlier.release()
    tar.add("note.txt", b"not read from a file")
    tar.end_sample()
    tar.close()
    os.close(fd)
    archive = out.read_bytes()
    assert len(archive) == tar.offset and len(archive) % tarfile.RECORDSIZE == 0
    assert tar.sha256.hexdigest() == hashlib.sha256(archive).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
    assert members == {**contents, "cmdline": expected, "note.txt": b"not read from a file"}
    for name, (offset, size) in offsets.items():
        assert archive[offset : offset + size] == contents[name]


@pytest.mark.parametrize("bad", ["/etc/hostname", "../outside.tar", "sub/train-000000.tar", ""])
def test_an_index_cannot_point_outside_the_shards_root(prepared, tmp_path, bad):
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.errors import InputError
    from data_prep.index import ShardIndex, columns_name
    from data_prep.storage import open_storage
    from pipeline.loader import ShardDataset

    out, _ = prepared
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    # the column file that loads map, made by hand with a bad name
    good = ShardIndex.load(open_storage(str(copy)), "train", cache=False)
    tampered = dataclasses.replace(good, shard_names=(bad, *good.shard_names[1:]))
    with open(copy / columns_name("train"), "wb") as f:
        tampered._write_columns(f)
    with pytest.raises(InputError, match=r"train-index.columns.arrow: shard name .* is not a file name inside the "
                                         r"shards' root"):
        ShardDataset(str(copy), "train", 160, 224)
    # the Parquet file alone (shards prepared before the column file)
    (copy / columns_name("train")).unlink()
    index = copy / "train-index.parquet"
    table = pq.read_table(index)
    shards = table.column("shard").to_pylist()
    shards[3] = bad
    pq.write_table(table.set_column(table.column_names.index("shard"), "shard", pa.array(shards)), index)
    with pytest.raises(InputError, match=r"train-index.parquet: shard name .* is not a file name inside the shards' root"):
        ShardDataset(str(copy), "train", 160, 224)


def test_every_published_file_is_readable_by_others_as_the_umask_allows(prepared):
    """Shared storage: shards, index and manifest get the usual 0644 (under umask 022), not 0600."""
    import os
    import stat

    out, manifest = prepared
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [out / s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    files += [out / "manifest.json", out / "train-index.parquet"]
    assert len(files) > 3
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_a_successful_prep_leaves_no_staging_directory(prepared):
    out, manifest = prepared
    assert not (out / ".staging").exists()
    assert manifest["staging_leftovers_removed"] == 0


def test_replanning_to_fewer_shards_removes_the_stale_ones_and_readers_never_see_a_stray(synth, tmp_path):
    import io
    import tarfile

    from pipeline.loader import streaming_dataset

    out = tmp_path / "shards"
    first = _prep(synth, out, "prep.max_samples_per_shard=10", "prep.splits=[train]")
    assert len(first["splits"]["train"]["shards"]) == 4
    second = _prep(synth, out, "prep.max_samples_per_shard=20", "prep.splits=[train]")
    names = sorted(p.name for p in out.glob("train-*.tar"))
    assert names == sorted(s["name"] for s in second["splits"]["train"]["shards"]) and len(names) == 2
    assert second["splits"]["train"]["counts"]["stale_shards_removed"] == 2
    # a tar that no plan made (copied in by hand): the streaming reader goes by the index, never opens it
    with tarfile.open(out / "train-000007.tar", "w") as tar:
        for suffix, data in ((".jpg", b"not an image"), (".json", b"{not json")):
            info = tarfile.TarInfo("stray" + suffix)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(streaming_dataset(str(out), "train", 160, 224, epoch_samples=80, seed=0))
    assert len(samples) == 80


def test_streaming_loader_workers_draw_their_own_flips(synth, tmp_path):
    """Each DataLoader process of the streaming mode has its own generator (seed, worker): copies of
    one generator in forked workers drew the same flip sequence in every worker."""
    from torch.utils.data import DataLoader

    from pipeline.loader import streaming_dataset

    out = tmp_path / "shards"
    _prep(synth, out, "prep.splits=[train]")
    stream = streaming_dataset(str(out), "train", 160, 224, epoch_samples=40, seed=0)
    samples = list(DataLoader(stream, batch_size=None, num_workers=2))
    assert len(samples) == 80  # 40 per worker
    flips = [bool(s["flip"]) for s in samples]  # in order: worker 0, worker 1, worker 0, ...
    assert flips[0::2] != flips[1::2]
    assert 0.2 < sum(flips) / len(flips) < 0.8


def test_a_stray_quote_or_a_bad_byte_costs_its_own_row_only(synth, tmp_path):
    """A `"` opening a field of line 12 used to open a quoted value running to the end of the file
    (prep read 10 rows and wrote the rest of the images as negatives); one byte that is not UTF-8
    used to refuse the whole file. Each now costs its own row, named with its line."""
    root = tmp_path / "bad"
    shutil.copytree(synth, root)
    box_csv = root / "train-annotations-bbox.csv"
    lines = box_csv.read_bytes().splitlines()
    assert len(lines) > 30
    total_boxes = len(lines) - 1
    lines[11] = lines[11].replace(b",xclick,", b',"xclick,', 1).replace(b",/m/", b',"/m/', 1)  # line 12
    lines[20] = lines[20].replace(b",/m/", b",/m/\xff", 1)  # line 21: not UTF-8
    box_csv.write_bytes(b"\n".join(lines) + b"\n")
    manifest = _prep(root, tmp_path / "out", "prep.splits=[train]", "prep.expand_labels=false")
    info = manifest["splits"]["train"]
    assert info["rejects"]["counts"] == {R.MALFORMED_ROW: 2}
    by_line = {r["line"]: r["detail"] for r in info["rejects"]["records"]}
    assert by_line == {12: 'a stray quote (") in LabelName', 21: "bytes that are not UTF-8 in LabelName"}
    index = pq.read_table(tmp_path / "out" / info["index"])
    assert info["counts"]["images_written"] == 40
    assert sum(index.column("num_boxes").to_pylist()) == total_boxes - 2


def test_a_class_subset_keeps_descendants_and_ancestors_and_counts_the_rest(synth, tmp_path):
    """prep.classes=[Quadrilateral, Circle]: Square and Diamond are quadrilaterals (kept as
    themselves), Polygon, Round and Shape are their ancestors; every other annotation is dropped and
    counted, and `tsd train` takes the kept classes as the model's."""
    import dataclasses

    from data_prep.class_subset import class_subset
    from data_prep.prep import load_label_space
    from pipeline.classes import resolve_class_selection

    out = tmp_path / "out"
    cfg = tiny_config(synth, out, "prep.shard_size_mb=0.1", "prep.splits=[train]",
                      "prep.classes=[Quadrilateral, /m/syn_circle]")
    manifest = run_prep(cfg.data, cfg.prep, progress=False)
    labels, hierarchy = load_label_space(cfg.data)
    kept = {"/m/syn_quad", "/m/syn_square", "/m/syn_diamond", "/m/syn_circle",
            "/m/syn_polygon", "/m/syn_round", "/m/syn_shape"}
    assert manifest["class_subset"] == {"selected": ["/m/syn_quad", "/m/syn_circle"],
                                        "classes": [m for m in labels.mids if m in kept]}
    counts = manifest["splits"]["train"]["counts"]
    rejected = sum(manifest["splits"]["train"]["rejects"]["counts"].values())
    assert counts["box_rows_outside_class_subset"] > 0 and counts["images_outside_class_subset"] >= 0
    assert counts["box_rows_read"] == counts["box_rows_kept"] + counts["box_rows_outside_class_subset"] + rejected
    keep_ids = {labels.index(m) for m in kept}
    index = pq.read_table(out / manifest["splits"]["train"]["index"]).to_pylist()
    assert index and all(set(row["labels"]) <= keep_ids for row in index)
    assert len(index) == counts["images_written"] == counts["images_planned"]
    # the same split prepared whole has more images, and every kept image is one of them
    whole = run_prep(dataclasses.replace(cfg.data, shards=str(tmp_path / "whole")),
                     dataclasses.replace(cfg.prep, classes=[]), progress=False)
    assert whole["class_subset"] is None
    assert counts["images_written"] + counts["images_outside_class_subset"] == whole["splits"]["train"]["counts"][
        "images_written"]
    trained = resolve_class_selection(cfg, subset_of_the_shards=True)
    assert trained.model.classes == manifest["class_subset"]["classes"] and trained.model.num_classes == 7
    assert resolve_class_selection(cfg).model.classes == []  # evaluation: the checkpoint's classes decide
    assert class_subset([], labels, hierarchy) is None


def _flip_a_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def test_verify_finds_a_shard_damaged_in_place_and_writes_it_again(prepared, synth, tmp_path):
    """A complete shard with one flipped byte (same size) passes resume's check, and the manifest
    keeps a checksum the file no longer has; `tsd prep --verify` names it and writes it again."""
    from data_prep.prep import VERIFY_REPORT_FILE
    from pipeline.cli import build_parser

    out = tmp_path / "shards"
    shutil.copytree(prepared[0], out)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    damaged = manifest["splits"]["train"]["shards"][1]
    path = out / damaged["name"]
    path.write_bytes(_flip_a_byte(path.read_bytes()))
    resumed = _prep(synth, out)  # without --verify: skipped as complete, damage and all
    assert resumed["splits"]["train"]["counts"]["shards_skipped_complete"] == len(manifest["splits"]["train"]["shards"])
    assert hashlib.sha256(path.read_bytes()).hexdigest() != damaged["sha256"]

    cfg = tiny_config(synth, out, "prep.shard_size_mb=0.1")
    verified = run_prep(cfg.data, cfg.prep, progress=False, verify=True)
    report = verified["verify"]
    assert report["shards_checked"] == sum(len(s["shards"]) for s in manifest["splits"].values())
    assert report["shards_bad"] == 1 and report["checked_by"] == {"sha256": report["shards_checked"]}
    (bad,) = report["bad"]
    assert bad["name"] == damaged["name"] and "same size: damaged in place" in bad["problem"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == damaged["sha256"]  # written again, identical
    assert verified["splits"]["train"]["counts"]["shards_skipped_complete"] == len(manifest["splits"]["train"]["shards"]) - 1
    assert json.loads((out / VERIFY_REPORT_FILE).read_text()) == report
    clean = run_prep(cfg.data, cfg.prep, progress=False, verify=True)
    assert clean["verify"]["shards_bad"] == 0 and "verify" not in _prep(synth, out)
    assert build_parser().parse_args(["prep", "--config", "c.yaml", "--verify"]).verify


def test_verify_of_s3_shards_compares_the_crc32_s3_keeps_without_a_download(synth, s3_server, s3_bucket):
    """Shards uploaded with their CRC32 are checked by S3 on upload and keep it: verification is a
    HEAD request per shard (no bytes read), and a shard replaced by other bytes of the same size is
    found all the same and written again."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    cfg = tiny_config(synth, f"s3://{s3_bucket}/shards", "prep.shard_size_mb=0.1", "prep.splits=[train]",
                      f"data.s3_endpoint_url={s3_server}")
    manifest = run_prep(cfg.data, cfg.prep, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert all(s["crc32"] for s in shards)
    clean = run_prep(cfg.data, cfg.prep, progress=False, verify=True)["verify"]
    assert clean["shards_bad"] == 0 and clean["checked_by"] == {"s3-crc32": len(shards)} and clean["bytes_read"] == 0
    key = f"shards/{shards[0]['name']}"
    original = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=s3_bucket, Key=key, Body=_flip_a_byte(original))  # boto3 sends (and S3 keeps) its CRC32
    report = run_prep(cfg.data, cfg.prep, progress=False, verify=True)["verify"]
    assert report["shards_bad"] == 1 and report["bad"][0]["how"] == "s3-crc32" and report["bytes_read"] == 0
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == original
