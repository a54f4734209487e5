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
import os
import re
import stat
import struct
from typing import Any

import trio

from zpcid.devices import register
from zpcid.pci.function import PciFunction
from zpcid.devices.virtio import pci as vp
from zpcid.devices.virtio.queue import (Chain, GuardedDma, RingError, Service, SplitQueue, Stopped,
                                gather, is_dma_error, scatter, slice_iov, validate_queue)

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
IO_CHUNK = 1 << 20  # bytes staged in memory per request at a time
NOWAIT_MAX = 256 << 10  # largest read tried inline from the page cache (bounds loop latency)
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32

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


class BackingFile:
    """The file or block device behind the disk; all methods block (run them in threads)."""

    def __init__(self, path: str, *, readonly: bool, size: int | None):
        self.path = path
        self.readonly = readonly
        exists = os.path.exists(path)
        if not exists and (size is None or readonly):
            raise ValueError(f"{path} does not exist (give a size to create it)")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC | (0 if exists else os.O_CREAT)
        self.fd = os.open(path, flags, 0o600)
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
        except BaseException:
            os.close(self.fd)
            raise
        self.capacity -= self.capacity % SECTOR
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        self.nowait = hasattr(os, "RWF_NOWAIT")

    def pread_nowait(self, n: int, offset: int) -> bytes | None:
        """The data if the page cache has all of it (never blocks), else None."""
        if not self.nowait:
            return None
        buf = bytearray(n)
        try:
            got = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self.nowait = False  # this file cannot do it; always use a worker thread
                return None
            raise
        return bytes(buf) if got == n else None

    def pread(self, n: int, offset: int) -> bytes:
        parts, got = [], 0
        while got < n:
            chunk = os.pread(self.fd, n - got, offset + got)
            if not chunk:
                # Past the end of a file that shrank under us: raw images read as zeros there.
                parts.append(bytes(n - got))
                break
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write")
            view, offset = view[n:], offset + n

    def fsync(self) -> None:
        os.fsync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        try:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            # Discard is a hint; a backing store that cannot punch holes ignores it.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap and not self.is_blockdev else []) \
            + [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        for mode in modes:
            try:
                _fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                    raise
        zeros = bytes(min(length, IO_CHUNK))
        for pos in range(0, length, len(zeros)):
            self.pwrite(zeros[: min(len(zeros), length - pos)], offset + pos)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VirtioBlkFunction(PciFunction):
    type_name = "virtio-blk"

    def __init__(self, name: str, *, path: str, readonly: bool = False, size: int | str | None = None,
                 num_queues: int = 1, queue_size: int = 256, serial: str | None = None,
                 blk_size: int = SECTOR, io_threads: int = 8, max_inflight: int = 256,
                 discard: bool = True, write_zeroes: bool = True, event_idx: bool = True,
                 indirect: bool = True, access_platform: bool = True,
                 msix_vectors: int | None = None, **kw):
        if queue_size < 2 or queue_size & (queue_size - 1) or queue_size > 32768:
            raise ValueError("queue_size must be a power of two in 2..32768")
        if blk_size < SECTOR or blk_size & (blk_size - 1):
            raise ValueError("blk_size must be a power of two >= 512")
        if io_threads < 1 or max_inflight < 1:
            raise ValueError("io_threads and max_inflight must be positive")
        super().__init__(name, vendor=vp.VIRTIO_PCI_VENDOR_ID,
                         device=vp.VIRTIO_PCI_DEVICE_ID_BASE + VIRTIO_ID_BLOCK,
                         class_code=0x010000,  # mass storage, SCSI (as QEMU's virtio-blk-pci)
                         subsys_vendor=vp.VIRTIO_PCI_SUBSYS_VENDOR_ID, subsys=vp.VIRTIO_PCI_SUBSYS_ID,
                         revision=vp.VIRTIO_PCI_REVISION,
                         msix_vectors=msix_vectors or num_queues + 1, **kw)
        self.backing = BackingFile(path, readonly=bool(readonly), size=parse_size(size))
        self.readonly = bool(readonly)
        self.blk_size = blk_size
        self.capacity = self.backing.capacity - self.backing.capacity % blk_size
        self.serial = (serial if serial is not None else name).encode()[:VIRTIO_BLK_ID_BYTES]
        self.queue_size = queue_size
        features = ((1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
                    | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_MQ))
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
        self.limiter = trio.CapacityLimiter(io_threads)
        self.max_inflight = max_inflight
        self.service: Service | None = None
        self.queues: dict[int, SplitQueue] = {}
        self.dirty = False  # writes not yet covered by an fsync
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

    async def virtio_reset(self) -> None:
        await self._stop_service()

    async def virtio_driver_ok(self) -> None:
        t = self.transport
        prev = self.service
        if prev is not None:
            prev.stop()
        service = Service(self.name, self.log, on_exit=self._quiesce)
        dma = GuardedDma(self, service)
        self.queues = {
            i: SplitQueue(i, q, dma, event_idx=t.has(vp.VIRTIO_RING_F_EVENT_IDX),
                          indirect=t.has(vp.VIRTIO_RING_F_INDIRECT_DESC))
            for i, q in enumerate(t.queues) if q.enabled
        }
        self.service = service
        queues = list(self.queues.values())

        async def main(svc: Service) -> None:
            if prev is not None:
                # The previous driver's last writes land before this one's first.
                await prev.done.wait()
            slots = trio.Semaphore(self.max_inflight)
            async with trio.open_nursery() as requests:
                for q in queues:
                    q.kick.set()  # look at the ring once: buffers may predate DRIVER_OK
                    requests.start_soon(self._queue_worker, svc, q, requests, slots, dma)

        service.start(main)

    # ------------------------------------------------------------------ service
    async def _stop_service(self) -> None:
        service = self.service
        if service is not None:
            service.stop()
            await service.done.wait()
        self.queues = {}

    async def _quiesce(self) -> None:
        """After the last request: persist what was acknowledged, release the file if closing."""
        if self.dirty and self.backing.fd >= 0 and not self.readonly:
            try:
                await trio.to_thread.run_sync(self.backing.fsync, limiter=self.limiter)
                self.dirty = False
            except OSError as exc:
                self.log.warning("virtio_blk_fsync_failed", error=str(exc))
        if self._closing:
            self.backing.close()  # close() left it to us: a worker thread might have been using it

    async def _queue_worker(self, svc: Service, q: SplitQueue, requests: trio.Nursery,
                            slots: trio.Semaphore, dma: GuardedDma) -> None:
        while True:
            await q.kick.wait()
            q.kick = trio.Event()
            while not self.transport.needs_reset:
                await slots.acquire()
                try:
                    chain = await q.pop()
                    if chain is None and await q.arm():
                        continue  # raced with the driver adding a buffer
                except Stopped:
                    slots.release()
                    return
                except Exception as exc:
                    slots.release()
                    self._ring_failure(q, exc)
                    break
                if chain is None:
                    slots.release()
                    break
                requests.start_soon(self._request, q, chain, slots, dma)

    def _ring_failure(self, q: SplitQueue, exc: Exception) -> None:
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
            written = await self._execute(chain, dma)
            if await q.push(chain.head, written):
                self._queue_interrupt(q)
        except Stopped:
            pass  # reset or detach: the driver no longer owns this ring
        except Exception as exc:
            self._ring_failure(q, exc)
        finally:
            slots.release()

    def _queue_interrupt(self, q: SplitQueue) -> None:
        self.transport.isr |= vp.VIRTIO_PCI_ISR_QUEUE
        if self.msix is not None and q.vector != vp.VIRTIO_MSI_NO_VECTOR:
            if self.msix.fire(q.vector):
                self.counters.interrupts += 1

    # ------------------------------------------------------------------ requests
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
            if not is_dma_error(exc):
                raise
            # A data buffer outside driver memory: fail this request, keep the device.
            status, written = VIRTIO_BLK_S_IOERR, 0
            self.counters.errors["virtio_blk_dma"] += 1
            self.log.warning("virtio_blk_dma_fault", type=rtype, sector=sector, error=str(exc))
        if status == VIRTIO_BLK_S_IOERR:
            self.stats["ioerr"] += 1
        elif status == VIRTIO_BLK_S_UNSUPP:
            self.stats["unsupp"] += 1
        await scatter(dma, status_iov, bytes([status]))
        return written + 1

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector * SECTOR + nbytes <= self.capacity

    async def _thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def _dispatch(self, rtype: int, sector: int, out_iov, out_len: int, in_iov, in_len: int,
                        dma: GuardedDma) -> tuple[int, int]:
        t = self.transport
        if rtype == VIRTIO_BLK_T_IN:
            if out_len or not self._in_range(sector, in_len):
                return self._bad("read", sector, out_len, in_len), 0
            pos = sector * SECTOR
            for off in range(0, in_len, IO_CHUNK):
                n = min(IO_CHUNK, in_len - off)
                # Cached data is copied right here (RWF_NOWAIT cannot block); the rest
                # waits for a worker thread.
                data = self.backing.pread_nowait(n, pos + off) if n <= NOWAIT_MAX else None
                if data is None:
                    data = await self._thread(self.backing.pread, n, pos + off)
                await scatter(dma, slice_iov(in_iov, off, n), data)
            self.stats["reads"] += 1
            self.stats["bytes_read"] += in_len
            return VIRTIO_BLK_S_OK, in_len
        if rtype == VIRTIO_BLK_T_OUT:
            if self.readonly or in_len or not self._in_range(sector, out_len):
                return self._bad("write", sector, out_len, in_len), 0
            pos = sector * SECTOR
            for off in range(0, out_len, IO_CHUNK):
                n = min(IO_CHUNK, out_len - off)
                data = await gather(dma, slice_iov(out_iov, off, n))
                self.dirty = True
                await self._thread(self.backing.pwrite, data, pos + off)
            self.stats["writes"] += 1
            self.stats["bytes_written"] += out_len
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.stats["flushes"] += 1
            if not self.readonly:
                self.dirty = False  # writes landing from now on need the next flush
                try:
                    await self._thread(self.backing.fsync)
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

    # ------------------------------------------------------------------ lifecycle
    def reset_state(self) -> None:
        if hasattr(self, "transport"):
            if self.service is not None:
                self.service.stop()  # synchronous callers (detach) cannot wait; the next start does
            self.queues = {}
            self.transport.reset()
        super().reset_state()

    async def reset(self) -> None:
        await self._stop_service()
        await super().reset()

    def detach(self) -> None:
        if self.service is not None:
            self.service.stop()  # before the DMA maps go away
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
            "status": t.status, "features": hex(t.features),
            "queues": [i for i, q in enumerate(t.queues) if q.enabled],
            **self.stats,
        }
        return d


@register("virtio-blk")
def make(name: str, **options) -> VirtioBlkFunction:
    return VirtioBlkFunction(name, **options)
