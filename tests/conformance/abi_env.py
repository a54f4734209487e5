"""A guest as the control-region ABI sees it: the reference VMM over a real
socket, memfd guest memory, Linux-style translation tables, and nothing of
zpcid's insides — every answer is read from the region's bytes (through the
mmap or through REGION_READ, per ``access``).
"""

import contextlib
import struct

import attrs

from protocol.zpci import formats as Z
from zpcid.vmm import client as vclient
from protocol.zpci import region as Zr  # ABI constants only (offsets, codes)
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.vmm.guest import GuestTables
from zpcid.zpci.properties import ZpciProperties
from zpcid.vmm.model import Vmm, attach
from zpcid.vmm.zpci_client import Result
from helpers import serving

GUEST_MEM = 64 << 20
TABLES_AT = 48 << 20
SDMA = 0x1_0000_0000
PAGE = 4096
ACCESS = ("mmap", "regio")


def props(**kw) -> ZpciProperties:
    kw.setdefault("fid", 0x21)
    kw.setdefault("uid", 0x4321)
    return ZpciProperties(**kw)


def fib(**kw) -> bytes:
    return Z.Fib(**kw).pack()


@attrs.frozen
class Answer:
    """One instruction as the guest experiences it."""

    res: Result
    r1: int  # the guest's r1 after the VMM applied the write-back
    r2: int

    @property
    def cc(self) -> int:
        return self.res.cc

    @property
    def exception(self) -> int:
        return self.res.exception

    @property
    def result(self) -> int:
        return self.res.result


@attrs.define
class Guest:
    vmm: Vmm
    tables: GuestTables

    @property
    def box(self):
        return self.vmm.box

    @property
    def client(self):
        return self.vmm.client

    @property
    def mem(self):
        return self.vmm.mem

    async def header(self) -> dict:
        raw = await self.box.read(0, 0x64)
        (magic, major, minor, features, mode, size, limit, state, fh, fid, uid, ioat, shadow,
         avail, lost) = struct.unpack_from("<IHHQIIQIIIIIIII", raw)
        flags, vfid, vuid = struct.unpack_from("<III", raw, Zr.HDR_VMM_FLAGS)
        return dict(magic=magic, major=major, minor=minor, features=features, mode=mode, size=size,
                    limit=limit, state=state, fh=fh, fid=fid, uid=uid, ioat=ioat, shadow=shadow,
                    dma_available=avail, events_lost=lost, vmm_flags=flags, vmm_fid=vfid, vmm_uid=vuid)

    async def state(self) -> int:
        return (await self.header())["state"]

    async def fh(self) -> int:
        return (await self.header())["fh"]

    async def events(self) -> list[tuple[int, int, Z.ErrorCcdf | Z.AvailabilityCcdf]]:
        out = []
        for kind, pec, ccdf in await self.box.drain_events():
            cls = Z.ErrorCcdf if kind == Z.ZPCI_EVENT_ERROR else Z.AvailabilityCcdf
            out.append((kind, pec, cls.unpack(ccdf)))
        return out

    def err_irqs(self) -> int:
        return vclient.read_eventfd(self.vmm.err_fd)

    # -------------------------------------------------------------- instructions
    async def _run(self, cmd: int, r1: int, r2: int, r3: int, **kw) -> Answer:
        res = await self.box.command(cmd, r1, r2, r3, **kw)
        return Answer(res, *res.apply(r1, r2))

    async def mpcifc(self, oc: int, fib_bytes: bytes = b"", *, fh: int | None = None,
                     dmaas: int = 0) -> Answer:
        fh = await self.fh() if fh is None else fh
        return await self._run(Zr.CMD_MPCIFC, (fh << 32) | (dmaas << 16) | oc, 0, 0,
                               fib=fib_bytes or fib())

    async def stpcifc(self, *, fh: int | None = None, dmaas: int = 0) -> Answer:
        fh = await self.fh() if fh is None else fh
        return await self._run(Zr.CMD_STPCIFC, (fh << 32) | (dmaas << 16), 0, 0)

    async def rpcit(self, start: int, length: int, *, fh: int | None = None) -> Answer:
        fh = await self.fh() if fh is None else fh
        return await self._run(Zr.CMD_RPCIT, fh << 32, start, length)

    async def pcistb(self, pcias: int, offset: int, data: bytes, *, gaddr: int = 0x8000,
                     fh: int | None = None) -> Answer:
        fh = await self.fh() if fh is None else fh
        return await self._run(Zr.CMD_PCISTB, (fh << 32) | (pcias << 16) | len(data), gaddr, offset,
                               data=data)

    async def pcilg(self, pcias: int, offset: int, length: int, *, fh: int | None = None,
                    r1: int = 0x5A5A5A5A5A5A5A5A) -> Answer:
        fh = await self.fh() if fh is None else fh
        return await self._run(Zr.CMD_PCILG, r1, (fh << 32) | (pcias << 16) | length, offset)

    async def pcistg(self, pcias: int, offset: int, length: int, value: int, *,
                     fh: int | None = None) -> Answer:
        fh = await self.fh() if fh is None else fh
        return await self._run(Zr.CMD_PCISTG, value, (fh << 32) | (pcias << 16) | length, offset)

    async def register_ioat(self, pba: int = SDMA, pal: int = SDMA + (32 << 20) - 1,
                            iota: int | None = None) -> Answer:
        return await self.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT,
                                 fib(pba=pba, pal=pal, iota=self.tables.iota if iota is None else iota))

    async def recover(self) -> None:
        """Linux's error recovery: reset block, then reset error."""
        assert (await self.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK)).cc == 0
        assert (await self.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR)).cc == 0

    async def punch_hole(self, gpa: int, size: int) -> None:
        """The VMM takes [gpa, gpa+size) out of the guest memory it shares."""
        await self.client.dma_unmap(0, GUEST_MEM)
        await self.client.dma_map(0, gpa, self.mem.fd, 0)
        await self.client.dma_map(gpa + size, GUEST_MEM - gpa - size, self.mem.fd, gpa + size)

    # -------------------------------------------------------------- the device
    async def dma(self, op: int, src: int, dst: int, length: int, pattern: int = 0) -> tuple[int, int]:
        """Run one dma-engine operation: (error code, fault address register)."""
        st = await Driver(self.client).run(op, src, dst, length, pattern)
        fault = struct.unpack("<Q", await self.client.region_read(0, D.REG_FAULT_ADDR, 8))[0]
        return D.status_error(st), fault


@contextlib.asynccontextmanager
async def guest(sock_dir, function, access: str, *, mode: int = Zr.MODE_ZPCID, enable: bool = True,
                vmm_flags: int = Zr.VMM_EVENTS | Zr.VMM_ADAPTER):
    async with serving(function, sock_dir) as server:
        async with attach(server.path, guest_memory=GUEST_MEM, mode=mode, enable=enable,
                          mmap=access == "mmap", vmm_flags=vmm_flags) as vmm:
            yield Guest(vmm, vmm.tables(TABLES_AT, 16 << 20))
