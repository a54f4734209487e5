"""A small model VMM: guest memory, the vfio-user client and the zPCI mailbox.

Demo, benchmarks and tests attach to a function with it the way a VMM would:
select the mode, share guest memory, enable MSI-X with eventfds, enable the
function through CLP.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import AsyncIterator

import attrs

from protocol.vfio_user import consts as C
from protocol.zpci import formats as Z
from zpcid.vmm import client as vclient
from zpcid.zpci import core as Zr
from zpcid.vmm.guest import GuestTables
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm.zpci_client import ZpciMailbox

PCI_CAP_ID_MSIX = 0x11


def find_capability(cfg: bytes, cap_id: int) -> int:
    """Offset of the first capability ``cap_id`` in a config-space dump."""
    off, seen = cfg[0x34], 0
    while off and seen < 48:
        if cfg[off] == cap_id:
            return off
        off, seen = cfg[off + 1], seen + 1
    raise LookupError(f"capability {cap_id:#x} not found")


@attrs.define
class Vmm:
    client: vclient.Client
    box: ZpciMailbox
    mem: Memfd
    msix_fds: list[int]
    err_fd: int
    nvec: int

    def fib(self, **kw) -> bytes:
        return Z.Fib(**kw).pack()

    def tables(self, base: int, size: int) -> GuestTables:
        """Guest translation tables carved from [base, base+size) of guest memory."""
        return GuestTables(self.mem, base, size)

    async def enable_function(self) -> int:
        return await self.box.enable()

    async def register_translation(self, pba: int, pal: int, iota: int) -> "vclient.Client":
        return await self.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, self.fib(pba=pba, pal=pal, iota=iota))

    async def deregister_translation(self):
        return await self.box.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT, self.fib())


@contextlib.asynccontextmanager
async def attach(path: str, *, guest_memory: int = 64 << 20, mode: int = Zr.MODE_ZPCID,
                 enable: bool = True, bars: bool = True) -> AsyncIterator[Vmm]:
    """Attach to a function's socket as a VMM with ``guest_memory`` bytes of RAM."""
    mem = Memfd(guest_memory, "zpcid-guest")
    fds: list[int] = []
    try:
        async with vclient.connect(path) as c:
            box = await ZpciMailbox.open(c)
            if await box.set_mode(mode, guest_memory) != mode:
                raise RuntimeError("function refused the mode")
            # In zpcid-translates mode DMA_MAP keys are guest absolute addresses.
            await c.dma_map(0, guest_memory, mem.fd, 0)
            if bars:
                for i in range(6):
                    await c.region_info(i)
            cfg = await c.region_read(C.VFIO_PCI_CONFIG_REGION_INDEX, 0, 256)
            msix = find_capability(cfg, PCI_CAP_ID_MSIX)
            nvec = (struct.unpack_from("<H", cfg, msix + 2)[0] & 0x7FF) + 1
            await c.region_write(7, 4, struct.pack("<H", 0x6))  # memory space + bus master
            fds = await c.enable_irq_eventfds(C.VFIO_PCI_MSIX_IRQ_INDEX, nvec)
            err = await c.enable_irq_eventfds(C.VFIO_PCI_ERR_IRQ_INDEX, 1)
            fds += err
            await c.region_write(7, msix + 2, struct.pack("<H", 0x8000 | (nvec - 1)))
            vmm = Vmm(c, box, mem, fds[:nvec], err[0], nvec)
            if enable:
                await vmm.enable_function()
            yield vmm
    finally:
        for fd in fds:
            os.close(fd)
        mem.close()
