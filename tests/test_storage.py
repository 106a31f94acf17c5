"""Storage: local and S3 behave alike; writes are atomic; S3 multipart uploads complete or vanish."""

from __future__ import annotations

import os

import pytest

import data_prep.storage as storage
from data_prep.errors import InputError
from data_prep.storage import open_storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path / "root")
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix", endpoint_url=server)


def test_put_read_list_range_delete(store, tmp_path):
    store.put_bytes("a/b.txt", b"hello world")
    local = tmp_path / "file.bin"
    local.write_bytes(b"0123456789" * 100)
    store.put_file("c.bin", local)
    assert store.exists("a/b.txt") and not store.exists("missing")
    assert store.read_bytes("a/b.txt") == b"hello world"
    assert store.read_range("c.bin", 5, 10) == b"5678901234"
    assert store.size("c.bin") == 1000
    assert sorted((o.name, o.size) for o in store.list()) == [("a/b.txt", 11), ("c.bin", 1000)]
    assert [o.name for o in store.list("a/")] == ["a/b.txt"]
    with pytest.raises(InputError, match="missing"):
        store.read_bytes("missing")
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")


def test_local_writes_leave_no_partial_file_on_failure(tmp_path):
    store = open_storage(tmp_path)

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store._atomic_write("x.bin", failing)
    assert os.listdir(tmp_path) == []


def test_s3_multipart_upload_is_completed(s3_server, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    store = open_storage(f"s3://{s3_bucket}/mp", endpoint_url=s3_server)
    data = os.urandom(11 * 1024 * 1024 + 17)  # three parts
    local = tmp_path / "big.tar"
    local.write_bytes(data)
    store.put_file("big.tar", local)
    assert store.read_bytes("big.tar") == data
    uploads = store.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert uploads == []  # nothing left half-done


def test_the_next_run_cleans_what_a_killed_one_left(s3_server, s3_bucket, tmp_path):
    """A killed prep leaves temp files in .staging/ and unfinished S3 multipart uploads: the next
    run's start removes both (S3 bills the parts of an upload until it is aborted)."""
    local = open_storage(tmp_path / "shards")
    staging = local.staging_dir()
    for n in range(3):
        (tmp_path / "shards" / ".staging" / f".train-00000{n}.tar.abc.tmp").write_bytes(b"partial")
    assert os.listdir(staging) and local.clean_staging() == 3 and os.listdir(staging) == []
    local.finish_staging()
    assert not (tmp_path / "shards" / ".staging").exists()
    store = open_storage(f"s3://{s3_bucket}/shards", endpoint_url=s3_server)
    for n in range(2):
        store.client.create_multipart_upload(Bucket=s3_bucket, Key=f"shards/train-00000{n}.tar")
    store.client.create_multipart_upload(Bucket=s3_bucket, Key="elsewhere/x.tar")  # another prefix: kept
    assert store.clean_staging() == 2
    left = store.client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/x.tar"]


def test_a_symlink_loop_or_a_dangling_link_is_reported_and_the_listing_goes_on(tmp_path):
    from data_prep.prep import list_images
    from data_prep.rejects import UNREADABLE_PATH, RejectLog
    from tests.conftest import jpeg_bytes

    images = tmp_path / "train"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(jpeg_bytes())
    (images / "sub" / "b.jpg").write_bytes(jpeg_bytes())
    os.symlink(images, images / "sub" / "loop")  # back up to the root: a loop
    os.symlink(tmp_path / "gone.jpg", images / "dangling.jpg")
    os.symlink(images / "self1", images / "self2")
    os.symlink(images / "self2", images / "self1")  # a link to a link to itself: ELOOP
    log = RejectLog()
    found = list_images(open_storage(images), log)
    assert set(found) == {"a", "b"}
    assert log.counts[UNREADABLE_PATH] == 4
    paths = {r.file for r in log.records}
    assert str(images / "sub" / "loop") in paths and str(images / "dangling.jpg") in paths


def test_a_published_shard_is_on_disk_before_its_name_and_the_rename_is_durable(tmp_path, monkeypatch):
    """A shard is renamed from the staging area into place: its data must be fsynced before the
    rename (or a crash leaves a full-size name over missing blocks) and the directory after it
    (or the rename itself may be lost). The real fsync runs; the spy records which path each call
    flushed and when, next to the renames."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    root = tmp_path / "shards"
    store = open_storage(root)
    staged = tmp_path / "shards" / ".staging" / "train-000000.tar.tmp"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"x" * 4096)
    store.put_file("train-000000.tar", staged)
    target = str(root / "train-000000.tar")
    assert events == [("fsync", str(staged)), ("rename", target), ("fsync", str(root))]
    assert (root / "train-000000.tar").read_bytes() == b"x" * 4096


def test_a_forked_process_makes_its_own_s3_client(s3_server, s3_bucket):
    """DataLoader workers are forked after the dataset's storage has made its client: sharing its
    keep-alive connections, two processes read each other's responses (a sample got another
    request's bytes through a keep-alive endpoint). The child must use a client of its own."""
    import multiprocessing

    store = open_storage(f"s3://{s3_bucket}/fork", endpoint_url=s3_server)
    store.put_bytes("a.bin", b"x" * 100)
    parent_client = id(store.client)

    def child(queue) -> None:
        import threading

        start, seen = threading.Barrier(8), []

        def first_use() -> None:  # the read-ahead threads of a fresh loader process, all at once
            start.wait()
            seen.append(id(store.client))

        threads = [threading.Thread(target=first_use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        queue.put((parent_client not in seen, store.read_range("a.bin", 10, 5)))

    queue = multiprocessing.get_context("fork").Queue()
    proc = multiprocessing.get_context("fork").Process(target=child, args=(queue,))
    proc.start()
    own_client, data = queue.get(timeout=60)
    proc.join(timeout=60)
    assert own_client and data == b"xxxxx"


def test_ranged_reads_through_presigned_urls_equal_boto3s(s3_server, s3_bucket):
    """The loader's ranged reads skip botocore's per-request Python (a presigned URL per object and
    a plain connection pool): the same bytes as boto3's ranged GET, at the start, in the middle, at
    the end and past the end of an object, and a missing object is boto3's error."""
    import boto3

    store = open_storage(f"s3://{s3_bucket}/ranged", endpoint_url=s3_server)
    data = bytes(range(256)) * 40
    store.put_bytes("obj.bin", data)
    client = boto3.client("s3", endpoint_url=s3_server)
    for offset, length in ((0, 10), (0, len(data)), (1000, 513), (len(data) - 7, 7), (len(data) - 7, 100)):
        expected = client.get_object(Bucket=s3_bucket, Key="ranged/obj.bin",
                                     Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()
        assert store.read_range("obj.bin", offset, length) == expected == data[offset:offset + length]
    store.put_bytes("obj.bin", data[::-1])  # the same URL serves the new object
    assert store.read_range("obj.bin", 0, 5) == data[::-1][:5]
    with pytest.raises(Exception, match="NoSuchKey|Not Found|404"):
        store.read_range("missing.bin", 0, 10)
