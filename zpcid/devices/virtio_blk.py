"""The `virtio-blk` function type: a modern (1.x) virtio block device over PCI.

BAR0  virtio structures (common / ISR / device config / notify, see zpcid.devices.virtio.pci)
BAR2  MSI-X table and PBA: vector 0.. for the driver to assign (config + one per queue)
Backed by a file or block device; I/O runs in worker threads (a CapacityLimiter
bounds them) so the trio loop never blocks, and a request's status is only
written after its pwrite (or, for FLUSH, its fsync) has returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import re
import stat
import struct
from typing import Any

import attrs
import trio

from zpcid.zpci.function import ZpciFunction
from zpcid.devices import uring
from zpcid.snapshot import Fd, Snapshot, SnapshotError, expect, require
from zpcid.devices.virtio import pci as vp
from zpcid.devices.virtio.queue import (Chain, GuardedDma, RingError, Service, SplitQueue, Stopped,
                                gather, is_client_gone, is_dma_error, scatter, slice_iov, validate_queue)

VIRTIO_ID_BLOCK = 2

# Feature bits (virtio 1.x 5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (virtio 1.x 5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x1

SECTOR = 512  # the unit of every sector number in the protocol
OUTHDR = struct.Struct("<IIQ")  # struct virtio_blk_outhdr: type, ioprio, sector
DWZ_SEG = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes
CONFIG_SIZE = 0x3C  # struct virtio_blk_config up to write_zeroes_may_unmap
IO_CHUNK = 1 << 20  # bytes staged per step where guest memory has no views (DMA messages)
NOWAIT_MAX = 1 << 20  # largest request tried inline against the page cache (bounds loop latency)
IOV_MAX = 1024  # iovecs per preadv/pwritev (Linux UIO_MAXIOV)
PAGE = 4096
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32
SLICE = 64  # requests a queue takes from its ring before letting other tasks run
SLICE_BYTES = 4 << 20  # ... or bytes it copies inline, whichever comes first
_TYPES = frozenset((VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES))

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def parse_size(value: int | str | None) -> int | None:
    """An int, or a string with an optional K/M/G/T suffix (binary units)."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"bad size {value!r}")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


# QEMU's cache modes: (O_DIRECT, O_DSYNC). With O_DSYNC every write is durable when
# it completes, so the device reports no volatile write cache and FLUSH has nothing to do.
CACHE_MODES = {"writeback": (False, False), "none": (True, False),
               "writethrough": (False, True), "directsync": (True, True)}
DEFAULT_CACHE = "writeback"
# How reads, writes and flushes run (QEMU's aio=): submitted from the loop to an
# io_uring, or in worker threads. io_uring falls back to threads where the kernel refuses it.
AIO_MODES = ("io_uring", "threads")
DEFAULT_AIO = "io_uring"
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views left after the first ``n`` bytes."""
    out = list(views)
    while n and out:
        if n >= len(out[0]):
            n -= len(out.pop(0))
        else:
            out[0] = out[0][n:]
            n = 0
    return out


def _copy(buf: memoryview, views: list[memoryview], *, to_views: bool) -> list[memoryview]:
    """Copy ``buf`` into the first bytes of ``views`` (or fill it from them); returns the rest."""
    pos = 0
    rest = list(views)
    while pos < len(buf) and rest:
        v = rest[0]
        n = min(len(v), len(buf) - pos)
        if to_views:
            v[:n] = buf[pos : pos + n]
        else:
            buf[pos : pos + n] = v[:n]
        pos += n
        if n == len(v):
            rest.pop(0)
        else:
            rest[0] = v[n:]
    return rest


def _iov_groups(views: list[memoryview]):
    """At most IOV_MAX views per system call."""
    for i in range(0, len(views), IOV_MAX):
        yield views[i : i + IOV_MAX]


class BackingFile:
    """The file or block device behind the disk.

    Data moves with ``preadv``/``pwritev`` straight between the file and views of
    guest memory. Methods whose name ends in ``_nowait`` never block (the trio loop
    may call them); every other method may block and runs in a worker thread.
    """

    def __init__(self, path: str, *, readonly: bool, size: int | None, cache: str = DEFAULT_CACHE):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache {cache!r} is not one of: {', '.join(CACHE_MODES)}")
        self.path = path
        self.readonly = readonly
        self.cache = cache
        self.direct, self.dsync = CACHE_MODES[cache]
        exists = os.path.exists(path)
        if not exists and (size is None or readonly):
            raise ValueError(f"{path} does not exist (give a size to create it)")
        flags = ((os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (0 if exists else os.O_CREAT)
                 | (os.O_DSYNC if self.dsync else 0))
        self.fd = os.open(path, flags, 0o600)
        # cache=none/directsync: a second descriptor with O_DIRECT; the first one
        # serves requests whose file offset or length O_DIRECT cannot take.
        self.dfd = -1
        self.bounced = 0  # O_DIRECT requests staged through an aligned buffer
        try:
            st = os.fstat(self.fd)
            if stat.S_ISREG(st.st_mode):
                if size is not None and size > st.st_size and not readonly:
                    os.ftruncate(self.fd, size)  # creating or extending a disk image
                # (read-only and larger than the file: the tail reads as zeros, as past EOF)
                self.capacity = size if size is not None else st.st_size
            elif stat.S_ISBLK(st.st_mode):
                dev_size = os.lseek(self.fd, 0, os.SEEK_END)
                if size is not None and size > dev_size:
                    raise ValueError(f"{path} has {dev_size} bytes, less than size {size}")
                self.capacity = size if size is not None else dev_size
            else:
                # Character devices (e.g. /dev/full for testing ENOSPC) have no size of their own.
                if size is None:
                    raise ValueError(f"{path} is not a regular file or block device; give a size")
                self.capacity = size
            if self.direct:
                try:
                    self.dfd = os.open(path, (flags & ~os.O_CREAT) | os.O_DIRECT)
                except OSError as exc:
                    raise ValueError(f"cache {cache!r} needs O_DIRECT, which {path} refuses: "
                                     f"{exc.strerror}") from None
                self.align = self._probe_alignment()
        except BaseException:
            self.close()
            raise
        self.capacity -= self.capacity % SECTOR
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        self.st_dev, self.st_ino = st.st_dev, st.st_ino
        self.nowait = hasattr(os, "RWF_NOWAIT") and not self.direct
        self.write_nowait_ok = self.nowait and not self.dsync

    def _probe_alignment(self) -> int:
        """The buffer/offset alignment O_DIRECT accepts here: 512, else 4096 (as QEMU probes)."""
        buf = mmap.mmap(-1, 2 * PAGE)
        try:
            view = memoryview(buf)
            try:
                os.preadv(self.dfd, [view[SECTOR : 2 * SECTOR]], SECTOR)
                return SECTOR
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    return SECTOR  # not an alignment verdict; requests fall back on EINVAL
                return PAGE
            finally:
                view.release()
        finally:
            buf.close()

    # ------------------------------------------------------------------ identity
    def identity(self) -> tuple[int, int, int]:
        """(st_dev, st_ino, capacity): what a restored function checks it got the same disk."""
        return self.st_dev, self.st_ino, self.capacity

    # ------------------------------------------------------------------ never blocking
    def read_nowait(self, views: list[memoryview], offset: int) -> int:
        """Bytes copied from the page cache into ``views`` without blocking (0 if none)."""
        return self._nowait(views, offset, write=False) if self.nowait else 0

    def write_nowait(self, views: list[memoryview], offset: int) -> int:
        """Bytes written into the page cache without blocking (0 if none)."""
        return self._nowait(views, offset, write=True) if self.write_nowait_ok else 0

    def _nowait(self, views: list[memoryview], offset: int, *, write: bool) -> int:
        if len(views) > IOV_MAX:
            return 0
        try:
            if write:
                return os.pwritev(self.fd, views, offset, os.RWF_NOWAIT)
            return os.preadv(self.fd, views, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
            # This file cannot do it (ext4 refuses buffered NOWAIT writes): use threads.
            if write:
                self.write_nowait_ok = False
            else:
                self.nowait = self.write_nowait_ok = False
            return 0

    # ------------------------------------------------------------------ blocking
    def _aligned(self, views: list[memoryview], offset: int, length: int) -> bool:
        a = self.align
        if offset % a or length % a:
            return False
        for v in views:
            if len(v) % a:
                return False
            if _address(v) % a:
                return False
        return True

    def ring_plan(self, views: list[memoryview], offset: int, length: int) -> tuple[int, bytearray] | None:
        """(descriptor, iovec array) for a ring operation on these buffers, or None where
        only the thread path can do it (an unaligned guest buffer under O_DIRECT: bounce)."""
        if len(views) > IOV_MAX:
            return None
        iov, bits = uring.iovecs(views)
        if not self.direct or offset % self.align or length % self.align:
            return self.fd, iov
        return (self.dfd, iov) if not bits % self.align else None

    def read_into(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` from ``offset``; past the end of the file reads as zeros."""
        self._transfer(views, offset, write=False)

    def write_from(self, views: list[memoryview], offset: int) -> None:
        self._transfer(views, offset, write=True)

    def _transfer(self, views: list[memoryview], offset: int, *, write: bool) -> None:
        """Move data between the file at ``offset`` and ``views``: through O_DIRECT when
        the cache mode asks for it and the request is aligned, else through the page cache."""
        move = self._pwritev_all if write else self._preadv_all
        length = sum(len(v) for v in views)
        if self.direct and not offset % self.align and not length % self.align:
            if not self._aligned(views, offset, length):
                self.bounced += 1
                # The guest buffer is not aligned: through a bounce buffer, a chunk at a time.
                with _Bounce(min(length, IO_CHUNK)) as bounce:
                    rest = views
                    for pos in range(0, length, IO_CHUNK):
                        with bounce.view[: min(IO_CHUNK, length - pos)] as chunk:
                            if write:
                                rest = _copy(chunk, rest, to_views=False)
                            move(self.dfd, [chunk], offset + pos)
                            if not write:
                                rest = _copy(chunk, rest, to_views=True)
                return
            try:
                move(self.dfd, views, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise  # (EINVAL: an alignment the probe did not see; go buffered)
        move(self.fd, views, offset)

    def _preadv_all(self, fd: int, views: list[memoryview], offset: int) -> None:
        for group in _iov_groups(views):
            while group:
                n = os.preadv(fd, group, offset)
                if n == 0:
                    for v in group:  # past the end of a file that shrank under us
                        v[:] = bytes(len(v))
                    break
                offset += n
                group = _advance(group, n)

    def _pwritev_all(self, fd: int, views: list[memoryview], offset: int) -> None:
        for group in _iov_groups(views):
            while group:
                n = os.pwritev(fd, group, offset)
                if n <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                offset += n
                group = _advance(group, n)

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes as a new buffer (message-mode guest memory has no views)."""
        buf = bytearray(n)
        self.read_into([memoryview(buf)], offset)
        return bytes(buf)

    def pwrite(self, data: bytes, offset: int) -> None:
        self.write_from([memoryview(data)], offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            # Discard is a hint; a backing store that cannot punch holes ignores it.
            if exc.errno not in _NOT_SUPPORTED:
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap and not self.is_blockdev else []) \
            + [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        for mode in modes:
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
        zeros = bytes(min(length, IO_CHUNK))
        for pos in range(0, length, len(zeros)):
            self._pwritev_all(self.fd, [memoryview(zeros)[: min(len(zeros), length - pos)]], offset + pos)

    def close(self) -> None:
        for name in ("dfd", "fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class _Bounce:
    """A page-aligned anonymous buffer for O_DIRECT I/O on behalf of an unaligned guest buffer."""

    def __init__(self, n: int):
        self.mm = mmap.mmap(-1, max(n, 1))
        self.view = memoryview(self.mm)[:n]

    def __enter__(self) -> "_Bounce":
        return self

    def __exit__(self, *exc) -> None:
        self.view.release()
        self.mm.close()


def _address(view: memoryview) -> int:
    """Process address of a buffer's first byte."""
    return uring.address(view) if len(view) else 0


class VirtioBlkFunction(ZpciFunction):
    type_name = "virtio-blk"

    def __init__(self, name: str, *, path: str, readonly: bool = False, size: int | str | None = None,
                 num_queues: int = 1, queue_size: int = 256, serial: str | None = None,
                 blk_size: int = SECTOR, io_threads: int = 8, max_inflight: int = 256,
                 discard: bool = True, write_zeroes: bool = True, event_idx: bool = True,
                 indirect: bool = True, access_platform: bool = True, cache: str = DEFAULT_CACHE,
                 aio: str = DEFAULT_AIO, msix_vectors: int | None = None, **kw):
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError("queue_size must be a power of two in 2..32768")
        if blk_size < SECTOR or blk_size & (blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        if io_threads < 1 or max_inflight < 1:
            raise ValueError("io_threads and max_inflight must be positive")
        if aio not in AIO_MODES:
            raise ValueError(f"aio {aio!r} is not one of: {', '.join(AIO_MODES)}")
        super().__init__(name, vendor=vp.VIRTIO_PCI_VENDOR_ID,
                         device=vp.VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_BLOCK,
                         class_code=0x010000,  # mass storage, SCSI (as QEMU's virtio-blk-pci)
                         subsys_vendor=vp.VIRTIO_PCI_SUBSYS_VENDOR_ID, subsys=vp.VIRTIO_PCI_SUBSYS_ID,
                         revision=vp.VIRTIO_PCI_REVISION,
                         msix_vectors=msix_vectors or num_queues + 1, **kw)
        self.backing = BackingFile(path, readonly=bool(readonly), size=parse_size(size), cache=cache)
        self.readonly = bool(readonly)
        self.blk_size = blk_size
        self.capacity = self.backing.capacity - self.backing.capacity % blk_size
        self.serial = (serial if serial is not None else name).encode()[:VIRTIO_BLK_ID_BYTES]
        self.queue_size = queue_size
        # No FLUSH where writes are durable when they complete (O_DSYNC): the
        # driver then treats the disk as write-through and sends none.
        features = ((1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
                    | (int(not self.backing.dsync) << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_MQ))
        if self.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= (int(bool(discard)) << VIRTIO_BLK_F_DISCARD) \
                | (int(bool(write_zeroes)) << VIRTIO_BLK_F_WRITE_ZEROES)
        features |= (int(bool(indirect)) << vp.VIRTIO_RING_F_INDIRECT_DESC) \
            | (int(bool(event_idx)) << vp.VIRTIO_RING_F_EVENT_IDX) \
            | (int(bool(access_platform)) << vp.VIRTIO_F_ACCESS_PLATFORM)
        try:
            self.transport = vp.VirtioPciTransport(
                self.config, self, bar=0, device_features=features, num_queues=num_queues,
                queue_max=queue_size, msix_vectors=self._msix_vectors,
                device_config_size=CONFIG_SIZE, log=self.log)
            self.add_bar(0, self.transport.region)
            self.add_msix_bar(2)
        except BaseException:
            self.backing.close()
            raise
        # Let go of cached ring views before an unmap closes the memory behind them.
        self.dma.listeners.append(self._dma_changed)
        self.limiter = trio.CapacityLimiter(io_threads)
        self.max_inflight = max_inflight
        self.aio = aio
        self.ring: uring.Ring | None = None  # the running service's io_uring (aio=io_uring)
        self._aio_fallback_logged = False
        self.ring_ops = 0  # reads, writes and flushes that went through an io_uring
        self.service: Service | None = None
        self.queues: dict[int, SplitQueue] = {}
        self.dirty = False  # writes not yet covered by an fsync
        self._paused = False  # quiesced: take no new requests
        self._drained = trio.Event()
        self._closing = False
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "get_id": 0, "discards": 0,
                      "write_zeroes": 0, "bytes_read": 0, "bytes_written": 0,
                      "ioerr": 0, "unsupp": 0, "needs_reset": 0}

    # ------------------------------------------------------------------ transport hooks
    def device_config(self) -> bytes:
        sectors_per_block = self.blk_size // SECTOR
        return struct.pack(
            "<QII4xIBBHIBxHIIIIIB3x",
            self.capacity // SECTOR, 0, self.queue_size - 2, self.blk_size,
            0, 0, 0, 0,  # topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
            0, len(self.transport.queues),  # writeback, num_queues
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, sectors_per_block,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
        )

    def virtio_features_ok(self, features: int) -> bool:
        return True

    def virtio_enable_queue(self, index: int, q: vp.QueueConfig) -> str | None:
        return validate_queue(q)

    def virtio_config_interrupt(self) -> None:
        v = self.transport.config_vector
        if self.msix is not None and v != vp.VIRTIO_MSI_NO_VECTOR:
            if self.msix.fire(v):
                self.counters.interrupts += 1

    def virtio_notify(self, index: int) -> None:
        q = self.queues.get(index)
        if q is None or self.service is None or self.service.stopped:
            # Not an error the device can report; the driver just gets nothing back.
            self.counters.errors["virtio_bad_notify"] += 1
            self.log.warning("virtio_bad_notify", queue=index, driver_ok=self.transport.driver_ok)
            return
        q.kick.set()

    def dma_resumed(self) -> None:
        """The function left the error state: the driver's doorbells and our
        interrupts meanwhile went nowhere, so look at every ring and signal
        every queue once (a spurious interrupt costs the driver one ring check)."""
        if self.service is None or self.service.stopped:
            return
        for q in self.queues.values():
            q.kick.set()
            self._queue_interrupt(q)

    async def virtio_reset(self) -> None:
        await self._stop_service()

    async def virtio_driver_ok(self) -> None:
        self._start_service()

    def _start_service(self, positions: tuple = ()) -> None:
        """Run the enabled queues (from the ring positions of a snapshot, if given)."""
        t = self.transport
        prev = self.service
        if prev is not None:
            prev.stop()
        self._paused = False
        service = Service(self.name, self.log, on_exit=self._quiesce)
        dma = GuardedDma(self, service)
        self.queues = {
            i: SplitQueue(i, q, dma, event_idx=t.has(vp.VIRTIO_RING_F_EVENT_IDX),
                          indirect=t.has(vp.VIRTIO_RING_F_INDIRECT_DESC))
            for i, q in enumerate(t.queues) if q.enabled
        }
        for pos in positions:
            require(pos.index in self.queues, f"snapshot has ring positions of queue {pos.index}, "
                                              "which is not enabled")
            self.queues[pos.index].restore(pos)
        self.service = service
        queues = list(self.queues.values())

        async def main(svc: Service) -> None:
            if prev is not None:
                # The previous driver's last writes land before this one's first.
                await prev.done.wait()
            slots = trio.Semaphore(self.max_inflight)
            ring = self._open_ring()
            try:
                async with trio.open_nursery() as requests:
                    if ring is not None:
                        # (reaps after a stop too, until no operation is in flight)
                        requests.start_soon(ring.reaper, lambda: svc.stopped)
                        self.ring = ring
                    for q in queues:
                        q.kick.set()  # look at the ring once: buffers may predate DRIVER_OK
                        requests.start_soon(self._queue_worker, svc, q, requests, slots, dma)
            finally:
                if ring is not None:
                    if self.ring is ring:
                        self.ring = None
                    ring.close()

        service.start(main)

    def _open_ring(self) -> "uring.Ring | None":
        """An io_uring for this service's requests, or None (aio=threads, or refused here)."""
        if self.aio != "io_uring":
            return None
        try:
            return uring.Ring(self.max_inflight)
        except (uring.Unavailable, OSError) as exc:
            if not self._aio_fallback_logged:
                self._aio_fallback_logged = True
                self.log.warning("virtio_blk_aio_fallback", aio="threads", reason=str(exc))
            return None

    # ------------------------------------------------------------------ service
    async def _stop_service(self) -> None:
        service = self.service
        if service is not None:
            service.stop()
            await service.done.wait()
        for q in self.queues.values():
            q.release()
        self.queues = {}

    async def _quiesce(self) -> None:
        """After the last request: persist what was acknowledged, release the file if closing."""
        if self.dirty and self.backing.fd >= 0 and not self.readonly and not self.backing.dsync:
            try:
                await trio.to_thread.run_sync(self.backing.flush, limiter=self.limiter)
                self.dirty = False
            except OSError as exc:
                self.log.warning("virtio_blk_fsync_failed", error=str(exc))
        if self._closing:
            self.backing.close()  # close() left it to us: a worker thread might have been using it

    async def _queue_worker(self, svc: Service, q: SplitQueue, requests: trio.Nursery,
                            slots: trio.Semaphore, dma: GuardedDma) -> None:
        """Per notification: drain the available ring, finish what can finish at once,
        hand the rest to request tasks, and publish the finished ones as one batch."""
        while True:
            await q.kick.wait()
            q.kick = trio.Event()
            while not self.transport.needs_reset and not self._paused:
                done: list[tuple[int, int]] = []
                empty = False
                moved = 0
                try:
                    for _ in range(SLICE):  # bounded work before others get the loop
                        if moved >= SLICE_BYTES:
                            break
                        try:
                            slots.acquire_nowait()  # (no scheduler pass while slots are free)
                        except trio.WouldBlock:
                            await slots.acquire()
                            if self._paused:  # quiesced while waiting for a slot
                                slots.release()
                                break
                        q.inflight += 1  # (a chain being fetched is in flight for quiesce)
                        try:
                            chain = await q.pop()
                        finally:
                            q.inflight -= 1
                        if chain is None:
                            slots.release()
                            empty = True
                            break
                        written = self._try_inline(chain, dma)
                        if written is None:
                            q.inflight += 1
                            requests.start_soon(self._request, q, chain, slots, dma)
                        else:
                            slots.release()
                            done.append((chain.head, written))
                            moved += chain.readable_len + written
                    if done:
                        await self._complete(q, done)
                    if empty and not await q.arm():
                        break
                except Stopped:
                    return
                except Exception as exc:
                    self._ring_failure(q, exc)
                    break
                await trio.lowlevel.checkpoint()

    def _ring_failure(self, q: SplitQueue, exc: Exception) -> None:
        if is_client_gone(exc):
            # Not the driver's fault and nobody left to tell: no NEEDS_RESET.
            self.log.warning("virtio_blk_client_gone", queue=q.index, error=str(exc))
            return
        if isinstance(exc, RingError) or is_dma_error(exc):
            self.counters.errors["virtio_ring"] += 1
            reason = "ring_error" if isinstance(exc, RingError) else "ring_dma_fault"
        else:
            self.log.exception("virtio_blk_internal_error", queue=q.index)
            self.counters.errors["virtio_internal"] += 1
            reason = "internal_error"
        self.stats["needs_reset"] += 1
        self.transport.device_error(reason, queue=q.index, error=str(exc))

    async def _request(self, q: SplitQueue, chain: Chain, slots: trio.Semaphore,
                       dma: GuardedDma) -> None:
        try:
            try:
                written = await self._execute(chain, dma)
                if q.inflight > 1 and not q.publishing:
                    # Others are in flight: let those finishing in this same scheduler
                    # pass join the batch, so one interrupt covers them all.
                    await trio.lowlevel.checkpoint()
            finally:
                # Counted until it is among the completed ones (no await between):
                # a quiesce must not see "nothing in flight" while it waits here.
                q.inflight -= 1
            await self._complete(q, [(chain.head, written)])
        except Stopped:
            pass  # reset or detach: the driver no longer owns this ring
        except Exception as exc:
            self._ring_failure(q, exc)
        finally:
            slots.release()
            self._maybe_drained()

    def _maybe_drained(self) -> None:
        if self._paused and self._no_requests():
            self._drained.set()

    def _no_requests(self) -> bool:
        return not any(q.inflight or q.publishing or q.completed for q in self.queues.values())

    async def _complete(self, q: SplitQueue, done: list[tuple[int, int]]) -> None:
        """Publish finished requests; whoever finds no publisher at work becomes it and
        also publishes what others finish meanwhile, with one interrupt per batch."""
        q.completed += done
        if q.publishing:
            return
        q.publishing = True
        try:
            while q.completed:
                batch, q.completed = q.completed, []
                if await q.push_many(batch):
                    self._queue_interrupt(q)
        finally:
            q.publishing = False
            self._maybe_drained()

    def _queue_interrupt(self, q: SplitQueue) -> None:
        self.transport.isr |= vp.VIRTIO_PCI_ISR_QUEUE
        if self.msix is not None and q.vector != vp.VIRTIO_MSI_NO_VECTOR:
            if self.msix.fire(q.vector):
                self.counters.interrupts += 1

    # ------------------------------------------------------------------ requests
    def _try_inline(self, chain: Chain, dma: GuardedDma) -> int | None:
        """Finish a request on the spot if that cannot block: a read the page cache
        holds, a write the page cache takes, GET_ID, a request refused outright.
        Returns the bytes written into the chain, or None to run it in a task."""
        rlen, wlen = chain.readable_len, chain.writable_len
        if rlen < OUTHDR.size or wlen < 1:
            return None  # _execute raises the ring error
        try:
            hdr_views = dma.views(slice_iov(chain.readable, 0, OUTHDR.size), False)
            status_views = dma.views(slice_iov(chain.writable, wlen - 1, 1), True)
        except Stopped:
            raise
        except Exception as exc:
            if is_dma_error(exc):
                return None  # _execute reports it the way it always has
            raise
        if hdr_views is None or status_views is None:
            return None  # DMA messages: nothing is immediate
        rtype, _ioprio, sector = OUTHDR.unpack(b"".join(hdr_views))
        out_len, in_len = rlen - OUTHDR.size, wlen - 1
        status, written = None, 0
        if rtype == VIRTIO_BLK_T_IN and not out_len and in_len <= NOWAIT_MAX:
            if not self._in_range(sector, in_len):
                status = self._bad("read", sector, out_len, in_len)
            elif self.backing.nowait:
                views = self._data_views(dma, slice_iov(chain.writable, 0, in_len), True)
                if views is not None and self.backing.read_nowait(views, sector * SECTOR) == in_len:
                    self.stats["reads"] += 1
                    self.stats["bytes_read"] += in_len
                    status, written = VIRTIO_BLK_S_OK, in_len
        elif rtype == VIRTIO_BLK_T_OUT and not in_len and out_len <= NOWAIT_MAX:
            if self.readonly or not self._in_range(sector, out_len):
                status = self._bad("write", sector, out_len, in_len)
            elif self.backing.write_nowait_ok:
                views = self._data_views(dma, slice_iov(chain.readable, OUTHDR.size, out_len), False)
                if views is not None:
                    self.dirty = True
                    if self.backing.write_nowait(views, sector * SECTOR) == out_len:
                        self.stats["writes"] += 1
                        self.stats["bytes_written"] += out_len
                        status = VIRTIO_BLK_S_OK
        elif rtype == VIRTIO_BLK_T_FLUSH and (self.readonly or self.backing.dsync):
            self.stats["flushes"] += 1
            status = VIRTIO_BLK_S_OK  # nothing volatile to flush
        elif rtype not in _TYPES:
            status = self._unsupp(rtype)
        if status is None:
            return None
        self._count_status(status)
        status_views[0][0] = status
        return written + 1

    def _data_views(self, dma: GuardedDma, iov, write: bool) -> list[memoryview] | None:
        """Views of a data buffer, or None (message mode, or a fault _execute will report)."""
        try:
            return dma.views(iov, write)
        except Stopped:
            raise
        except Exception as exc:
            if is_dma_error(exc):
                return None
            raise

    def _count_status(self, status: int) -> None:
        if status == VIRTIO_BLK_S_IOERR:
            self.stats["ioerr"] += 1
        elif status == VIRTIO_BLK_S_UNSUPP:
            self.stats["unsupp"] += 1

    async def _execute(self, chain: Chain, dma: GuardedDma) -> int:
        """Carry out one request; returns the bytes written into the chain (incl. status)."""
        rlen, wlen = chain.readable_len, chain.writable_len
        if rlen < OUTHDR.size or wlen < 1:
            raise RingError(f"request without header or status byte ({rlen} readable, {wlen} writable)")
        rtype, _ioprio, sector = OUTHDR.unpack(await gather(dma, slice_iov(chain.readable, 0, OUTHDR.size)))
        out_iov = slice_iov(chain.readable, OUTHDR.size, rlen - OUTHDR.size)
        in_iov = slice_iov(chain.writable, 0, wlen - 1)
        status_iov = slice_iov(chain.writable, wlen - 1, 1)
        try:
            status, written = await self._dispatch(rtype, sector, out_iov, rlen - OUTHDR.size,
                                                   in_iov, wlen - 1, dma)
        except Stopped:
            raise
        except OSError as exc:
            status, written = VIRTIO_BLK_S_IOERR, 0
            self.counters.errors["virtio_blk_backing"] += 1
            self.log.warning("virtio_blk_io_error", type=rtype, sector=sector,
                             errno=errno.errorcode.get(exc.errno, exc.errno), error=str(exc))
        except Exception as exc:
            if not is_dma_error(exc) or is_client_gone(exc):
                raise
            # A data buffer outside driver memory: fail this request, keep the device.
            status, written = VIRTIO_BLK_S_IOERR, 0
            self.counters.errors["virtio_blk_dma"] += 1
            self.log.warning("virtio_blk_dma_fault", type=rtype, sector=sector, error=str(exc))
        self._count_status(status)
        await scatter(dma, status_iov, bytes([status]))
        return written + 1

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector * SECTOR + nbytes <= self.capacity

    async def _thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _move(self, views: list[memoryview], pos: int, length: int, *, write: bool) -> None:
        """Data between the file at ``pos`` and guest buffers: through the io_uring where
        one runs and the request suits it, the rest (bounce buffers, a short transfer,
        an alignment O_DIRECT refused after all) through a worker thread."""
        ring = self.ring
        if ring is not None and ring.accepting:
            plan = self.backing.ring_plan(views, pos, length)
            if plan is not None:
                fd, iov = plan
                self.ring_ops += 1
                res = await (ring.pwritev if write else ring.preadv)(fd, views, pos, iov)
                if res == length:
                    return
                if res < 0 and not (res == -errno.EINVAL and fd == self.backing.dfd):
                    raise OSError(-res, os.strerror(-res))
                if res > 0:  # a short transfer: the thread path carries on (or zero-fills)
                    views, pos = _advance(views, res), pos + res
        await self._thread(self.backing.write_from if write else self.backing.read_into, views, pos)

    async def _flush(self) -> None:
        ring = self.ring
        if ring is not None and ring.accepting:
            self.ring_ops += 1
            res = await ring.fdatasync(self.backing.fd)
            if res < 0:
                raise OSError(-res, os.strerror(-res))
        else:
            await self._thread(self.backing.flush)

    async def _dispatch(self, rtype: int, sector: int, out_iov, out_len: int, in_iov, in_len: int,
                        dma: GuardedDma) -> tuple[int, int]:
        t = self.transport
        if rtype == VIRTIO_BLK_T_IN:
            if out_len or not self._in_range(sector, in_len):
                return self._bad("read", sector, out_len, in_len), 0
            pos = sector * SECTOR
            views = dma.views(in_iov, True)
            if views is not None:
                # Straight from the file into guest memory; the service waits for
                # this thread before a reset lets the driver reuse the buffers.
                got = self.backing.read_nowait(views, pos) if in_len <= NOWAIT_MAX else 0
                if got < in_len:
                    await self._move(_advance(views, got), pos + got, in_len - got, write=False)
                dma.service.check()
            else:
                for off in range(0, in_len, IO_CHUNK):
                    n = min(IO_CHUNK, in_len - off)
                    data = await self._thread(self.backing.pread, n, pos + off)
                    await scatter(dma, slice_iov(in_iov, off, n), data)
            self.stats["reads"] += 1
            self.stats["bytes_read"] += in_len
            return VIRTIO_BLK_S_OK, in_len
        if rtype == VIRTIO_BLK_T_OUT:
            if self.readonly or in_len or not self._in_range(sector, out_len):
                return self._bad("write", sector, out_len, in_len), 0
            pos = sector * SECTOR
            views = dma.views(out_iov, False)
            self.dirty = True
            if views is not None:
                await self._move(views, pos, out_len, write=True)
            else:
                for off in range(0, out_len, IO_CHUNK):
                    n = min(IO_CHUNK, out_len - off)
                    data = await gather(dma, slice_iov(out_iov, off, n))
                    await self._thread(self.backing.pwrite, data, pos + off)
            self.stats["writes"] += 1
            self.stats["bytes_written"] += out_len
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.stats["flushes"] += 1
            if not self.readonly and not self.backing.dsync:
                self.dirty = False  # writes landing from now on need the next flush
                try:
                    await self._flush()
                except BaseException:
                    self.dirty = True
                    raise
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            n = min(in_len, VIRTIO_BLK_ID_BYTES)
            await scatter(dma, slice_iov(in_iov, 0, n), ident[:n])
            self.stats["get_id"] += 1
            return VIRTIO_BLK_S_OK, n
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            discard = rtype == VIRTIO_BLK_T_DISCARD
            bit = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
            if not t.has(bit):
                return self._unsupp(rtype), 0
            return await self._discard_zeroes(discard, out_iov, out_len, in_len, dma), 0
        return self._unsupp(rtype), 0

    async def _discard_zeroes(self, discard: bool, out_iov, out_len: int, in_len: int,
                              dma: GuardedDma) -> int:
        nseg = out_len // DWZ_SEG.size
        if in_len or out_len % DWZ_SEG.size or not 1 <= nseg <= MAX_DISCARD_SEG:
            return self._bad("discard" if discard else "write_zeroes", 0, out_len, in_len)
        raw = await gather(dma, out_iov)
        segs = [DWZ_SEG.unpack_from(raw, i * DWZ_SEG.size) for i in range(nseg)]
        for sec, num, flags in segs:
            allowed = 0 if discard else VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            if flags & ~allowed:
                return self._unsupp(VIRTIO_BLK_T_DISCARD if discard else VIRTIO_BLK_T_WRITE_ZEROES)
            if num > MAX_DISCARD_SECTORS or not self._in_range(sec, num * SECTOR):
                return self._bad("discard" if discard else "write_zeroes", sec, out_len, in_len)
        for sec, num, flags in segs:
            if discard:
                await self._thread(self.backing.discard, sec * SECTOR, num * SECTOR)
            else:
                self.dirty = True
                await self._thread(self.backing.write_zeroes, sec * SECTOR, num * SECTOR,
                                   bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        self.stats["discards" if discard else "write_zeroes"] += 1
        return VIRTIO_BLK_S_OK

    def _bad(self, what: str, sector: int, out_len: int, in_len: int) -> int:
        self.counters.errors["virtio_blk_bad_request"] += 1
        self.log.warning("virtio_blk_bad_request", op=what, sector=sector, out_len=out_len,
                         in_len=in_len, readonly=self.readonly, capacity=self.capacity)
        return VIRTIO_BLK_S_IOERR

    def _unsupp(self, rtype: int) -> int:
        self.log.info("virtio_blk_unsupported", type=rtype)
        return VIRTIO_BLK_S_UNSUPP

    def _dma_changed(self, kind: str, region) -> None:
        if kind == "unmap":
            for q in self.queues.values():
                q.release()  # (the next ring access resolves the views again)

    # ------------------------------------------------------------------ quiesce
    async def device_quiesce(self) -> None:
        """Take no new requests, let those in flight finish and reach the used ring,
        then stop the queue service (it syncs the file); the ring positions stay."""
        self._paused = True
        service = self.service
        if service is None:
            return
        while not self._no_requests():
            self._drained = trio.Event()
            await self._drained.wait()
        service.stop()
        await service.done.wait()

    def device_resume(self) -> None:
        """Carry on after ``device_quiesce`` (a hand-over that did not happen)."""
        self._paused = False
        if self.queues and (self.service is None or self.service.stopped):
            self._start_service(tuple(q.snapshot() for _, q in sorted(self.queues.items())))

    # ------------------------------------------------------------------ snapshot
    def device_snapshot(self) -> "VirtioBlkSnapshot":
        """Transport registers, ring positions, backing-file identity, dirty flag, stats.

        Taken quiesced: a request in flight (a thread mid-I/O) cannot be captured.
        """
        if not self._no_requests():
            raise SnapshotError(f"virtio-blk {self.name} has requests in flight (quiesce first)",
                                errno.EBUSY)
        dev, ino, capacity = self.backing.identity()
        return VirtioBlkSnapshot(
            # Queues exist from DRIVER_OK to the next reset, quiesced or not.
            transport=self.transport.snapshot(),
            queues=tuple(q.snapshot() for _, q in sorted(self.queues.items())),
            backing=Fd(self.backing.fd), path=self.backing.path, dev=dev, ino=ino,
            capacity=capacity, cache=self.backing.cache, readonly=self.readonly,
            dirty=self.dirty, stats=dict(self.stats))

    def device_restore(self, snap: "VirtioBlkSnapshot") -> None:
        """Become the device ``snap`` was taken of; the queues run again if they ran.

        This function was built from the same configuration and opened the disk
        itself; the snapshot's fd only proves it is the same disk (and is closed).
        Call it from inside trio (the queue service is a trio system task).
        """
        try:
            expect(snap, VirtioBlkSnapshot)
            st = os.fstat(snap.backing)
            require((st.st_dev, st.st_ino) == (snap.dev, snap.ino),
                    "the snapshot's backing fd is not the file it names")
            require(self.backing.identity() == (snap.dev, snap.ino, snap.capacity),
                    f"backing file {self.backing.path} is not the snapshot's {snap.path} "
                    f"(device, inode or capacity differ)")
            require((snap.cache, snap.readonly) == (self.backing.cache, self.readonly),
                    "cache mode or read-only setting differs from the snapshot")
            self.transport.restore(snap.transport)
            self.dirty = snap.dirty
            self.stats.update({k: v for k, v in snap.stats.items() if k in self.stats})
            if snap.queues:
                self._start_service(snap.queues)
        finally:
            snap.close_fds()

    # ------------------------------------------------------------------ lifecycle
    def reset_state(self) -> None:
        if hasattr(self, "transport"):
            if self.service is not None:
                self.service.stop()  # synchronous callers (detach) cannot wait; the next start does
            for q in self.queues.values():
                q.release()
            self.queues = {}
            self.transport.reset()
        super().reset_state()

    async def reset(self) -> None:
        await self._stop_service()
        await super().reset()

    def detach(self) -> None:
        if self.service is not None:
            self.service.stop()  # before the DMA maps go away
        for q in self.queues.values():
            q.release()
        super().detach()

    def close(self) -> None:
        self._closing = True
        super().close()
        if self.service is None or self.service.done.is_set():
            self.backing.close()
        # else the stopping service closes the file once its last worker thread returned

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        t = self.transport
        d["virtio"] = {
            "path": self.backing.path, "readonly": self.readonly, "capacity": self.capacity,
            "cache": self.backing.cache, "bounced": self.backing.bounced,
            # the engine the running queues use ("threads" where io_uring was refused)
            "aio": "io_uring" if self.ring is not None else "threads" if self.aio == "threads"
                   or self._aio_fallback_logged else self.aio,
            "ring_ops": self.ring_ops,
            "status": t.status, "features": hex(t.features),
            "queues": [i for i, q in enumerate(t.queues) if q.enabled],
            **self.stats,
        }
        return d


@attrs.frozen
class VirtioBlkSnapshot(Snapshot):
    KIND = "devices.virtio_blk"
    transport: Snapshot
    queues: tuple  # QueueSnapshot per running queue; empty when the queues do not run
    backing: Fd
    path: str
    dev: int
    ino: int
    capacity: int
    cache: str
    readonly: bool
    dirty: bool
    stats: dict


def make(name: str, **options) -> VirtioBlkFunction:
    return VirtioBlkFunction(name, **options)
