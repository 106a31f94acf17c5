"""A read-only S3 endpoint on 127.0.0.1 that serves a directory: HEAD and GET of objects, GET with
a byte range. For benchmarks only.

``bench_s3_latency.py`` measures how well the training loader hides S3's latency. Behind the
latency relay, moto answers each request with a few milliseconds of Python on the same two cores
the loader runs on, so the measured rate is moto's, not the loader's. This server does the least
an S3 endpoint can for the calls the loader makes (HEAD for sizes and versions, GET of the index,
ranged GETs of samples), answering from the page cache with ``sendfile``; what is left between it
and local disk is the latency the relay adds and how the loader overlaps it. No authentication is
checked (it listens on loopback only); a missing object is S3's ``404 NoSuchKey``.

    python bench/range_server.py --root DIR [--port 0]   # prints its port, serves DIR/BUCKET/KEY
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import sys
from pathlib import Path

from aiohttp import web

NO_SUCH_KEY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
               b"<Message>The specified key does not exist.</Message></Error>")
RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def make_app(root: Path) -> web.Application:
    root = root.resolve()

    def path_of(request: web.Request) -> Path | None:
        path = (root / request.match_info["bucket"] / request.match_info["key"]).resolve()
        return path if path.is_file() and root in path.parents else None

    def headers_of(path: Path) -> dict[str, str]:
        info = path.stat()
        etag = hashlib.md5(f"{info.st_size}-{info.st_mtime_ns}".encode(), usedforsecurity=False).hexdigest()
        return {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                "Last-Modified": "Tue, 01 Dec 2026 00:00:00 GMT"}

    async def head(request: web.Request) -> web.StreamResponse:
        path = path_of(request)
        if path is None:
            return web.Response(status=404)
        return web.Response(headers={**headers_of(path), "Content-Length": str(path.stat().st_size)})

    async def get(request: web.Request) -> web.StreamResponse:
        path = path_of(request)
        if path is None:
            return web.Response(status=404, body=NO_SUCH_KEY, content_type="application/xml")
        size = path.stat().st_size
        wanted = RANGE.match(request.headers.get("Range", ""))
        if wanted is None:
            return web.FileResponse(path, headers=headers_of(path))
        start = int(wanted[1])
        end = min(size - 1, int(wanted[2])) if wanted[2] else size - 1
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        return web.Response(status=206, body=body, headers={
            **headers_of(path), "Content-Range": f"bytes {start}-{end}/{size}"})

    app = web.Application()
    app.router.add_route("HEAD", "/{bucket}/{key:.+}", head)
    app.router.add_route("GET", "/{bucket}/{key:.+}", get)
    return app


async def serve(root: Path, port: int) -> None:
    runner = web.AppRunner(make_app(root), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # the port, for the parent process
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="DIR: object BUCKET/KEY is the file DIR/BUCKET/KEY")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.root).is_dir():
        sys.exit(f"{args.root}: not a directory")
    asyncio.run(serve(Path(args.root), args.port))


if __name__ == "__main__":
    main()
