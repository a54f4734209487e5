"""`zpcid bench`: hot-path figures, each next to a baseline measured in the same run.

The daemon under test runs in its own process (as it does in production); the
client side is the reference client acting as the VMM.  Baselines are raw
AF_UNIX socketpair traffic between two processes and numpy memcpy.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import trio

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.vfio_user.header import Command
from zpcid.vmm import client as vclient
from zpcid import log
from zpcid.zpci import core as Zr
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm.model import attach

SDMA = 0x1_0000_0000
PAGE = 4096
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


# ---------------------------------------------------------------- reporting
class Report:
    def __init__(self, quiet: bool):
        self.rows: list[dict[str, Any]] = []
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def progress(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            sys.stderr.write(f"\r\033[K{text}")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def add(self, group: str, name: str, value: float, unit: str, *, baseline: float | None = None,
            baseline_name: str = "", higher_is_better: bool = True, samples: list[float] | None = None,
            target: str = "") -> None:
        ratio = None
        if baseline:
            ratio = value / baseline if higher_is_better else baseline / value
        self.rows.append(dict(group=group, name=name, value=value, unit=unit, baseline=baseline,
                              baseline_name=baseline_name, ratio=ratio,
                              higher_is_better=higher_is_better, samples=samples or [value],
                              target=target))

    def table(self) -> str:
        def fmt(v: float | None) -> str:
            if v is None:
                return "-"
            if v >= 1e6:
                return f"{v / 1e6:.2f}M"
            if v >= 1e4:
                return f"{v / 1e3:.1f}k"
            if v >= 100:
                return f"{v:.0f}"
            return f"{v:.3g}"

        head = ("figure", "median", "unit", "baseline", "baseline is", "ratio", "target")
        lines = [head]
        for r in self.rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append((f"{r['group']}: {r['name']}", fmt(r["value"]), r["unit"], fmt(r["baseline"]),
                          r["baseline_name"], ratio, r["target"]))
        widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
        out = []
        for i, l in enumerate(lines):
            out.append("  ".join(str(c).ljust(w) if j in (0, 2, 4, 6) else str(c).rjust(w)
                                 for j, (c, w) in enumerate(zip(l, widths))).rstrip())
            if i == 0:
                out.append("  ".join("-" * w for w in widths))
        out.append("ratio: figure/baseline for rates, baseline/figure for times (1.00 = as fast as the baseline)")
        return "\n".join(out)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------- raw baselines (no trio)
def _child_loop(sock: socket.socket, fn) -> None:
    try:
        fn(sock)
    finally:
        os._exit(0)


def raw_roundtrip(n: int, req_size: int = 36, rep_size: int = 32, batches: int = 20) -> list[float]:
    """Per-round-trip time (s) of blocking ping-pong between two processes on a socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()

        def serve(s):
            while True:
                got = 0
                while got < req_size:
                    chunk = s.recv(req_size - got)
                    if not chunk:
                        return
                    got += len(chunk)
                s.sendall(b"r" * rep_size)
        _child_loop(b, serve)
    b.close()
    req = b"q" * req_size
    per = []
    try:
        for _ in range(batches):
            t = time.perf_counter()
            for _ in range(n // batches):
                a.sendall(req)
                got = 0
                while got < rep_size:
                    got += len(a.recv(rep_size - got))
            per.append((time.perf_counter() - t) / (n // batches))
    finally:
        a.close()
        os.waitpid(pid, 0)
    return per


def raw_burst_with_fds(n: int, msg_size: int = 48) -> float:
    """Messages/s: pipelined messages each carrying one fd, reader closes the fds, one final reply."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mem = os.memfd_create("bench", os.MFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        a.close()

        def serve(s):
            anc = socket.CMSG_SPACE(4 * 4)
            buf = b""
            count = 0
            while count < n:
                data, ancdata, _, _ = s.recvmsg(msg_size, anc)
                if not data:
                    return
                for lvl, typ, raw in ancdata:
                    for fd in array.array("i", raw[: len(raw) - len(raw) % 4]):
                        os.close(fd)
                buf += data
                while len(buf) >= msg_size:
                    buf = buf[msg_size:]
                    count += 1
            s.sendall(b"done")
        _child_loop(b, serve)
    b.close()
    msg = b"m" * msg_size
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mem]))]
    t = time.perf_counter()
    for _ in range(n):
        a.sendmsg([msg], fds)
    a.recv(4)
    dt = time.perf_counter() - t
    a.close()
    os.close(mem)
    os.waitpid(pid, 0)
    return n / dt


def memcpy_rate(size: int, reps: int = 5) -> list[float]:
    """Bytes/s of numpy copyto between two halves of one memfd mapping (page-cache backed)."""
    with Memfd(2 * size, "bench-memcpy") as m:
        buf = np.frombuffer(m.mm, dtype=np.uint8)
        src, dst = buf[:size], buf[size:]
        src[:] = 1
        np.copyto(dst, src)  # fault the pages in, like the guest memory in the DMA runs
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            np.copyto(dst, src)
            out.append(size / (time.perf_counter() - t))
        del buf, src, dst
    return out


# ---------------------------------------------------------------- server process
def serve_main(directory: str) -> None:
    """Entry of the daemon process under test: one dma-engine function per socket."""
    from zpcid.zpci.properties import ZpciProperties
    from zpcid.vfio_user.server import FunctionServer

    log.configure(fmt="json", level="error")

    async def main() -> None:
        fn = D.DmaEngine("bench0", zpci=ZpciProperties(fid=1, uid=1, dma_limit=1 << 21))
        async with trio.open_nursery() as nursery:
            await nursery.start(FunctionServer(fn, os.path.join(directory, "fn.sock")).serve)
            print("READY", flush=True)
            await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- measurements
async def timed(coro_fn, n: int, batches: int = 10) -> list[float]:
    per = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(max(1, n // batches)):
            await coro_fn()
        per.append((time.perf_counter() - t) / max(1, n // batches))
    return per


async def bench_intercepts(path: str, rep: Report, raw_rtt: float, quick: bool) -> None:
    n = 500 if quick else 4000
    async with attach(path, guest_memory=64 * MiB) as vmm:
        c, box = vmm.client, vmm.box
        rep.progress("intercept round trips")
        w = await timed(lambda: c.region_write(0, D.REG_PATTERN, b"\0" * 4), n)
        rep.add("round trip", "REGION_WRITE to a register", median(w) * 1e6, "us", baseline=raw_rtt * 1e6,
                baseline_name="raw socketpair RTT", higher_is_better=False, samples=[x * 1e6 for x in w])
        gt = vmm.tables(32 * MiB, 16 * MiB)
        await vmm.register_translation(SDMA, SDMA + 16 * MiB - 1, gt.iota)
        gt.map(SDMA, MiB, 1)
        r = await timed(lambda: box.rpcit(SDMA, PAGE), n)
        rep.add("round trip", "one-page RPCIT via mailbox", median(r) * 1e6, "us", baseline=raw_rtt * 1e6,
                baseline_name="raw socketpair RTT", higher_is_better=False,
                samples=[x * 1e6 for x in r], target="<= 1.5x raw")
        rd = await timed(lambda: c.region_read(0, D.REG_STATUS, 4), n)
        rep.add("messages", "REGION_READ (sequential)", 1 / median(rd), "msg/s", baseline=1 / raw_rtt,
                baseline_name="raw socketpair RTT")
        # posted writes: QEMU posts memory-BAR writes (NO_REPLY) and relies on ordering
        k = 2000 if quick else 20000
        t = time.perf_counter()
        for _ in range(k):
            await c.region_write(0, D.REG_PATTERN, b"\0" * 4, via_mmap=False, posted=True)
        await c.region_read(0, D.REG_STATUS, 4)
        rate = k / (time.perf_counter() - t)
        rep.add("messages", "REGION_WRITE posted (pipelined)", rate, "msg/s", baseline=1 / raw_rtt,
                baseline_name="raw socketpair RTT")


async def bench_mapping_paths(path: str, rep: Report, quick: bool) -> float:
    """Stock QEMU on s390x: one DMA_MAP round trip per page; zpcid: one RPCIT per range."""
    pages = 256
    async with attach(path, guest_memory=64 * MiB, mode=Zr.MODE_VMM) as vmm:
        c = vmm.client
        rep.progress("stock path: DMA_MAP per page")
        samples = []
        for _ in range(3 if quick else 10):
            t = time.perf_counter()
            for i in range(pages):
                await c.dma_map(SDMA + i * PAGE, PAGE, vmm.mem.fd, 0x100_0000 + i * PAGE)
            samples.append((time.perf_counter() - t) / pages)
            await c.dma_unmap(SDMA, pages * PAGE)
        stock = median(samples)
        # pipelined bursts, as QEMU sends at boot
        rep.progress("DMA_MAP/UNMAP bursts")
        burst = 500 if quick else 4000
        t = time.perf_counter()
        waiters = [await c.dma_map_nowait(SDMA + i * PAGE, PAGE, vmm.mem.fd, 0x100_0000 + (i % 1024) * PAGE)
                   for i in range(burst)]
        for w in waiters:
            await c.wait_reply(w)
        map_rate = burst / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(burst):
            await c.dma_unmap(SDMA + i * PAGE, PAGE)
        unmap_rate = burst / (time.perf_counter() - t)
    rep.add("DMA_MAP", "pipelined burst with fd (same memfd)", map_rate, "maps/s",
            baseline=raw_burst_with_fds_cached, baseline_name="raw msgs+fd burst")
    rep.add("DMA_MAP", "DMA_UNMAP sequential", unmap_rate, "unmaps/s", baseline=1 / raw_rtt_cached,
            baseline_name="raw socketpair RTT")
    async with attach(path, guest_memory=64 * MiB) as vmm:
        gt = vmm.tables(32 * MiB, 16 * MiB)
        await vmm.register_translation(SDMA, SDMA + 16 * MiB - 1, gt.iota)
        gt.map(SDMA, 0x100_0000, pages)
        samples = []
        for _ in range(3 if quick else 10):
            await vmm.deregister_translation()
            await vmm.register_translation(SDMA, SDMA + 16 * MiB - 1, gt.iota)
            t = time.perf_counter()
            r = await vmm.box.rpcit(SDMA, pages * PAGE)
            samples.append((time.perf_counter() - t) / pages)
            assert r.cc == 0
    rep.add("map 1 MiB", "zpcid-translates: one RPCIT (per page)", median(samples) * 1e6, "us/page",
            baseline=stock * 1e6, baseline_name="stock path: DMA_MAP/page", higher_is_better=False)
    return 1 / stock


async def bench_rpcit(path: str, rep: Report, stock_rate: float, quick: bool) -> None:
    sizes = [MiB, 64 * MiB] + ([] if quick else [GiB, 4 * GiB])
    top = max(sizes)
    tables = 64 * MiB
    async with attach(path, guest_memory=top + tables, bars=False) as vmm:
        gt = vmm.tables(top, tables)
        rep.progress(f"building guest tables for {top >> 20} MiB")
        gt.map(SDMA, PAGE, top // PAGE - 1)  # frame 0 would be a zero PTE
        for size in sizes:
            samples = []
            for _ in range(3):
                await vmm.deregister_translation()
                await vmm.register_translation(SDMA, SDMA + top - 1, gt.iota)
                rep.progress(f"RPCIT {size >> 20} MiB")
                t = time.perf_counter()
                r = await vmm.box.rpcit(SDMA, size - PAGE if size == top else size)
                dt = time.perf_counter() - t
                if r.cc != 0:
                    raise RuntimeError(f"RPCIT {size >> 20} MiB: cc {r.cc} status {r.status}")
                samples.append((size // PAGE) / dt)
            rep.add("RPCIT", f"shadow {size >> 20} MiB" if size < GiB else f"shadow {size >> 30} GiB",
                    median(samples), "pages/s", baseline=stock_rate, baseline_name="stock DMA_MAP/page",
                    samples=samples, target=">= 5M pages/s")


async def bench_direct_map(path: str, rep: Report, raw_rtt: float, quick: bool) -> None:
    for size in ([GiB, 64 * GiB] if quick else [GiB, 64 * GiB, TiB]):
        rep.progress(f"direct map {size >> 30} GiB")
        async with attach(path, guest_memory=size, bars=False) as vmm:
            samples = []
            for _ in range(5):
                t = time.perf_counter()
                r = await vmm.register_translation(SDMA, SDMA + size - 1, 0)
                samples.append(time.perf_counter() - t)
                assert r.cc == 0 and vmm.box.u32(Zr.HDR_IOAT) & 2
                await vmm.deregister_translation()
        label = f"{size >> 30} GiB" if size < TiB else f"{size >> 40} TiB"
        rep.add("direct map", f"enable for {label} guest", median(samples) * 1e6, "us",
                baseline=raw_rtt * 1e6, baseline_name="raw socketpair RTT", higher_is_better=False,
                samples=[x * 1e6 for x in samples], target="< 1 ms")


async def _copy(vmm, src: int, dst: int, n: int) -> None:
    st = await Driver(vmm.client, irq_fd=vmm.msix_fds[0], vector=0).run(D.OP_COPY, src, dst, n)
    if not st & D.STATUS_DONE or st & D.STATUS_ERROR:
        raise RuntimeError(f"dma-engine copy failed: status {st:#x}")


async def bench_dma(path: str, rep: Report, quick: bool) -> None:
    sizes = [MiB, 16 * MiB] if quick else [MiB, 4 * MiB, 16 * MiB, 64 * MiB]
    top = max(sizes)
    guest = 2 * top + 64 * MiB
    base = {s: median(memcpy_rate(s)) for s in sizes}
    async with attach(path, guest_memory=guest, bars=False) as vmm:
        src, dst = 16 * MiB, 16 * MiB + top
        vmm.mem.mm[src : src + top] = os.urandom(1024) * (top // 1024)
        vmm.mem.mm[dst : dst + top] = bytes(top)
        gt = vmm.tables(guest - 32 * MiB, 32 * MiB)
        await vmm.register_translation(SDMA, SDMA + guest - 1, gt.iota)
        gt.map(SDMA + src, src, 2 * top // PAGE)
        r = await vmm.box.rpcit(SDMA + src, 2 * top)
        assert r.cc == 0
        for kind in ("shadow", "direct"):
            if kind == "direct":
                await vmm.deregister_translation()
                await vmm.register_translation(SDMA, SDMA + guest - 1, 0)
            for size in sizes:
                rep.progress(f"DMA copy {size >> 20} MiB through the {kind}")
                samples = []
                for _ in range(5):
                    t = time.perf_counter()
                    await _copy(vmm, SDMA + src, SDMA + dst, size)
                    samples.append(size / (time.perf_counter() - t))
                if vmm.mem.mm[dst : dst + 64] != vmm.mem.mm[src : src + 64]:
                    raise RuntimeError("DMA copy produced wrong data")
                rep.add("DMA copy", f"{size >> 20} MiB via {kind}", median(samples) / 1e9, "GB/s",
                        baseline=base[size] / 1e9, baseline_name="numpy memcpy", samples=[x / 1e9 for x in samples],
                        target=">= 70% of memcpy" if kind == "direct" else ">= 40% of memcpy")


def bench_shadow_memory(rep: Report) -> None:
    from zpcid.vmm.guest import GuestTables, dma_space
    from zpcid.zpci.iommu import ShadowIotlb, rpcit

    with Memfd(1 * GiB + 64 * MiB) as mem:
        space = dma_space(mem)
        gt = GuestTables(mem, GiB, 64 * MiB)
        n = 65536
        gt.map(SDMA, PAGE, n)
        sh = ShadowIotlb(1 << 21)
        r = rpcit(sh, space, gt.iota, SDMA, SDMA + GiB - 1, SDMA, n * PAGE)
        assert r.error is None
        rep.add("shadow IOTLB", f"memory per mapping ({n} dense)", sh.nbytes / sh.mapped, "bytes",
                higher_is_better=False)
        space.close()


async def run_async(path: str, rep: Report, quick: bool, raw_rtt: float) -> None:
    await bench_intercepts(path, rep, raw_rtt, quick)
    stock_rate = await bench_mapping_paths(path, rep, quick)
    await bench_rpcit(path, rep, stock_rate, quick)
    await bench_direct_map(path, rep, raw_rtt, quick)
    await bench_dma(path, rep, quick)
    try:
        from zpcid.tools.virtio_bench import run_virtio_bench
    except ImportError:
        return
    rep.progress("virtio-blk (reference client as the driver, tmpfs file)")
    res = await run_virtio_bench(size=(32 if quick else 256) * MiB, duration=0.3 if quick else 2.0)
    b, v = res["baseline"], res["virtio"]
    rep.add("virtio-blk", "4 KiB random read", v["randread_4k_iops"], "IOPS",
            baseline=b["randread_4k_iops"], baseline_name="os.pread, same file")
    rep.add("virtio-blk", "1 MiB sequential read", v["seqread_1m_mib_s"], "MiB/s",
            baseline=b["seqread_1m_mib_s"], baseline_name="os.pread, same file")
    if "seqwrite_1m_mib_s" in v:
        rep.add("virtio-blk", "1 MiB sequential write", v["seqwrite_1m_mib_s"], "MiB/s")


raw_rtt_cached = 0.0
raw_burst_with_fds_cached = 0.0


def run(quick: bool = False, as_json: bool = False, quiet: bool = False) -> int:
    global raw_rtt_cached, raw_burst_with_fds_cached
    rep = Report(quiet)
    rep.progress("baseline: raw socketpair round trips")
    rtt = raw_roundtrip(2000 if quick else 20000)
    raw_rtt_cached = median(rtt)
    rep.progress("baseline: raw message bursts with fds")
    raw_burst_with_fds_cached = raw_burst_with_fds(2000 if quick else 20000)
    rep.add("baseline", "raw socketpair round trip (2 processes)", raw_rtt_cached * 1e6, "us",
            higher_is_better=False, samples=[x * 1e6 for x in rtt])
    bench_shadow_memory(rep)
    with tempfile.TemporaryDirectory(prefix="zpcid-bench-") as d:
        proc = subprocess.Popen([sys.executable, "-m", "zpcid.tools.bench", "--serve", d],
                                stdout=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError("benchmark daemon did not start")
            trio.run(run_async, os.path.join(d, "fn.sock"), rep, quick, raw_rtt_cached)
        finally:
            proc.terminate()
            proc.wait(10)
    from zpcid.tools import bench_isolation  # the whole daemon: supervisor, zygote, workers

    bench_isolation.run(rep, quick)
    rep.progress("")
    if not quiet and rep.tty:
        sys.stderr.write("\r\033[K")
    if as_json:
        print(json.dumps({"version": 1, "quick": quick, "python": sys.version.split()[0],
                          "rows": rep.rows}, indent=2))
    else:
        print(rep.table())
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="zpcid bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_main(args.serve)
        return 0
    log.configure(fmt="json", level="error")
    return run(args.quick, args.json, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
