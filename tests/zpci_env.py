"""A guest + VMM set-up for zPCI tests: real socket, real memfd, real tables."""

import contextlib
import os
import struct

import attrs

from protocol import consts as C
from protocol import zpci as Z
from zpcid import client as vclient
from zpcid import zpci as Zr
from zpcid.guest import GuestTables
from zpcid.memfd import Memfd
from zpcid.properties import ZpciProperties
from zpcid.zpci_client import ZpciMailbox
from helpers import serving

GUEST_MEM = 64 << 20
TABLES_AT = 48 << 20  # guest tables live in the top 16 MiB
SDMA = 0x1_0000_0000


def find_cap(cfg: bytes, cap_id: int) -> int:
    off = cfg[0x34]
    while off:
        if cfg[off] == cap_id:
            return off
        off = cfg[off + 1]
    raise LookupError(cap_id)


@attrs.define
class Env:
    function: object
    server: object
    client: vclient.Client
    box: ZpciMailbox
    mem: Memfd
    tables: GuestTables | None
    eventfds: list[int]
    err_fd: int

    def fib(self, **kw) -> bytes:
        return Z.Fib(**kw).pack()

    async def register_ioat(self, pba=SDMA, pal=SDMA + (32 << 20) - 1, iota=None):
        return await self.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT,
                                     self.fib(pba=pba, pal=pal,
                                              iota=self.tables.iota if iota is None else iota))


@contextlib.asynccontextmanager
async def zpci_env(sock_dir, function, *, mode=Zr.MODE_ZPCID, enable=True, tables=True):
    mem = Memfd(GUEST_MEM, "guest")
    fds: list[int] = []
    try:
        async with serving(function, sock_dir) as server:
            async with vclient.connect(server.path) as c:
                box = await ZpciMailbox.open(c)
                assert await box.set_mode(mode, GUEST_MEM) == mode
                await c.dma_map(0, GUEST_MEM, mem.fd, 0)
                for i in range(6):
                    await c.region_info(i)
                cfg = await c.region_read(7, 0, 256)
                # bus master + memory, MSI-X on with eventfds
                await c.region_write(7, 4, struct.pack("<H", 0x6))
                nvec = function.msix.nvec
                fds = await c.enable_irq_eventfds(C.VFIO_PCI_MSIX_IRQ_INDEX, nvec)
                err = await c.enable_irq_eventfds(C.VFIO_PCI_ERR_IRQ_INDEX, 1)
                fds += err
                msix = find_cap(cfg, 0x11)
                await c.region_write(7, msix + 2, struct.pack("<H", 0x8000 | (nvec - 1)))
                if enable:
                    await box.enable()
                gt = GuestTables(mem, TABLES_AT, 16 << 20) if tables else None
                yield Env(function, server, c, box, mem, gt, fds[:nvec], err[0])
    finally:
        for fd in fds:
            os.close(fd)
        mem.close()


def props(**kw) -> ZpciProperties:
    kw.setdefault("fid", 0x10)
    kw.setdefault("uid", 0x1234)
    return ZpciProperties(**kw)
