"""The DMA API device models use: IOVAs go through the zPCI IOMMU of the
function (``ZpciCore.translate``) into the client's DMA space.

Every access that cannot complete raises DmaFault with the IOVA the device
used (after the function went to the error state with an error event).
"""

from __future__ import annotations

from typing import Any

from zpcid.vfio_user.dma import DmaFault

# The ZpciCore that runs us (zpcid.zpci.core imports this module, not the other way round).
Core = Any


class ZpciDmaPath:
    def __init__(self, core: Core):
        self.core = core
        self.space = core.memory

    @property
    def blocked(self) -> bool:
        """DMA is held back while the function is in the error state (``ZpciCore.dma_blocked``)."""
        return self.core.dma_blocked

    async def unblocked(self) -> None:
        await self.core.dma_unblocked()

    async def read(self, iova: int, length: int) -> bytes:
        core = self.core
        out = []
        for piova, gpa, n in core.translate(iova, length, False):
            try:
                out.append(await self.space.read(gpa, n))
            except DmaFault as exc:
                core.memory_fault(piova, gpa, exc, iova, length, False)
        core.account_dma(length, 0)
        return out[0] if len(out) == 1 else b"".join(out)

    async def write(self, iova: int, data) -> None:
        core = self.core
        view = memoryview(data)
        length = len(view)
        for piova, gpa, n in core.translate(iova, length, True):
            pos = piova - iova
            try:
                await self.space.write(gpa, view[pos : pos + n])
            except DmaFault as exc:
                core.memory_fault(piova, gpa, exc, iova, length, True)
        core.account_dma(0, length)

    @property
    def view_generation(self) -> int | None:
        """Changes whenever a view taken earlier may no longer be what its IOVA maps to;
        None while the IOMMU translates (RPCIT can change a mapping at any time)."""
        return None if self.core.translating else self.space.generation

    def views(self, iova: int, length: int, write: bool) -> list[memoryview] | None:
        """Memoryviews of the client memory behind an IOVA range, for I/O straight into
        or out of it; None where the memory is reachable only through DMA messages."""
        core = self.core
        out: list[memoryview] = []
        for piova, gpa, n in core.translate(iova, length, write):
            try:
                piece = self.space.views(gpa, n, write)
            except DmaFault as exc:
                core.memory_fault(piova, gpa, exc, iova, length, write)
            if piece is None:
                return None
            out += piece
        core.account_dma(0, length) if write else core.account_dma(length, 0)
        return out

    def views_many(self, pieces: list[tuple[int, int]], write: bool) -> list[memoryview] | None:
        """``views`` of several (iova, len) pieces of one request."""
        core = self.core
        guest = pieces if not core.translating else core.direct_pieces(pieces, write)
        if guest is not None:
            # vmm-translates keys, or a direct map: the pieces are guest addresses in one pass
            try:
                out = self.space.views_many(guest, write)
            except DmaFault:
                out = None  # the piece-by-piece path below reports the fault
            else:
                if out is not None:
                    total = sum(n for _, n in guest)
                    core.account_dma(0, total) if write else core.account_dma(total, 0)
                return out
        out = []
        for iova, n in pieces:
            if n:
                piece = self.views(iova, n, write)
                if piece is None:
                    return None
                out += piece
        return out

    async def copy(self, dst: int, src: int, length: int) -> None:
        """Device-internal copy between two IOVA ranges: one memcpy per contiguous piece."""
        core = self.core
        spieces = core.translate(src, length, False)
        dpieces = core.translate(dst, length, True)
        space = self.space
        si = di = 0
        (sio, sa, sn), (dio, da, dn) = spieces[0], dpieces[0]
        while True:
            n = min(sn, dn)
            try:
                sview = space.view(sa, n, False)
            except DmaFault:
                sview = None
            try:
                dview = space.view(da, n, True) if sview is not None else None
            except DmaFault:
                dview = None
            if dview is not None:
                dview[:] = sview
            else:
                # message-mode, discontiguous or missing memory: read and write
                # separately so a fault names the side (and IOVA) that failed
                try:
                    chunk = await space.read(sa, n)
                except DmaFault as exc:
                    core.memory_fault(sio, sa, exc, src, length, False)
                try:
                    await space.write(da, chunk)
                except DmaFault as exc:
                    core.memory_fault(dio, da, exc, dst, length, True)
            sio, sa, sn, dio, da, dn = sio + n, sa + n, sn - n, dio + n, da + n, dn - n
            if sn == 0:
                si += 1
                if si == len(spieces):
                    break
                sio, sa, sn = spieces[si]
            if dn == 0:
                di += 1
                dio, da, dn = dpieces[di]
        core.account_dma(length, length)
