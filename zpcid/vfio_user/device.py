"""What a vfio-user transport needs from a device model.

The pure-Python endpoint (``zpcid.vfio_user.endpoint``) drives this interface; a
libvfio-user backend would register the same calls as its callbacks.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import attrs

from protocol.vfio_user.messages import IrqSet, RegionCap


@attrs.frozen
class RegionDesc:
    flags: int
    size: int
    caps: tuple[RegionCap, ...] = ()
    fd: int | None = None
    offset: int = 0  # file offset to mmap with ``fd``


class Session(Protocol):
    """The attached client, as seen by a device (message-mode DMA, notifications)."""

    async def dma_read(self, addr: int, count: int) -> bytes: ...
    async def dma_write(self, addr: int, data: bytes) -> None: ...


class VfioDevice(Protocol):
    def attach(self, session: Session) -> None: ...
    def detach(self) -> None: ...
    def device_info(self) -> tuple[int, int, int]: ...  # flags, num_regions, num_irqs
    def region_info(self, index: int) -> RegionDesc: ...
    async def region_read(self, index: int, offset: int, count: int) -> bytes: ...
    async def region_write(self, index: int, offset: int, data: bytes) -> None: ...
    def irq_info(self, index: int) -> tuple[int, int]: ...  # flags, count
    def set_irqs(self, req: IrqSet, fds: Sequence[int]) -> list[int]: ...
    def dma_map(self, iova: int, size: int, readable: bool, writable: bool,
                fd: int | None, offset: int) -> None: ...
    def dma_unmap(self, iova: int, size: int) -> int: ...
    def dma_unmap_all(self) -> int: ...
    async def reset(self) -> None: ...
    def release_requested(self) -> bool: ...  # the VMM is asked to let go; False: nobody was told
