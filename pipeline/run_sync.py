"""Monitoring files of a run published into its storage, so that they can be read from any machine.

TensorBoard events and the workers' status files are written on the node of each rank (rank 0's
events, every rank's ``workers/rank{r}.json``). When the run's storage is elsewhere
(``train.storage_path: s3://...``, where the checkpoints go), those files are copied there, next to
the checkpoints (``<storage_path>/<run>/tensorboard/``, ``.../workers/``): at most every
``train.sync_every_s`` seconds, at every checkpoint and at the end. Each copy is a whole-object
PUT (atomic in S3), so a reader never sees a half-written file; only files that changed since the
last copy are sent. ``tensorboard --logdir s3://bucket/runs/<run>/tensorboard`` then shows the run
while it trains (for an S3-compatible endpoint other than AWS, tensorboard reads ``S3_ENDPOINT``).
"""

from __future__ import annotations

import time
from pathlib import Path

from data_prep.storage import Storage, is_s3, open_storage


def run_storage(storage_path: str, run_name: str, local_dir: str, endpoint_url: str | None) -> Storage | None:
    """The storage of a run's published monitoring files, or None when they are already there
    (the storage is the local directory the files are written in)."""
    if not is_s3(storage_path) and Path(storage_path).resolve() == Path(local_dir).resolve():
        return None
    return open_storage(f"{storage_path.rstrip('/')}/{run_name}", endpoint_url)


class DirectorySync:
    """Copies the files of a local directory that changed into ``remote`` under ``prefix``."""

    def __init__(self, local: Path, remote: Storage | None, prefix: str, every_s: float, pattern: str = "*") -> None:
        self.local, self.remote, self.prefix, self.every_s = local, remote, prefix.strip("/"), every_s
        self.pattern = pattern  # e.g. one rank's own status file
        self.sent: dict[str, tuple[int, int]] = {}
        self.last = 0.0
        self.failures = 0

    def __call__(self, force: bool = False) -> int:
        """Copy what changed (when ``every_s`` has passed, or ``force``); returns the files copied.
        A failed copy is counted and retried at the next call: monitoring never stops training."""
        if self.remote is None or not self.local.is_dir():
            return 0
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return 0
        self.last = now
        copied = 0
        for path in sorted(p for p in self.local.rglob(self.pattern) if p.is_file() and not p.name.endswith(".tmp")):
            stat = path.stat()
            key = str(path.relative_to(self.local))
            if self.sent.get(key) == (stat.st_size, stat.st_mtime_ns):
                continue
            try:
                self.remote.put_bytes(f"{self.prefix}/{key}", path.read_bytes())
            except Exception:  # noqa: BLE001 - network or permission trouble: try again later
                self.failures += 1
                continue
            self.sent[key] = (stat.st_size, stat.st_mtime_ns)
            copied += 1
        return copied
