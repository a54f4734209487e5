"""`zpcid bench`: hot-path figures, each interleaved with its baseline in the same run.

The daemon under test is ``zpcid serve`` in its own processes (supervisor and
per-function workers), with two dma-engine functions: one driven the way
zpcid-translates VMMs do, one the way stock QEMU does (a DMA_MAP per page).

Every figure is measured in batches alternating with its baseline's batches
(A B A B ...), so machine noise hits both alike; each row shows the median,
min, max and spread of its batches, and ``--json`` keeps every sample.  Round
trips use a minimal blocking client (``zpcid.tools.floor``), so they measure
the server; server CPU per message comes from the daemon's own CPU time, next
to minimal Python responders.  ``--compare OLD.json`` prints the change per
figure against an earlier ``--json`` run.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import attrs
import numpy as np
import trio

from protocol.vfio_user import messages as M
from zpcid import log
from zpcid.devices import dma_engine as D
from zpcid.tools import bench_isolation
from zpcid.tools import floor as F
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.vmm.model import attach
from protocol.zpci import region as Zr

SDMA = 0x1_0000_0000
PAGE = 4096
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
CONFIG_REGION = 7
JSON_VERSION = 2


# ---------------------------------------------------------------- rows
@attrs.define
class Row:
    group: str
    name: str
    unit: str
    samples: list[float]
    baseline_samples: list[float] | None = None
    baseline_name: str = ""
    higher_is_better: bool = False
    target: str = ""

    @property
    def key(self) -> str:
        return f"{self.group}: {self.name}"

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.baseline_samples) if self.baseline_samples else None

    @property
    def ratio(self) -> float | None:
        """Cost relative to the baseline: 1.0 = as fast, 2.0 = twice the time (or half the rate)."""
        b = self.baseline
        if not b:
            return None
        return b / self.value if self.higher_is_better else self.value / b

    @property
    def spread(self) -> float:
        """(max - min) / median of the batches, in percent."""
        return (max(self.samples) - min(self.samples)) / self.value * 100 if self.value else 0.0

    def as_json(self) -> dict[str, Any]:
        return dict(group=self.group, name=self.name, unit=self.unit, value=self.value,
                    min=min(self.samples), max=max(self.samples), spread_pct=self.spread,
                    samples=self.samples, baseline=self.baseline, baseline_name=self.baseline_name,
                    baseline_samples=self.baseline_samples, ratio=self.ratio,
                    higher_is_better=self.higher_is_better, target=self.target)


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


def render(head: tuple[str, ...], lines: list[tuple[str, ...]], left: tuple[int, ...]) -> str:
    lines = [head] + lines
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if j in left else str(c).rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths))).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class Report:
    def __init__(self, quiet: bool):
        self.rows: list[Row] = []
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def progress(self, text: str) -> None:
        if self.quiet:
            return
        sys.stderr.write(f"\r\033[K{text}" if self.tty else text + "\n")
        sys.stderr.flush()

    def add(self, row: Row | str, name: str = "", value: float = 0.0, unit: str = "", *,
            baseline: float | None = None, baseline_name: str = "", higher_is_better: bool = True,
            samples: list[float] | None = None, target: str = "") -> None:
        """A ``Row``, or (group, name, value, unit, ...) for a figure given by its median."""
        if not isinstance(row, Row):
            row = Row(row, name, unit, samples or [value], [baseline] if baseline else None,
                      baseline_name, higher_is_better, target)
        self.rows.append(row)

    def table(self) -> str:
        lines = []
        for r in self.rows:
            lines.append((r.key, fmt(r.value), fmt(min(r.samples)), fmt(max(r.samples)),
                          f"{r.spread:.0f}%", r.unit, fmt(r.baseline), r.baseline_name,
                          "-" if r.ratio is None else f"{r.ratio:.3g}x", r.target))
        head = ("figure", "median", "min", "max", "spread", "unit", "baseline", "baseline is", "cost", "target")
        return (render(head, lines, (0, 5, 7, 9))
                + "\ncost: the figure relative to its baseline (1.00x = as fast; 2.00x = twice the time"
                  " or half the rate);\nbaseline batches alternate with the figure's (A B A B ...);"
                  " spread = (max - min) / median over the batches")

    def json(self, quick: bool) -> dict[str, Any]:
        return {"version": JSON_VERSION, "quick": quick, "python": sys.version.split()[0],
                "rows": [r.as_json() for r in self.rows]}


def compare(old_doc: dict[str, Any], rep: Report) -> str:
    """The change of every figure against an earlier --json run."""
    old = {f"{r['group']}: {r['name']}": r for r in old_doc.get("rows", [])}
    lines = []
    for r in rep.rows:
        o = old.get(r.key)
        if o is None or not o.get("value"):
            lines.append((r.key, "-", fmt(r.value), r.unit, "new", "", "-", "" if r.ratio is None else f"{r.ratio:.2f}x"))
            continue
        change = (r.value - o["value"]) / o["value"] * 100
        better = (change > 0) == r.higher_is_better
        verdict = "same" if abs(change) < 5 else ("better" if better else "WORSE")
        lines.append((r.key, fmt(o["value"]), fmt(r.value), r.unit, f"{change:+.1f}%", verdict,
                       "-" if o.get("ratio") is None else f"{o['ratio']:.2f}x",
                       "-" if r.ratio is None else f"{r.ratio:.2f}x"))
    head = ("figure", "old", "new", "unit", "change", "", "old cost", "new cost")
    return render(head, lines, (0, 3, 5)) + "\n(within 5%: same; costs are against each run's own baseline)"


# ---------------------------------------------------------------- interleaving
def interleave(rounds: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Run the measures in turn (A B A B ...) for ``rounds`` rounds; one sample list each."""
    out: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for i, m in enumerate(measures):
            out[i].append(m())
    return out


async def ainterleave(rounds: int, *measures) -> list[list[float]]:
    """``interleave`` for measures that may be coroutine functions."""
    out: list[list[float]] = [[] for _ in measures]
    for _ in range(rounds):
        for i, m in enumerate(measures):
            v = m()
            out[i].append(await v if hasattr(v, "__await__") else v)
    return out


# ---------------------------------------------------------------- the daemon under test
class Daemon(bench_isolation.Daemon):
    """``zpcid serve`` with three dma-engine functions: one for zpcid-translates
    sessions with the refresh bit set (RPCIT walks the tables: the RPCIT, mapping
    and DMA figures), one for stock-QEMU (a DMA_MAP per page) sessions, and one
    with the default properties (lazy translation: RPCIT only invalidates)."""

    def __init__(self, base: str):
        # The refresh bit on (as before compat level 3) for the first two: RPCIT walks
        # the tables, which is what the RPCIT and shadow figures measure; the third
        # keeps the defaults (lazy translation).
        fns = [{"type": "dma-engine", "fid": fid, "uid": fid, "name": f"f{fid:x}", "dma-limit": 0x200000}
               for fid in (1, 2, 3)]
        fns[0]["tlb-refresh"] = fns[1]["tlb-refresh"] = True
        super().__init__(base, fns)
        self.pid = self.proc.pid
        self.translating, self.stock, self.lazy = self.socket(1), self.socket(2), self.socket(3)

    def cpu(self) -> float:
        """CPU seconds of the whole daemon: supervisor, zygote and workers."""
        return F.cpu_seconds(self.pid)


class OtherDaemon:
    """``zpcid serve`` from another source tree (``--against``), one dma-engine function.

    The message-path rounds attach a translating session to it (REGION_READ,
    REGION_WRITE, one-page RPCIT); a tree whose zPCI region this VMM toolkit
    cannot drive gets REGION_READ from a bare blocking client only.
    """

    def __init__(self, src: str, base: str):
        self.dir = os.path.join(base, "against")
        os.makedirs(self.dir)
        cfg = os.path.join(self.dir, "zpcid.toml")
        with open(cfg, "w") as f:
            f.write(f'[daemon]\nruntime-dir = "{self.dir}"\nlog-level = "error"\nlog-format = "json"\n\n'
                    '[[function]]\nname = "old"\ntype = "dma-engine"\nfid = 1\nuid = 1\n')
            # A tree with lazy translation: keep its RPCIT walking, like ours.
            props = os.path.join(src, "zpcid", "zpci", "properties.py")
            if os.path.exists(props):
                with open(props) as p:
                    if "tlb_refresh" in p.read():
                        f.write("tlb-refresh = true\n")
        self.log = open(os.path.join(self.dir, "zpcid.log"), "wb")
        env = dict(os.environ, PYTHONPATH=os.path.abspath(src))
        # The command line moved from zpcid.service.cli to zpcid.cli at some point.
        entry = "zpcid.cli" if os.path.exists(os.path.join(src, "zpcid", "cli.py")) else "zpcid.service.cli"
        self.proc = subprocess.Popen([sys.executable, "-m", entry, "serve", "--config", cfg],
                                     cwd=os.path.abspath(src), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        self.path = os.path.join(self.dir, "old.sock")
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the daemon from {src} did not start (see {self.log.name})")
            time.sleep(0.05)
        time.sleep(0.5)  # its workers, if any, come up after the socket

    def cpu(self) -> float:
        return F.cpu_seconds(self.pid)

    close = bench_isolation.Daemon.close  # same process, same stop


@contextlib.contextmanager
def blocking(sock: socket.socket) -> Iterator[F.BlockingPeer]:
    """Borrow a trio-driven connection for blocking calls (no trio task may read it meanwhile)."""
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    peer = F.BlockingPeer(dup)  # the file status flags are shared: the socket blocks now
    try:
        yield peer
    finally:
        dup.setblocking(False)
        dup.close()


def batch(peer: F.BlockingPeer, cmd: int, payload: bytes, n: int, cpu: Callable[[], float]):
    """(seconds per round trip, server CPU seconds per message) over ``n`` calls."""
    c0 = cpu()
    rtt = F.round_trips(peer, cmd, payload, n)
    return rtt, (cpu() - c0) / n


# ---------------------------------------------------------------- raw baselines
def raw_burst(n: int, msg_size: int = 48, with_fd: bool = True) -> float:
    """Messages/s: ``n`` pipelined messages (each with one fd) into a reader process, one final reply."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mem = os.memfd_create("bench", os.MFD_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            anc, buf, count = socket.CMSG_SPACE(4 * 4), b"", 0
            while count < n:
                data, ancdata, _, _ = b.recvmsg(msg_size, anc)
                if not data:
                    break
                for _, _, raw in ancdata:
                    for fd in array.array("i", raw[: len(raw) - len(raw) % 4]):
                        os.close(fd)
                buf += data
                while len(buf) >= msg_size:
                    buf, count = buf[msg_size:], count + 1
            b.sendall(b"done")
        finally:
            os._exit(0)
    b.close()
    msg = b"m" * msg_size
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mem]))] if with_fd else []
    t = time.perf_counter()
    for _ in range(n):
        a.sendmsg([msg], anc)
    a.recv(4)
    dt = time.perf_counter() - t
    a.close()
    os.close(mem)
    os.waitpid(pid, 0)
    return n / dt


def memcpy_rate(src, dst) -> float:
    """GB/s of one numpy copy between two page-cache-backed mappings."""
    t = time.perf_counter()
    np.copyto(dst, src)
    return src.nbytes / (time.perf_counter() - t) / 1e9


# ---------------------------------------------------------------- the message path
async def bench_message_path(daemon: Daemon, echo: F.Responder, floors: dict[str, F.Responder],
                             rep: Report, quick: bool, other: OtherDaemon | None = None) -> None:
    n, rounds = (300, 6) if quick else (2000, 12)
    cfg_read = F.region_read(CONFIG_REGION, 0, 4)
    reg_write = F.region_write(0, D.REG_PATTERN, bytes(4))

    async def one_page_rpcit(vmm) -> bytes:
        """A translating session with 1 MiB mapped; the REGION_WRITE that runs a one-page RPCIT."""
        gt = vmm.tables(32 * MiB, 16 * MiB)
        await vmm.register_translation(SDMA, SDMA + 16 * MiB - 1, gt.iota)
        gt.map(SDMA, MiB, 1)
        box = vmm.box
        at, db = box.prepare(Zr.CMD_RPCIT, box.fh << 32, SDMA, PAGE)
        return F.region_write(box.index, at, db)

    async with contextlib.AsyncExitStack() as stack:
        vmm = await stack.enter_async_context(attach(daemon.translating, guest_memory=64 * MiB))
        stock = await stack.enter_async_context(attach(daemon.stock, guest_memory=64 * MiB, mode=Zr.MODE_VMM))
        lazy = await stack.enter_async_context(attach(daemon.lazy, guest_memory=64 * MiB))
        box = vmm.box
        rpcit = await one_page_rpcit(vmm)
        rpcit_lazy = await one_page_rpcit(lazy)
        other_vmm = other_rpcit = None
        if other is not None:
            # The same session on the --against daemon, so all three figures compare
            # like for like (a daemon too old for this toolkit gets REGION_READ only).
            try:
                other_vmm = await stack.enter_async_context(attach(other.path, guest_memory=64 * MiB))
                other_rpcit = await one_page_rpcit(other_vmm)
            except Exception as exc:  # noqa: BLE001 -- whatever an old daemon does: REGION_READ only
                rep.progress(f"--against daemon: no translating session ({exc!r}); REGION_READ only")
                other_rpcit = None
        rep.progress("message path: blocking client against zpcid, the responders and a raw echo")
        with blocking(vmm.client.transport.raw) as zp, blocking(stock.client.transport.raw) as sp, \
                blocking(lazy.client.transport.raw) as lp, contextlib.ExitStack() as borrowed:
            peers = {}
            for kind, r in [("echo", echo)] + list(floors.items()):
                peers[kind] = F.BlockingPeer.connect(r.path)
                peers[kind].negotiate()
            fd = stock.mem.fd

            def stock_maps() -> tuple[float, float]:
                k = max(16, n // 8)
                c0, t = daemon.cpu(), time.perf_counter()
                for i in range(k):
                    sp.call(F.DMA_MAP, M.DmaMap(32, 3, 0x100_0000 + i * PAGE, SDMA + i * PAGE, PAGE).pack(),
                            (fd,))
                dt, dc = time.perf_counter() - t, daemon.cpu() - c0
                sp.call(F.DMA_UNMAP, M.DmaUnmap(24, 0, SDMA, k * PAGE).pack())
                return dt / k, dc / k

            def responder(kind: str):
                return lambda: batch(peers[kind], F.REGION_READ, cfg_read, n,
                                     lambda: F.cpu_seconds((floors.get(kind) or echo).pid))

            measures = {
                "trio": responder("trio"),
                "blocking": responder("blocking"),
                "read": lambda: batch(zp, F.REGION_READ, cfg_read, n, daemon.cpu),
                "write": lambda: batch(zp, F.REGION_WRITE, reg_write, n, daemon.cpu),
                "rpcit": lambda: batch(zp, F.REGION_WRITE, rpcit, n, daemon.cpu),
                "rpcit_lazy": lambda: batch(lp, F.REGION_WRITE, rpcit_lazy, n, daemon.cpu),
                "map": stock_maps,
            }
            if other is not None:
                if other_vmm is not None:  # attached (one client at a time): borrow that session
                    op = borrowed.enter_context(blocking(other_vmm.client.transport.raw))
                    if other_rpcit is not None:
                        measures["other_write"] = lambda: batch(op, F.REGION_WRITE, reg_write, n, other.cpu)
                        measures["other_rpcit"] = lambda: batch(op, F.REGION_WRITE, other_rpcit, n, other.cpu)
                else:
                    op = peers["other"] = F.BlockingPeer.connect(other.path)
                    op.negotiate()
                measures["other"] = lambda: batch(op, F.REGION_READ, cfg_read, n, other.cpu)
            echo_batch = responder("echo")
            for m in [echo_batch, *measures.values()]:
                m()  # warm-up: connections, caches, first-use paths
            # Each figure's batch right after a batch of its baseline (A B A B ...):
            # the raw echo for round trips, the trio responder for server CPU.
            got: dict[str, list] = {k: [] for k in measures}
            echoes: dict[str, list] = {k: [] for k in measures}
            trio_cpu: dict[str, list] = {k: [] for k in measures}
            for _ in range(rounds):
                for k, m in measures.items():
                    echoes[k].append(echo_batch())
                    if k not in floors:
                        trio_cpu[k].append(measures["trio"]()[1])
                    got[k].append(m())
            for p in peers.values():
                p.close()
        assert box.result().cc == 0 and lazy.box.result().cc == 0, "RPCIT failed in the benchmark"
        if other_rpcit is not None:
            assert other_vmm.box.result().cc == 0, "RPCIT failed on the --against daemon"

    def us(samples: list, which: int) -> list[float]:
        return [s[which] * 1e6 for s in samples]

    def rtt_row(kind: str, name: str, target: str = "") -> Row:
        return Row("message path", name, "us", us(got[kind], 0), us(echoes[kind], 0), "raw AF_UNIX echo",
                   target=target)

    def cpu_row(kind: str, name: str, target: str = "") -> Row:
        return Row("server CPU", name, "us/msg", us(got[kind], 1), [s * 1e6 for s in trio_cpu[kind]],
                   "minimal trio responder", target=target)

    rep.add(rtt_row("read", "REGION_READ config space, round trip"))
    rep.add(rtt_row("write", "REGION_WRITE register, round trip"))
    rep.add(rtt_row("rpcit", "one-page RPCIT intercept, round trip", "<= 1.5x"))
    rep.add(rtt_row("rpcit_lazy", "one-page RPCIT, refresh bit off (invalidate), round trip"))
    rep.add(rtt_row("map", "stock s390x: DMA_MAP one page, round trip"))
    rep.add(rtt_row("trio", "minimal trio responder, REGION_READ round trip"))
    rep.add(rtt_row("blocking", "minimal blocking responder, REGION_READ round trip"))
    rep.add(cpu_row("read", "zpcid per REGION_READ", "<= 1.3x"))
    rep.add(cpu_row("write", "zpcid per REGION_WRITE to a register"))
    rep.add(cpu_row("rpcit", "zpcid per one-page RPCIT"))
    rep.add(cpu_row("rpcit_lazy", "zpcid per one-page RPCIT, refresh bit off (invalidate)"))
    rep.add(cpu_row("map", "zpcid per DMA_MAP (stock path)"))
    rep.add(Row("server CPU", "minimal blocking responder per REGION_READ", "us/msg", us(got["blocking"], 1),
                us(got["trio"], 1), "minimal trio responder"))
    if other is not None:
        # (ours, theirs, round-trip name, CPU name) as in zpcid's own rows above;
        # theirs measured in the same rounds, interleaved with ours.
        pairs = [("read", "other", "REGION_READ config space", "REGION_READ")]
        if "other_rpcit" in got:
            pairs += [("write", "other_write", "REGION_WRITE register", "REGION_WRITE to a register"),
                      ("rpcit", "other_rpcit", "one-page RPCIT intercept", "one-page RPCIT")]
        for _, theirs, rtt_name, _ in pairs:
            rep.add(rtt_row(theirs, f"--against daemon: {rtt_name}, round trip"))
        for _, theirs, _, cpu_name in pairs:
            rep.add(cpu_row(theirs, f"--against daemon per {cpu_name}"))
        for ours, theirs, _, cpu_name in pairs:
            rep.add(Row("server CPU", f"zpcid per {cpu_name} vs the --against daemon", "us/msg",
                        us(got[ours], 1), us(got[theirs], 1), "--against daemon"))


# ---------------------------------------------------------------- reference-client figures
async def bench_pipelined(daemon: Daemon, rep: Report, quick: bool) -> None:
    rounds = 3 if quick else 6
    k = 1000 if quick else 5000
    async with attach(daemon.stock, guest_memory=64 * MiB, mode=Zr.MODE_VMM) as vmm:
        c = vmm.client
        rep.progress("pipelined: posted REGION_WRITEs and DMA_MAP bursts")

        async def posted() -> float:
            t = time.perf_counter()
            for _ in range(k):
                await c.region_write(0, D.REG_PATTERN, bytes(4), via_mmap=False, posted=True)
            await c.region_read(0, D.REG_STATUS, 4, via_mmap=False)  # all served
            return k / (time.perf_counter() - t)

        async def burst() -> float:
            t = time.perf_counter()
            waiters = [await c.dma_map_nowait(SDMA + i * PAGE, PAGE, vmm.mem.fd, 0x100_0000 + (i % 1024) * PAGE)
                       for i in range(k)]
            for w in waiters:
                await c.wait_reply(w)
            rate = k / (time.perf_counter() - t)
            await c.dma_unmap(SDMA, k * PAGE)
            return rate

        p, raw, b, rawfd = await ainterleave(rounds, posted, lambda: raw_burst(k, 32, with_fd=False),
                                             burst, lambda: raw_burst(k, 48))
    rep.add(Row("pipelined", "REGION_WRITE posted (QEMU's BAR writes)", "msg/s", p, raw,
                "raw pipelined messages", higher_is_better=True))
    rep.add(Row("pipelined", "DMA_MAP burst with fd (boot)", "maps/s", b, rawfd,
                "raw pipelined messages + fd", higher_is_better=True))


async def bench_mapping(daemon: Daemon, rep: Report, quick: bool) -> None:
    """Stock QEMU on s390x: a DMA_MAP round trip per page; zpcid-translates: one RPCIT per range."""
    pages = 256
    reps = 3 if quick else 8
    sizes = [MiB, 64 * MiB] + ([] if quick else [GiB, 4 * GiB])
    top = max(sizes)
    tables = 64 * MiB
    async with attach(daemon.stock, guest_memory=64 * MiB, mode=Zr.MODE_VMM) as stock, \
            attach(daemon.translating, guest_memory=top + tables, bars=False) as vmm:
        sc = stock.client

        async def stock_per_page() -> float:
            t = time.perf_counter()
            for i in range(pages):
                await sc.dma_map(SDMA + i * PAGE, PAGE, stock.mem.fd, 0x100_0000 + i * PAGE)
            dt = (time.perf_counter() - t) / pages
            await sc.dma_unmap(SDMA, pages * PAGE)
            return dt

        gt = vmm.tables(top, tables)
        rep.progress(f"building guest tables for {top >> 20} MiB")
        gt.map(SDMA, PAGE, top // PAGE - 1)  # frame 0 would be a zero PTE

        def rpcit_rate(size: int):
            async def one() -> float:
                await vmm.deregister_translation()
                await vmm.register_translation(SDMA, SDMA + top - 1, gt.iota)
                t = time.perf_counter()
                r = await vmm.box.rpcit(SDMA, size - PAGE if size == top else size)
                dt = time.perf_counter() - t
                if r.cc != 0:
                    raise RuntimeError(f"RPCIT {size >> 20} MiB: cc {r.cc} status {r.status}")
                return (size // PAGE) / dt
            return one

        for size in sizes:
            label = f"{size >> 20} MiB" if size < GiB else f"{size >> 30} GiB"
            rep.progress(f"RPCIT {label}")
            base, rate = await ainterleave(reps, stock_per_page, rpcit_rate(size))
            stock_rate = [1 / s for s in base]
            if size == MiB:
                rep.add(Row("map 1 MiB", "zpcid-translates: one RPCIT, per page", "us/page",
                            [1e6 / r for r in rate], [s * 1e6 for s in base],
                            "stock path: DMA_MAP per page"))
            rep.add(Row("RPCIT", f"shadow {label}", "pages/s", rate, stock_rate, "stock DMA_MAP per page",
                        higher_is_better=True, target=">= 5M pages/s"))


async def bench_direct_map(daemon: Daemon, echo: F.Responder, rep: Report, quick: bool) -> None:
    peer = F.BlockingPeer.connect(echo.path)
    peer.negotiate()
    payload = F.region_read(CONFIG_REGION, 0, 4)
    try:
        for size in ([GiB, 64 * GiB] if quick else [GiB, 64 * GiB, TiB]):
            label = f"{size >> 30} GiB" if size < TiB else f"{size >> 40} TiB"
            rep.progress(f"direct map {label}")
            async with attach(daemon.translating, guest_memory=size, bars=False) as vmm:
                async def enable() -> float:
                    t = time.perf_counter()
                    r = await vmm.register_translation(SDMA, SDMA + size - 1, 0)
                    dt = time.perf_counter() - t
                    assert r.cc == 0 and vmm.box.u32(Zr.HDR_IOAT) & 2
                    await vmm.deregister_translation()
                    return dt * 1e6

                got, echo_us = await ainterleave(5, enable,
                                                 lambda: F.round_trips(peer, F.REGION_READ, payload, 50) * 1e6)
            rep.add(Row("direct map", f"enable for a {label} guest", "us", got, echo_us, "raw AF_UNIX echo",
                        target="< 1 ms"))
    finally:
        peer.close()


async def _copy(vmm, src: int, dst: int, n: int) -> None:
    st = await Driver(vmm.client, irq_fd=vmm.msix_fds[0], vector=0).run(D.OP_COPY, src, dst, n)
    if not st & D.STATUS_DONE or st & D.STATUS_ERROR:
        raise RuntimeError(f"dma-engine copy failed: status {st:#x}")


async def bench_dma(daemon: Daemon, rep: Report, quick: bool) -> None:
    sizes = [MiB, 16 * MiB] if quick else [MiB, 4 * MiB, 16 * MiB, 64 * MiB]
    top = max(sizes)
    guest = 2 * top + 64 * MiB
    with Memfd(2 * top, "bench-memcpy") as m:
        buf = np.frombuffer(m.mm, dtype=np.uint8)
        msrc, mdst = buf[:top], buf[top:]
        msrc[:] = 1
        np.copyto(mdst, msrc)  # fault the pages in, like the guest memory in the DMA runs
        async with attach(daemon.translating, guest_memory=guest, bars=False) as vmm:
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

                    async def copy(size=size) -> float:
                        t = time.perf_counter()
                        await _copy(vmm, SDMA + src, SDMA + dst, size)
                        return size / (time.perf_counter() - t) / 1e9

                    got, base = await ainterleave(5, copy, functools.partial(memcpy_rate, msrc[:size], mdst[:size]))
                    if vmm.mem.mm[dst : dst + 64] != vmm.mem.mm[src : src + 64]:
                        raise RuntimeError("DMA copy produced wrong data")
                    rep.add(Row("DMA copy", f"{size >> 20} MiB via {kind}", "GB/s", got, base, "numpy memcpy",
                                higher_is_better=True,
                                target="<= 1.43x (>= 70%)" if kind == "direct" else "<= 2.5x (>= 40%)"))
        del buf, msrc, mdst


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
        rep.add(Row("shadow IOTLB", f"memory per mapping ({n} dense)", "bytes", [sh.nbytes / sh.mapped]))
        space.close()


async def bench_virtio(rep: Report, quick: bool) -> None:
    try:
        from zpcid.tools.virtio_bench import run_randread_pairs
    except ImportError:
        return
    rep.progress("virtio-blk 4 KiB random reads (reference client as the driver) against a pread loop")
    res = await run_randread_pairs(runs=3 if quick else 5, duration=0.3 if quick else 1.5,
                                   size=(32 if quick else 64) * MiB)
    rep.add(Row("virtio-blk", "4 KiB random read, queue depth 16", "IOPS", res["virtio"], res["baseline"],
                "os.pread loop, same file", higher_is_better=True))


# ---------------------------------------------------------------- driver
SECTIONS = ("message", "pipelined", "mapping", "direct", "dma", "virtio", "isolation")


async def run_async(daemon: Daemon, echo: F.Responder, floors: dict[str, F.Responder], rep: Report,
                    quick: bool, sections: tuple[str, ...] = SECTIONS, other: OtherDaemon | None = None) -> None:
    if "message" in sections:
        await bench_message_path(daemon, echo, floors, rep, quick, other)
    if "pipelined" in sections:
        await bench_pipelined(daemon, rep, quick)
    if "mapping" in sections:
        await bench_mapping(daemon, rep, quick)
    if "direct" in sections:
        await bench_direct_map(daemon, echo, rep, quick)
    if "dma" in sections:
        await bench_dma(daemon, rep, quick)
    if "virtio" in sections:
        await bench_virtio(rep, quick)


def run(quick: bool = False, as_json: bool = False, quiet: bool = False, compare_with: str | None = None,
        sections: tuple[str, ...] = SECTIONS, against: str | None = None) -> int:
    old = None
    if compare_with:
        with open(compare_with) as f:
            old = json.load(f)
    rep = Report(quiet)
    if "mapping" in sections:
        bench_shadow_memory(rep)
    d = tempfile.mkdtemp(prefix="zpcid-bench-")
    started: list = []
    try:
        rep.progress("starting the daemon and the baseline responders")
        daemon = Daemon(d)
        started.append(daemon)
        echo = F.Responder("echo", d)
        started.append(echo)
        floors = {}
        for kind in ("blocking", "trio"):
            floors[kind] = F.Responder(kind, d)
            started.append(floors[kind])
        other = None
        if against:
            other = OtherDaemon(against, d)
            started.append(other)
        trio.run(run_async, daemon, echo, floors, rep, quick, sections, other)
        for s in reversed(started):
            s.close()
        started.clear()
        if "isolation" in sections:
            bench_isolation.run(rep, quick)  # its own daemons
    finally:
        for s in reversed(started):
            s.close()
        shutil.rmtree(d, ignore_errors=True)
    rep.progress("")
    if not quiet and rep.tty:
        sys.stderr.write("\r\033[K")
    if as_json:
        print(json.dumps(rep.json(quick), indent=1))
    else:
        print(rep.table())
    if old is not None:
        print(("\n" if not as_json else "") + compare(old, rep), file=sys.stderr if as_json else sys.stdout)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output, every sample kept")
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer batches (a smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument("--compare", metavar="OLD.json", help="print the change of each figure against an earlier --json run")
    p.add_argument("--against", metavar="SRC",
                   help="also measure the daemon of another source tree (e.g. a checkout of an older "
                        "commit) in the message-path rounds, interleaved")
    p.add_argument("--only", metavar="SECTION", action="append", choices=SECTIONS,
                   help=f"run only these sections (repeatable): {', '.join(SECTIONS)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="zpcid bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    log.configure(fmt="json", level="error")
    return run(args.quick, args.json, args.quiet, args.compare, tuple(args.only or SECTIONS), args.against)


if __name__ == "__main__":
    sys.exit(main())
