"""Lazy translation: the shadow IOTLB as a cache that fills itself from the
guest's tables on a miss (the function group's refresh bit off).

Without the refresh bit the guest issues RPCIT only when a valid entry became
invalid or changed; an entry that went from invalid to valid is simply there
for the device's next access.  So a DMA that misses the shadow walks the
guest's tables for the pages it touches (``walk.rpcit`` over exactly those
pages), caches what is valid and translates; RPCIT (``walk.invalidate``) only
makes the shadow forget a range.  Only valid translations are cached: an
invalid page is walked again at every access, so a mapping the guest creates
later is seen without an RPCIT.
"""

from __future__ import annotations

from protocol.zpci import tables as T
from zpcid.zpci.iommu.errors import GuestMemory, TranslationError
from zpcid.zpci.iommu.shadow import PAGE, ShadowIotlb
from zpcid.zpci.iommu.walk import RpcitResult, rpcit

# A miss walks at most this much of an access at a time: the walk's cost is
# bounded per piece of the transfer, like the copy that follows it.
FILL_CHUNK = 2 << 20


class LazyIotlb:
    """``translate`` through ``shadow``, filling it on a miss from the tables at ``iota``.

    The DMA limit bounds the cache: when a miss needs more entries than are
    free, every cached translation is dropped first (an IOTLB's overflow
    flush), and an access needing more than the whole limit is translated
    without being cached.  A valid translation never fails for lack of room.
    ``filled`` is called with the result of every fill walk.
    """

    def __init__(self, shadow: ShadowIotlb, mem: GuestMemory, iota: int, pba: int, pal: int,
                 filled=None):
        self.shadow = shadow
        self.mem = mem
        self.iota = iota
        self.pba = pba
        self.pal = pal
        self.filled = filled
        self.evictions = 0  # overflow flushes

    @property
    def mapped(self) -> int:
        return self.shadow.mapped

    def ranges(self) -> list[tuple[int, int, int, bool]]:
        return self.shadow.ranges()

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        """Guest (address, length) pieces, as ``ShadowIotlb.translate``; misses are walked."""
        sh = self.shadow
        try:
            return sh.translate(iova, length, write)  # hits, and PEC 0x02 outside [PBA, PAL]
        except TranslationError as exc:
            if exc.pec != T.ZPCI_PEC_TRANSLATION_PROTECTION:
                raise
        pieces: list[tuple[int, int]] = []
        pos, end = iova, iova + length
        while pos < end:
            stop = min(end, (pos & ~(FILL_CHUNK - 1)) + FILL_CHUNK)
            try:
                part = sh.translate(pos, stop - pos, write)
            except TranslationError as exc:
                if exc.pec != T.ZPCI_PEC_TRANSLATION_PROTECTION:
                    raise
                part = self._fill(pos, stop - pos, write)
            for gpa, n in part:
                if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                    pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
                else:
                    pieces.append((gpa, n))
            pos = stop
        return pieces

    def _fill(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        """Walk the tables for the pages of [iova, iova+length), cache them, translate."""
        lo = iova & ~(PAGE - 1)
        hi = (iova + length + PAGE - 1) & ~(PAGE - 1)
        npages = (hi - lo) >> T.PAGE_SHIFT
        sh = self.shadow
        target = sh
        if sh.limit is not None and npages > sh.available:
            if npages <= sh.limit:
                sh.clear()
                self.evictions += 1
            else:
                # More than the whole cache: translate from a private walk.
                target = ShadowIotlb(None)
                target.pba, target.pal = sh.pba, sh.pal
        res: RpcitResult = rpcit(target, self.mem, self.iota, self.pba, self.pal, lo, hi - lo)
        if self.filled is not None:
            self.filled(res)
        if res.error is not None:
            raise TranslationError(res.error.pec, max(res.error.iova, iova), res.error.message)
        # An invalid or read-only page raises PEC 0x04 at its IOVA here.
        return target.translate(iova, length, write)
