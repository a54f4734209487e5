"""PCI configuration space with a capability list and BAR emulation."""

from __future__ import annotations

import struct
from typing import Callable

import attrs

from zpcid.snapshot import Snapshot, expect, require
from zpcid.vfio_user.regions import Region, RegionError

CONFIG_SIZE = 4096

# Standard header offsets (PCI Local Bus spec names)
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_CAP_LIST = 0x10

PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09

PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_FLAGS_MASKALL = 0x4000


@attrs.define
class Bar:
    """A memory BAR: zPCI has no I/O space, and QEMU insists on power-of-two sizes."""

    index: int
    region: Region
    is64: bool = True
    prefetch: bool = False

    def __attrs_post_init__(self) -> None:
        size = self.region.size
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR{self.index} size {size:#x} is not a power of two >= 16")
        if self.is64 and self.index % 2:
            raise ValueError(f"64-bit BAR{self.index} must use an even index")

    @property
    def type_bits(self) -> int:
        return (PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is64 else 0) | (
            PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0
        )


class ConfigSpace:
    """4 KiB PCIe config space: per-byte write masks, BAR sizing, capability list."""

    def __init__(self, vendor: int, device: int, class_code: int = 0xFF0000,
                 subsys_vendor: int = 0, subsys: int = 0, revision: int = 0):
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1c = bytearray(CONFIG_SIZE)
        self.bars: dict[int, Bar] = {}
        self._bar_regs = [0] * 6
        self._next_cap = 0x40
        self._last_cap_ptr = PCI_CAPABILITY_LIST
        self.caps: dict[int, int] = {}  # cap id -> offset (first instance)
        self.write_hooks: list[Callable[[int, int], None]] = []  # (offset, length)
        struct.pack_into("<HH", self.data, 0, vendor, device)
        self.data[PCI_REVISION_ID] = revision
        self.data[PCI_CLASS_PROG : PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self.data, PCI_SUBSYSTEM_VENDOR_ID, subsys_vendor, subsys)
        self.set_wmask(PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
                       | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)
        self.w1c[PCI_STATUS + 1] = 0xF9  # error bits are write-one-to-clear
        self.wmask[PCI_INTERRUPT_LINE] = 0xFF

    def set_wmask(self, offset: int, length: int, mask: int) -> None:
        self.wmask[offset : offset + length] = mask.to_bytes(length, "little")

    def u16(self, off: int) -> int:
        return int.from_bytes(self.data[off : off + 2], "little")

    def u32(self, off: int) -> int:
        return int.from_bytes(self.data[off : off + 4], "little")

    def put(self, off: int, value: int, length: int) -> None:
        self.data[off : off + length] = value.to_bytes(length, "little")

    @property
    def command(self) -> int:
        return self.u16(PCI_COMMAND)

    # --------------------------------------------------------------- building
    def add_bar(self, bar: Bar) -> None:
        used = {i for b in self.bars.values() for i in range(b.index, b.index + 1 + b.is64)}
        wanted = set(range(bar.index, bar.index + 1 + bar.is64))
        if not wanted <= set(range(6)) or wanted & used:
            raise ValueError(f"BAR{bar.index} collides with another BAR or lies outside 0..5")
        self.bars[bar.index] = bar
        self._bar_regs[bar.index] = bar.type_bits
        if bar.is64:
            self._bar_regs[bar.index + 1] = 0
        self._sync_bars()

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (body excludes the 2-byte id/next header); returns its offset."""
        length = 2 + len(body)
        off = self._next_cap
        if off + length > 0x100:
            raise ValueError("capability list overflows the standard config space")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2 : off + length] = body
        if wmask:
            self.wmask[off + 2 : off + 2 + len(wmask)] = wmask
        self.data[self._last_cap_ptr] = off
        self._last_cap_ptr = off + 1
        self._next_cap = (off + length + 3) & ~3
        self.caps.setdefault(cap_id, off)
        self.data[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        return off

    def add_pcie_capability(self) -> int:
        # Express capability v2, endpoint; link x1 at 2.5 GT/s.
        body = bytearray(0x3C - 2)
        struct.pack_into("<H", body, 0, 0x0002)  # PCI_EXP_FLAGS: version 2, endpoint
        struct.pack_into("<I", body, 0x0C - 2, 0x11)  # link capabilities
        struct.pack_into("<H", body, 0x12 - 2, 0x11)  # link status
        wmask = bytearray(0x3C - 2)
        struct.pack_into("<H", wmask, 0x08 - 2, 0x7CFF)  # device control
        return self.add_capability(PCI_CAP_ID_EXP, bytes(body), bytes(wmask))

    def reset(self) -> None:
        """Function-level reset: BAR addresses, writable and write-one-to-clear bits to 0."""
        # Every guest-writable bit of this model starts out as 0, so clearing the
        # writable bits restores the power-on state; read-only content is kept.
        for o in range(CONFIG_SIZE):
            m = self.wmask[o] | self.w1c[o]
            if m:
                self.data[o] &= ~m & 0xFF
        for reg in range(6):
            bar = self.bars.get(reg)
            self._bar_regs[reg] = bar.type_bits if bar is not None else 0
        self._sync_bars()

    # --------------------------------------------------------------- access
    def _sync_bars(self) -> None:
        for i, v in enumerate(self._bar_regs):
            self.put(PCI_BASE_ADDRESS_0 + 4 * i, v, 4)

    def _bar_write(self, reg: int, value: int) -> None:
        bar = self.bars.get(reg)
        if bar is not None:
            mask = ~(bar.region.size - 1) & 0xFFFFFFFF
            self._bar_regs[reg] = (value & mask & ~0xF) | bar.type_bits
            return
        low = self.bars.get(reg - 1)
        if low is not None and low.is64:
            self._bar_regs[reg] = value & (~(low.region.size - 1) >> 32) & 0xFFFFFFFF
            return
        self._bar_regs[reg] = 0  # unimplemented BAR: sizing reads back 0

    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or offset + count > CONFIG_SIZE:
            raise RegionError(f"config read {offset:#x}+{count} out of range")
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        count = len(data)
        if offset < 0 or offset + count > CONFIG_SIZE:
            raise RegionError(f"config write {offset:#x}+{count} out of range")
        bar_lo, bar_hi = PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_0 + 24
        if offset < bar_hi and offset + count > bar_lo:
            for reg in range(6):
                ro = bar_lo + 4 * reg
                if offset < ro + 4 and offset + count > ro:
                    cur = bytearray(self._bar_regs[reg].to_bytes(4, "little"))
                    for i in range(4):
                        if offset <= ro + i < offset + count:
                            cur[i] = data[ro + i - offset]
                    self._bar_write(reg, int.from_bytes(cur, "little"))
            self._sync_bars()
        d, wm, w1c = self.data, self.wmask, self.w1c
        for i in range(count):
            o = offset + i
            if bar_lo <= o < bar_hi:
                continue
            b = data[i]
            if w1c[o]:
                d[o] &= ~(b & w1c[o]) & 0xFF
            m = wm[o]
            if m:
                d[o] = (d[o] & ~m) | (b & m)
        for hook in self.write_hooks:
            hook(offset, count)


    # --------------------------------------------------------------- snapshot
    def snapshot(self) -> "ConfigSnapshot":
        """The guest-visible bytes and the BAR registers behind them."""
        return ConfigSnapshot(data=bytes(self.data), bar_regs=tuple(self._bar_regs))

    def restore(self, snap: "ConfigSnapshot") -> None:
        """Take the snapshot's bytes as they are (IDs and capabilities included: the
        guest has read them, so a newer build must not change them under it)."""
        expect(snap, ConfigSnapshot)
        require(len(snap.data) == CONFIG_SIZE and len(snap.bar_regs) == 6,
                "config space snapshot has the wrong size")
        for reg, v in enumerate(snap.bar_regs):
            bar = self.bars.get(reg)
            require(bar is None or v & 0xF == bar.type_bits,
                    f"BAR{reg} of the snapshot has another type than this function's")
        self.data[:] = snap.data
        self._bar_regs = list(snap.bar_regs)


@attrs.frozen
class ConfigSnapshot(Snapshot):
    KIND = "pci.config"
    data: bytes
    bar_regs: tuple


class ConfigRegion(Region):
    """Region index 7."""

    def __init__(self, cfg: ConfigSpace):
        self.cfg = cfg
        self.size = CONFIG_SIZE

    async def read(self, offset: int, count: int) -> bytes:
        return self.cfg.read(offset, count)

    async def write(self, offset: int, data: bytes) -> None:
        self.cfg.write(offset, data)
