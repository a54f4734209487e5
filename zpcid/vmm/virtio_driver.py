"""A minimal virtio-pci (modern) + virtio-blk driver over the reference vfio-user client.

It does what Linux's virtio_pci_modern and virtio_blk do, in the same order:
walk config space for the virtio capabilities, reset, ACKNOWLEDGE|DRIVER,
negotiate features, FEATURES_OK, lay out split rings in guest memory, assign
MSI-X vectors (eventfds), DRIVER_OK, then submit requests and reap the used
ring when the queue's eventfd fires. Guest memory is a memfd DMA-mapped with
its fd, or a plain buffer served through DMA_READ/DMA_WRITE messages.
Used by the tests and by the benchmark.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import AsyncIterator

import attrs
import trio

from protocol.vfio_user import consts as C
from zpcid.vmm.client import Client, read_eventfd
from zpcid.vfio_user.memfd import SHARE_SEALS, Memfd
from zpcid.pci.config import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CAPABILITY_LIST, PCI_COMMAND
from zpcid.devices.virtio import pci as vp
from zpcid.devices.virtio.queue import (DESC_SIZE, USED_ELEM_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, fence)

CONFIG_REGION = C.VFIO_PCI_CONFIG_REGION_INDEX
PAGE = 4096

# virtio-blk request types / status (duplicated from the device on purpose: the
# driver is written against the specification, not against our implementation)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ, F_DISCARD, F_WRITE_ZEROES = 2, 5, 6, 9, 12, 13, 14


class DriverError(Exception):
    """The device did not behave as a virtio device must (or refused us)."""


@attrs.define
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int
    notify_multiplier: int = 0


class GuestMemory:
    """Guest RAM at ``base``: a memfd (shared by fd) or a bytearray (message-mode DMA)."""

    def __init__(self, size: int, base: int = 0x4000_0000, *, shared: bool = True,
                 seal: int = SHARE_SEALS):
        self.size, self.base, self.shared = size, base, shared
        self.memfd = Memfd(size, "zpcid-guest", seal) if shared else None
        self.buf = self.memfd.mm if self.memfd else bytearray(size)
        self._next = base
        self._free: dict[int, list[int]] = {}

    async def map(self, client: Client) -> None:
        if self.memfd:
            await client.dma_map(self.base, self.size, self.memfd.fd, 0)
        else:
            await client.dma_map(self.base, self.size, buf=self.buf)

    def read(self, addr: int, n: int) -> bytes:
        off = addr - self.base
        return bytes(self.buf[off : off + n])

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.base
        self.buf[off : off + len(data)] = data

    def u16(self, addr: int) -> int:
        return struct.unpack("<H", self.read(addr, 2))[0]

    def put16(self, addr: int, v: int) -> None:
        self.write(addr, struct.pack("<H", v & 0xFFFF))

    def alloc(self, n: int, align: int = 16) -> int:
        """Page-granular allocation; blocks of one size are recycled."""
        n = max(PAGE, (n + PAGE - 1) & ~(PAGE - 1))
        free = self._free.get(n)
        if free:
            return free.pop()
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + n > self.base + self.size:
            raise MemoryError("guest memory exhausted")
        self._next = addr + n
        return addr

    def free(self, addr: int, n: int) -> None:
        n = max(PAGE, (n + PAGE - 1) & ~(PAGE - 1))
        self._free.setdefault(n, []).append(addr)

    def close(self) -> None:
        if self.memfd:
            self.memfd.close()


def need_event(event: int, new: int, old: int) -> bool:
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class DriverQueue:
    """Driver side of one split virtqueue."""

    def __init__(self, drv: "VirtioPciDriver", index: int, size: int, vector: int, eventfd: int):
        self.drv, self.index, self.size, self.vector, self.eventfd = drv, index, size, vector, eventfd
        mem = drv.mem
        self.desc = mem.alloc(DESC_SIZE * size, 16)
        self.avail = mem.alloc(6 + 2 * size, 2)
        self.used = mem.alloc(6 + USED_ELEM_SIZE * size, 4)
        for addr, n in ((self.desc, DESC_SIZE * size), (self.avail, 6 + 2 * size),
                        (self.used, 6 + USED_ELEM_SIZE * size)):
            mem.write(addr, bytes(n))
        self.free = list(range(size))
        self.free_event = trio.Event()
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}
        self.waiters: dict[int, list] = {}  # head -> [event, used len, published at]
        self.notify_addr = 0
        self.notifications = 0
        self.interrupts = 0

    # ------------------------------------------------------------------ submit
    async def _take(self, n: int) -> list[int]:
        if n > self.size:
            raise DriverError(f"chain of {n} descriptors on a queue of {self.size}")
        while len(self.free) < n:
            if self.free_event.is_set():
                self.free_event = trio.Event()  # every waiter shares the current event
            await self.free_event.wait()
        return [self.free.pop() for _ in range(n)]

    async def add(self, bufs: list[tuple[int, int, bool]], *, indirect_table: int | None = None) -> int:
        """Put (addr, len, device_writable) buffers in a chain; returns its head."""
        mem = self.drv.mem
        if indirect_table is not None:
            for i, (addr, n, w) in enumerate(bufs):
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                mem.write(indirect_table + DESC_SIZE * i, struct.pack("<QIHH", addr, n, flags, i + 1))
            (head,) = await self._take(1)
            mem.write(self.desc + DESC_SIZE * head,
                      struct.pack("<QIHH", indirect_table, DESC_SIZE * len(bufs), VRING_DESC_F_INDIRECT, 0))
            self.chains[head] = [head]
            return head
        ids = await self._take(len(bufs))
        for i, (addr, n, w) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
            mem.write(self.desc + DESC_SIZE * ids[i],
                      struct.pack("<QIHH", addr, n, flags, 0 if last else ids[i + 1]))
        self.chains[ids[0]] = ids
        return ids[0]

    def write_desc(self, i: int, addr: int, n: int, flags: int, nxt: int) -> None:
        """Write a raw descriptor (for tests that build broken chains by hand)."""
        self.drv.mem.write(self.desc + DESC_SIZE * i, struct.pack("<QIHH", addr, n, flags, nxt))

    def publish(self, head: int) -> trio.Event:
        return self._publish(head)[0]

    def _publish(self, head: int) -> list:
        mem = self.drv.mem
        # [done, used length, when published]: the reaper's watchdog fails waiters
        # older than the driver's timeout (no cancel scope per request). The reaper
        # takes a waiter out when its chain completes: the head may be reused at once.
        waiter = [trio.Event(), None, trio.current_time()]
        self.waiters[head] = waiter
        mem.put16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        fence()  # ring entry before the index
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.put16(self.avail + 2, self.avail_idx)
        return waiter

    async def kick(self, old_idx: int) -> None:
        """Notify the device unless it asked not to be (EVENT_IDX / NO_NOTIFY)."""
        mem = self.drv.mem
        fence()
        if self.drv.event_idx:
            avail_event = mem.u16(self.used + 4 + USED_ELEM_SIZE * self.size)
            if not need_event(avail_event, self.avail_idx, old_idx):
                return
        elif mem.u16(self.used) & VRING_USED_F_NO_NOTIFY:
            return
        await self.notify()

    async def notify(self) -> None:
        self.notifications += 1
        await self.drv.client.region_write(self.drv.common.bar, self.notify_addr,
                                           struct.pack("<H", self.index))

    async def submit(self, bufs: list[tuple[int, int, bool]], **kw) -> int:
        """Add a chain, publish it, kick, and wait for the device; returns the used length."""
        return (await self.submit_many([bufs], **kw))[0]

    async def submit_many(self, chains: list[list[tuple[int, int, bool]]], **kw) -> list[int]:
        """Add chains, publish them, kick once, wait for all; returns their used lengths."""
        heads, waiters = [], []
        old = self.avail_idx
        for bufs in chains:
            need = 1 if kw.get("indirect_table") is not None else len(bufs)
            if len(self.free) < need and self.avail_idx != old:
                # Out of descriptors: let the device see what is published so far.
                await self.kick(old)
                old = self.avail_idx
            heads.append(await self.add(bufs, **kw))
            waiters.append(self._publish(heads[-1]))
        await self.kick(old)
        out = []
        for head, (done, _, _) in zip(heads, waiters):
            if not done.is_set():  # (a set event would still cost a scheduler pass)
                await done.wait()
        for head, (_, used, _) in zip(heads, waiters):
            if used is None:
                raise DriverError(f"queue {self.index}: no completion for head {head}")
            out.append(used)
        return out

    # ------------------------------------------------------------------ complete
    def reap(self) -> int:
        mem = self.drv.mem
        n = 0
        while True:
            used_idx = mem.u16(self.used + 2)
            fence()
            while self.last_used != used_idx:
                slot = self.used + 4 + USED_ELEM_SIZE * (self.last_used % self.size)
                head, length = struct.unpack("<II", mem.read(slot, USED_ELEM_SIZE))
                self.last_used = (self.last_used + 1) & 0xFFFF
                self.free.extend(self.chains.pop(head, []))
                self.free_event.set()
                waiter = self.waiters.pop(head, None)
                if waiter is not None:
                    waiter[1] = length
                    waiter[0].set()
                n += 1
            if not self.drv.event_idx:
                return n
            # Ask for an interrupt on the next completion, then look once more.
            mem.put16(self.avail + 4 + 2 * self.size, self.last_used)
            fence()
            if mem.u16(self.used + 2) == self.last_used:
                return n

    async def reaper(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        check = trio.current_time()
        while True:
            period = min(self.drv.timeout / 2, 1.0)  # (the timeout may change meanwhile)
            with trio.move_on_after(period):
                await trio.lowlevel.wait_readable(self.eventfd)
                if read_eventfd(self.eventfd):
                    self.interrupts += 1
                self.reap()
            now = trio.current_time()
            if now >= check:
                check = now + period
                self.expire(now - self.drv.timeout)

    def expire(self, before: float) -> None:
        """Fail the requests published before ``before`` that the device never completed."""
        for head, waiter in list(self.waiters.items()):
            if waiter[2] < before:
                del self.waiters[head]
                waiter[0].set()  # (used length None: submit raises)


class VirtioPciDriver:
    """Brings a virtio-pci function up and owns its queues."""

    def __init__(self, client: Client, mem: GuestMemory, *, timeout: float = 10.0):
        self.client = client
        self.mem = mem
        self.timeout = timeout  # a request without completion fails instead of hanging
        self.nursery: trio.Nursery | None = None
        self._reapers: trio.CancelScope | None = None
        self.caps: dict[int, VirtioCap] = {}
        self.msix_cap = 0
        self.msix_vectors = 0
        self.device_features = 0
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.eventfds: list[int] = []
        self.event_idx = False

    # ------------------------------------------------------------------ register access
    @property
    def common(self) -> VirtioCap:
        return self.caps[vp.VIRTIO_PCI_CAP_COMMON_CFG]

    async def _read(self, cap: VirtioCap, off: int, size: int) -> int:
        data = await self.client.region_read(cap.bar, cap.offset + off, size)
        return int.from_bytes(data, "little")

    async def _write(self, cap: VirtioCap, off: int, size: int, value: int) -> None:
        await self.client.region_write(cap.bar, cap.offset + off, value.to_bytes(size, "little"))

    async def common_read(self, off: int, size: int) -> int:
        return await self._read(self.common, off, size)

    async def common_write(self, off: int, size: int, value: int) -> None:
        await self._write(self.common, off, size, value)

    async def status(self) -> int:
        return await self.common_read(vp.COMMON_STATUS, 1)

    async def set_status(self, value: int) -> None:
        await self.common_write(vp.COMMON_STATUS, 1, value)

    async def add_status(self, bits: int) -> None:
        await self.set_status(await self.status() | bits)

    async def device_config(self, off: int, size: int) -> int:
        return await self._read(self.caps[vp.VIRTIO_PCI_CAP_DEVICE_CFG], off, size)

    async def read_isr(self) -> int:
        return await self._read(self.caps[vp.VIRTIO_PCI_CAP_ISR_CFG], 0, 1)

    # ------------------------------------------------------------------ bring-up
    async def probe(self) -> None:
        """Find the virtio structures and MSI-X by walking the capability list."""
        cfg = await self.client.region_read(CONFIG_REGION, 0, 256)
        vendor, device = struct.unpack_from("<HH", cfg, 0)
        if vendor != vp.VIRTIO_PCI_VENDOR_ID or not 0x1040 <= device <= 0x107F:
            raise DriverError(f"{vendor:04x}:{device:04x} is not a modern virtio device")
        ptr, seen = cfg[PCI_CAPABILITY_LIST] & ~3, 0
        while ptr and seen < 48:
            cap_id, nxt = cfg[ptr], cfg[ptr + 1]
            if cap_id == PCI_CAP_ID_VNDR:
                _, _, cap_len, cfg_type, bar, _id, offset, length = struct.unpack_from("<BBBBBBxxII", cfg, ptr)
                mult = struct.unpack_from("<I", cfg, ptr + 16)[0] if cfg_type == vp.VIRTIO_PCI_CAP_NOTIFY_CFG else 0
                # Like Linux: the first capability of each type with a valid BAR wins.
                if bar <= 5 and cfg_type not in self.caps:
                    self.caps[cfg_type] = VirtioCap(cfg_type, bar, offset, length, ptr, mult)
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_cap = ptr
                self.msix_vectors = (struct.unpack_from("<H", cfg, ptr + 2)[0] & 0x7FF) + 1
            ptr, seen = nxt & ~3, seen + 1
        for t in (vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.VIRTIO_PCI_CAP_NOTIFY_CFG, vp.VIRTIO_PCI_CAP_ISR_CFG):
            if t not in self.caps:
                raise DriverError(f"virtio capability type {t} missing")
        if not self.msix_cap:
            raise DriverError("no MSI-X capability")
        for bar in {c.bar for c in self.caps.values()}:
            await self.client.region_info(bar)
        cmd = int.from_bytes(await self.client.region_read(CONFIG_REGION, PCI_COMMAND, 2), "little")
        await self.client.region_write(CONFIG_REGION, PCI_COMMAND, (cmd | 0x6).to_bytes(2, "little"))

    async def reset(self) -> None:
        await self.set_status(0)
        for _ in range(100):
            if await self.status() == 0:
                return
            await trio.sleep(0.001)
        raise DriverError("device did not complete its reset")

    async def init(self, *, wanted: int = ~0, num_queues: int | None = None,
                   queue_size: int | None = None) -> None:
        """Reset and bring the device to DRIVER_OK with ``num_queues`` queues."""
        await self.reset()
        await self.set_status(vp.VIRTIO_CONFIG_S_ACKNOWLEDGE)
        await self.add_status(vp.VIRTIO_CONFIG_S_DRIVER)
        feats = 0
        for sel in (0, 1):
            await self.common_write(vp.COMMON_DFSELECT, 4, sel)
            feats |= await self.common_read(vp.COMMON_DF, 4) << (32 * sel)
        self.device_features = feats
        if not feats >> vp.VIRTIO_F_VERSION_1 & 1:
            raise DriverError("device does not offer VERSION_1")
        self.features = feats & wanted
        for sel in (0, 1):
            await self.common_write(vp.COMMON_GFSELECT, 4, sel)
            await self.common_write(vp.COMMON_GF, 4, (self.features >> (32 * sel)) & 0xFFFFFFFF)
        await self.add_status(vp.VIRTIO_CONFIG_S_FEATURES_OK)
        if not await self.status() & vp.VIRTIO_CONFIG_S_FEATURES_OK:
            await self.add_status(vp.VIRTIO_CONFIG_S_FAILED)
            raise DriverError("device refused our features")
        self.event_idx = bool(self.features >> vp.VIRTIO_RING_F_EVENT_IDX & 1)

        # MSI-X on, one eventfd per vector: vector 0 for config changes, i+1 for queue i.
        ctl = int.from_bytes(await self.client.region_read(CONFIG_REGION, self.msix_cap + 2, 2), "little")
        await self.client.region_write(CONFIG_REGION, self.msix_cap + 2, (ctl | 0x8000).to_bytes(2, "little"))
        self.eventfds = await self.client.enable_irq_eventfds(C.VFIO_PCI_MSIX_IRQ_INDEX, self.msix_vectors)
        await self.common_write(vp.COMMON_MSIX, 2, 0)
        if await self.common_read(vp.COMMON_MSIX, 2) != 0:
            raise DriverError("device refused the config vector")

        total = await self.common_read(vp.COMMON_NUMQ, 2)
        want = total if num_queues is None else min(num_queues, total)
        notify = self.caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
        for i in range(want):
            await self.common_write(vp.COMMON_Q_SELECT, 2, i)
            qmax = await self.common_read(vp.COMMON_Q_SIZE, 2)
            if qmax == 0:
                break
            size = min(qmax, queue_size or qmax)
            vector = (i + 1) if i + 1 < self.msix_vectors else vp.VIRTIO_MSI_NO_VECTOR
            q = DriverQueue(self, i, size, vector,
                            self.eventfds[vector] if vector != vp.VIRTIO_MSI_NO_VECTOR else -1)
            await self.common_write(vp.COMMON_Q_SIZE, 2, size)
            # 64-bit addresses as two 32-bit writes, the way Linux writes them.
            for off, addr in ((vp.COMMON_Q_DESCLO, q.desc), (vp.COMMON_Q_AVAILLO, q.avail),
                              (vp.COMMON_Q_USEDLO, q.used)):
                await self.common_write(off, 4, addr & 0xFFFFFFFF)
                await self.common_write(off + 4, 4, addr >> 32)
            await self.common_write(vp.COMMON_Q_MSIX, 2, vector)
            if await self.common_read(vp.COMMON_Q_MSIX, 2) != vector:
                raise DriverError(f"device refused vector {vector} for queue {i}")
            noff = await self.common_read(vp.COMMON_Q_NOFF, 2)
            q.notify_addr = notify.offset + noff * notify.notify_multiplier
            await self.common_write(vp.COMMON_Q_ENABLE, 2, 1)
            if await self.common_read(vp.COMMON_Q_ENABLE, 2) != 1:
                raise DriverError(f"queue {i} could not be enabled")
            self.queues.append(q)
        await self.add_status(vp.VIRTIO_CONFIG_S_DRIVER_OK)

    async def start_reapers(self) -> None:
        """One task per queue reaping its used ring when the queue's eventfd fires."""
        assert self.nursery is not None
        self._reapers = scope = trio.CancelScope()
        self._reapers_done = done = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with scope:
                    async with trio.open_nursery() as n:
                        for q in self.queues:
                            if q.eventfd >= 0:
                                await n.start(q.reaper)
                        task_status.started()
            finally:
                done.set()

        await self.nursery.start(run)

    async def reinit(self, **init) -> None:
        """Tear the queues down (as after a reset or NEEDS_RESET) and bring the device up again."""
        if self._reapers is not None:
            self._reapers.cancel()
            # A reaper woken by its eventfd may not have run yet: its fd must
            # stay open until it has seen the cancellation.
            await self._reapers_done.wait()
        self.close()
        self.queues = []
        await self.init(**init)
        if self.nursery is not None:
            await self.start_reapers()

    def close(self) -> None:
        for fd in self.eventfds:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self.eventfds = []


class VirtioBlkDriver(VirtioPciDriver):
    """virtio-blk requests on top of the transport driver."""

    async def capacity(self) -> int:
        return await self.device_config(0, 8)

    async def request(self, q: int, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                      *, indirect: bool = False) -> tuple[int, bytes, int]:
        """One request; returns (status, data read, used length)."""
        mem = self.mem
        queue = self.queues[q]
        hdr = mem.alloc(16 + 1)  # header, status byte at +16
        status_addr = hdr + 16
        mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector) + b"\xff")
        bufs = [(hdr, 16, False)]
        out_addr = in_addr = table = None
        if out:
            out_addr = mem.alloc(len(out))
            mem.write(out_addr, out)
            bufs.append((out_addr, len(out), False))
        if in_len:
            in_addr = mem.alloc(in_len)
            bufs.append((in_addr, in_len, True))
        bufs.append((status_addr, 1, True))
        if indirect:
            table = mem.alloc(DESC_SIZE * len(bufs))
        try:
            used = await queue.submit(bufs, indirect_table=table)
            status = mem.read(status_addr, 1)[0]
            data = mem.read(in_addr, in_len) if in_len else b""
        finally:
            mem.free(hdr, 17)
            if out_addr is not None:
                mem.free(out_addr, len(out))
            if in_addr is not None:
                mem.free(in_addr, in_len)
            if table is not None:
                mem.free(table, DESC_SIZE * len(bufs))
        return status, data, used

    async def read_many(self, q: int, reqs: list[tuple[int, int]]) -> list[bytes]:
        """Several reads (sector, bytes) as one batch: published together, one kick."""
        mem = self.mem
        hdrs = mem.alloc(32 * len(reqs))  # header + status byte, 32 bytes apart
        datas = [mem.alloc(n) for _, n in reqs]
        try:
            chains = []
            for i, ((sector, n), data) in enumerate(zip(reqs, datas)):
                h = hdrs + 32 * i
                mem.write(h, struct.pack("<IIQ", T_IN, 0, sector) + b"\xff")
                chains.append([(h, 16, False), (data, n, True), (h + 16, 1, True)])
            await self.queues[q].submit_many(chains)
            out = []
            for i, ((sector, n), data) in enumerate(zip(reqs, datas)):
                if mem.read(hdrs + 32 * i + 16, 1)[0] != S_OK:
                    raise DriverError(f"read of sector {sector} failed")
                out.append(mem.read(data, n))
            return out
        finally:
            mem.free(hdrs, 32 * len(reqs))
            for (_, n), data in zip(reqs, datas):
                mem.free(data, n)

    async def read(self, q: int, sector: int, n: int, **kw) -> bytes:
        status, data, _ = await self.request(q, T_IN, sector, in_len=n, **kw)
        if status != S_OK:
            raise DriverError(f"read of sector {sector} failed with status {status}")
        return data

    async def write(self, q: int, sector: int, data: bytes, **kw) -> None:
        status, _, _ = await self.request(q, T_OUT, sector, out=data, **kw)
        if status != S_OK:
            raise DriverError(f"write of sector {sector} failed with status {status}")

    async def flush(self, q: int = 0) -> int:
        return (await self.request(q, T_FLUSH))[0]

    async def get_id(self, q: int = 0) -> bytes:
        status, data, _ = await self.request(q, T_GET_ID, in_len=20)
        if status != S_OK:
            raise DriverError(f"GET_ID failed with status {status}")
        return data.rstrip(b"\0")


@contextlib.asynccontextmanager
async def open_blk(client: Client, mem: GuestMemory, **init) -> AsyncIterator[VirtioBlkDriver]:
    """Map guest memory, bring the device up and run one reaper task per queue."""
    await mem.map(client)
    drv = VirtioBlkDriver(client, mem)
    try:
        await drv.probe()
        await drv.init(**init)
        async with trio.open_nursery() as nursery:
            drv.nursery = nursery
            await drv.start_reapers()
            try:
                yield drv
            finally:
                nursery.cancel_scope.cancel()
    finally:
        drv.close()
