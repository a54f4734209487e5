"""What the zPCI layer needs from the PCI function it is attached to.

The function implements this small interface; the zPCI layer reaches the
function only through it (and the function reaches the zPCI layer only
through ``ZpciCore``'s DMA path and interrupt-delivery hook), so neither
imports the other's insides.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Mapping, Protocol


class FunctionPort(Protocol):
    def zpci_ids(self) -> tuple[int, int]:
        """(vendor ID, device ID) from config space."""

    def zpci_bars(self) -> Mapping[int, tuple[int, int]]:
        """BAR index (0-5) -> (size, the BAR register as the guest programmed it); read-only."""

    def zpci_msix_vectors(self) -> int:
        """MSI-X vectors of the function (0 without MSI-X)."""

    def zpci_dma_mapped(self) -> bool:
        """Whether the client has DMA-mapped anything (the mode is fixed then)."""

    async def zpci_load(self, index: int, offset: int, length: int) -> bytes:
        """Read a BAR or config space (vfio region index) for PCILG."""

    async def zpci_store(self, index: int, offset: int, data: bytes) -> None:
        """Write a BAR or config space for PCISTG/PCISTB (one access)."""

    def zpci_dma_resumed(self) -> None:
        """The function left the error state with DMA enabled: look for work again."""

    def zpci_signal_error(self) -> bool:
        """Signal the vfio-user ERR IRQ; False if the client installed none."""

    def zpci_count(self, counter: str, n: int = 1) -> None:
        """Add to one of the function's monotonic counters."""

    def zpci_count_error(self, kind: str) -> None:
        """Count one error of ``kind``."""

    def zpci_spawn(self, async_fn: Callable[..., Awaitable[None]], *args) -> bool:
        """Run a task for as long as the client's session lasts; False without a session."""
