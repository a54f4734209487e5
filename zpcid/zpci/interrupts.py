"""Adapter interruptions: MSI-X vector n -> AIBV bit (and summary bit) in guest memory."""

from __future__ import annotations

from typing import Callable

import attrs

from zpcid.zpci.atomic import set_indicator_bit


@attrs.frozen
class AdapterInterrupts:
    """One MPCIFC "register adapter interruptions" (FIB format 0)."""

    isc: int
    noi: int
    aibvo: int
    summary: bool
    aisbo: int
    aibv: int
    aisb: int

    @classmethod
    def from_fib(cls, fib) -> "AdapterInterrupts":
        return cls(fib.isc, fib.noi, fib.aibvo, bool(fib.sum), fib.aisbo, fib.aibv, fib.aisb)

    def indicator_ranges(self) -> list[tuple[int, int]]:
        """The guest bytes the indicators live in: (address, length)."""
        out = [(self.aibv, (self.aibvo + self.noi + 7) // 8)]
        if self.summary:
            out.append((self.aisb, self.aisbo // 8 + 1))
        return out

    def fib_fields(self) -> dict[str, int]:
        return dict(isc=self.isc, noi=self.noi, aibvo=self.aibvo, sum=int(self.summary),
                    aisbo=self.aisbo, aibv=self.aibv, aisb=self.aisb)


def raise_vector(aif: AdapterInterrupts, vector: int, address: Callable[[int], int]) -> bool:
    """Set the AIBV bit of ``vector`` (bit 0 = 0x80 of the first byte) and, with
    SUM, the summary bit; True when the VMM must inject an interruption (the
    summary bit went from 0 to 1, or SUM is off). ``address(gpa)`` is the process
    address of a writable guest byte (DmaFault if there is none).

    The guest scans every vector once it sees the summary bit: an interrupt is
    only needed when that bit went from 0 to 1.
    """
    bit = aif.aibvo + vector
    set_indicator_bit(address(aif.aibv + bit // 8), bit % 8)
    if not aif.summary:
        return True
    return set_indicator_bit(address(aif.aisb + aif.aisbo // 8), aif.aisbo % 8)
