"""Benchmark: what `tsd prep --verify` costs, by S3's kept CRC32 against a full sha256 read.

Writes N shard-sized files of random bytes, uploads them to a moto S3 server (its own process on
127.0.0.1) the way prep publishes shards (``S3Storage.put_file`` with the file's CRC32, so that
S3 keeps a whole-object checksum), and times ``data_prep.verify.verify_shards`` side by side:

- S3, manifest with CRC32: one HEAD request per shard, nothing downloaded;
- S3, manifest without CRC32 (shards prepared before it was kept): each shard downloaded and hashed;
- the same files on local disk: read and hashed (sha256).

Also the per-core cost of the two checksums on the writer's side (CRC32 is computed while an S3
shard is written, beside the sha256 that every shard has). moto answers on loopback, so the
download rows are an upper bound of what S3 gives one node; the HEAD row does not depend on size.

    python bench/bench_verify.py [--shards 8] [--shard-mb 64]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _throughput(fn, data: bytes, rounds: int = 3) -> float:
    best = min(_timed(fn, data) for _ in range(rounds))
    return len(data) / best / 1e6


def _timed(fn, data: bytes) -> float:
    t0 = time.perf_counter()
    fn(data)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "verify.json"))
    args = parser.parse_args()
    import boto3
    from bench_s3_latency import _free_port, _wait_port

    from data_prep.storage import open_storage
    from data_prep.verify import verify_shards

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    work = Path(tempfile.mkdtemp(prefix="bench-verify-"))
    port = _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        _wait_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        s3 = open_storage("s3://bench/shards", endpoint)
        local = open_storage(work / "shards")
        entries = []
        sample = b""
        for i in range(args.shards):
            data = os.urandom(args.shard_mb << 20)
            sample = sample or data
            name = f"train-{i:06d}.tar"
            crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
            entries.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "crc32": crc})
            local.put_bytes(name, data)
            staged = work / f"{name}.staged"
            staged.write_bytes(data)
            s3.put_file(name, staged, crc32=crc)
        total_mb = args.shards * args.shard_mb * 1.048576
        no_crc = [{k: v for k, v in e.items() if k != "crc32"} for e in entries]
        for label, store, shards in (("S3 (moto), CRC32 kept by S3: HEAD only", s3, entries),
                                     ("S3 (moto), no CRC32 in the manifest: download + sha256", s3, no_crc),
                                     ("local disk (page cache): read + sha256", local, entries)):
            report = verify_shards(store, {"splits": {"train": {"shards": shards}}}, ["train"])
            assert not report.bad, report.bad
            rows.append({"check": label, "shards": args.shards, "MB": round(total_mb),
                         "seconds": round(report.seconds, 3), "ms_per_shard": round(1e3 * report.seconds / args.shards, 1),
                         "MB_read": round(report.bytes_read / 1e6)})
            print(json.dumps(rows[-1]), flush=True)
        hashing = {"sha256_MB_per_s": round(_throughput(lambda b: hashlib.sha256(b).digest(), sample)),
                   "crc32_MB_per_s": round(_throughput(zlib.crc32, sample))}
        print(json.dumps(hashing))
    finally:
        moto.terminate()
        moto.wait()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\n| check | shards × MB | seconds | ms per shard | MB read |  ({machine})")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['check']} | {r['shards']} × {args.shard_mb} | {r['seconds']} | {r['ms_per_shard']} | {r['MB_read']} |")
    print(f"\nper core: sha256 {hashing['sha256_MB_per_s']} MB/s, CRC32 (zlib) {hashing['crc32_MB_per_s']} MB/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "hashing": hashing, "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
