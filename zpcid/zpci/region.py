"""The control region as zpcid serves it: header publishing, the mailbox
doorbell, the event ring (layout: ``protocol.zpci.region``)."""

from __future__ import annotations

import struct
import time
from typing import Awaitable, Callable

from protocol.vfio_user.messages import TypeCap
from protocol.zpci import region as R
from zpcid.vfio_user.regions import MemfdRegion, store_writable

# Precompiled: the header, operands and results are packed on every intercept.
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VMM_IDS = struct.Struct("<III")
_STATE_BLOCK = struct.Struct("<IIIIIIII")  # HDR_STATE .. HDR_EVENTS_LOST
_OPERANDS = struct.Struct(R.OPERANDS_FORMAT)
_RESULTS = struct.Struct(R.RESULT_FORMAT)


class ControlRegion(MemfdRegion):
    """Region 9: an mmappable memfd. A REGION_WRITE stores only the writable
    fields, then tells the owner which bytes it covered; a write that covers
    the doorbell runs the command."""

    def __init__(self, name: str, on_write: Callable[[int, int], None],
                 on_doorbell: Callable[[], Awaitable[None]]):
        super().__init__(R.REGION_SIZE, f"zpcid-{name}-zpci")
        self.on_write = on_write
        self.on_doorbell = on_doorbell

    def caps(self):
        return super().caps() + (TypeCap(R.ZPCI_REGION_TYPE, R.ZPCI_REGION_SUBTYPE),)

    @property
    def closed(self) -> bool:
        return self.mm is None or self.mm.closed

    async def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        # Read-only parts (header, CLP data, results, event producer) are owned
        # by zpcid; only the writable fields are taken from a REGION_WRITE.
        store_writable(self.mm, R.WRITABLE_RANGES, offset, data)
        self.on_write(offset, end)
        if offset <= R.MAILBOX + R.MB_DOORBELL < end:
            await self.on_doorbell()

    # ------------------------------------------------------------------ layout
    def initialise(self, features: int) -> None:
        """Power-on contents: zeros, then the constant header fields and ring geometry."""
        mm = self.mm
        mm[:] = bytes(R.REGION_SIZE)
        struct.pack_into("<IHHQ", mm, R.HDR_MAGIC, R.MAGIC, R.ABI_MAJOR, R.ABI_MINOR, features)
        struct.pack_into("<I", mm, R.HDR_REGION_SIZE, R.REGION_SIZE)
        struct.pack_into("<6I", mm, R.HDR_OFFSETS, R.CLP_LIST_ENTRY, R.CLP_QUERY_FN, R.CLP_QUERY_GRP,
                         R.MAILBOX, R.MB_DATA, R.EVENTS)
        struct.pack_into("<IIII", mm, R.EVENTS, 0, 0, R.EV_SLOTS, R.EV_SLOT_SIZE)

    def vmm_fields(self) -> tuple[int, int, int, int, int]:
        """What the VMM wrote: (mode, guest memory limit, vmm_flags, vmm_fid, vmm_uid)."""
        mode, = struct.unpack_from("<I", self.mm, R.HDR_MODE)
        limit, = struct.unpack_from("<Q", self.mm, R.HDR_MEM_LIMIT)
        return (mode, limit, *struct.unpack_from("<III", self.mm, R.HDR_VMM_FLAGS))

    def publish_header(self, mode: int, limit: int, vmm_flags: int, vmm_fid: int, vmm_uid: int,
                       state: int, fh: int, fid: int, uid: int, ioat: int, shadow: int, available: int,
                       lost: int) -> None:
        """The read-only header fields (positional: this runs on every intercept)."""
        mm = self.mm
        _U32.pack_into(mm, R.HDR_MODE, mode)
        _U64.pack_into(mm, R.HDR_MEM_LIMIT, limit)
        _VMM_IDS.pack_into(mm, R.HDR_VMM_FLAGS, vmm_flags, vmm_fid, vmm_uid)
        _STATE_BLOCK.pack_into(mm, R.HDR_STATE, state, fh, fid, uid, ioat, shadow,
                               available if available < 0xFFFFFFFF else 0xFFFFFFFF, lost)

    def publish_clp(self, entry: bytes, query: bytes, group: bytes) -> None:
        mm = self.mm
        mm[R.CLP_LIST_ENTRY : R.CLP_LIST_ENTRY + len(entry)] = entry
        mm[R.CLP_QUERY_FN : R.CLP_QUERY_FN + len(query)] = query
        mm[R.CLP_QUERY_GRP : R.CLP_QUERY_GRP + len(group)] = group

    # ------------------------------------------------------------------ mailbox
    def operands(self) -> tuple[int, int, int, int]:
        """(command, r1, r2, r3) as the VMM left them."""
        return _OPERANDS.unpack_from(self.mm, R.MAILBOX)

    def fib_in(self) -> bytes:
        base = R.MAILBOX + R.MB_FIB
        return bytes(self.mm[base : base + R.FIB_SIZE])

    def data(self, length: int) -> bytes:
        return bytes(self.mm[R.MB_DATA : R.MB_DATA + min(length, R.MB_DATA_SIZE)])

    def clp_request(self) -> bytes:
        base = R.MAILBOX + R.MB_CLP_REQ
        return bytes(self.mm[base : base + R.MB_CLP_REQ_SIZE])

    def set_clp_response(self, block: bytes) -> None:
        base = R.MAILBOX + R.MB_CLP_RESP
        self.mm[base : base + R.MB_CLP_RESP_SIZE] = block[: R.MB_CLP_RESP_SIZE].ljust(R.MB_CLP_RESP_SIZE, b"\0")

    def set_results(self, result: int, cc: int, status: int, exception: int, writeback: int,
                    r1_out: int, r2_out: int, fib: bytes | None) -> None:
        mm = self.mm
        _RESULTS.pack_into(mm, R.MAILBOX + R.MB_RESULT, result, cc, status, exception, writeback, r1_out)
        _U64.pack_into(mm, R.MAILBOX + R.MB_R2_OUT, r2_out)
        if fib is not None:
            mm[R.MAILBOX + R.MB_FIB_OUT : R.MAILBOX + R.MB_FIB_OUT + len(fib)] = fib


class EventRing:
    """The event ring at 0x3000: zpcid produces, the VMM consumes."""

    def __init__(self, region: ControlRegion):
        self.region = region
        self.produced = 0
        self.lost = 0

    def reset(self) -> None:
        self.produced = self.lost = 0

    def add(self, kind: int, pec: int, ccdf: bytes) -> bool:
        """Store one event; False (and counted in ``lost``) when the ring is full."""
        mm = self.region.mm
        consumer, = struct.unpack_from("<I", mm, R.EVENTS + R.EV_CONSUMER)
        if self.produced - consumer >= R.EV_SLOTS:
            self.lost += 1  # ring full: the VMM is not draining it
            return False
        slot = R.EVENTS + R.EV_RING + (self.produced % R.EV_SLOTS) * R.EV_SLOT_SIZE
        struct.pack_into(R.EV_SLOT_FORMAT, mm, slot, kind, pec, time.time_ns())
        mm[slot + R.EV_CCDF : slot + R.EV_CCDF + len(ccdf)] = ccdf
        self.produced += 1
        struct.pack_into("<I", mm, R.EVENTS + R.EV_PRODUCER, self.produced & 0xFFFFFFFF)
        return True
