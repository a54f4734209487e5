"""A guest + VMM set-up for zPCI tests: real socket, real memfd, real tables."""

import contextlib

import attrs

from protocol.zpci import formats as Z
from zpcid.vmm import client as vclient
from zpcid.zpci import core as Zr
from zpcid.vmm.guest import GuestTables
from zpcid.vfio_user.memfd import Memfd
from zpcid.zpci.properties import ZpciProperties
from zpcid.vmm.model import attach
from zpcid.vmm.zpci_client import ZpciMailbox
from helpers import serving

GUEST_MEM = 64 << 20
TABLES_AT = 48 << 20  # guest tables live in the top 16 MiB
SDMA = 0x1_0000_0000


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
    async with serving(function, sock_dir) as server:
        async with attach(server.path, guest_memory=GUEST_MEM, mode=mode, enable=enable) as vmm:
            gt = vmm.tables(TABLES_AT, 16 << 20) if tables else None
            yield Env(function, server, vmm.client, vmm.box, vmm.mem, gt, vmm.msix_fds, vmm.err_fd)


def props(**kw) -> ZpciProperties:
    kw.setdefault("fid", 0x10)
    kw.setdefault("uid", 0x1234)
    return ZpciProperties(**kw)
