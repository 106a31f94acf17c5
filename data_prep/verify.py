"""`tsd prep --verify`: re-check every shard of a prepared output against its manifest.

A resumed prep trusts a shard whose report says it is complete and whose size matches; a flipped
byte, a shard overwritten by hand or a bad disk block passes that check, and the manifest keeps a
checksum the file no longer has. The verification pass checks each shard listed in the manifest:

- missing, or not the size the manifest says: bad, no read needed;
- on S3, when the manifest has the shard's CRC32 and S3 kept a whole-object CRC32 for it (prep
  uploads with ``ChecksumCRC32``; S3 checks the upload against it): one HEAD request compares the
  two, no download (``how: s3-crc32``);
- otherwise the shard is read and hashed, and its sha256 compared (``how: sha256``).

Bad shards are deleted with their reports, so the prep run that follows writes them again
(shards are reproducible: the rewrite has the manifest's checksum). Threads overlap the reads;
hashlib and the reads release the GIL.
"""

from __future__ import annotations

import hashlib
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from data_prep.shard import report_name
from data_prep.storage import Storage

SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")


@dataclass
class ShardCheck:
    split: str
    name: str
    ok: bool
    how: str  # "s3-crc32" (S3's kept checksum, no download), "sha256" (read and hashed), "size", "missing"
    problem: str | None = None


@dataclass
class VerifyReport:
    output: str
    checks: list[ShardCheck]
    bytes_read: int
    seconds: float

    @property
    def bad(self) -> list[ShardCheck]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> dict:
        how: dict[str, int] = {}
        for c in self.checks:
            how[c.how] = how.get(c.how, 0) + 1
        return {"output": self.output, "shards_checked": len(self.checks), "shards_bad": len(self.bad),
                "checked_by": how, "bytes_read": self.bytes_read, "seconds": round(self.seconds, 3),
                "bad": [asdict(c) for c in self.bad]}


def _check(out: Storage, split: str, entry: dict) -> tuple[ShardCheck, int]:
    name = entry["name"]
    if not out.exists(name):
        return ShardCheck(split, name, False, "missing", f"{out.uri(name)}: missing"), 0
    size = out.size(name)
    if size != entry["bytes"]:
        return ShardCheck(split, name, False, "size",
                          f"{out.uri(name)}: {size:,} bytes, the manifest says {entry['bytes']:,}"), 0
    expected_crc = entry.get("crc32")
    if out.keeps_checksums and expected_crc:
        stored = out.stored_crc32(name)
        if stored is not None:
            ok = stored == expected_crc
            return ShardCheck(split, name, ok, "s3-crc32",
                              None if ok else f"{out.uri(name)}: CRC32 {stored} kept by S3, the manifest says "
                                              f"{expected_crc}"), 0
    digest = hashlib.sha256()
    read = 0
    for chunk in out.iter_bytes(name):
        digest.update(chunk)
        read += len(chunk)
    actual = digest.hexdigest()
    ok = actual == entry["sha256"]
    return ShardCheck(split, name, ok, "sha256",
                      None if ok else f"{out.uri(name)}: sha256 {actual[:16]}…, the manifest says "
                                      f"{entry['sha256'][:16]}… (same size: damaged in place)"), read


def verify_shards(out: Storage, manifest: dict, splits: list[str], workers: int = 8,
                  progress: bool = False) -> VerifyReport:
    """Check every shard the manifest lists for ``splits`` (see the module docstring)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    jobs = [(split, entry) for split in splits for entry in manifest.get("splits", {}).get(split, {}).get("shards", [])]
    checks: list[ShardCheck] = []
    read = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda job: _check(out, *job), jobs)
        for check, n in tqdm(results, total=len(jobs), desc="verify shards", unit="shard", disable=not progress):
            checks.append(check)
            read += n
    return VerifyReport(out.uri(""), checks, read, time.perf_counter() - t0)


def remove_bad(out: Storage, report: VerifyReport) -> list[str]:
    """Delete each bad shard and its report, so that the next prep run writes it again."""
    removed = []
    for check in report.bad:
        found = SHARD_NAME.match(check.name)
        out.delete(check.name)
        if found:
            out.delete(report_name(found["split"], int(found["index"])))
        removed.append(check.name)
    return removed
