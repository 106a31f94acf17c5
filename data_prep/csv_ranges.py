"""Parsing one large local CSV in parallel: byte ranges cut at line ends, one pyarrow reader each.

pyarrow's streaming CSV reader parses on one core. The challenge train file (1 GB, 12.2M rows)
is cut into ranges of ~64 MB, each parsed by its own reader in its own thread (pyarrow releases
the GIL while it parses), at most ``window`` (one per core) at a time, while the caller consumes
the record batches strictly in file order: results stay exactly those of one sequential reader.
Only the ranges in the window hold parsed batches, so memory does not grow with the file (with
one range per core, the later ranges' whole parse waited in memory for the consumer). Ranges
after the first hold no header, so their readers get the column names; their line numbers start
at their own first line, and ``lines_before`` turns them into the file's.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections.abc import Callable, Iterator

_DONE = object()


class RangeFile(io.RawIOBase):
    """Bytes ``[start, end)`` of a local file as a readable stream (for one range's reader)."""

    def __init__(self, path: str, start: int, end: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY)
        self._pos, self._end = start, end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def line_ranges(path: str, parts: int) -> list[tuple[int, int]]:
    """``parts`` (or fewer) byte ranges covering the file, each starting at a line start; the
    first holds the header line."""
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(bounds[-1], size * k // parts))
            f.readline()  # to the end of the line the cut fell in
            cut = f.tell()
            if cut >= size:
                break
            if cut > bounds[-1]:
                bounds.append(cut)
    bounds.append(size)
    return list(zip(bounds, bounds[1:], strict=False))


def lines_before(path: str, offset: int, chunk: int = 16 << 20) -> int:
    """The number of line ends in the file before byte ``offset``."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            data = f.read(min(chunk, offset))
            if not data:
                break
            count += data.count(b"\n")
            offset -= len(data)
    return count


def parallel_batches(path: str, ranges: list[tuple[int, int]],
                     open_reader: Callable[[int, RangeFile], Iterator], window: int | None = None) -> Iterator:
    """Every record batch of every range, in file order.

    ``open_reader(k, stream)`` makes the reader of range k. Each range is parsed in its own
    thread, at most ``window`` ranges (default: all) at a time: range k + window starts when the
    consumer has taken the last batch of range k. A parser's exception is raised here, at its
    place in the order. Closing the iterator early stops the threads at their next batch.
    """
    window = len(ranges) if window is None else max(1, window)
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue() for _ in ranges]

    def parse(k: int, start: int, end: int) -> None:
        stream = RangeFile(path, start, end)
        try:
            for batch in open_reader(k, stream):
                if stop.is_set():
                    return
                queues[k].put(batch)
            queues[k].put(_DONE)
        except BaseException as exc:  # handed to the consumer, raised there
            queues[k].put(exc)
        finally:
            stream.close()

    threads = [threading.Thread(target=parse, args=(k, a, b), daemon=True, name=f"csv-range-{k}")
               for k, (a, b) in enumerate(ranges)]
    for t in threads[:window]:
        t.start()
    try:
        for k, q in enumerate(queues):
            while (item := q.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
            if k + window < len(threads):
                threads[k + window].start()
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started (the window's ranges that were never reached were not)
                t.join()
