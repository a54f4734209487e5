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

    @property
    def window(self) -> tuple[int, int]:
        """[lo, hi): the IOVAs that reach guest memory (the aperture below the memory limit)."""
        return max(self.pba, self.sdma), min(self.pal + 1, self.sdma + self.memory_limit)

    def lookup(self, iova: int) -> tuple[int, bool] | None:
        lo, hi = self.window
        if not lo <= iova < hi:
            return None
        return iova - self.sdma, self.writable

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        if length <= 0:
            return []
        lo, hi = self.window
        if iova < lo or iova + length > hi:
            raise TranslationError(T.ZPCI_PEC_OUT_OF_RANGE, max(iova, 0),
                                   "DMA outside the direct-mapped aperture")
        if write and not self.writable:
            raise TranslationError(T.ZPCI_PEC_TRANSLATION_PROTECTION, iova, "read-only direct map")
        return [(iova - self.sdma, length)]

    def translate_many(self, pieces: list[tuple[int, int]], write: bool) -> list[tuple[int, int]] | None:
        """Guest (address, length) of every (iova, length) piece of one request, or None if
        any piece would fault (``translate`` of that piece then names the fault).

        One bounds check per piece and no per-page work: the whole request in one pass."""
        if write and not self.writable:
            return None
        lo, hi = self.window
        sdma = self.sdma
        out = []
        for iova, n in pieces:
            if n > 0:
                if iova < lo or iova + n > hi:
                    return None
                out.append((iova - sdma, n))
        return out

    def ranges(self) -> list[tuple[int, int, int, bool]]:
        lo, hi = self.window
        return [(lo, hi - lo, lo - self.sdma, self.writable)] if hi > lo else []


