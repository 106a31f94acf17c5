"""The per-sample index of a split (``{split}-index.parquet``): its schema, writing it, reading it.

One row per sample: its key, its shard, where its ``.jpg`` and ``.json`` members lie in the tar,
the image size, its classes (each once) and its number of boxes. ``tsd prep`` writes it; the
loader, the samplers and evaluation read it. This module is the only place that knows the
columns.

Read at the real train split's size (1,743,042 rows, ~7 classes per image) it must be cheap in
every training process and its DataLoader workers, so ``ShardIndex`` is columnar: numpy arrays
and one Arrow string array, no Python object per sample. Forked loader workers then share its
pages (no per-object reference counts to touch), the labels are one flat array with offsets
(``LabelSets``), shard names are stored once with an int32 id per sample, and positions are
stored relative to the sample's start (int32), ~120 bytes per sample in all.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from data_prep.errors import InputError

# A sample's row as the shard writer collects it (``ShardResult.index_columns``), in this order.
INDEX_COLUMNS = ("key", "jpg_offset", "jpg_size", "json_offset", "json_size", "width", "height", "labels",
                 "num_boxes")


def index_name(split: str) -> str:
    return f"{split}-index.parquet"


def columns_name(split: str) -> str:
    """The index's columns as ``ShardIndex`` holds them (uncompressed Arrow IPC), published beside
    the Parquet file so that no process has to decode it: copied once into the node's cache and
    memory-mapped there."""
    return f"{split}-index.columns.arrow"


def index_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("shard_index", pa.int32()),
                      ("jpg_offset", pa.int64()), ("jpg_size", pa.int64()), ("json_offset", pa.int64()),
                      ("json_size", pa.int64()), ("width", pa.int32()), ("height", pa.int32()),
                      ("labels", pa.list_(pa.int16())), ("num_boxes", pa.int32())])


def index_table(shards: list[tuple[int, str, dict[str, list]]]):
    """The index table of ``(shard index, shard name, index columns)`` in shard order."""
    import pyarrow as pa

    def column(name: str) -> list:
        return [value for _, _, cols in shards for value in cols[name]]

    counts = [len(cols["key"]) for _, _, cols in shards]
    schema = index_schema()
    data = {"shard": [name for (_, name, _), n in zip(shards, counts, strict=True) for _ in range(n)],
            "shard_index": [i for (i, _, _), n in zip(shards, counts, strict=True) for _ in range(n)],
            **{name: column(name) for name in INDEX_COLUMNS}}
    return pa.table({f.name: pa.array(data[f.name], f.type) for f in schema}, schema=schema)


def write_index_table(out, split: str, table) -> int:
    """Publish a split's index into the shards' storage, as its column file (what loads read) and
    as Parquet (the portable table, for pandas and people); returns its rows."""
    import pyarrow.parquet as pq

    columns = io.BytesIO()
    ShardIndex.from_table(table, out.uri(index_name(split)))._write_columns(columns)
    out.put_bytes(columns_name(split), columns.getvalue())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out.put_bytes(index_name(split), buf.getvalue())
    return table.num_rows


def write_index(out, split: str, results) -> int:
    """The index of a split from its shards' results (``data_prep.shard.ShardResult``)."""
    return write_index_table(out, split, index_table([(r.index, r.name, r.index_columns) for r in results]))


@dataclass
class LabelSets:
    """Every sample's classes as one flat array and offsets: sample i has ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray  # [L] int
    offsets: np.ndarray  # [N + 1] int

    @classmethod
    def from_lists(cls, labels: list) -> LabelSets:
        counts = np.array([len(x) for x in labels], dtype=np.int64)
        values = np.concatenate([np.asarray(x, np.int64) for x in labels]) if len(labels) else np.zeros(0, np.int64)
        return cls(values, np.concatenate([[0], np.cumsum(counts)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample_of_each(self) -> np.ndarray:
        """``[L]``: the sample each value belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.counts())

    def take(self, rows: np.ndarray) -> LabelSets:
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.counts()[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        starts = np.repeat(self.offsets[rows] - offsets[:-1], counts)
        return LabelSets(self.values[np.arange(offsets[-1]) + starts], offsets)

    def mapped(self, label_map: np.ndarray) -> LabelSets:
        """The classes through ``label_map`` (old id -> new id, -1 drops it), e.g. into an expert's ids."""
        new = np.asarray(label_map)[self.values]
        keep = new >= 0
        kept_per_sample = np.bincount(self.sample_of_each()[keep], minlength=len(self))
        return LabelSets(new[keep], np.concatenate([[0], np.cumsum(kept_per_sample)]))


@dataclass
class ShardIndex:
    """The columns of a split's index that the loader, samplers and evaluation use (see the module doc)."""

    keys: object  # pyarrow StringArray; ``key(i)`` for one, ``key_list()`` for all
    shard_names: tuple[str, ...]
    shard_ids: np.ndarray  # [N] int32 into shard_names
    starts: np.ndarray  # [N] int64: where the sample's .jpg data starts in its shard
    jpg_sizes: np.ndarray  # [N] int32
    json_starts: np.ndarray  # [N] int32: the .json data's start, relative to ``starts``
    lengths: np.ndarray  # [N] int32: bytes from ``starts`` to the end of the .json data (one range read)
    widths: np.ndarray  # [N] int32
    heights: np.ndarray  # [N] int32
    labels: LabelSets

    def __len__(self) -> int:
        return len(self.starts)

    def key(self, i: int) -> str:
        return self.keys[int(i)].as_py()

    def key_list(self) -> list[str]:
        return self.keys.to_pylist()

    def shard(self, i: int) -> str:
        return self.shard_names[int(self.shard_ids[i])]

    def ends(self) -> np.ndarray:
        return self.starts + self.lengths

    def take(self, rows: np.ndarray) -> ShardIndex:
        rows = np.asarray(rows, dtype=np.int64)
        import pyarrow as pa

        return ShardIndex(self.keys.take(pa.array(rows)), self.shard_names, self.shard_ids[rows], self.starts[rows],
                          self.jpg_sizes[rows], self.json_starts[rows], self.lengths[rows], self.widths[rows],
                          self.heights[rows], self.labels.take(rows))

    @classmethod
    def load(cls, storage, split: str, cache: bool = True) -> ShardIndex:
        """The split's index. With ``cache``, the decoded columns are kept in a node-local file
        (``$TSD_CACHE/index``, default ``~/.cache/tsd``) that every later load on the node maps
        instead of decoding the Parquet file again: all the training and loader processes of a
        node then share one copy in the page cache, and a load takes milliseconds."""
        name = index_name(split)
        published = columns_name(split)
        published_version = storage.version(published)  # one request: whether it exists, and its cache name
        if published_version is not None:  # written by prep with the Parquet file: nothing to decode
            # copied into the node's cache first, also from a local disk: a mapped file that someone
            # overwrites in place (cp, a sync tool) would kill every process mapping it (SIGBUS);
            # the cache file is only ever replaced by a rename
            path = _cache_path(storage, published, published_version) if cache else None
            if path is None:
                return cls._mapped(io.BytesIO(storage.read_bytes(published)))._checked(storage.uri(published))
            if not path.is_file():
                from data_prep.storage import write_atomically

                def copy(file) -> None:
                    for chunk in storage.iter_bytes(published):
                        file.write(chunk)

                write_atomically(path, copy)
            return cls._mapped(path)._checked(storage.uri(published))
        version = storage.version(name)
        if version is None:
            raise InputError(f"{storage.uri(name)}: no index for split '{split}' (run `tsd prep` first)")
        path = _cache_path(storage, name, version) if cache else None
        if path is not None and path.is_file():
            try:
                return cls._mapped(path)
            except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt from the index
                pass
        index = cls._decode(storage, name)
        if path is None:
            return index
        try:
            from data_prep.storage import write_atomically

            write_atomically(path, index._write_columns)
            return cls._mapped(path)
        except OSError:  # no room or no permission for the cache: the decoded index serves as well
            return index

    def _write_columns(self, file) -> None:
        import json

        import pyarrow as pa

        columns = {"key": self.keys, "shard_id": pa.array(self.shard_ids), "start": pa.array(self.starts),
                   "jpg_size": pa.array(self.jpg_sizes), "json_start": pa.array(self.json_starts),
                   "length": pa.array(self.lengths), "width": pa.array(self.widths), "height": pa.array(self.heights),
                   "labels": pa.LargeListArray.from_arrays(pa.array(self.labels.offsets), pa.array(self.labels.values))}
        table = pa.table(columns).replace_schema_metadata({"shard_names": json.dumps(list(self.shard_names))})
        with pa.ipc.new_file(file, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(1, len(self)))

    @classmethod
    def _mapped(cls, path) -> ShardIndex:
        """An index whose columns are views of a memory-mapped column file (no copy); or of an
        in-memory one (a file object)."""
        import json

        import pyarrow as pa

        source = pa.memory_map(str(path), "r") if isinstance(path, str | Path) else path
        table = pa.ipc.open_file(source).read_all()
        names = tuple(json.loads(table.schema.metadata[b"shard_names"]))

        def col(name: str):
            column = table.column(name)
            return column.chunk(0) if column.num_chunks else pa.array([], column.type)

        def numbers(name: str) -> np.ndarray:
            return _view(col(name))

        labels = col("labels")
        return cls(col("key"), names, numbers("shard_id"), numbers("start"), numbers("jpg_size"),
                   numbers("json_start"), numbers("length"), numbers("width"), numbers("height"),
                   LabelSets(_view(labels.values), _view(labels.offsets)))

    def _checked(self, where: str) -> ShardIndex:
        """The index, after the checks every index read from storage passes (a published column
        file is read as it is, like the Parquet file)."""
        _check_shard_names(self.shard_names, where)
        if len(self) and (self.json_starts.min() < 0 or (self.json_starts > self.lengths).any()):
            raise InputError(f"{where}: sample positions are not those `tsd prep` writes")
        return self

    @classmethod
    def from_table(cls, table, where: str) -> ShardIndex:
        """The index of an in-memory index table (``index_table``), checked as a read one is."""
        import pyarrow as pa

        def column(col: str):
            if not table.num_rows:
                return None
            values = table.column(col).combine_chunks()
            return values.dictionary_encode() if col == "shard" and not pa.types.is_dictionary(values.type) else values

        return cls._from_columns(column, where)

    @classmethod
    def _decode(cls, storage, name: str) -> ShardIndex:
        """The index decoded from its Parquet file (checked: shard names, positions)."""
        import pyarrow.parquet as pq

        source = storage.local_path(name) if hasattr(storage, "local_path") else io.BytesIO(storage.read_bytes(name))
        file = pq.ParquetFile(source, read_dictionary=["shard"])

        def column(col: str):
            """One column as one Arrow array, read on its own: the decoder's buffers of one column at a
            time, not of the whole table, are alive at once."""
            table = file.read(columns=[col])
            return table.column(0).combine_chunks() if table.num_rows else None

        return cls._from_columns(column, storage.uri(name))

    @classmethod
    def _from_columns(cls, column, where: str) -> ShardIndex:
        """The index from ``column(name)``: one Arrow array per index column (None when empty)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        def numbers(col: str, dtype) -> np.ndarray:
            values = column(col)
            return np.zeros(0, dtype) if values is None else _view(values).astype(dtype)

        shard_column = column("shard")
        if shard_column is None:
            shard_column = pc.dictionary_encode(pa.array([], pa.string()))
        names = tuple(shard_column.dictionary.to_pylist())
        _check_shard_names(names, where)
        shard_ids = _view(shard_column.indices).astype(np.int32)
        shard_column = None
        starts = numbers("jpg_offset", np.int64)
        json_starts = numbers("json_offset", np.int64) - starts
        lengths = json_starts + numbers("json_size", np.int64)
        if len(lengths) and (lengths.max() >= 2**31 or json_starts.min() < 0):
            raise InputError(f"{where}: sample positions are not those `tsd prep` writes")
        labels = column("labels")
        label_sets = (LabelSets(np.zeros(0, np.int16), np.zeros(1, np.int64)) if labels is None else
                      LabelSets(_view(labels.values).copy(), _view(labels.offsets).astype(np.int64)))
        labels = None
        keys = column("key")
        index = cls(pa.array([], pa.string()) if keys is None else keys, names, shard_ids, starts,
                    numbers("jpg_size", np.int32), json_starts.astype(np.int32), lengths.astype(np.int32),
                    numbers("width", np.int32), numbers("height", np.int32), label_sets)
        pa.default_memory_pool().release_unused()  # the decoders' buffers go back to the system
        return index


def _check_shard_names(names, where: str) -> None:
    """Names come from a file: they must stay inside the shards' root."""
    for shard in names:
        if not isinstance(shard, str) or not shard or shard != PurePosixPath(shard).name or shard in (".", ".."):
            raise InputError(f"{where}: shard name {shard!r} is not a file name inside the shards' root (an "
                             f"index names its shards as `tsd prep` wrote them)")


def _view(array) -> np.ndarray:
    """A read-only numpy view of a primitive Arrow array without nulls (no copy; Arrow's own
    ``to_numpy`` would import pandas, half a second, in every process)."""
    dtype = _NUMPY[str(array.type)]
    if len(array) == 0:
        return np.zeros(0, dtype)
    if array.null_count:
        raise InputError(f"index column of type {array.type} has {array.null_count} missing values")
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


_NUMPY = {name: np.dtype(name) for name in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                            "uint64")}


def _cache_path(storage, name: str, version: str):
    """The node-local cache file of an index, named by its address and ``version`` (size and
    mtime, or ETag: ``Storage.version``), so that a re-made index is never read from a stale cache."""
    import hashlib
    import os

    tag = hashlib.sha256(f"{storage.uri(name)}|{version}|columns-v1".encode()).hexdigest()[:20]
    return Path(os.environ.get("TSD_CACHE") or Path.home() / ".cache" / "tsd") / "index" / f"{tag}.arrow"
