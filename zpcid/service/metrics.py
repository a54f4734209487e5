"""Prometheus metrics read from the function counters at scrape time.

Names carry the ``zpcid_`` prefix and base units; per-function series are
labelled by ``fid`` only (errors additionally by ``kind``).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Iterable

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from zpcid import log

# FunctionCounters field -> (metric name without _total, help)
COUNTERS = {
    "rpcit_calls": ("zpcid_rpcit_calls", "RPCIT (refresh PCI translations) requests handled"),
    "shadow_fills": ("zpcid_shadow_fills", "Shadow IOTLB misses filled from the guest's tables"),
    "pages_mapped": ("zpcid_pages_mapped", "IOMMU pages mapped in the shadow IOTLB"),
    "pages_unmapped": ("zpcid_pages_unmapped", "IOMMU pages unmapped from the shadow IOTLB"),
    "dma_bytes_read": ("zpcid_dma_read_bytes", "Bytes the device read from guest memory by DMA"),
    "dma_bytes_written": ("zpcid_dma_written_bytes", "Bytes the device wrote to guest memory by DMA"),
    "interrupts": ("zpcid_interrupts", "Interrupts signalled to the VMM"),
    "attaches": ("zpcid_attaches", "VMM clients that attached to the function"),
    "vfio_dma_maps": ("zpcid_vfio_dma_maps", "DMA_MAP requests that added a client DMA mapping"),
    "vfio_dma_unmaps": ("zpcid_vfio_dma_unmaps", "Client DMA mappings removed by DMA_UNMAP"),
}


def fid_label(fid: int) -> str:
    return f"{fid:#x}"


def sample(function, attached: bool) -> dict:
    """What a worker reports for its function at scrape time (JSON-serialisable)."""
    zpci = {}
    try:
        zpci = function.describe().get("zpci", {})
    except Exception:  # a scrape must not fail because one function misbehaves
        log.get("zpcid.service.metrics").exception("describe_failed")
    c = function.counters
    return {"attached": attached,
            "counters": {field: getattr(c, field, 0) for field in COUNTERS},
            "errors": {str(kind): n for kind, n in c.errors.items()},
            "shadow_mappings": zpci.get("shadow_mappings", 0) or 0,
            "dma_limit_remaining": zpci.get("dma_limit_remaining"),
            "resident_bytes": _resident_bytes()}


def _resident_bytes() -> int:
    """This process's resident set (a worker's own memory, for its function's series)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def valid_sample(s) -> bool:
    """A worker's sample has the shape :func:`sample` gives (workers are not trusted blindly)."""
    def count(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    try:
        return (isinstance(s["attached"], bool) and count(s["shadow_mappings"])
                and (s["dma_limit_remaining"] is None or count(s["dma_limit_remaining"]))
                and count(s["resident_bytes"])
                and all(k in COUNTERS and count(v) for k, v in s["counters"].items())
                and all(isinstance(k, str) and count(v) for k, v in s["errors"].items()))
    except (KeyError, TypeError, AttributeError):
        return False


class FunctionCollector:
    """Custom collector: ``entries()`` yields (fid, sample, restarts) at scrape time,
    ``sample`` as made by :func:`sample` in the function's worker (None: not known yet)."""

    def __init__(self, entries: Callable[[], Iterable[tuple[int, dict | None, int]]]):
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
        restarts = CounterMetricFamily("zpcid_worker_restarts",
                                       "Times the function's worker process died and was restarted",
                                       labels=["fid"])
        resident = GaugeMetricFamily("zpcid_worker_resident_memory_bytes",
                                     "Resident memory of the function's worker process", labels=["fid"])
        for fid, s, n_restarts in rows:
            label = fid_label(fid)
            restarts.add_metric([label], n_restarts)
            if s is None:
                continue
            attached.add_metric([label], 1 if s["attached"] else 0)
            shadow.add_metric([label], s["shadow_mappings"])
            resident.add_metric([label], s["resident_bytes"])
            if s.get("dma_limit_remaining") is not None:
                remaining.add_metric([label], s["dma_limit_remaining"])
            for field, family in counters.items():
                family.add_metric([label], s["counters"].get(field, 0))
            for kind, n in sorted(s["errors"].items()):
                errors.add_metric([label, kind], n)
        yield attached
        yield shadow
        yield remaining
        yield from counters.values()
        yield errors
        yield restarts
        yield resident


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
PATHS = ("/", "/metrics")


async def serve_http(listener: trio.socket.SocketType, registry: CollectorRegistry,
                     refresh=None) -> None:
    """Serve ``GET /metrics`` on ``listener`` in the event loop (the stock server
    runs a thread, which would read the counters while trio changes them);
    ``await refresh()`` (if given) brings the workers' samples up to date first.

    h11 parses HTTP; prometheus_client's WSGI app does the exposition (content
    negotiation, OpenMetrics, gzip, ``name[]`` filters).
    """
    app = make_wsgi_app(registry)
    await trio.serve_listeners(functools.partial(_answer, app=app, refresh=refresh),
                               [trio.SocketListener(listener)])


async def _answer(stream: trio.SocketStream, app, refresh=None) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                request = await _request(stream, conn)
            except h11.RemoteProtocolError as exc:
                status, headers, body = exc.error_status_hint, [("Content-Type", "text/plain")], b"bad request\n"
                request = None
            except (OSError, trio.BrokenResourceError):
                return
            if request is None and conn.their_state is not h11.ERROR:
                return  # the client hung up before a whole request
            if request is not None:
                if refresh is not None and request.target.partition(b"?")[0].decode("latin-1") in PATHS:
                    await refresh()
                status, headers, body = _respond(app, request)
            headers = [*headers, ("Content-Length", str(len(body))), ("Connection", "close")]
            reason = _REASONS.get(status, b"")
            try:
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers, reason=reason)))
                if request is not None and request.method != b"HEAD":
                    await stream.send_all(conn.send(h11.Data(data=body)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            except (OSError, trio.BrokenResourceError, h11.LocalProtocolError):
                pass


async def _request(stream: trio.SocketStream, conn: h11.Connection) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed
            return None


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large"}


def _respond(app, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
    path, _, query = request.target.decode("latin-1").partition("?")
    if path not in PATHS:
        return 404, [("Content-Type", "text/plain")], b"try /metrics\n"
    environ = {"REQUEST_METHOD": "GET" if request.method == b"HEAD" else request.method.decode("latin-1"),
               "PATH_INFO": path, "QUERY_STRING": query}
    for name, value in request.headers:
        environ["HTTP_" + name.decode("latin-1").upper().replace("-", "_")] = value.decode("latin-1")
    started: list = []
    body = b"".join(app(environ, lambda status, headers: started.extend((status, headers))))
    status, headers = started
    return int(status.split()[0]), list(headers), body
