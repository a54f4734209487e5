"""A PCI function with its zPCI layer composed on from above.

``ZpciFunction`` is what device types derive from: the PCI function (config
space, BARs, MSI-X, DMA space) plus a ``ZpciCore`` attached through the
function's extension interface. The core sees the function only through the
``FunctionPort`` methods below (``zpci_*``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import attrs

from protocol.vfio_user import consts as C
from zpcid.pci.function import PciFunction
from zpcid.zpci.core import ZpciCore
from zpcid.zpci.properties import ZpciProperties


class ZpciFunction(PciFunction):
    def __init__(self, name: str, *, zpci: ZpciProperties | None = None, **pci: Any):
        self._zpci_bars: tuple[tuple[bytes, int], Mapping[int, tuple[int, int]]] | None = None
        super().__init__(name, **pci)
        self.zpci = ZpciCore(name, zpci or ZpciProperties(), self.log, self, self.dma)
        self.attach_extension(self.zpci)

    @property
    def props(self) -> ZpciProperties:
        return self.zpci.props

    # ------------------------------------------------------------------ control socket (zpcictl)
    def zpci_mappings(self) -> list[dict[str, Any]]:
        return self.zpci.mappings()

    def zpci_events(self, clear: bool = False) -> list[dict[str, Any]]:
        events = list(self.zpci.event_log)
        if clear:
            self.zpci.event_log.clear()
        return events

    def inject_error(self, pec: int) -> dict[str, Any]:
        return self.zpci.inject_error(pec)

    def clear_error(self) -> dict[str, Any]:
        return self.zpci.clear_error()

    SETTABLE = ("relaxed_translation", "relaxed_alignment", "tlb_refresh", "dma_limit", "maxstbl",
                "compat", "pchid", "pfgid", "util_str")

    def set_property(self, key: str, value: Any) -> None:
        """Change a zPCI property; only while no VMM is attached (the guest would notice)."""
        if self.session is not None:
            raise RuntimeError("function is attached; detach the VMM first")
        key = key.replace("-", "_")
        if key not in self.SETTABLE:
            raise KeyError(f"property {key!r} cannot be set at run time (settable: {', '.join(self.SETTABLE)})")
        self.zpci.set_props(attrs.evolve(self.props, **{key: value}))

    # ------------------------------------------------------------------ FunctionPort
    def zpci_ids(self) -> tuple[int, int]:
        return self.config.u16(0), self.config.u16(2)

    def zpci_bars(self) -> Mapping[int, tuple[int, int]]:
        # Asked on every intercept (the CLP key in publish, PCILG/PCISTG/PCISTB):
        # the same read-only mapping while the BAR registers and the set of BARs
        # are unchanged (BARs are only ever added; their sizes are fixed).
        cfg = self.config
        key = (bytes(cfg.data[0x10:0x28]), len(cfg.bars))
        cached = self._zpci_bars
        if cached is not None and cached[0] == key:
            return cached[1]
        bars = MappingProxyType({i: (bar.region.size, cfg.u32(0x10 + 4 * i))
                                 for i, bar in cfg.bars.items() if i < 6})
        self._zpci_bars = (key, bars)
        return bars

    def zpci_msix_vectors(self) -> int:
        return self.msix.nvec if self.msix is not None else 0

    def zpci_dma_mapped(self) -> bool:
        return len(self.dma) > 0

    async def zpci_load(self, index: int, offset: int, length: int) -> bytes:
        return await self.region_read(index, offset, length)

    async def zpci_store(self, index: int, offset: int, data: bytes) -> None:
        await self.region_write(index, offset, data)

    def zpci_dma_resumed(self) -> None:
        self.dma_resumed()

    def dma_resumed(self) -> None:
        """Device models that wait out the error state restart their work here."""

    def zpci_signal_error(self) -> bool:
        return self.irqs.signal(C.VFIO_PCI_ERR_IRQ_INDEX)

    def zpci_count(self, counter: str, n: int = 1) -> None:
        setattr(self.counters, counter, getattr(self.counters, counter) + n)

    def zpci_count_error(self, kind: str) -> None:
        self.counters.errors[kind] += 1

    def zpci_spawn(self, async_fn, *args) -> bool:
        if self.tasks is None:
            return False
        self.tasks.start_soon(async_fn, *args)
        return True
