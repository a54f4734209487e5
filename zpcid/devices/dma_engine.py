"""The `dma-engine` function type: copy, fill and CRC32C over guest memory.

Every access goes through the function's DMA path, so in zpcid-translates mode
it is translated by the zPCI IOMMU (shadow or direct map) and a bad IOVA takes
the zPCI error path.  Register map: docs/devices/dma-engine.md.
"""

from __future__ import annotations

import struct

import attrs
import trio

from crc32c import crc32c
from zpcid.vfio_user.dma import DmaFault
from zpcid.zpci.function import ZpciFunction
from zpcid.snapshot import Snapshot, expect, require
from zpcid.vfio_user.regions import WindowedRegion, store_writable

DEFAULT_VENDOR = 0x1014  # test IDs, see docs/devices/dma-engine.md
DEFAULT_DEVICE = 0xFE10
ID_VALUE = 0x44_4D_41_45  # "DMAE"

# registers (BAR0, little-endian)
REG_ID, REG_VERSION, REG_CTRL, REG_STATUS = 0x00, 0x04, 0x08, 0x0C
REG_SRC, REG_DST, REG_LEN, REG_OP = 0x10, 0x18, 0x20, 0x24
REG_PATTERN, REG_RESULT, REG_VECTOR, REG_DOORBELL = 0x28, 0x30, 0x34, 0x38
REG_RING_BASE, REG_RING_SIZE, REG_RING_HEAD, REG_RING_TAIL = 0x40, 0x48, 0x4C, 0x50
REG_COMPLETED, REG_FAULT_ADDR, REG_MAX_LEN = 0x54, 0x58, 0x60
REGS_SIZE = 0x68

CTRL_IRQ = 1 << 0  # raise the vector on completion

OP_COPY, OP_FILL, OP_CRC32C = 1, 2, 3

STATUS_BUSY, STATUS_DONE, STATUS_ERROR = 1 << 0, 1 << 1, 1 << 2
# error codes in STATUS bits 8..15
ERR_NONE, ERR_FAULT, ERR_BAD_DESC, ERR_NOT_READY, ERR_RING = 0, 1, 2, 3, 4

DESC_SIZE = 32
DESC = struct.Struct("<HHIQQII")  # op, flags, len, src, dst, result, status
DESC_F_IRQ = 1
DESC_ST_OK, DESC_ST_ERROR = 1, 0x80
MAX_RING = 4096
# Work between two checkpoints: one operation of up to max_transfer bytes (64 MiB
# by default, a ring holds thousands) runs as slices of this size, so neither
# this function's session nor anything else on the loop waits for more than one
# slice (well under a millisecond of memcpy/CRC).
SLICE = 256 << 10


class DescriptorError(Exception):
    pass


class DmaEngine(ZpciFunction):
    type_name = "dma-engine"

    def __init__(self, name: str, *, vendor: int = DEFAULT_VENDOR, device: int = DEFAULT_DEVICE,
                 msix_vectors: int = 4, max_transfer: int = 64 << 20, **kw):
        super().__init__(name, vendor=vendor, device=device, class_code=0x088000,
                         msix_vectors=msix_vectors, **kw)
        if not 4096 <= max_transfer <= 1 << 30:
            raise ValueError("max_transfer must be between 4 KiB and 1 GiB")
        self.max_transfer = max_transfer
        bar = WindowedRegion(0x1000)
        bar.add(0, 0x1000, self._read, self._write)
        self.add_bar(0, bar)
        self.add_msix_bar(2)
        self.regs = bytearray(REGS_SIZE)
        self._lock = trio.Lock()
        self.reset_state()

    # ------------------------------------------------------------------ registers
    def reset_state(self) -> None:
        super().reset_state()
        if hasattr(self, "regs"):
            self.regs[:] = bytes(REGS_SIZE)
            struct.pack_into("<II", self.regs, REG_ID, ID_VALUE, 1)
            struct.pack_into("<I", self.regs, REG_MAX_LEN, self.max_transfer)

    def device_snapshot(self) -> "DmaEngineSnapshot":
        """The registers (ring head/tail included; the ring itself is guest memory).

        Taken quiesced, so no operation is half done.
        """
        return DmaEngineSnapshot(regs=bytes(self.regs))

    def device_restore(self, snap) -> None:
        expect(snap, DmaEngineSnapshot)
        require(len(snap.regs) == REGS_SIZE, "dma-engine register block has another size")
        self.regs[:] = snap.regs

    def _get(self, fmt: str, off: int) -> int:
        return struct.unpack_from(fmt, self.regs, off)[0]

    def _set(self, fmt: str, off: int, v: int) -> None:
        struct.pack_into(fmt, self.regs, off, v)

    async def _read(self, offset: int, count: int) -> bytes:
        return bytes(self.regs[offset : offset + count]).ljust(count, b"\0")

    _WRITABLE = [(REG_CTRL, REG_CTRL + 4), (REG_SRC, REG_OP + 4), (REG_PATTERN, REG_PATTERN + 8),
                 (REG_VECTOR, REG_VECTOR + 4), (REG_RING_BASE, REG_RING_SIZE + 4)]

    async def _write(self, offset: int, data: bytes) -> None:
        # Doorbells only start the work: it runs after the write is answered
        # (STATUS says busy until then), in submission order.
        if offset == REG_DOORBELL and len(data) == 4:
            self._set("<I", REG_STATUS, STATUS_BUSY)
            await self.defer(self._serialized, self._run_registers)
            return
        if offset == REG_RING_TAIL and len(data) == 4:
            self._set("<I", REG_STATUS, STATUS_BUSY)
            await self.defer(self._serialized, self._run_ring, int.from_bytes(data, "little"))
            return
        store_writable(self.regs, self._WRITABLE, offset, data)

    async def _serialized(self, fn, *args) -> None:
        async with self._lock:
            await fn(*args)

    # ------------------------------------------------------------------ operations
    async def execute(self, op: int, src: int, dst: int, length: int, pattern: int) -> int:
        """Run one operation; returns its result (CRC32C) or raises DmaFault/DescriptorError."""
        if length == 0 or length > self.max_transfer:
            raise DescriptorError(f"length {length} not in 1..{self.max_transfer}")
        path = self.dma_path
        checkpoint = trio.lowlevel.checkpoint
        if op == OP_COPY:
            offsets = range(0, length, SLICE)
            if src < dst < src + length:
                offsets = reversed(offsets)  # overlapping upwards: like memmove, back to front
            for off in offsets:
                await path.copy(dst + off, src + off, min(SLICE, length - off))
                await checkpoint()
            return 0
        if op == OP_FILL:
            pat = pattern.to_bytes(8, "little")
            data = pat * (min(length, SLICE) // 8 + 1)
            for off in range(0, length, SLICE):
                n = min(SLICE, length - off)
                await path.write(dst + off, memoryview(data)[:n])
                await checkpoint()
            return 0
        if op == OP_CRC32C:
            crc = 0
            for off in range(0, length, SLICE):
                crc = crc32c(await path.read(src + off, min(SLICE, length - off)), crc)
                await checkpoint()
            return crc
        raise DescriptorError(f"unknown operation {op}")

    def _status(self, error: int, busy: bool = False) -> None:
        st = STATUS_ERROR | (error << 8) if error else STATUS_DONE
        if busy:
            st |= STATUS_BUSY
        self._set("<I", REG_STATUS, st)

    def _ready(self) -> bool:
        # Doorbells of a disabled function must not start DMA: the guest cannot
        # have set up translation for it.
        return bool(self.config.command & 0x4)  # bus master

    async def _run_registers(self) -> None:
        if not self._ready():
            self._status(ERR_NOT_READY)
            return
        op, src, dst = self._get("<I", REG_OP), self._get("<Q", REG_SRC), self._get("<Q", REG_DST)
        length, pattern = self._get("<I", REG_LEN), self._get("<Q", REG_PATTERN)
        self._set("<I", REG_STATUS, STATUS_BUSY)
        error = await self._one(op, src, dst, length, pattern)
        self._status(error)
        if self._get("<I", REG_CTRL) & CTRL_IRQ:
            self._interrupt()

    async def _one(self, op, src, dst, length, pattern, desc: int | None = None) -> int:
        try:
            result = await self.execute(op, src, dst, length, pattern)
        except DmaFault as exc:
            self._set("<Q", REG_FAULT_ADDR, exc.addr)
            self.log.warning("dma_engine_fault", error=str(exc), op=op)
            return ERR_FAULT
        except DescriptorError as exc:
            self.log.warning("dma_engine_bad_request", error=str(exc), op=op)
            return ERR_BAD_DESC
        self._set("<I", REG_RESULT, result)
        self._set("<I", REG_COMPLETED, (self._get("<I", REG_COMPLETED) + 1) & 0xFFFFFFFF)
        return ERR_NONE

    def _interrupt(self) -> None:
        if self.msix is not None:
            v = self._get("<I", REG_VECTOR)
            if v < self.msix.nvec:
                self.msix.fire(v)

    async def _run_ring(self, tail: int) -> None:
        """Process descriptors head..tail-1 (free-running indexes modulo ring size)."""
        if not self._ready():
            self._status(ERR_NOT_READY)
            return
        base, size = self._get("<Q", REG_RING_BASE), self._get("<I", REG_RING_SIZE)
        head = self._get("<I", REG_RING_HEAD)
        if size == 0 or size > MAX_RING or size & (size - 1) or base % DESC_SIZE:
            self._status(ERR_RING)
            return
        pending = (tail - head) & 0xFFFFFFFF
        if pending > size:
            self._status(ERR_RING)  # the tail ran more than a ring ahead: overlap
            return
        error, irq = ERR_NONE, False
        path = self.dma_path
        while head != tail:
            addr = base + (head % size) * DESC_SIZE
            try:
                raw = await path.read(addr, DESC_SIZE)
            except DmaFault as exc:
                self._set("<Q", REG_FAULT_ADDR, exc.addr)
                error = ERR_FAULT
                break
            op, flags, length, src, dst, _res, _st = DESC.unpack(raw)
            err = await self._one(op, src, dst, length, src if op == OP_FILL else 0)
            result = self._get("<I", REG_RESULT) if not err else 0
            try:
                await path.write(addr + 24, struct.pack("<II", result, DESC_ST_OK if not err else DESC_ST_ERROR | err))
            except DmaFault as exc:
                # After a fault the function may be in the zPCI error state, so the
                # write-back fails too: keep the first fault as the one reported.
                if not err:
                    self._set("<Q", REG_FAULT_ADDR, exc.addr)
                    err = ERR_FAULT
            head = (head + 1) & 0xFFFFFFFF
            self._set("<I", REG_RING_HEAD, head)
            irq |= bool(flags & DESC_F_IRQ)
            if err:
                error = err
                break  # stop at the failing descriptor, as the status register reports
        self._status(error)
        if irq or error:
            self._interrupt()


@attrs.frozen
class DmaEngineSnapshot(Snapshot):
    KIND = "devices.dma_engine"
    regs: bytes


def make(name: str, **options) -> DmaEngine:
    return DmaEngine(name, **options)


def status_error(status: int) -> int:
    """The error code of a STATUS value (0 = completed fine)."""
    return (status >> 8) & 0xFF if status & STATUS_ERROR else 0
