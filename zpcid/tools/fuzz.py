"""Fuzzing zpcid as a hostile VMM and a hostile guest would (docs/reliability.md).

Three campaigns, each against real functions served on real Unix sockets in
this process (so a crash, a hang or a leak is seen directly):

* ``messages``: stateful vfio-user message mutation.  A client negotiates, then
  sends a stream built from well-formed messages of every command (DMA_MAP with
  memfds, SET_IRQS with eventfds and with things that are not eventfds, region
  accesses to BARs, config space and the zPCI region's mailbox, resets...) of
  which a share is mutated (bit flips, truncation, lying sizes, wrong fd counts,
  random commands).  Replies are drained concurrently, DMA_READ/WRITE requests
  of the device answered.  When the daemon drops the client, a new one comes.
* ``tables``: hostile guest translation-table trees through the mailbox.  Each
  tree is a random set of mappings plus corrupted entries (garbage, aliases,
  pointers outside guest memory, protection bits) under a random IOTA; the
  guest registers it and issues RPCITs over random ranges, then DMA through it.
* ``virtqueues``: a virtio-blk function whose rings get random descriptors
  (loops, indirect tables, addresses outside memory, lengths up to 4 GiB) and
  random avail indexes, with notifications; reset and re-initialised after.

After every campaign slice: the function answers a fresh VMM, the shadow IOMMU
is consistent, and at the end descriptors and mappings are back to baseline.

``python -m zpcid.tools.fuzz --minutes N`` runs until the time is up (or the
counts given are reached) and prints the counts as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import struct
import sys
import tempfile
import time
from typing import Any

import trio

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.vfio_user.header import HEADER, HEADER_SIZE, Command, Flags
from protocol.zpci import formats as Z
from protocol.zpci import tables as T
from zpcid import log
from zpcid.devices.dma_engine import DmaEngine
from zpcid.devices.memory import REG_MAGIC, MAGIC, MemoryFunction
from zpcid.devices.virtio_blk import VirtioBlkFunction
from zpcid.vfio_user.memfd import Memfd
from zpcid.vfio_user.server import FunctionServer
from zpcid.vfio_user.transport import SocketTransport, close_fds
from zpcid.vmm import client as vclient
from zpcid.vmm.model import attach
from zpcid.vmm.virtio_driver import GuestMemory, open_blk
from protocol.zpci import region as Zr
from zpcid.zpci.properties import ZpciProperties

ANSWER_TIMEOUT = 30.0  # generous: a function that misses it is frozen
SDMA = 0x1_0000_0000
MAX_LEAKED_FDS = 0  # any descriptor still open at the end is a leak


class FuzzFailure(AssertionError):
    """An invariant broke: the message says which, with the seed to replay it."""


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def _describe(fds) -> list[str]:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd}={os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(str(fd))
    return out


# ------------------------------------------------------------------ serving
@contextlib.asynccontextmanager
async def served(function, directory: str, name: str):
    path = os.path.join(directory, name + ".sock")
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(FunctionServer(function, path).serve)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    finally:
        function.close()


async def answers(path: str, region: int = 0, offset: int = 0) -> None:
    """A fresh VMM attaches and reads config space (and a register): the function is alive."""
    with trio.fail_after(ANSWER_TIMEOUT):
        # The previous (hostile) client may still be detaching: the hand-over
        # window answers EBUSY; retry until attached.
        while True:
            try:
                async with vclient.connect(path) as c:
                    vendor = await c.region_read(C.VFIO_PCI_CONFIG_REGION_INDEX, 0, 2)
                    if vendor == b"\xff\xff":
                        raise FuzzFailure("config space reads as all ones")
                    return
            except (vclient.VfioUserError, ConnectionError, OSError):
                await trio.sleep(0.05)


# ------------------------------------------------------------------ messages
class MessageFuzzer:
    """Builds (payload, fds) message streams for one function; a share mutated."""

    def __init__(self, rng: random.Random, nregions: int = 10):
        self.rng = rng
        self.nregions = nregions
        self.ids = 0
        self.mem = Memfd(1 << 20, "zpcid-fuzz-guest")
        self.unsealed = os.memfd_create("zpcid-fuzz-unsealed", os.MFD_CLOEXEC)
        os.ftruncate(self.unsealed, 1 << 20)
        self.mutated = 0

    def close(self) -> None:
        self.mem.close()
        os.close(self.unsealed)

    def _header(self, cmd: int, payload: bytes, flags: int = 0) -> bytes:
        self.ids = (self.ids + 1) & 0xFFFF
        return HEADER.pack(self.ids, cmd, HEADER_SIZE + len(payload), flags, 0) + payload

    def version(self) -> bytes:
        caps = M.Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 20)
        return self._header(Command.VERSION, M.Version(0, 0, caps).pack())

    def _fds(self, kind: str) -> list[int]:
        r = self.rng
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_CLOEXEC | r.choice([0, os.EFD_NONBLOCK]))
            if r.random() < 0.3:
                os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # saturated: a write would block
            return [fd]
        if kind == "pipe":
            a, b = os.pipe()
            os.close(a)
            return [b]
        if kind == "sealed":
            return [os.dup(self.mem.fd)]
        if kind == "unsealed":
            return [os.dup(self.unsealed)]
        return []

    def one(self) -> tuple[bytes, list[int]]:
        """One message: well-formed most of the time, then maybe mutated."""
        r = self.rng
        cmd = r.choice([Command.DMA_MAP, Command.DMA_UNMAP, Command.DEVICE_GET_INFO,
                        Command.DEVICE_GET_REGION_INFO, Command.DEVICE_GET_IRQ_INFO,
                        Command.DEVICE_SET_IRQS, Command.REGION_READ, Command.REGION_WRITE,
                        Command.REGION_READ, Command.REGION_WRITE, Command.DEVICE_RESET,
                        Command.REGION_WRITE_MULTI, Command.DEVICE_GET_REGION_IO_FDS,
                        Command.DEVICE_FEATURE, Command.VERSION, Command.DMA_READ])
        fds: list[int] = []
        page = 4096
        if cmd == Command.DMA_MAP:
            kind = r.choice(["sealed", "sealed", "unsealed", "none", "pipe"])
            fds = self._fds(kind)
            addr = r.choice([0, SDMA, r.randrange(0, 1 << 20) * page, (1 << 64) - page])
            size = r.choice([page, 1 << 16, 1 << 20, 2 << 20, r.randrange(1, 1 << 21)])
            payload = M.DmaMap(32, r.choice([1, 2, 3, 0, 7]), r.choice([0, page, 1 << 19, 1 << 21]),
                               addr, size).pack()
        elif cmd == Command.DMA_UNMAP:
            payload = M.DmaUnmap(24, r.choice([0, 0, 2]), r.choice([0, SDMA, r.randrange(0, 1 << 30)]),
                                 r.choice([page, 1 << 20, 1 << 40])).pack()
        elif cmd == Command.DEVICE_GET_INFO:
            payload = M.DeviceInfo(16).pack()
        elif cmd == Command.DEVICE_GET_REGION_INFO:
            payload = M.RegionInfo(argsz=r.choice([32, 64, 256, 8]), index=r.randrange(0, 12)).pack_request()
        elif cmd == Command.DEVICE_GET_IRQ_INFO:
            payload = M.IrqInfo(16, 0, r.randrange(0, 7)).pack()
        elif cmd == Command.DEVICE_SET_IRQS:
            index = r.randrange(0, 6)
            count = r.choice([0, 1, 1, 2, 4])
            action = r.choice([C.VFIO_IRQ_SET_ACTION_TRIGGER, C.VFIO_IRQ_SET_ACTION_MASK,
                               C.VFIO_IRQ_SET_ACTION_UNMASK])
            dtype = r.choice([C.VFIO_IRQ_SET_DATA_EVENTFD, C.VFIO_IRQ_SET_DATA_NONE, C.VFIO_IRQ_SET_DATA_BOOL])
            data = b""
            if dtype == C.VFIO_IRQ_SET_DATA_EVENTFD:
                for _ in range(count):
                    fds += self._fds(r.choice(["eventfd", "eventfd", "pipe"]))
            elif dtype == C.VFIO_IRQ_SET_DATA_BOOL:
                data = bytes(r.randrange(2) for _ in range(count))
            payload = M.IrqSet(20 + len(data), dtype | action, index, r.randrange(0, 3), count, data).pack()
        elif cmd in (Command.REGION_READ, Command.REGION_WRITE):
            region = r.choice([0, 2, 4, 7, 7, 9, 9, r.randrange(0, 12)])
            offset = r.choice([0, 4, 0x10, 0x24, 0x1000 + Zr.MB_DOORBELL, 0x1000, r.randrange(0, 1 << 14)])
            count = r.choice([1, 2, 4, 8, 4, r.randrange(0, 300)])
            if region == 9 and offset == 0x1000 + Zr.MB_DOORBELL:
                count = 4
            data = b""
            if cmd == Command.REGION_WRITE:
                data = r.randbytes(count) if r.random() < 0.5 else struct.pack("<I", r.randrange(0, 9))[:count].ljust(count, b"\0")
            payload = M.RegionAccess(offset, region, count, data).pack()
        elif cmd == Command.REGION_WRITE_MULTI:
            payload = r.randbytes(r.randrange(0, 64))
        elif cmd == Command.DEVICE_GET_REGION_IO_FDS:
            payload = M.RegionIoFds(16, 0, r.randrange(0, 12), 0).pack()
        elif cmd == Command.VERSION:
            payload = M.Version(0, 0).pack()
        elif cmd == Command.DMA_READ:
            payload = M.DmaAccess(0, 8).pack()
        else:
            payload = r.randbytes(r.randrange(0, 32))
        msg = self._header(cmd, payload, Flags.NO_REPLY if r.random() < 0.05 else 0)
        if r.random() < 0.25:
            msg, fds = self.mutate(msg, fds)
        return msg, fds

    def mutate(self, msg: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        r = self.rng
        self.mutated += 1
        b = bytearray(msg)
        how = r.randrange(7)
        if how == 0:  # bit flips anywhere
            for _ in range(r.randrange(1, 4)):
                i = r.randrange(len(b))
                b[i] ^= 1 << r.randrange(8)
        elif how == 1:  # the header lies about the size (framing stays consistent)
            body = b[HEADER_SIZE:]
            cut = r.randrange(0, len(body) + 1)
            b = b[:HEADER_SIZE] + body[:cut]
            struct.pack_into("<I", b, 4, len(b))
        elif how == 2:  # payload extended with garbage
            b += r.randbytes(r.randrange(1, 64))
            struct.pack_into("<I", b, 4, len(b))
        elif how == 3:  # another command's payload
            struct.pack_into("<H", b, 2, r.randrange(0, 24))
        elif how == 4:  # flags: reply, error, unknown bits
            struct.pack_into("<I", b, 8, r.choice([1, 2, 0x10, 0x20, 0xFFFF_FFFF]))
        elif how == 5:  # surplus descriptors
            fds = fds + self._fds(r.choice(["eventfd", "sealed", "pipe"]))
        else:  # a size field in the payload set to an extreme
            if len(b) >= HEADER_SIZE + 8:
                off = HEADER_SIZE + r.randrange(0, (len(b) - HEADER_SIZE) // 4) * 4
                struct.pack_into("<I", b, off, r.choice([0, 0xFFFF_FFFF, 1 << 31, 7]))
        return bytes(b), fds


async def _drain(transport: SocketTransport, client_mem: bytearray, stats: dict) -> None:
    """Read replies; answer the device's DMA_READ/WRITE like a VMM (from ``client_mem``)."""
    buf = b""
    while True:
        data, fds = await transport.recv()
        close_fds(fds)
        if not data:
            return
        buf += data
        while len(buf) >= HEADER_SIZE:
            msg_id, cmd, size, flags, err = HEADER.unpack_from(buf)
            if size < HEADER_SIZE or len(buf) < size:
                break
            body, buf = buf[HEADER_SIZE:size], buf[size:]
            stats["replies"] += 1
            if flags & Flags.TYPE_MASK == Flags.COMMAND and cmd in (Command.DMA_READ, Command.DMA_WRITE):
                try:
                    acc = M.DmaAccess.unpack(body, with_data=cmd == Command.DMA_WRITE)
                    addr = acc.addr % len(client_mem)
                    out = body[:16] + bytes(client_mem[addr : addr + acc.count]).ljust(acc.count, b"\0") \
                        if cmd == Command.DMA_READ else body[:16]
                    transport.send_nowait(HEADER.pack(msg_id, cmd, HEADER_SIZE + len(out), Flags.REPLY, 0) + out)
                except Exception:  # noqa: BLE001 - the fuzzer's own VMM side may be sloppy
                    pass


async def fuzz_messages(path: str, rng: random.Random, count: int, stats: dict) -> None:
    """Send ``count`` messages to ``path`` over as many connections as the daemon needs."""
    fz = MessageFuzzer(rng)
    client_mem = bytearray(1 << 16)
    try:
        sent = 0
        while sent < count:
            with trio.fail_after(ANSWER_TIMEOUT):
                while True:
                    try:
                        transport = await SocketTransport.connect(path)
                        break
                    except OSError:
                        await trio.sleep(0.01)
            stats["connections"] += 1
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain, transport, client_mem, stats)
                    # A hostile first message carries its descriptors too; they
                    # are ours to close like every other message's.
                    first, first_fds = (fz.version(), []) if rng.random() < 0.97 else fz.one()
                    try:
                        if not transport.send_nowait(first, first_fds):
                            with trio.fail_after(ANSWER_TIMEOUT):
                                await transport.flush()
                    finally:
                        close_fds(first_fds)
                    per_conn = rng.choice([50, 500, 5000])
                    for _ in range(per_conn):
                        msg, fds = fz.one()
                        try:
                            with trio.fail_after(ANSWER_TIMEOUT):
                                if not transport.send_nowait(msg, fds):
                                    await transport.flush()
                        except (OSError, trio.BrokenResourceError):
                            close_fds(fds)
                            break
                        close_fds(fds)
                        sent += 1
                        stats["messages"] += 1
                        if sent % 64 == 0:
                            await trio.sleep(0)
                        if sent >= count:
                            break
                    # Let the daemon answer what it has, then hang up.
                    await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()
            finally:
                await transport.aclose()
        stats["mutated"] += fz.mutated
    finally:
        fz.close()


# ------------------------------------------------------------------ tables
def _hostile_tree(vmm, rng: random.Random) -> int:
    """Random mappings plus planted garbage in a fresh table area; returns the IOTA."""
    base = rng.choice([40, 44, 48]) << 20
    t = vmm.tables(base, 4 << 20)
    mem_size = len(vmm.mem.mm)
    for _ in range(rng.randrange(1, 12)):
        iova = SDMA + rng.choice([0, rng.randrange(0, 64) << 20, rng.randrange(0, 1 << 16) << 12])
        n = rng.randrange(1, 300)
        gpa = rng.randrange(0, 32 << 20) & ~0xFFF
        try:
            if rng.random() < 0.1:
                t.unmap(iova, n)
            elif rng.random() < 0.05:
                t.map_1m_frame(iova & ~0xFFFFF, gpa & ~0xFFFFF, writable=rng.random() < 0.5)
            else:
                t.map(iova, gpa, n, writable=rng.random() < 0.7)
        except (MemoryError, ValueError):
            break
    # Garbage in the tables themselves: aliases, junk, out-of-memory pointers.
    for _ in range(rng.randrange(0, 24)):
        addr = rng.randrange(base, base + (4 << 20), 8)
        kind = rng.randrange(5)
        if kind == 0:
            value = rng.getrandbits(64)
        elif kind == 1:
            value = t.root | (rng.getrandbits(12) & 0xFFF)  # points back at the root
        elif kind == 2:
            value = rng.choice([mem_size, 1 << 40, (1 << 64) - 4096]) | 0x0C
        elif kind == 3:
            value = t.read_u64(rng.randrange(base, base + (4 << 20), 8)) ^ (1 << rng.randrange(64))
        else:
            value = T.ZPCI_TABLE_INVALID
        t.write_u64(addr, value)
    iota = t.iota
    if rng.random() < 0.1:
        iota ^= 1 << rng.randrange(0, 12)  # wrong designation type / flags
    return iota


async def fuzz_tables(path: str, fn, rng: random.Random, trees: int, stats: dict) -> None:
    async with attach(path, guest_memory=64 << 20) as vmm:
        for i in range(trees):
            iota = _hostile_tree(vmm, rng)
            pal = SDMA + rng.choice([(1 << 20) - 1, (64 << 20) - 1, (64 << 20) - 1, (32 << 20) - 1, 1 << 40])
            r = await vmm.register_translation(SDMA, pal, iota)
            if r.cc == 0 and r.exception == 0:
                for _ in range(rng.randrange(1, 4)):
                    start = SDMA + rng.choice([0, rng.randrange(0, 64 << 20), rng.randrange(0, 1 << 32)])
                    length = rng.choice([4096, 1 << 20, 64 << 20, rng.randrange(0, 1 << 33)])
                    res = await vmm.box.rpcit(start, length)
                    if res.result != 0 or res.cc not in (0, 1, 2, 3):
                        raise FuzzFailure(f"RPCIT answered result {res.result} cc {res.cc}")
                    stats["rpcits"] += 1
                fn.zpci.shadow.check()
                await vmm.deregister_translation()
            stats["trees"] += 1
            if fn.zpci.state == Zr.State.ERROR or i % 50 == 49:
                # Leave the error state the way a guest does: disable and re-enable.
                await vmm.box.set_pci_fn(vmm.box.fh, 1)
                await vmm.enable_function()
            if i % 64 == 0:
                await trio.sleep(0)


# ------------------------------------------------------------------ virtqueues
async def fuzz_virtqueues(path: str, rng: random.Random, rounds: int, stats: dict) -> None:
    from zpcid.vmm.virtio_driver import DriverError

    async with vclient.connect(path) as c:
        mem = GuestMemory(8 << 20)
        try:
            async with open_blk(c, mem, num_queues=1) as drv:
                q = drv.queues[0]
                for i in range(rounds):
                    for _ in range(rng.randrange(1, 8)):
                        d = rng.randrange(0, q.size)
                        addr = rng.choice([mem.base + rng.randrange(0, 8 << 20), 0, rng.getrandbits(64),
                                           q.desc, q.avail, q.used])
                        length = rng.choice([16, 512, 4096, 0, 0xFFFF_FFFF, rng.getrandbits(32)])
                        flags = rng.getrandbits(3)
                        q.write_desc(d, addr, length, flags, rng.randrange(0, q.size + 4))
                    for _ in range(rng.randrange(1, 4)):
                        mem.put16(q.avail + 4 + 2 * rng.randrange(0, q.size), rng.randrange(0, q.size + 8))
                    mem.put16(q.avail + 2, (mem.u16(q.avail + 2) + rng.choice([1, 2, 7, 300, 0x8000])) & 0xFFFF)
                    await q.notify()
                    stats["virtq_rounds"] += 1
                    if i % 16 == 15:
                        with trio.fail_after(ANSWER_TIMEOUT):
                            await drv.status()  # the device still answers its driver
                        with contextlib.suppress(DriverError, vclient.VfioUserError):
                            await drv.reinit()
                            q = drv.queues[0]
                        stats["virtq_resets"] += 1
                    await trio.sleep(0)
        finally:
            mem.close()


# ------------------------------------------------------------------ campaign
def _new_stats() -> dict[str, int]:
    return dict(messages=0, mutated=0, replies=0, connections=0, trees=0, rpcits=0,
                virtq_rounds=0, virtq_resets=0, slices=0)


async def campaign(*, seed: int, messages: int, trees: int, virtq_rounds: int,
                   deadline: float | None = None, slice_messages: int = 20_000,
                   slice_trees: int = 500, slice_virtq: int = 200) -> dict[str, Any]:
    """Run until the counts are reached (or ``deadline``, a time.monotonic() value)."""
    rng = random.Random(seed)
    stats = _new_stats()
    props = ZpciProperties(fid=0x10, uid=0x1234)
    fds_before = open_fds()
    with tempfile.TemporaryDirectory(prefix="zpcid-fuzz-") as directory:
        disk = os.path.join(directory, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(4 << 20)
        mem_fn = MemoryFunction("fz-mem", zpci=props)
        dma_fn = DmaEngine("fz-dma", zpci=ZpciProperties(fid=0x11, uid=0x1235))
        blk_fn = VirtioBlkFunction("fz-blk", path=disk, size="4M", zpci=ZpciProperties(fid=0x12, uid=0x1236))
        async with served(mem_fn, directory, "mem") as s_mem, \
                served(dma_fn, directory, "dma") as s_dma, \
                served(blk_fn, directory, "blk") as s_blk:
            def more() -> bool:
                if deadline is not None:
                    return time.monotonic() < deadline
                return (stats["messages"] < messages or stats["trees"] < trees
                        or stats["virtq_rounds"] < virtq_rounds)

            while more():
                stats["slices"] += 1
                if stats["messages"] < messages or deadline is not None:
                    for server in (s_mem, s_dma):
                        n = slice_messages if deadline is not None else min(slice_messages, messages - stats["messages"])
                        await fuzz_messages(server.path, rng, max(n // 2, 1), stats)
                        await answers(server.path)
                if stats["trees"] < trees or deadline is not None:
                    n = slice_trees if deadline is not None else min(slice_trees, trees - stats["trees"])
                    await fuzz_tables(s_dma.path, dma_fn, rng, n, stats)
                    await answers(s_dma.path)
                if stats["virtq_rounds"] < virtq_rounds or deadline is not None:
                    n = slice_virtq if deadline is not None else min(slice_virtq, virtq_rounds - stats["virtq_rounds"])
                    await fuzz_virtqueues(s_blk.path, rng, max(n, 1), stats)
                    await answers(s_blk.path)
            # Every session is over: the functions are back to no client, no maps.
            for server in (s_mem, s_dma, s_blk):
                with trio.fail_after(ANSWER_TIMEOUT):
                    while server.attached:
                        await trio.sleep(0.01)
                if len(server.function.dma):
                    raise FuzzFailure(f"{server.function.name}: DMA maps left after the last client")
    # Mappings still viewed by a finished task go with the last reference.
    gc.collect()
    leaked = open_fds() - fds_before
    stats["leaked_fds"] = len(leaked)
    stats["leaked"] = _describe(leaked)
    if len(leaked) > MAX_LEAKED_FDS:
        counts = {k: v for k, v in stats.items() if k != "leaked"}
        raise FuzzFailure(f"descriptors leaked after {counts}: {_describe(leaked)}")
    stats["seed"] = seed
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zpcid.tools.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=None, help="run this long (default: until the counts)")
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--trees", type=int, default=1_000)
    p.add_argument("--virtq", type=int, default=500, help="virtqueue rounds")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    log.configure(fmt="json", level="critical")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    t0 = time.monotonic()
    try:
        # With a time limit, small slices so the run ends close to it.
        slices = dict(slice_messages=4_000, slice_trees=50, slice_virtq=20) if deadline else {}
        stats = trio.run(lambda: campaign(seed=seed, messages=args.messages, trees=args.trees,
                                          virtq_rounds=args.virtq, deadline=deadline, **slices))
    except FuzzFailure as exc:
        print(json.dumps({"seed": seed, "failure": str(exc)}), file=sys.stderr)
        return 1
    stats["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
