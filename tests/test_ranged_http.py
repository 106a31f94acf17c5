"""The loader's ranged GETs (``data_prep.ranged_http``) against a real HTTP/1.1 server on 127.0.0.1
that serves byte ranges and can be told to misbehave as object stores do: answer 503, close a
kept-alive connection without saying so, or not listen at all."""

from __future__ import annotations

import http.server
import multiprocessing
import re
import socket
import threading

import pytest

from data_prep.ranged_http import RangedHTTP

DATA = bytes(range(256)) * 64


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        with server.lock:
            server.requests += 1
            status = server.statuses.pop(0) if server.statuses else 206
        start, end = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
        body = DATA[start:end + 1] if status == 206 else b"<Error><Code>SlowDown</Code></Error>"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        self.end_headers()
        self.wfile.write(body)
        if server.close_after_each:  # an idle-closed keep-alive connection, without "Connection: close"
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.lock = threading.Lock()
    httpd.requests = httpd.connections = 0
    httpd.statuses = []  # statuses of the next requests (206 after them)
    httpd.close_after_each = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/bucket/key?X-Amz-Signature=secret"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_ranges_come_back_over_one_kept_alive_connection(server):
    http = RangedHTTP(attempts=3, backoff_s=0.001)
    for start, length in ((0, 10), (1000, 4096), (len(DATA) - 7, 7), (5, 1)) * 5:
        assert http.get(server.url, start, length) == (206, DATA[start:start + length])
    assert server.requests == 20 and server.connections == 1


def test_each_thread_has_its_own_connection(server):
    http = RangedHTTP(attempts=3, backoff_s=0.001)
    results, start = [], threading.Barrier(4)

    def read(k: int) -> None:
        start.wait()
        results.extend(http.get(server.url, 100 * k + j, 50) == (206, DATA[100 * k + j:100 * k + j + 50])
                       for j in range(10))

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 40 and server.connections == 4


def test_a_connection_closed_by_the_server_is_made_again(server):
    server.close_after_each = True
    http = RangedHTTP(attempts=3, backoff_s=0.001)
    for k in range(6):
        assert http.get(server.url, 10 * k, 10) == (206, DATA[10 * k:10 * k + 10])
    assert server.requests == 6 and server.connections == 6  # a stale one fails before it reaches the server
    once = RangedHTTP(attempts=1)  # without a retry the stale connection is an error
    once.get(server.url, 0, 10)
    with pytest.raises(ConnectionError, match="RemoteDisconnected|ConnectionResetError|BrokenPipeError"):
        once.get(server.url, 0, 10)


def test_throttling_is_retried_until_it_passes(server):
    server.statuses = [503, 503, 500]
    http = RangedHTTP(attempts=4, backoff_s=0.001)
    assert http.get(server.url, 7, 9) == (206, DATA[7:16])
    assert server.requests == 4


def test_the_last_attempt_s_status_is_returned_when_throttling_persists(server):
    server.statuses = [503] * 10
    http = RangedHTTP(attempts=3, backoff_s=0.001)
    status, body = http.get(server.url, 0, 10)
    assert status == 503 and b"SlowDown" in body and server.requests == 3


def test_nothing_listening_names_the_object_not_its_signature():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    http = RangedHTTP(attempts=2, backoff_s=0.001)
    with pytest.raises(ConnectionError, match=rf"127.0.0.1:{port}/bucket/key \(bytes 3-12\).*2 attempts") as info:
        http.get(f"http://127.0.0.1:{port}/bucket/key?X-Amz-Signature=secret", 3, 10)
    assert "secret" not in str(info.value)


def _use_in_child(http: RangedHTTP, url: str, queue) -> None:
    try:
        http.get(url, 0, 1)
        queue.put("used the parent's connections")
    except RuntimeError as exc:
        queue.put(str(exc))


def test_a_forked_process_cannot_use_the_parent_s_connections(server):
    http = RangedHTTP(attempts=1)
    http.get(server.url, 0, 1)  # the parent's connection is open when the child forks
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_use_in_child, args=(http, server.url, queue))
    child.start()
    answer = queue.get(timeout=30)
    child.join(timeout=30)
    assert "forked process" in answer
