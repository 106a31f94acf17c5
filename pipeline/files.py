"""Publishing local output files atomically: a reader sees the old file or the whole new one.

Every report, predictions file and submission the pipeline writes goes through here, on top of
``data_prep.storage.write_atomically`` (unique temp name, fsync, rename, directory fsync).
"""

from __future__ import annotations

import json
import os

from data_prep.storage import write_atomically


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomically(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
