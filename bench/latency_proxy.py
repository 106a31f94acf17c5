"""A TCP relay on 127.0.0.1 that gives a local S3 endpoint (the moto server) the latency of the real
thing, and can answer some requests with S3's throttling error.

Every HTTP request the client sends is held ``latency_s`` before it is relayed (a request starts
when the client sends after having received a response, which is how keep-alive HTTP/1.1 clients
such as botocore talk); responses are relayed as they come. With ``fail_every=N``, every N-th
request is not relayed but answered ``503 Slow Down`` with S3's XML error body, on the same
connection, as S3 does when it throttles: what botocore's retry modes retry.

    with LatencyProxy(upstream_port, latency_s=0.025) as proxy:
        boto3.client("s3", endpoint_url=proxy.url)
"""

from __future__ import annotations

import asyncio
import threading

SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
             b"Connection: keep-alive\r\n\r\n%s")
SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")


class LatencyProxy:
    """Runs the relay in a background thread with its own event loop; ``url`` is its address."""

    def __init__(self, upstream_port: int, latency_s: float = 0.025, fail_every: int = 0,
                 upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_s, self.fail_every = latency_s, fail_every
        self.requests = 0
        self.failed = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)  # open connections: end them before the loop closes
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        answered = asyncio.Event()  # the last request got (the start of) its response
        answered.set()
        back = asyncio.ensure_future(self._responses(up_reader, writer, answered))
        try:
            while data := await reader.read(65536):
                if answered.is_set():  # a new request starts with this data
                    answered.clear()
                    self.requests += 1
                    if self.latency_s:
                        await asyncio.sleep(self.latency_s)
                    if self.fail_every and self.requests % self.fail_every == 0:
                        self.failed += 1
                        body = b"" if data.startswith(b"HEAD ") else SLOW_DOWN_BODY  # HEAD: headers only
                        writer.write(SLOW_DOWN % (len(SLOW_DOWN_BODY), body))
                        await writer.drain()
                        answered.set()
                        continue  # the request (a GET without a body) is dropped, never relayed
                up_writer.write(data)
                await up_writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            back.cancel()
            for w in (writer, up_writer):
                w.close()

    @staticmethod
    async def _responses(up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         answered: asyncio.Event) -> None:
        try:
            while data := await up_reader.read(65536):
                answered.set()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="relay 127.0.0.1:PORT to an S3 endpoint with added latency")
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=25.0)
    parser.add_argument("--fail-every", type=int, default=0)
    args = parser.parse_args()
    with LatencyProxy(args.upstream_port, args.latency_ms / 1000, args.fail_every) as proxy:
        print(proxy.port, flush=True)  # the caller reads the port from the first line
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
