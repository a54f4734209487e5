"""The metrics listener in-process: real sockets, prometheus_client's exposition, mock clock."""

from __future__ import annotations

import gzip
import os

import pytest
import trio
from prometheus_client import CollectorRegistry, Counter

from zpcid.service import metrics
from zpcid.vfio_user.server import bind_unix


@pytest.fixture
def registry():
    reg = CollectorRegistry()
    c = Counter("zpcid_test_things", "things counted", ["fid"], registry=reg)
    c.labels(fid="0x1").inc(3)
    return reg


async def _serve(nursery, sock_dir, registry) -> str:
    path = os.path.join(sock_dir, "metrics.sock")
    listener = bind_unix(path)
    nursery.start_soon(metrics.serve_http, listener, registry)
    return path


async def _exchange(path: str, request: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Send ``request``, read to EOF; (status line, headers, body)."""
    async with await trio.open_unix_socket(path) as s:
        await s.send_all(request)
        data = b""
        while chunk := await s.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    return status, headers, body


async def test_get_metrics_in_text_format(sock_dir, registry):
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, sock_dir, registry)
        for target in (b"/metrics", b"/"):
            status, headers, body = await _exchange(path, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == b"HTTP/1.1 200 OK"
            assert headers[b"content-type"].startswith(b"text/plain; version=0.0.4")
            assert int(headers[b"content-length"]) == len(body)
            assert b'zpcid_test_things_total{fid="0x1"} 3.0' in body.splitlines()
        # HTTP/1.0 clients are answered too (and the connection closes).
        status, _, body = await _exchange(path, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert status.endswith(b"200 OK") and b"zpcid_test_things_total" in body
        nursery.cancel_scope.cancel()


async def test_openmetrics_gzip_and_filter_come_from_prometheus_client(sock_dir, registry):
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, sock_dir, registry)
        status, headers, body = await _exchange(
            path, b"GET /metrics?name[]=zpcid_test_things_total HTTP/1.1\r\nHost: x\r\n"
                  b"Accept: application/openmetrics-text; version=1.0.0\r\nAccept-Encoding: gzip\r\n\r\n")
        assert status == b"HTTP/1.1 200 OK"
        assert headers[b"content-type"].startswith(b"application/openmetrics-text")
        assert headers[b"content-encoding"] == b"gzip"
        text = gzip.decompress(body)
        assert text.endswith(b"# EOF\n") and b'zpcid_test_things_total{fid="0x1"} 3.0' in text
        nursery.cancel_scope.cancel()


async def test_head_has_headers_only(sock_dir, registry):
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, sock_dir, registry)
        status, headers, body = await _exchange(path, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == b"HTTP/1.1 200 OK" and body == b"" and int(headers[b"content-length"]) > 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("request_, code", [
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", b"405"),
    (b"\x00\x01garbage\r\n\r\n", b"400"),
    # one byte over the limit (all of it read when the limit trips, so no reset loses the answer)
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".ljust(metrics.MAX_REQUEST + 1, b"a"), b"431"),
])
async def test_bad_requests_get_an_error_status_and_the_listener_keeps_serving(sock_dir, registry, request_, code):
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, sock_dir, registry)
        status, _, _ = await _exchange(path, request_)
        assert status.split()[1] == code
        status, _, _ = await _exchange(path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == b"HTTP/1.1 200 OK"
        nursery.cancel_scope.cancel()


async def test_silent_client_is_dropped_after_the_timeout_and_does_not_block_others(
        sock_dir, registry, autojump_clock):
    async with trio.open_nursery() as nursery:
        path = await _serve(nursery, sock_dir, registry)
        async with await trio.open_unix_socket(path) as stalled:
            await stalled.send_all(b"GET /metr")  # then nothing
            # Another scraper is served while the first one stalls.
            status, _, _ = await _exchange(path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == b"HTTP/1.1 200 OK"
            start = trio.current_time()
            assert await stalled.receive_some(100) == b""  # hung up on, without an answer
            waited = trio.current_time() - start
            assert metrics.REQUEST_TIMEOUT - 0.1 <= waited <= metrics.REQUEST_TIMEOUT + 0.1
        nursery.cancel_scope.cancel()
