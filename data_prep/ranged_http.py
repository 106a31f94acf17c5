"""GETs of byte ranges of presigned object URLs: the training loader's one request per sample.

Why not botocore or urllib3: a loader process reads each sample with one ranged GET of ~0.5 MB,
and every millisecond of CPU it spends on the request is taken from JPEG decoding on the same
core. Measured per 450 KB request from one core (bench notes in BENCHMARKS.md): botocore ~3 ms,
urllib3's ``PoolManager`` ~1 ms (it parses and re-encodes the long presigned URL several times
per request), ``http.client`` on a kept-alive connection ~0.35 ms. So this is ``http.client``
with what the loader needs around it:

- one keep-alive connection per thread and endpoint (the read-ahead threads each hold one), made
  again after the server closed it (S3 closes idle connections);
- retries of S3's throttling and server errors (500, 502, 503, 504) and of dropped connections,
  with exponential backoff and full jitter, ``attempts`` in all;
- https with the system's CA certificates, or the bundle in ``AWS_CA_BUNDLE`` (boto3's variable);
- separate connect and read timeouts.

An instance belongs to the process that made it: a forked process must make its own (two
processes on one socket read each other's responses). ``S3Storage`` keeps one per process.
Errors never show the URL's query string: it holds the signature.
"""

from __future__ import annotations

import http.client
import os
import random
import ssl
import threading
import time
from urllib.parse import urlsplit

RETRIED_STATUSES = frozenset({500, 502, 503, 504})


class RangedHTTP:
    """Ranged GETs over per-thread keep-alive connections, with retries (see the module docstring)."""

    def __init__(self, attempts: int, backoff_s: float = 0.05, max_backoff_s: float = 5.0,
                 connect_timeout_s: float = 10.0, read_timeout_s: float = 60.0) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1 (got {attempts})")
        self.pid = os.getpid()
        self.attempts = attempts
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.connect_timeout_s, self.read_timeout_s = connect_timeout_s, read_timeout_s
        self._local = threading.local()  # .connections: {(scheme, host, port): HTTPConnection}
        self._tls: ssl.SSLContext | None = None
        self._tls_lock = threading.Lock()

    def get(self, url: str, start: int, length: int) -> tuple[int, bytes]:
        """``(status, body)`` of ``GET url`` for bytes ``start`` to ``start + length - 1``.

        The status is the last attempt's: 206 (or 200 from a server that ignores ranges) when it
        worked, anything else for the caller to judge (a 403 of an expired signature, a 404).
        Raises ``ConnectionError`` naming the object when every attempt failed to connect or read.
        """
        parts = urlsplit(url)
        endpoint = (parts.scheme, parts.hostname or "", parts.port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"Range": f"bytes={start}-{start + length - 1}"}
        for attempt in range(self.attempts):
            last = attempt == self.attempts - 1
            try:
                connection = self._connection(endpoint)
                connection.request("GET", target, headers=headers)
                answer = connection.getresponse()
                body = answer.read()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, closed while idle
                self._drop(endpoint)
                if last:
                    raise ConnectionError(f"GET {parts.scheme}://{parts.netloc}{parts.path} (bytes {start}-"
                                          f"{start + length - 1}): {type(exc).__name__}: {exc} "
                                          f"({self.attempts} attempts)") from None
                self._wait(attempt)
                continue
            if answer.will_close:
                self._drop(endpoint)
            if answer.status in RETRIED_STATUSES and not last:
                self._wait(attempt)
                continue
            return answer.status, body
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _wait(self, attempt: int) -> None:
        """Exponential backoff with full jitter (what AWS recommends against throttling)."""
        time.sleep(random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**attempt)))

    def _connection(self, endpoint: tuple[str, str, int | None]) -> http.client.HTTPConnection:
        connections = self._connections()
        connection = connections.get(endpoint)
        if connection is None:
            scheme, host, port = endpoint
            if scheme == "https":
                connection = http.client.HTTPSConnection(host, port, timeout=self.connect_timeout_s,
                                                         context=self._tls_context())
            elif scheme == "http":
                connection = http.client.HTTPConnection(host, port, timeout=self.connect_timeout_s)
            else:
                raise ValueError(f"cannot GET a {scheme!r} URL")
            connection.connect()
            connection.sock.settimeout(self.read_timeout_s)
            connections[endpoint] = connection
        return connection

    def _drop(self, endpoint: tuple[str, str, int | None]) -> None:
        connection = self._connections().pop(endpoint, None)
        if connection is not None:
            connection.close()

    def _connections(self) -> dict:
        if os.getpid() != self.pid:
            raise RuntimeError("a RangedHTTP was used in a forked process: each process must make its own")
        connections = getattr(self._local, "connections", None)
        if connections is None:
            connections = self._local.connections = {}
        return connections

    def _tls_context(self) -> ssl.SSLContext:
        with self._tls_lock:
            if self._tls is None:
                self._tls = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
            return self._tls
