"""The direct map of relaxed translation (IOTA with T = 0)."""

from __future__ import annotations

import attrs

from protocol.zpci import tables as T
from zpcid.zpci.iommu.errors import TranslationError


@attrs.frozen
class DirectMap:
    """Relaxed translation (IOTA T = 0): IOVA -> guest address IOVA - sdma.

    O(1) to create and drop; uses no DMA-limit units.  Accesses must lie in
    [pba, pal] and below ``memory_limit`` in guest terms, else PEC 0x02.
    """

    sdma: int
    pba: int
    pal: int
    memory_limit: int
    writable: bool = True
    mapped = 0  # pages counted against the DMA limit

    def lookup(self, iova: int) -> tuple[int, bool] | None:
        if iova < max(self.pba, self.sdma) or iova > self.pal or iova - self.sdma >= self.memory_limit:
            return None
        return iova - self.sdma, self.writable

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        if length <= 0:
            return []
        last = iova + length - 1
        if iova < max(self.pba, self.sdma) or last > self.pal or last - self.sdma >= self.memory_limit:
            raise TranslationError(T.ZPCI_PEC_OUT_OF_RANGE, max(iova, 0),
                                   "DMA outside the direct-mapped aperture")
        if write and not self.writable:
            raise TranslationError(T.ZPCI_PEC_TRANSLATION_PROTECTION, iova, "read-only direct map")
        return [(iova - self.sdma, length)]

    def ranges(self) -> list[tuple[int, int, int, bool]]:
        lo = max(self.pba, self.sdma)
        hi = min(self.pal + 1, self.sdma + self.memory_limit)
        return [(lo, hi - lo, lo - self.sdma, self.writable)] if hi > lo else []


