"""MSI-X capability, table and PBA, delivering vectors through client eventfds."""

from __future__ import annotations

import struct
from typing import Callable

import attrs

from protocol.vfio_user import consts as C
from zpcid.snapshot import Snapshot, expect, require
from zpcid.vfio_user.irq import IrqTable
from zpcid.pci.config import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL, ConfigSpace

ENTRY_SIZE = 16
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1


class Msix:
    """Vector state of one function.

    QEMU emulates the MSI-X table itself and never writes ours, so the table's
    per-vector mask bits only count once a client has written the table;
    protocol masks (SET_IRQS MASK/UNMASK) and the function mask always count.
    """

    def __init__(self, cfg: ConfigSpace, irqs: IrqTable, nvec: int,
                 bar: int, table_offset: int, pba_offset: int):
        if not 1 <= nvec <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        self.cfg, self.irqs, self.nvec = cfg, irqs, nvec
        self.table_offset, self.pba_offset = table_offset, pba_offset
        self.table_size = nvec * ENTRY_SIZE
        self.pba_size = ((nvec + 63) // 64) * 8
        body = struct.pack("<HII", nvec - 1, table_offset | bar, pba_offset | bar)
        self.cap = cfg.add_capability(PCI_CAP_ID_MSIX, body,
                                      (PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL).to_bytes(2, "little"))
        self.table = bytearray(self.table_size)
        self.pending = bytearray(self.pba_size)
        self.table_in_use = False
        self.delivered = 0
        # zPCI adapter-interrupt path: called before the eventfd is signalled;
        # returning False suppresses the eventfd.
        self.deliver_hook: Callable[[int], bool] | None = None
        self.reset()
        cfg.write_hooks.append(self._config_written)
        irqs.on_unmask = self._protocol_unmask
        irqs.on_trigger = self._protocol_trigger
        irqs.on_change = self._irqs_changed

    def reset(self) -> None:
        for v in range(self.nvec):
            struct.pack_into("<QII", self.table, v * ENTRY_SIZE, 0, 0, PCI_MSIX_ENTRY_CTRL_MASKBIT)
        self.pending[:] = bytes(self.pba_size)
        self.table_in_use = False
        ctl = self.cfg.u16(self.cap + 2) & ~(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self.cfg.put(self.cap + 2, ctl, 2)

    # ------------------------------------------------------------------ state
    @property
    def control(self) -> int:
        return self.cfg.u16(self.cap + 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.control & PCI_MSIX_FLAGS_MASKALL)

    def vector_masked(self, v: int) -> bool:
        if self.function_masked or self.irqs.masked[C.VFIO_PCI_MSIX_IRQ_INDEX][v]:
            return True
        if self.table_in_use:
            return bool(self.table[v * ENTRY_SIZE + 12] & PCI_MSIX_ENTRY_CTRL_MASKBIT)
        return False

    def is_pending(self, v: int) -> bool:
        return bool(self.pending[v // 8] & (1 << (v % 8)))

    def _set_pending(self, v: int, on: bool) -> None:
        if on:
            self.pending[v // 8] |= 1 << (v % 8)
        else:
            self.pending[v // 8] &= ~(1 << (v % 8)) & 0xFF

    # ------------------------------------------------------------------ delivery
    def fire(self, v: int) -> bool:
        """Raise vector v; True if it was delivered now (not left pending)."""
        if not 0 <= v < self.nvec:
            raise ValueError(f"MSI-X vector {v} out of range")
        if not self.enabled:
            return False
        if self.vector_masked(v) or self.irqs.eventfd(C.VFIO_PCI_MSIX_IRQ_INDEX, v) is None:
            self._set_pending(v, True)
            return False
        return self._deliver(v)

    def _deliver(self, v: int) -> bool:
        if self.deliver_hook is not None and not self.deliver_hook(v):
            return False
        ok = self.irqs.signal(C.VFIO_PCI_MSIX_IRQ_INDEX, v)
        if ok:
            self.delivered += 1
        return ok

    def _flush_pending(self) -> None:
        if not self.enabled or not any(self.pending):
            return
        for v in range(self.nvec):
            if self.is_pending(v) and not self.vector_masked(v) and \
                    self.irqs.eventfd(C.VFIO_PCI_MSIX_IRQ_INDEX, v) is not None:
                self._set_pending(v, False)
                self._deliver(v)

    def _config_written(self, offset: int, length: int) -> None:
        if offset <= self.cap + 3 and offset + length > self.cap + 2:
            self._flush_pending()

    def _protocol_unmask(self, index: int, v: int) -> None:
        if index == C.VFIO_PCI_MSIX_IRQ_INDEX:
            self._flush_pending()

    def _protocol_trigger(self, index: int, v: int) -> None:
        if index == C.VFIO_PCI_MSIX_IRQ_INDEX:
            self.fire(v)

    def _irqs_changed(self, index: int) -> None:
        if index == C.VFIO_PCI_MSIX_IRQ_INDEX:
            self._flush_pending()

    # ------------------------------------------------------------------ BAR windows
    async def table_read(self, offset: int, count: int) -> bytes:
        return bytes(self.table[offset : offset + count])

    async def table_write(self, offset: int, data: bytes) -> None:
        self.table[offset : offset + len(data)] = data
        self.table_in_use = True
        self._flush_pending()

    async def pba_read(self, offset: int, count: int) -> bytes:
        return bytes(self.pending[offset : offset + count])

    async def pba_write(self, offset: int, data: bytes) -> None:
        pass  # the PBA is read-only

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> "MsixSnapshot":
        """Table, pending bits and whether the client uses the table (enable and
        function mask live in config space)."""
        return MsixSnapshot(nvec=self.nvec, table=bytes(self.table), pending=bytes(self.pending),
                            table_in_use=self.table_in_use, delivered=self.delivered)

    def restore(self, snap: "MsixSnapshot") -> None:
        """Take the state as it was; nothing is delivered (pending stays pending)."""
        expect(snap, MsixSnapshot)
        require(snap.nvec == self.nvec, f"MSI-X snapshot has {snap.nvec} vectors, function has {self.nvec}")
        require(len(snap.table) == self.table_size and len(snap.pending) == self.pba_size,
                "MSI-X snapshot table or PBA has the wrong size")
        self.table[:] = snap.table
        self.pending[:] = snap.pending
        self.table_in_use = snap.table_in_use
        self.delivered = snap.delivered


@attrs.frozen
class MsixSnapshot(Snapshot):
    KIND = "pci.msix"
    nvec: int
    table: bytes
    pending: bytes
    table_in_use: bool
    delivered: int
