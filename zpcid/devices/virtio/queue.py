"""Split virtqueues, device side, and the background service that runs them.

Every access to driver memory goes through a ``GuardedDma`` (the function's
``dma_path`` behind a liveness check), so the same code runs over mmapped
client memory, DMA_READ/DMA_WRITE messages or a zPCI IOMMU translation.
"""

from __future__ import annotations

import collections
import struct
import threading
from typing import Awaitable, Callable

import attrs
import trio

from zpcid.snapshot import Snapshot, expect
from zpcid.vfio_user.dma import DmaFault
from zpcid.devices.virtio.pci import QueueConfig

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
USED_ELEM_SIZE = 8

_desc = struct.Struct("<QIHH")
_u16 = struct.Struct("<H")
_used_elem = struct.Struct("<II")


class RingError(Exception):
    """The driver broke the ring protocol; the device must ask for a reset."""


class Stopped(Exception):
    """The queue service was stopped (reset or detach) while a request was in flight."""


def is_dma_error(exc: BaseException) -> bool:
    """A failed access to driver memory: DmaFault, or an IOMMU's TranslationError."""
    return isinstance(exc, DmaFault) or any(c.__name__ == "TranslationError" for c in type(exc).__mro__)


def is_client_gone(exc: BaseException) -> bool:
    """A message-mode DMA that failed because the VMM left (not the driver's fault)."""
    return isinstance(exc, DmaFault) and exc.client_gone


_fence_lock = threading.Lock()


def fence() -> None:
    """Full memory barrier between our stores and loads of shared driver memory.

    The driver runs on other CPUs; x86 may reorder a store (used idx) after a
    later load (used_event), which would lose an interrupt. Taking a lock is an
    atomic read-modify-write, i.e. a full fence, and costs well under a microsecond.
    """
    _fence_lock.acquire()
    _fence_lock.release()


def validate_queue(q: QueueConfig) -> str | None:
    """Why a split queue cannot be enabled as configured, or None."""
    if q.size == 0 or q.size & (q.size - 1) or q.size > q.max_size:
        return f"queue size {q.size} is not a power of two in 1..{q.max_size}"
    if q.desc % 16:
        return f"descriptor table {q.desc:#x} is not 16-byte aligned"
    if q.driver % 2:
        return f"avail ring {q.driver:#x} is not 2-byte aligned"
    if q.device % 4:
        return f"used ring {q.device:#x} is not 4-byte aligned"
    return None


class GuardedDma:
    """The function's DMA path, refusing access once the service has stopped.

    While the function's DMA is blocked (zPCI error state) accesses wait for it
    to end and then go ahead, instead of failing: a virtio driver cannot cancel
    a request, so one failed here would hang it for good (docs/qemu.md, "Error
    recovery"). A fault that happens while blocked is retried the same way.
    """

    def __init__(self, function, service: "Service"):
        self.function = function
        self.service = service

    async def _access(self, access):
        """``access(dma_path)``, waiting out blocked DMA before it and after a fault."""
        path = self.function.dma_path
        while True:
            self.service.check()
            if path.blocked:
                await path.unblocked()
                continue
            try:
                return await access(path)
            except Exception as exc:
                if not (is_dma_error(exc) and path.blocked):
                    raise

    async def read(self, addr: int, n: int) -> bytes:
        return await self._access(lambda path: path.read(addr, n))

    async def write(self, addr: int, data: bytes) -> None:
        await self._access(lambda path: path.write(addr, data))

    def views(self, iov: list[tuple[int, int]], write: bool) -> list[memoryview] | None:
        """Views of the driver memory behind (addr, len) pieces, for I/O without copies;
        None where that memory is only reachable through DMA messages (or while DMA
        is blocked: the message path waits)."""
        self.service.check()
        path = self.function.dma_path
        if path.blocked:
            return None
        return path.views_many(iov, write)


@attrs.define
class Chain:
    """One descriptor chain as device-readable and device-writable (addr, len) pieces."""

    head: int
    readable: list[tuple[int, int]] = attrs.field(factory=list)
    writable: list[tuple[int, int]] = attrs.field(factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


def slice_iov(iov: list[tuple[int, int]], skip: int, length: int) -> list[tuple[int, int]]:
    """The (addr, len) pieces covering bytes [skip, skip+length) of a buffer list."""
    out = []
    for addr, n in iov:
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        if take:
            out.append((addr + skip, take))
        length -= take
        skip = 0
        if not length:
            break
    return out


async def gather(dma: GuardedDma, iov: list[tuple[int, int]]) -> bytes:
    parts = [await dma.read(a, n) for a, n in iov]
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def scatter(dma: GuardedDma, iov: list[tuple[int, int]], data: bytes | memoryview) -> None:
    view = memoryview(data)
    pos = 0
    for a, n in iov:
        await dma.write(a, view[pos : pos + n])
        pos += n


class SplitQueue:
    """Device side of a split virtqueue (virtio 1.x 2.7)."""

    def __init__(self, index: int, cfg: QueueConfig, dma: GuardedDma, *,
                 event_idx: bool, indirect: bool):
        self.index = index
        self.size = cfg.size
        self.desc, self.avail, self.used = cfg.desc, cfg.driver, cfg.device
        self.vector = cfg.vector
        self.dma = dma
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used: int | None = None
        self.heads: collections.deque[int] = collections.deque()
        self.used_lock = trio.Lock()
        # Views of the three ring areas while the DMA mapping they came from holds.
        self._ring_gen: int | None = None
        self._ring_views: tuple[memoryview | None, ...] = (None, None, None)
        self._ring_bounds = ((self.desc, DESC_SIZE * self.size), (self.avail, 6 + 2 * self.size),
                             (self.used, 6 + USED_ELEM_SIZE * self.size))
        self.kick = trio.Event()
        self.inflight = 0
        self.completed: list[tuple[int, int]] = []  # (head, written) not yet in the used ring
        self.publishing = False

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> "QueueSnapshot":
        """Ring positions (the rings themselves are driver memory); taken with no request in flight."""
        return QueueSnapshot(index=self.index, last_avail=self.last_avail, used_idx=self.used_idx,
                             signalled_used=self.signalled_used, heads=tuple(self.heads))

    def restore(self, snap: "QueueSnapshot") -> None:
        expect(snap, QueueSnapshot)
        self.last_avail, self.used_idx = snap.last_avail & 0xFFFF, snap.used_idx & 0xFFFF
        self.signalled_used = None if snap.signalled_used is None else snap.signalled_used & 0xFFFF
        self.heads = collections.deque(snap.heads)

    # ------------------------------------------------------------------ ring memory
    def _view(self, area: int, off: int, n: int) -> memoryview | None:
        """Bytes [off, off+n) of ring area 0 (descriptors), 1 (avail) or 2 (used), as a view
        of shared memory, or None (message-mode DMA, IOMMU translation, split mapping)."""
        self.dma.service.check()
        gen = self.dma.function.dma_path.view_generation
        if gen is None:
            return None
        if gen != self._ring_gen:
            self._ring_gen = gen
            self._ring_views = tuple(self._area_view(addr, size, write=i == 2)
                                     for i, (addr, size) in enumerate(self._ring_bounds))
        v = self._ring_views[area]
        return v[off : off + n] if v is not None else None

    def release(self) -> None:
        """Drop the ring views, so the DMA space can unmap the memory behind them."""
        for v in self._ring_views:
            if v is not None:
                v.release()
        self._ring_views, self._ring_gen = (None, None, None), None

    def _area_view(self, addr: int, size: int, write: bool) -> memoryview | None:
        try:
            views = self.dma.function.dma_path.views(addr, size, write)
        except Exception as exc:
            if is_dma_error(exc):
                return None  # the slow path reports the fault when the ring is used
            raise
        return views[0] if views is not None and len(views) == 1 else None

    async def _read(self, area: int, off: int, n: int):
        v = self._view(area, off, n)
        if v is not None:
            return v
        return await self.dma.read(self._ring_bounds[area][0] + off, n)

    async def _write(self, area: int, off: int, data: bytes) -> None:
        v = self._view(area, off, len(data))
        if v is not None:
            v[:] = data
        else:
            await self.dma.write(self._ring_bounds[area][0] + off, data)

    # ------------------------------------------------------------------ avail side
    async def _avail_idx(self) -> int:
        return _u16.unpack(await self._read(1, 2, 2))[0]

    async def _fetch_heads(self) -> None:
        idx = await self._avail_idx()
        fence()
        n = (idx - self.last_avail) & 0xFFFF
        if n == 0:
            return
        if n > self.size:
            raise RingError(f"avail index moved by {n}, more than the queue size {self.size}")
        start = self.last_avail % self.size
        first = min(n, self.size - start)
        raw = bytes(await self._read(1, 4 + 2 * start, 2 * first))
        if first < n:
            raw += await self._read(1, 4, 2 * (n - first))
        self.heads.extend(struct.unpack(f"<{n}H", raw))
        self.last_avail = idx

    async def pop(self) -> Chain | None:
        """The next available descriptor chain, or None when the ring is empty."""
        if not self.heads:
            await self._fetch_heads()
            if not self.heads:
                return None
        return await self.read_chain(self.heads.popleft())

    async def arm(self) -> bool:
        """Ask for a notification on the next buffer; True if one is already there."""
        if self.event_idx:
            await self._write(2, 4 + USED_ELEM_SIZE * self.size, _u16.pack(self.last_avail))
        fence()
        return bool(self.heads) or await self._avail_idx() != self.last_avail

    async def read_chain(self, head: int) -> Chain:
        if head >= self.size:
            raise RingError(f"head descriptor {head} outside queue of {self.size}")
        chain = Chain(head)
        readable, writable = chain.readable, chain.writable
        # The descriptor table as one buffer (a view of shared memory where there is
        # one), parsed locally: no DMA-space lookup per descriptor.
        table = self._view(0, 0, DESC_SIZE * self.size)
        if table is None:
            table = await self.dma.read(self.desc, DESC_SIZE * self.size)
        limit, i = self.size, head
        in_indirect = False
        seen = 0
        unpack = _desc.unpack_from
        while True:
            addr, length, flags, nxt = unpack(table, DESC_SIZE * i)
            if flags & VRING_DESC_F_INDIRECT:
                if in_indirect or not self.indirect:
                    raise RingError("indirect descriptor not allowed here")
                if flags & VRING_DESC_F_NEXT:
                    raise RingError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > self.size:
                    raise RingError(f"indirect table of {length} bytes")
                # One read of the whole table (a copy: the driver cannot change it under us).
                table = await self.dma.read(addr, length)
                limit, i, in_indirect = length // DESC_SIZE, 0, True
                seen = 0
                continue
            if flags & VRING_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise RingError("device-readable descriptor after a device-writable one")
            else:
                readable.append((addr, length))
            seen += 1
            if not flags & VRING_DESC_F_NEXT:
                return chain
            if seen >= limit:
                raise RingError(f"descriptor chain loops or is longer than {limit}")
            if nxt >= limit:
                raise RingError(f"next descriptor {nxt} outside table of {limit}")
            i = nxt

    # ------------------------------------------------------------------ used side
    async def push(self, head: int, written: int) -> bool:
        """Return a chain to the driver; True if the driver wants an interrupt now."""
        return await self.push_many([(head, written)])

    async def push_many(self, done: list[tuple[int, int]]) -> bool:
        """Return chains to the driver under one used-index update; True if the
        driver wants an interrupt for them (one interrupt covers the batch)."""
        try:
            self.used_lock.acquire_nowait()  # (no scheduler pass when nobody holds it)
        except trio.WouldBlock:
            await self.used_lock.acquire()
        try:
            idx = self.used_idx
            pos = 0
            while pos < len(done):
                # Consecutive elements up to the end of the ring in one write.
                slot = (idx + pos) % self.size
                n = min(len(done) - pos, self.size - slot)
                raw = b"".join(_used_elem.pack(h, w) for h, w in done[pos : pos + n])
                await self._write(2, 4 + USED_ELEM_SIZE * slot, raw)
                pos += n
            fence()  # the elements must be visible before the index that publishes them
            new = (idx + len(done)) & 0xFFFF
            await self._write(2, 2, _u16.pack(new))
            self.used_idx = new
            fence()
            if self.event_idx:
                old, self.signalled_used = self.signalled_used, new
                if old is None:
                    return True
                event = _u16.unpack(await self._read(1, 4 + 2 * self.size, 2))[0]
                # vring_need_event: did new move past the driver's used_event since old?
                return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
            flags = _u16.unpack(await self._read(1, 0, 2))[0]
            return not flags & VRING_AVAIL_F_NO_INTERRUPT
        finally:
            self.used_lock.release()


@attrs.frozen
class QueueSnapshot(Snapshot):
    KIND = "devices.virtio.queue"
    index: int
    last_avail: int
    used_idx: int
    signalled_used: int | None
    heads: tuple  # heads taken from the avail ring, not yet started


class Service:
    """A function's background tasks, outside the endpoint's request/reply loop.

    ``PciFunction.attach`` is synchronous and the endpoint does not lend its
    nursery, so the service runs as a trio system task (started from an async
    register write) holding its own nursery; ``stop`` cancels it and ``done``
    is set once every task, including worker-thread I/O, has returned.
    """

    def __init__(self, name: str, log, on_exit: Callable[[], Awaitable[None]] | None = None):
        self.name = name
        self.log = log
        self.on_exit = on_exit  # runs (shielded) after the last task, even if never started
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.stopped = False

    def start(self, main: Callable[["Service"], Awaitable[None]]) -> None:
        trio.lowlevel.spawn_system_task(self._main, main, name=f"virtio-service:{self.name}")

    async def _main(self, main) -> None:
        try:
            with self.scope:
                await main(self)
        except Exception:
            # A system task must not raise: that would end the whole daemon.
            self.log.exception("virtio_service_failed")
        finally:
            self.stopped = True
            if self.on_exit is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await self.on_exit()
                    except Exception:
                        self.log.exception("virtio_service_exit_failed")
            self.done.set()

    def check(self) -> None:
        if self.stopped:
            raise Stopped()

    def stop(self) -> None:
        self.stopped = True
        self.scope.cancel()
