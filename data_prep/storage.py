"""One interface over a local directory and an S3 prefix (``s3://bucket/prefix``).

Every write is atomic: a local file is written to a temporary name in the same directory and
renamed; an S3 object is written with one ``put_object`` or a multipart upload that is completed
only after its last part, so a reader never sees a half-written object. Credentials come from
boto3's standard chain and are never logged; ``endpoint_url`` (or ``AWS_ENDPOINT_URL``) selects
any S3-compatible store.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from data_prep.errors import InputError
from data_prep.ranged_http import RangedHTTP

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 64 * 1024 * 1024


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
    return bucket, key.strip("/")


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for S3 and the OS separator for local paths."""
    if is_s3(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return str(Path(base, *parts))


ProblemCallback = Callable[[str, str], None]  # (path, what went wrong) of an entry a listing skipped


@dataclass(frozen=True)
class ObjectInfo:
    name: str  # relative to the storage root
    size: int


class Storage:
    """Read, list and atomically write objects under one root (local directory or S3 prefix)."""

    root: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str = "", on_problem: ProblemCallback | None = None) -> Iterator[ObjectInfo]:
        """Objects whose name starts with ``prefix`` (recursive), in no particular order; entries that
        cannot be listed go to ``on_problem(path, what)`` and are skipped."""
        raise NotImplementedError

    def put_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, name: str, local_path: str | os.PathLike, crc32: str | None = None) -> None:
        """Atomically publish a finished local file under ``name``. ``crc32`` (base64, as S3
        writes it) is the file's whole-object CRC32: a store that keeps checksums checks the upload
        against it and keeps it (``stored_crc32``)."""
        raise NotImplementedError

    def version(self, name: str) -> str | None:
        """What changes when the object is written again (size and mtime; size and ETag on S3):
        node-local caches of an object are named by it. None when there is no such object (so
        that one request both checks and names it)."""
        raise NotImplementedError

    #: whether the store keeps a whole-object checksum it reports without a download (S3)
    keeps_checksums = False

    def stored_crc32(self, name: str) -> str | None:
        """The whole-object CRC32 (base64) the store keeps for ``name``; None when it keeps none."""
        return None

    def iter_bytes(self, name: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks (hashing without holding it in memory)."""
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def uri(self, name: str) -> str:
        return join(self.root, name) if name else self.root

    def staging_dir(self) -> str:
        """Where finished files wait before they are published (same filesystem when possible)."""
        return tempfile.gettempdir()

    def clean_staging(self) -> int:
        """Remove what a killed run left unpublished (temp files, unfinished uploads); their count.
        Called when a run starts: one run writes an output at a time."""
        return 0

    def finish_staging(self) -> None:
        """After a successful run: remove the (now empty) staging area."""

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")


def _file_mode() -> int:
    """The mode a published file gets: what ``open()`` would give it under this process's umask
    (0644 under the usual 022), not ``mkstemp``'s private 0600, so that other users and containers
    sharing the storage can read the dataset."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def write_atomically(target: str | os.PathLike, writer: Callable[[BinaryIO], object]) -> None:
    """Publish a local file so that a reader sees the old one or the whole new one: ``writer(f)``
    fills a unique temporary file beside ``target``, which is fsynced, given ``FILE_MODE``, renamed
    over ``target``, and the directory fsynced so that the rename survives a crash."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a finished file's data to the disk (before it is renamed into place), or a directory's
    entries (so that a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = str(root)
        self._root = Path(root)

    def _path(self, name: str) -> Path:
        return self._root / name if name else self._root

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise InputError(f"{self._path(name)}: no such file") from None

    def local_path(self, name: str) -> str:
        """The file behind ``name`` (local storage only: lets callers open it directly, without the
        cost of a ``Path`` per file)."""
        return os.path.join(self.root, name) if name else self.root

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        with open(self._path(name), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size

    def list(self, prefix: str = "", on_problem: ProblemCallback | None = None) -> Iterator[ObjectInfo]:
        """Every file below the root (or ``prefix``), following symbolic links; a loop of links back
        to a directory already listed, a dangling link or an unreadable entry is passed to
        ``on_problem(path, what)`` (if given) and skipped, never an error that stops the listing."""
        base = self._path(prefix) if prefix and self._path(prefix).is_dir() else self._root
        if not base.exists():
            return
        report = on_problem or (lambda path, what: None)
        root = os.path.join(str(self._root), "")  # with its trailing separator
        seen: set[tuple[int, int]] = set()
        stack = [str(base)]
        while stack:
            directory = stack.pop()
            try:
                st = os.stat(directory)
                if (st.st_dev, st.st_ino) in seen:
                    report(directory, "a symbolic link loop: this directory was listed already")
                    continue
                seen.add((st.st_dev, st.st_ino))
                entries = list(os.scandir(directory))
            except OSError as exc:
                report(directory, f"cannot list ({exc.strerror or exc})")
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=True):
                        stack.append(entry.path)
                        continue
                    size = entry.stat().st_size
                except OSError as exc:
                    report(entry.path, f"cannot read ({exc.strerror or exc}; a dangling or looping link?)")
                    continue
                name = entry.path[len(root):].replace(os.sep, "/")  # scandir paths start with root
                if name.startswith(prefix.rstrip("/")) or not prefix:
                    yield ObjectInfo(name, size)

    def _atomic_write(self, name: str, writer) -> None:
        write_atomically(self._path(name), writer)

    def put_bytes(self, name: str, data: bytes) -> None:
        self._atomic_write(name, lambda f: f.write(data))

    def version(self, name: str) -> str | None:
        try:
            info = self._path(name).stat()
        except FileNotFoundError:
            return None
        return f"{info.st_size}|{info.st_mtime_ns}"

    def iter_bytes(self, name: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        with open(self._path(name), "rb") as f:
            while data := f.read(chunk):
                yield data

    def put_file(self, name: str, local_path: str | os.PathLike, crc32: str | None = None) -> None:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fsync_path(local_path)  # the data on disk before the name points at it...
        try:
            os.replace(local_path, target)  # same filesystem: an atomic rename
        except OSError:  # another filesystem: copied, fsynced and renamed there
            with open(local_path, "rb") as src:
                self._atomic_write(name, lambda f: shutil.copyfileobj(src, f, 1 << 20))
            return
        fsync_path(target.parent)  # ...and the rename itself durable

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def clean_staging(self) -> int:
        path = self._root / ".staging"
        removed = 0
        if path.is_dir():
            for leftover in path.iterdir():
                if leftover.is_file() or leftover.is_symlink():
                    leftover.unlink(missing_ok=True)
                    removed += 1
        return removed

    def finish_staging(self) -> None:
        try:
            (self._root / ".staging").rmdir()
        except OSError:  # absent, or not empty (a file another writer published meanwhile stays)
            pass

    def staging_dir(self) -> str:
        """A directory on the same filesystem as the outputs, so that publishing is a rename."""
        path = self._root / ".staging"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)


S3_MAX_ATTEMPTS = 10  # per request, the first included
S3_MAX_POOL_CONNECTIONS = 32  # boto3's pool (ranged reads keep their own connections: ranged_http)
PRESIGNED_TTL_S = 900  # a ranged read's presigned URL is made again after PRESIGNED_TTL_S / 2


class S3Storage(Storage):
    def __init__(self, root: str, endpoint_url: str | None = None) -> None:
        self.root = root.rstrip("/")
        self.bucket, self.prefix = split_s3(root)
        self.endpoint_url = endpoint_url
        self._owned: tuple[int, object] | None = None  # (pid, boto3 client): the client of that process
        self._ranged: tuple[int, RangedHTTP, dict] | None = None  # (pid, its ranged GETs, {name: (made, url)})

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_owned"] = state["_ranged"] = None  # clients do not pickle; each process makes its own
        return state

    @property
    def client(self):
        # A forked process (a DataLoader worker) inherits the parent's client and its pool of open
        # keep-alive connections: two processes on one socket read each other's responses, and a
        # sample gets another request's bytes. Each process makes its own client; (pid, client) is
        # one attribute, replaced in one assignment, so that no thread of a new process can see
        # its pid beside the parent's client (threads that come first may each make one: harmless).
        owned = self._owned
        if owned is None or owned[0] != os.getpid():
            import boto3
            from botocore.config import Config

            # retries with backoff for S3's throttling (503 SlowDown) and dropped connections, and a
            # connection pool for the loader's read-ahead threads (botocore's default is 10)
            owned = (os.getpid(), boto3.client("s3", endpoint_url=self.endpoint_url or None, config=Config(
                retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
                max_pool_connections=S3_MAX_POOL_CONNECTIONS)))
            self._owned = owned
        return owned[1]

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def exists(self, name: str) -> bool:
        return self._head(name) is not None

    def _head(self, name: str) -> dict | None:
        """The object's HEAD answer; None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def read_bytes(self, name: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("404", "NoSuchKey"):
                raise InputError(f"{self.uri(name)}: no such object") from None
            raise

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of an object from ``offset``: the loader's one request per sample.

        botocore spends ~3 ms of Python on every request (its event hooks, header parsing,
        signing), a fifth of a training sample's whole CPU budget in a loader process. A ranged
        read goes instead through a presigned URL of the object (signed once per object and
        process, again before it expires) and ``ranged_http.RangedHTTP`` (keep-alive
        ``http.client`` connections: ~0.35 ms per 450 KB sample), with the same retries of
        throttling, server errors and dropped connections with backoff. A refused signature
        (expired credentials) signs again once; any other failure is asked again through boto3,
        whose errors say what is wrong."""
        _, http, urls = self._ranged_reader()
        for attempt in range(2):
            made, url = urls.get(name, (0.0, ""))
            if time.monotonic() - made > PRESIGNED_TTL_S / 2:
                made, url = time.monotonic(), self.client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": self._key(name)}, ExpiresIn=PRESIGNED_TTL_S)
                urls[name] = (made, url)
            status, body = http.get(url, offset, length)
            if status == 206 or (status == 200 and offset == 0):
                return body if status == 206 else body[:length]
            if status in (400, 403) and attempt == 0:
                urls.pop(name, None)  # credentials renewed since the URL was signed: sign again
                continue
            break
        rng = f"bytes={offset}-{offset + length - 1}"
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name), Range=rng)["Body"].read()

    def _ranged_reader(self) -> tuple[int, RangedHTTP, dict]:
        """This process's ranged GETs and presigned URLs (made again in a forked process, as the client)."""
        ranged = self._ranged
        if ranged is None or ranged[0] != os.getpid():
            ranged = (os.getpid(), RangedHTTP(S3_MAX_ATTEMPTS), {})
            self._ranged = ranged
        return ranged

    def size(self, name: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(name))["ContentLength"])

    def list(self, prefix: str = "", on_problem: ProblemCallback | None = None) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]))

    def put_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    keeps_checksums = True

    def version(self, name: str) -> str | None:
        head = self._head(name)
        return None if head is None else f"{head['ContentLength']}|{head.get('ETag', '')}"

    def stored_crc32(self, name: str) -> str | None:
        head = self.client.head_object(Bucket=self.bucket, Key=self._key(name), ChecksumMode="ENABLED")
        if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":  # a checksum of part checksums
            return None
        return head.get("ChecksumCRC32")

    def iter_bytes(self, name: str, chunk: int = 8 << 20) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        yield from body.iter_chunks(chunk)

    def put_file(self, name: str, local_path: str | os.PathLike, crc32: str | None = None) -> None:
        """One PUT, or a multipart upload completed at the end. With ``crc32`` S3 checks the
        object against it, whole (``ChecksumType=FULL_OBJECT`` for multipart too), and keeps it:
        ``tsd prep --verify`` then checks a shard with one HEAD request instead of a download."""
        size = os.path.getsize(local_path)
        key = self._key(name)
        if size <= MULTIPART_THRESHOLD:
            with open(local_path, "rb") as f:
                extra = {"ChecksumAlgorithm": "CRC32", "ChecksumCRC32": crc32} if crc32 else {}
                self.client.put_object(Bucket=self.bucket, Key=key, Body=f, **extra)
            return
        whole = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "FULL_OBJECT"} if crc32 else {}
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, **whole)
        parts = []
        try:
            with open(local_path, "rb") as f:
                number = 1
                while chunk := f.read(MULTIPART_CHUNK):
                    answer = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload["UploadId"],
                        PartNumber=number,
                        Body=chunk,
                        **({"ChecksumAlgorithm": "CRC32"} if crc32 else {}),
                    )
                    part = {"PartNumber": number, "ETag": answer["ETag"]}
                    if crc32:
                        part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                    parts.append(part)
                    number += 1
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts},
                **({"ChecksumCRC32": crc32, "ChecksumType": "FULL_OBJECT"} if crc32 else {}),
            )
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])
            raise
        finally:
            Path(local_path).unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def clean_staging(self) -> int:
        """Abort the multipart uploads a killed run left under this prefix (S3 keeps, and bills,
        their parts until they are aborted)."""
        prefix = self.prefix + "/" if self.prefix else ""
        aborted = 0
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted += 1
        return aborted



def open_storage(root: str | os.PathLike, endpoint_url: str | None = None) -> Storage:
    """A ``Storage`` for a local directory or an ``s3://bucket/prefix`` URI."""
    root = str(root)
    if is_s3(root):
        return S3Storage(root, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    return LocalStorage(root)


def s3_object(uri: str, endpoint_url: str | None = None) -> tuple[S3Storage, str]:
    """The storage of an ``s3://bucket/key`` object's prefix, and the object's name in it."""
    bucket, key = split_s3(uri)
    parent, _, name = key.rpartition("/")
    return S3Storage(f"s3://{bucket}/{parent}", endpoint_url), name


def read_source(uri: str, endpoint_url: str | None = None) -> bytes:
    """Read one whole file given by a local path or an S3 URI."""
    if is_s3(uri):
        storage, name = s3_object(uri, endpoint_url)
        return storage.read_bytes(name)
    path = Path(uri)
    if not path.is_file():
        raise InputError(f"{uri}: no such file")
    return path.read_bytes()


def open_source(uri: str, endpoint_url: str | None = None) -> BinaryIO:
    """A readable binary stream over a local file or an S3 object (streamed, not buffered whole)."""
    if is_s3(uri):
        import boto3

        bucket, key = split_s3(uri)
        client = boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"]
        except client.exceptions.NoSuchKey:
            raise InputError(f"{uri}: no such object") from None
    if not Path(uri).is_file():
        raise InputError(f"{uri}: no such file")
    return open(uri, "rb")
