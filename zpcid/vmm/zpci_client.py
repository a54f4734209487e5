"""VMM side of the zPCI control region: what a VMM does on each intercept.

Drives region 9 of a function through the reference client: mmap for the
operands and results, one REGION_WRITE of the doorbell per instruction.
"""

from __future__ import annotations

import struct

import attrs

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.zpci import region as Zr
from zpcid.vmm.client import Client


@attrs.frozen
class Result:
    """One mailbox answer (docs/zpci-region.md, "Mailbox")."""

    result: int
    cc: int
    status: int
    exception: int
    r1: int  # r1_out
    fib: bytes = b""
    writeback: int = 0
    r2: int = 0  # r2_out

    def apply(self, r1: int, r2: int) -> tuple[int, int]:
        """The guest's r1 and r2 after the instruction, as a VMM stores them back."""
        if self.result != Zr.RES_OK or self.exception != Zr.EXC_NONE:
            return r1, r2
        return (self.r1 if self.writeback & Zr.WB_R1 else r1,
                self.r2 if self.writeback & Zr.WB_R2 else r2)


class ZpciMailbox:
    """The VMM's view of one function's control region.

    With ``mm`` (the region mmapped) operands and results go through the shared
    memory and each command is one REGION_WRITE of the doorbell.  Without it
    every access is a REGION_READ/REGION_WRITE and ``mm`` is a local copy that
    holds what was last read (``refresh()`` re-reads the header).
    """

    def __init__(self, client: Client, index: int, mm=None):
        self.client = client
        self.index = index
        self.mapped = mm is not None
        self.mm = mm if mm is not None else bytearray(Zr.REGION_SIZE)

    @classmethod
    async def open(cls, client: Client, *, mmap: bool = True) -> "ZpciMailbox":
        """Find the control region by its type capability (mmapped if asked and offered)."""
        info = await client.get_info()
        for idx in range(C.VFIO_PCI_NUM_REGIONS, info.num_regions):
            rm = await client.region_info(idx, map=mmap)
            for cap in rm.info.caps:
                if isinstance(cap, M.TypeCap) and cap.type == Zr.ZPCI_REGION_TYPE \
                        and cap.subtype == Zr.ZPCI_REGION_SUBTYPE:
                    if mmap and rm.mm is None:
                        raise RuntimeError("control region is not mmappable")
                    box = cls(client, idx, rm.mm if mmap else None)
                    await box.refresh()
                    magic, major = struct.unpack_from("<IH", box.mm, Zr.HDR_MAGIC)
                    if magic != Zr.MAGIC or major != Zr.ABI_MAJOR:
                        raise RuntimeError(f"control region ABI {magic:#x}/{major} not understood")
                    return box
        raise LookupError("function has no zPCI control region")

    # ------------------------------------------------------------------ raw access
    async def read(self, off: int, n: int) -> bytes:
        """Region bytes [off, off+n): from the mmap, or one REGION_READ (kept in ``mm``)."""
        if not self.mapped:
            self.mm[off : off + n] = await self.client.region_read(self.index, off, n, via_mmap=False)
        return bytes(self.mm[off : off + n])

    async def write(self, off: int, data: bytes) -> None:
        """Store operands: into the mmap, or one REGION_WRITE."""
        if self.mapped:
            self.mm[off : off + len(data)] = data
        else:
            await self.client.region_write(self.index, off, data, via_mmap=False)

    async def refresh(self) -> None:
        """Re-read header and CLP data (without mmap; the mmap is always current)."""
        if not self.mapped:
            await self.read(0, Zr.CLP_QUERY_GRP + 64)

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
        await self.refresh()
        return self.u32(Zr.HDR_MODE)

    async def set_vmm(self, flags: int, fid: int = 0, uid: int = 0) -> None:
        """Say what this VMM does (vmm_flags) and the FID/UID its guest sees."""
        await self.client.region_write(self.index, Zr.HDR_VMM_FLAGS, struct.pack("<III", flags, fid, uid),
                                       via_mmap=False)
        await self.refresh()

    def clp_block(self, which: str) -> bytes:
        """A ready-made CLP block (without mmap: as of the last ``refresh()``)."""
        off, n = {"list": (Zr.CLP_LIST_ENTRY, 16), "query": (Zr.CLP_QUERY_FN, 256),
                  "group": (Zr.CLP_QUERY_GRP, 64)}[which]
        return bytes(self.mm[off : off + n])

    # ------------------------------------------------------------------ mailbox
    async def command(self, cmd: int, r1: int = 0, r2: int = 0, r3: int = 0, *,
                      fib: bytes | None = None, data: bytes | None = None) -> Result:
        if not self.mapped:
            return await self._command_regio(cmd, r1, r2, r3, fib=fib, data=data)
        offset, doorbell = self.prepare(cmd, r1, r2, r3, fib=fib, data=data)
        await self.client.region_write(self.index, offset, doorbell, via_mmap=False)
        return self.result()

    def prepare(self, cmd: int, r1: int = 0, r2: int = 0, r3: int = 0, *,
                fib: bytes | None = None, data: bytes | None = None) -> tuple[int, bytes]:
        """Write an instruction's operands into the mmap; returns the doorbell write
        (offset, data) that runs it."""
        if not self.mapped:
            raise RuntimeError("prepare() needs the region mmapped")
        mm, base = self.mm, Zr.MAILBOX
        struct.pack_into("<QQQ", mm, base + Zr.MB_R1, r1, r2, r3)
        if fib is not None:
            mm[base + Zr.MB_FIB : base + Zr.MB_FIB + Zr.FIB_SIZE] = fib.ljust(Zr.FIB_SIZE, b"\0")
        if data is not None:
            mm[Zr.MB_DATA : Zr.MB_DATA + len(data)] = data
        return base + Zr.MB_DOORBELL, struct.pack("<I", cmd)

    def result(self) -> Result:
        """The outcome of the last instruction, from the mailbox (the mmap, or the
        last REGION_READ of the results)."""
        return self._parse_results(bytes(self.mm[Zr.MAILBOX + Zr.MB_RESULT : Zr.MAILBOX + Zr.MB_RESULTS_END]))

    async def _command_regio(self, cmd: int, r1: int, r2: int, r3: int, *,
                             fib: bytes | None, data: bytes | None) -> Result:
        """Without the mmap: data, then one write of doorbell + operands (+ FIB), then one read."""
        if data is not None:
            await self.write(Zr.MB_DATA, data)
        operands = struct.pack(Zr.OPERANDS_FORMAT, cmd, r1, r2, r3)
        if fib is not None:
            operands += fib.ljust(Zr.FIB_SIZE, b"\0")
        await self.client.region_write(self.index, Zr.MAILBOX + Zr.MB_DOORBELL, operands, via_mmap=False)
        return self._parse_results(await self.read(Zr.MAILBOX + Zr.MB_RESULT, Zr.MB_RESULTS_END - Zr.MB_RESULT))

    @staticmethod
    def _parse_results(raw: bytes) -> Result:
        result, cc, status, exc, wb, r1_out = struct.unpack_from(Zr.RESULT_FORMAT, raw, 0)
        fib_out = raw[Zr.MB_FIB_OUT - Zr.MB_RESULT : Zr.MB_FIB_OUT - Zr.MB_RESULT + Zr.FIB_SIZE]
        r2_out, = struct.unpack_from("<Q", raw, Zr.MB_R2_OUT - Zr.MB_RESULT)
        return Result(result, cc, status, exc, r1_out, fib_out, wb, r2_out)

    async def clp(self, request: bytes) -> bytes:
        await self.write(Zr.MAILBOX + Zr.MB_CLP_REQ, request[:32].ljust(32, b"\0"))
        await self.command(Zr.CMD_CLP)
        resp = Zr.MAILBOX + Zr.MB_CLP_RESP
        if self.mapped:
            length = struct.unpack_from(">H", self.mm, resp)[0]
            return bytes(self.mm[resp : resp + max(16, min(length, 256))])
        # the response header says how long the block is
        head = await self.read(resp, 16)
        length = max(16, min(struct.unpack_from(">H", head)[0], 256))
        return head + (await self.read(resp + 16, length - 16) if length > 16 else b"")

    async def set_pci_fn(self, fh: int, oc: int, ndas: int = 1) -> tuple[int, int]:
        """CLP Set PCI Function; returns (response code, new FH)."""
        req = struct.pack(">HHI8sIHBB8s", 32, 0x0005, 0, bytes(8), fh, 0, oc, ndas, bytes(8))
        resp = await self.clp(req)
        await self.refresh()
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
        """Drain the event ring through the mmap: (type, pec, ccdf) per event."""
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

    async def drain_events(self) -> list[tuple[int, int, bytes]]:
        """Drain the event ring in either access mode: (type, pec, ccdf) per event."""
        if self.mapped:
            return self.events()
        base = Zr.EVENTS
        prod, cons, slots, size = struct.unpack("<IIII", await self.read(base, 16))
        out = []
        while cons != prod:
            slot = base + Zr.EV_RING + (cons % slots) * size
            raw = await self.read(slot, 48)
            kind, pec = struct.unpack_from("<II", raw)
            out.append((kind, pec, raw[16:48]))
            cons = (cons + 1) & 0xFFFFFFFF
        await self.write(base + Zr.EV_CONSUMER, struct.pack("<I", cons))
        return out
