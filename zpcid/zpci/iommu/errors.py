"""What a translation reports when it fails."""

from __future__ import annotations

from typing import Protocol


class GuestMemory(Protocol):
    def view(self, addr: int, length: int, write: bool = False) -> memoryview: ...


class TranslationError(Exception):
    """A translation failure with the PEC the function reports and the failing IOVA."""

    def __init__(self, pec: int, iova: int, message: str = "", qualifier: int | None = None):
        super().__init__(f"PEC {pec:#x} at IOVA {iova:#x}" + (f": {message}" if message else ""))
        self.pec = pec
        self.iova = iova
        self.qualifier = qualifier
        self.message = message


