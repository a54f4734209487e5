"""Prometheus metrics read from the function counters at scrape time.

Names carry the ``zpcid_`` prefix and base units; per-function series are
labelled by ``fid`` only (errors additionally by ``kind``).
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from zpcid import log

# FunctionCounters field -> (metric name without _total, help)
COUNTERS = {
    "rpcit_calls": ("zpcid_rpcit_calls", "RPCIT (refresh PCI translations) requests handled"),
    "pages_mapped": ("zpcid_pages_mapped", "IOMMU pages mapped in the shadow IOTLB"),
    "pages_unmapped": ("zpcid_pages_unmapped", "IOMMU pages unmapped from the shadow IOTLB"),
    "dma_bytes_read": ("zpcid_dma_read_bytes", "Bytes the device read from guest memory by DMA"),
    "dma_bytes_written": ("zpcid_dma_written_bytes", "Bytes the device wrote to guest memory by DMA"),
    "interrupts": ("zpcid_interrupts", "Interrupts signalled to the VMM"),
    "attaches": ("zpcid_attaches", "VMM clients that attached to the function"),
}


def fid_label(fid: int) -> str:
    return f"{fid:#x}"


class FunctionCollector:
    """Custom collector: ``entries()`` yields (fid, function, attached) at scrape time."""

    def __init__(self, entries: Callable[[], Iterable[tuple[int, object, bool]]]):
        self.entries = entries
        self.started = time.time()

    def collect(self):
        rows = list(self.entries())
        yield GaugeMetricFamily("zpcid_functions", "Functions the daemon serves", value=len(rows))
        yield GaugeMetricFamily("zpcid_start_time_seconds", "Daemon start time (Unix epoch)",
                                value=self.started)
        attached = GaugeMetricFamily("zpcid_attached_clients", "VMM clients attached (0 or 1)",
                                     labels=["fid"])
        shadow = GaugeMetricFamily("zpcid_shadow_mappings", "Entries in the shadow IOTLB",
                                   labels=["fid"])
        remaining = GaugeMetricFamily("zpcid_dma_limit_remaining",
                                      "DMA mappings left before the DMA limit", labels=["fid"])
        counters = {f: CounterMetricFamily(name, help_, labels=["fid"])
                    for f, (name, help_) in COUNTERS.items()}
        errors = CounterMetricFamily("zpcid_errors", "Errors by kind", labels=["fid", "kind"])
        for fid, function, is_attached in rows:
            label = fid_label(fid)
            attached.add_metric([label], 1 if is_attached else 0)
            try:
                info = function.describe()
            except Exception:  # a scrape must not fail because one function misbehaves
                log.get("zpcid.service.metrics").exception("describe_failed", fid=label)
                info = {}
            zpci = info.get("zpci", {})
            shadow.add_metric([label], zpci.get("shadow_mappings", 0) or 0)
            if zpci.get("dma_limit_remaining") is not None:
                remaining.add_metric([label], zpci["dma_limit_remaining"])
            c = function.counters
            for field, family in counters.items():
                family.add_metric([label], getattr(c, field, 0))
            for kind, n in sorted(c.errors.items()):
                errors.add_metric([label, str(kind)], n)
        yield attached
        yield shadow
        yield remaining
        yield from counters.values()
        yield errors


def make_registry(entries) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FunctionCollector(entries))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


# ---------------------------------------------------------------------- listener
MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0


async def serve_http(listener: trio.socket.SocketType, registry: CollectorRegistry) -> None:
    """A minimal HTTP/1.0 responder for ``GET /metrics`` (no threads, unlike the stock server)."""
    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(_answer, conn, registry)


async def _answer(conn: trio.socket.SocketType, registry: CollectorRegistry) -> None:
    with conn:
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
                try:
                    chunk = await conn.recv(4096)
                except OSError:
                    return
                if not chunk:
                    break
                data += chunk
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) < 2:
            status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
        elif parts[0] not in (b"GET", b"HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
        elif parts[1].split(b"?")[0] not in (b"/", b"/metrics"):
            status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
        else:
            status, body, ctype = "200 OK", generate_latest(registry), CONTENT_TYPE_LATEST
        head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        if parts and parts[0] == b"HEAD":
            body = b""
        try:
            await _send_all(conn, head + body)
        except OSError:
            pass


async def _send_all(conn, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await conn.send(view)
        view = view[n:]
