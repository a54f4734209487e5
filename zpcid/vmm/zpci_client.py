"""VMM side of the zPCI control region: what a VMM does on each intercept.

Drives region 9 of a function through the reference client: mmap for the
operands and results, one REGION_WRITE of the doorbell per instruction.
"""

from __future__ import annotations

import struct

import attrs

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from zpcid.zpci import core as Zr
from zpcid.vmm.client import Client


@attrs.frozen
class Result:
    result: int
    cc: int
    status: int
    exception: int
    r1: int
    fib: bytes = b""


class ZpciMailbox:
    def __init__(self, client: Client, index: int, mm):
        self.client = client
        self.index = index
        self.mm = mm

    @classmethod
    async def open(cls, client: Client) -> "ZpciMailbox":
        """Find the control region by its type capability and mmap it."""
        info = await client.get_info()
        for idx in range(C.VFIO_PCI_NUM_REGIONS, info.num_regions):
            rm = await client.region_info(idx)
            for cap in rm.info.caps:
                if isinstance(cap, M.TypeCap) and cap.type == Zr.ZPCI_REGION_TYPE \
                        and cap.subtype == Zr.ZPCI_REGION_SUBTYPE:
                    if rm.mm is None:
                        raise RuntimeError("control region is not mmappable")
                    box = cls(client, idx, rm.mm)
                    magic, major = struct.unpack_from("<IH", rm.mm, Zr.HDR_MAGIC)
                    if magic != Zr.MAGIC or major != Zr.ABI_MAJOR:
                        raise RuntimeError(f"control region ABI {magic:#x}/{major} not understood")
                    return box
        raise LookupError("function has no zPCI control region")

    # ------------------------------------------------------------------ header
    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.mm, off)[0]

    @property
    def state(self) -> int:
        return self.u32(Zr.HDR_STATE)

    @property
    def fh(self) -> int:
        return self.u32(Zr.HDR_FH)

    @property
    def features(self) -> int:
        return struct.unpack_from("<Q", self.mm, Zr.HDR_FEATURES)[0]

    async def set_mode(self, mode: int, guest_memory_limit: int = 0) -> int:
        # One write covering mode and memory limit.
        payload = struct.pack("<IIQ", mode, Zr.REGION_SIZE, guest_memory_limit)
        await self.client.region_write(self.index, Zr.HDR_MODE, payload, via_mmap=False)
        return self.u32(Zr.HDR_MODE)

    def clp_block(self, which: str) -> bytes:
        off, n = {"list": (Zr.CLP_LIST_ENTRY, 16), "query": (Zr.CLP_QUERY_FN, 256),
                  "group": (Zr.CLP_QUERY_GRP, 64)}[which]
        return bytes(self.mm[off : off + n])

    # ------------------------------------------------------------------ mailbox
    async def command(self, cmd: int, r1: int = 0, r2: int = 0, r3: int = 0, *,
                      fib: bytes | None = None, data: bytes | None = None) -> Result:
        offset, doorbell = self.prepare(cmd, r1, r2, r3, fib=fib, data=data)
        await self.client.region_write(self.index, offset, doorbell, via_mmap=False)
        return self.result()

    def prepare(self, cmd: int, r1: int = 0, r2: int = 0, r3: int = 0, *,
                fib: bytes | None = None, data: bytes | None = None) -> tuple[int, bytes]:
        """Write an instruction's operands; returns the doorbell write (offset, data) that runs it."""
        mm, base = self.mm, Zr.MAILBOX
        struct.pack_into("<QQQ", mm, base + Zr.MB_R1, r1, r2, r3)
        if fib is not None:
            mm[base + Zr.MB_FIB : base + Zr.MB_FIB + 80] = fib.ljust(80, b"\0")
        if data is not None:
            mm[Zr.MB_DATA : Zr.MB_DATA + len(data)] = data
        return base + Zr.MB_DOORBELL, struct.pack("<I", cmd)

    def result(self) -> Result:
        """The outcome of the last instruction, from the mailbox."""
        mm, base = self.mm, Zr.MAILBOX
        result, cc, status, exc, _, r1_out = struct.unpack_from("<IBBBBQ", mm, base + Zr.MB_RESULT)
        fib_out = bytes(mm[base + Zr.MB_FIB_OUT : base + Zr.MB_FIB_OUT + 80])
        return Result(result, cc, status, exc, r1_out, fib_out)

    async def clp(self, request: bytes) -> bytes:
        base = Zr.MAILBOX + Zr.MB_CLP_REQ
        self.mm[base : base + 32] = request.ljust(32, b"\0")
        await self.command(Zr.CMD_CLP)
        resp = Zr.MAILBOX + Zr.MB_CLP_RESP
        length = struct.unpack_from(">H", self.mm, resp)[0]
        return bytes(self.mm[resp : resp + max(16, min(length, 256))])

    async def set_pci_fn(self, fh: int, oc: int, ndas: int = 1) -> tuple[int, int]:
        """CLP Set PCI Function; returns (response code, new FH)."""
        req = struct.pack(">HHI8sIHBB8s", 32, 0x0005, 0, bytes(8), fh, 0, oc, ndas, bytes(8))
        resp = await self.clp(req)
        return struct.unpack_from(">H", resp, 2)[0], struct.unpack_from(">I", resp, 16)[0]

    async def enable(self) -> int:
        rc, fh = await self.set_pci_fn(self.fh, 0)
        if rc != 0x0010:
            raise RuntimeError(f"enable failed: CLP response {rc:#x}")
        return fh

    async def mpcifc(self, oc: int, fib: bytes, *, fh: int | None = None, dmaas: int = 0) -> Result:
        fh = self.fh if fh is None else fh
        return await self.command(Zr.CMD_MPCIFC, (fh << 32) | (dmaas << 16) | oc, fib=fib)

    async def stpcifc(self, *, fh: int | None = None, dmaas: int = 0) -> Result:
        fh = self.fh if fh is None else fh
        return await self.command(Zr.CMD_STPCIFC, (fh << 32) | (dmaas << 16))

    async def rpcit(self, start: int, length: int, *, fh: int | None = None) -> Result:
        fh = self.fh if fh is None else fh
        return await self.command(Zr.CMD_RPCIT, fh << 32, start, length)

    async def pcistb(self, pcias: int, offset: int, data: bytes, *, gaddr: int = 0,
                     fh: int | None = None) -> Result:
        fh = self.fh if fh is None else fh
        return await self.command(Zr.CMD_PCISTB, (fh << 32) | (pcias << 16) | len(data), gaddr,
                                  offset, data=data)

    async def pcilg(self, pcias: int, offset: int, length: int, *, fh: int | None = None) -> Result:
        fh = self.fh if fh is None else fh
        return await self.command(Zr.CMD_PCILG, 0, (fh << 32) | (pcias << 16) | length, offset)

    async def pcistg(self, pcias: int, offset: int, length: int, value: int, *,
                     fh: int | None = None) -> Result:
        fh = self.fh if fh is None else fh
        return await self.command(Zr.CMD_PCISTG, value, (fh << 32) | (pcias << 16) | length, offset)

    def events(self) -> list[tuple[int, int, bytes]]:
        """Drain the event ring: (type, pec, ccdf) per event."""
        base = Zr.EVENTS
        prod, cons, slots, size = struct.unpack_from("<IIII", self.mm, base)
        out = []
        while cons < prod:
            slot = base + Zr.EV_RING + (cons % slots) * size
            kind, pec = struct.unpack_from("<II", self.mm, slot)
            out.append((kind, pec, bytes(self.mm[slot + 16 : slot + 48])))
            cons += 1
        struct.pack_into("<I", self.mm, base + Zr.EV_CONSUMER, cons)
        return out
