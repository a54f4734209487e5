"""The `memory` function type: a RAM BAR, MSI-X and a small register block.

BAR0  RAM (mmappable memfd, or a shared file given as ``backing``)
BAR2  MSI-X table and PBA (trapped)
BAR4  registers (trapped), little-endian:
  0x00 MAGIC      RO  0x7a706369 ("zpci")
  0x04 VERSION    RO  1
  0x08 SCRATCH    RW
  0x0c DOORBELL   WO  writing v raises MSI-X vector v
  0x10 RINGS      RO  number of doorbell writes
  0x18 RAM_SIZE   RO  64-bit
  0x20 DMA_ADDR   RW  64-bit bus address
  0x28 DMA_LEN    RW
  0x2c DMA_CMD    WO  1: RAM[0:len] -> DMA_ADDR, 2: DMA_ADDR -> RAM[0:len]
  0x30 DMA_STATUS RO  0 ok, 1 fault, 2 busy (the copy runs after the write is answered)
"""

from __future__ import annotations

import struct

import trio

import attrs

from zpcid.vfio_user.dma import DmaFault
from zpcid.pci.function import PciFunction
from zpcid.snapshot import Snapshot, expect, require
from zpcid.vfio_user.regions import MemfdRegion, WindowedRegion

MAGIC = 0x7A706369
REG_MAGIC, REG_VERSION, REG_SCRATCH, REG_DOORBELL, REG_RINGS = 0x00, 0x04, 0x08, 0x0C, 0x10
REG_RAM_SIZE, REG_DMA_ADDR, REG_DMA_LEN, REG_DMA_CMD, REG_DMA_STATUS = 0x18, 0x20, 0x28, 0x2C, 0x30
DMA_CMD_TO_HOST, DMA_CMD_FROM_HOST = 1, 2
DMA_STATUS_OK, DMA_STATUS_FAULT, DMA_STATUS_BUSY = 0, 1, 2
DMA_SLICE = 4 << 20  # a few ms of copying at most

DEFAULT_VENDOR = 0x1014  # test IDs, documented in docs/configuration.md
DEFAULT_DEVICE = 0xFE00


class MemoryFunction(PciFunction):
    type_name = "memory"

    def __init__(self, name: str, *, ram_size: int = 1 << 20, backing: str | None = None,
                 vendor: int = DEFAULT_VENDOR, device: int = DEFAULT_DEVICE,
                 msix_vectors: int = 4, **kw):
        super().__init__(name, vendor=vendor, device=device, class_code=0x050000,
                         msix_vectors=msix_vectors, **kw)
        self.ram = MemfdRegion(ram_size, f"zpcid-{name}-bar0", backing)
        self.add_bar(0, self.ram, prefetch=True)
        self.add_msix_bar(2)
        self.regs_region = WindowedRegion(0x1000)
        self.regs_region.add(0, 0x1000, self._reg_read, self._reg_write)
        self.add_bar(4, self.regs_region)
        self.regs = bytearray(0x40)
        self.rings = 0
        self.reset_state()

    def reset_state(self) -> None:
        super().reset_state()
        if hasattr(self, "regs"):
            self.rings = 0
            self.regs[:] = bytes(0x40)
            struct.pack_into("<II", self.regs, REG_MAGIC, MAGIC, 1)
            struct.pack_into("<Q", self.regs, REG_RAM_SIZE, self.ram.size)

    def device_snapshot(self) -> "MemoryRegsSnapshot":
        """The register block (the RAM BAR is a memfd, captured with the BARs)."""
        return MemoryRegsSnapshot(regs=bytes(self.regs), rings=self.rings)

    def device_restore(self, snap) -> None:
        expect(snap, MemoryRegsSnapshot)
        require(len(snap.regs) == len(self.regs), "memory register block has another size")
        self.regs[:] = snap.regs
        self.rings = snap.rings

    async def _reg_read(self, offset: int, count: int) -> bytes:
        struct.pack_into("<I", self.regs, REG_RINGS, self.rings & 0xFFFFFFFF)
        if offset + count > len(self.regs):
            return bytes(self.regs[offset : offset + count]).ljust(count, b"\0")
        return bytes(self.regs[offset : offset + count])

    async def _reg_write(self, offset: int, data: bytes) -> None:
        if offset == REG_DOORBELL and len(data) == 4:
            vector = int.from_bytes(data, "little")
            self.rings += 1
            self.log.debug("doorbell", vector=vector)
            if self.msix is not None and vector < self.msix.nvec:
                self.msix.fire(vector)
            return
        if offset == REG_DMA_CMD and len(data) == 4:
            struct.pack_into("<I", self.regs, REG_DMA_STATUS, DMA_STATUS_BUSY)
            await self.defer(self._dma, int.from_bytes(data, "little"))
            return
        for i, b in enumerate(data):
            o = offset + i
            if o in range(REG_SCRATCH, REG_SCRATCH + 4) or o in range(REG_DMA_ADDR, REG_DMA_CMD):
                self.regs[o] = b
        if offset == REG_SCRATCH:
            self.log.info("scratch_write", value=hex(struct.unpack_from("<I", self.regs, REG_SCRATCH)[0]))

    async def _dma(self, cmd: int) -> None:
        addr, length = struct.unpack_from("<QI", self.regs, REG_DMA_ADDR)
        length = min(length, self.ram.size)
        status = 0
        try:
            # Through dma_path, so a zPCI IOMMU in front of the client's map applies.
            if cmd not in (DMA_CMD_TO_HOST, DMA_CMD_FROM_HOST):
                status = 1
            # In slices with a checkpoint between them: a large RAM BAR must not
            # hold the event loop for the whole copy.
            for off in range(0, length if status == 0 else 0, DMA_SLICE):
                n = min(DMA_SLICE, length - off)
                if cmd == DMA_CMD_TO_HOST:
                    await self.dma_path.write(addr + off, await self.ram.read(off, n))
                else:
                    await self.ram.write(off, await self.dma_path.read(addr + off, n))
                await trio.lowlevel.checkpoint()
        except DmaFault as exc:
            self.log.warning("dma_fault", error=str(exc))
            status = 1
        struct.pack_into("<I", self.regs, REG_DMA_STATUS, status)


@attrs.frozen
class MemoryRegsSnapshot(Snapshot):
    KIND = "devices.memory"
    regs: bytes
    rings: int


def make(name: str, **options) -> MemoryFunction:
    return MemoryFunction(name, **options)
