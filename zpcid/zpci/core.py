"""The zPCI side of a function: handle and state, CLP data, MPCIFC/STPCIFC,
RPCIT with a shadow IOMMU, direct mapping, PCISTB/PCILG/PCISTG, adapter
interrupts, FMB and error events — exposed to the VMM through the control
region (``docs/zpci-region.md``).
"""

from __future__ import annotations

import collections
import enum
import struct
import time
from typing import TYPE_CHECKING, Any

import attrs

from protocol.vfio_user import consts as C
from protocol.zpci import formats as Z
from protocol.zpci import tables as T
from protocol.errors import ProtocolError
from protocol.vfio_user.messages import TypeCap
from zpcid import log
from zpcid.vfio_user.dma import DmaFault
from zpcid.zpci.atomic import set_indicator_bit
from zpcid.zpci.iommu import ShadowIotlb, TranslationError, rpcit_sliced as walk_rpcit
from zpcid.vfio_user.regions import MemfdRegion

if TYPE_CHECKING:
    from zpcid.pci.function import PciFunction

PAGE = 4096
IBM_VENDOR_ID = 0x1014
ZPCI_REGION_INDEX = 9
ZPCI_REGION_SUBTYPE = 0x7A70  # "zp"
ZPCI_REGION_TYPE = 0x80000000 | IBM_VENDOR_ID  # VFIO_REGION_TYPE_PCI_VENDOR_TYPE | IBM
FH_SHM_ZPCID = 0x00040000  # SHM bits of handles zpcid hands out
DEFAULT_MSIA = 0xFE00_0000_0000_0000
DEFAULT_MUI = 4000
DEFAULT_EDMA = 0x01FF_FFFF_FFFF_FFFF
FMB_LENGTH = 64

# ---------------------------------------------------------------- control region ABI (v1)
ABI_MAJOR, ABI_MINOR = 1, 0
REGION_SIZE = 0x4000
MAGIC = 0x5A504349  # "ZPCI"
# header (host byte order: little-endian)
HDR_MAGIC, HDR_VERSION, HDR_FEATURES, HDR_MODE = 0x000, 0x004, 0x008, 0x010
HDR_REGION_SIZE, HDR_MEM_LIMIT, HDR_STATE, HDR_FH = 0x014, 0x018, 0x020, 0x024
HDR_FID, HDR_UID, HDR_IOAT, HDR_SHADOW = 0x028, 0x02C, 0x030, 0x034
HDR_DMA_AVAIL, HDR_EVENTS_LOST = 0x038, 0x03C
HDR_OFFSETS = 0x040  # u32 offsets: list entry, query fn, query group, mailbox, mb data, events
CLP_LIST_ENTRY, CLP_QUERY_FN, CLP_QUERY_GRP = 0x100, 0x200, 0x400
MAILBOX, MB_DATA, EVENTS = 0x1000, 0x2000, 0x3000
# features
FEAT_MAILBOX, FEAT_EVENTS, FEAT_ADAPTER_INT = 1 << 0, 1 << 1, 1 << 2
FEAT_RELAXED_TRANSLATION, FEAT_RELAXED_ALIGNMENT, FEAT_FMB = 1 << 3, 1 << 4, 1 << 5
FEAT_PCILG_PCISTG = 1 << 6
# modes
MODE_VMM, MODE_ZPCID = 0, 1
MODE_NAMES = {MODE_VMM: "vmm-translates", MODE_ZPCID: "zpcid-translates"}
# mailbox layout
MB_DOORBELL, MB_R1, MB_R2, MB_R3, MB_FIB = 0x00, 0x08, 0x10, 0x18, 0x20
MB_RESULT, MB_CC, MB_STATUS, MB_EXCEPTION, MB_R1_OUT, MB_FIB_OUT = 0x80, 0x84, 0x85, 0x86, 0x88, 0x90
MB_CLP_REQ, MB_CLP_RESP = 0x100, 0x200
MB_DATA_SIZE = 0x1000
# commands
CMD_CLP, CMD_MPCIFC, CMD_STPCIFC, CMD_RPCIT, CMD_PCISTB, CMD_PCILG, CMD_PCISTG = 1, 2, 3, 4, 5, 6, 7
# mailbox results (ABI level, not architected)
RES_OK, RES_BAD_COMMAND, RES_WRONG_MODE, RES_BAD_REQUEST = 0, 1, 2, 3
# program exceptions the VMM must inject instead of setting a cc
EXC_NONE, EXC_OPERAND, EXC_SPECIFICATION = 0, 1, 2
# event ring
EV_PRODUCER, EV_CONSUMER, EV_ENTRIES, EV_ENTRY_SIZE, EV_RING = 0x00, 0x04, 0x08, 0x0C, 0x40
EV_SLOT_SIZE = 64
EV_SLOTS = (REGION_SIZE - EVENTS - EV_RING) // EV_SLOT_SIZE  # 63


class State(enum.IntEnum):
    RESERVED = 0
    STANDBY = 1
    DISABLED = 2
    ENABLED = 3
    BLOCKED = 4
    ERROR = 5
    PERMANENT_ERROR = 6


_NOT_AVAILABLE = {State.RESERVED, State.STANDBY, State.DISABLED, State.PERMANENT_ERROR}


@attrs.define
class Outcome:
    cc: int = 0
    status: int = 0
    exception: int = EXC_NONE
    r1: int | None = None  # register value to store back, when the instruction does
    fib: bytes | None = None
    result: int = RES_OK


@attrs.define
class AdapterInterrupts:
    isc: int
    noi: int
    aibvo: int
    summary: bool
    aisbo: int
    aibv: int
    aisb: int


class ControlRegion(MemfdRegion):
    """Region 9: mmappable memfd; a write touching the doorbell runs the command."""

    def __init__(self, core: "ZpciCore"):
        super().__init__(REGION_SIZE, f"zpcid-{core.function.name}-zpci")
        self.core = core

    def caps(self):
        return super().caps() + (TypeCap(ZPCI_REGION_TYPE, ZPCI_REGION_SUBTYPE),)

    async def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        # Read-only parts (header, CLP data, results, event producer) are owned
        # by zpcid; only the writable fields are taken from a REGION_WRITE.
        for lo, hi in self.core.writable_ranges:
            a, b = max(lo, offset), min(hi, end)
            if a < b:
                self.mm[a:b] = data[a - offset : b - offset]
        self.core.header_written(offset, end)
        if offset <= MAILBOX + MB_DOORBELL < end:
            await self.core.doorbell()


class ZpciCore:
    """zPCI state and instruction execution of one function."""

    writable_ranges = (
        (HDR_MODE, HDR_MODE + 4),
        (HDR_MEM_LIMIT, HDR_MEM_LIMIT + 8),
        (MAILBOX, MAILBOX + MB_RESULT),
        (MAILBOX + MB_CLP_REQ, MAILBOX + MB_CLP_RESP),
        (MB_DATA, MB_DATA + MB_DATA_SIZE),
        (EVENTS + EV_CONSUMER, EVENTS + EV_CONSUMER + 4),
    )

    def __init__(self, function: "PciFunction", index: int | None = None):
        self.function = function
        self.props = function.props
        self.log = function.log.bind(fid=self.props.fid, uid=self.props.uid)
        self.index = (self.props.fid & 0xFFFF) if index is None else index
        self.region = ControlRegion(self)
        self.mm = self.region.mm
        self.shadow = ShadowIotlb(self.props.dma_limit)
        self.event_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._clp_key: tuple | None = None
        self.reset_all()

    # ------------------------------------------------------------------ lifecycle
    def reset_all(self) -> None:
        """Back to power-on: configured but disabled, nothing registered."""
        if self.mm.closed:
            return  # the function was closed (daemon done with it); nothing to show any more
        self.state = State.DISABLED
        self.fh = self.index | FH_SHM_ZPCID
        self.mode = MODE_VMM
        self.mem_limit = 0
        self._clear_registrations()
        self.mm[:] = bytes(REGION_SIZE)
        self._clp_key = None
        struct.pack_into("<IHHQ", self.mm, HDR_MAGIC, MAGIC, ABI_MAJOR, ABI_MINOR, self.features)
        struct.pack_into("<I", self.mm, HDR_REGION_SIZE, REGION_SIZE)
        struct.pack_into("<6I", self.mm, HDR_OFFSETS, CLP_LIST_ENTRY, CLP_QUERY_FN, CLP_QUERY_GRP,
                         MAILBOX, MB_DATA, EVENTS)
        struct.pack_into("<IIII", self.mm, EVENTS, 0, 0, EV_SLOTS, EV_SLOT_SIZE)
        self.events_produced = 0
        self.events_lost = 0
        self.publish()

    def _clear_registrations(self) -> None:
        self.pba = self.pal = self.iota = 0
        self.ioat = False
        self.direct = False
        if hasattr(self, "shadow"):
            n = self.shadow.clear()
            self.function.counters.pages_unmapped += n
        self.aif: AdapterInterrupts | None = None
        self.fmb_addr = 0
        self.fmb = dict(samples=0, ld=0, st=0, stb=0, rpcit=0, dma_r=0, dma_w=0)
        if getattr(self.function, "msix", None) is not None:
            self.function.msix.deliver_hook = None

    def function_reset(self) -> None:
        """Disable the function as a system reset does (handle loses the enable bit)."""
        self._clear_registrations()
        if self.state != State.PERMANENT_ERROR:
            self.state = State.DISABLED
        self.fh &= ~Z.FH_MASK_ENABLE
        self.publish()

    @property
    def features(self) -> int:
        f = FEAT_MAILBOX | FEAT_EVENTS | FEAT_ADAPTER_INT | FEAT_FMB | FEAT_PCILG_PCISTG
        if self.props.rtr:
            f |= FEAT_RELAXED_TRANSLATION
        if self.props.relaxed_alignment:
            f |= FEAT_RELAXED_ALIGNMENT
        return f

    @property
    def translating(self) -> bool:
        return self.mode == MODE_ZPCID

    # ------------------------------------------------------------------ aperture
    @property
    def sdma(self) -> int:
        return self.props.sdma

    @property
    def edma(self) -> int:
        if self.props.rtr:
            # Full aperture: direct mapping must reach all guest memory.
            return self.sdma + self.mem_limit - 1 if self.mem_limit else DEFAULT_EDMA
        # Without relaxed translation the aperture is what the DMA limit can map.
        return self.sdma + self.props.dma_limit * PAGE - 1

    # ------------------------------------------------------------------ CLP data
    def list_entry(self) -> Z.ClpListEntry:
        cfg = self.function.config
        return Z.ClpListEntry(device_id=cfg.u16(2), vendor_id=cfg.u16(0),
                              configured=self.state not in (State.STANDBY, State.RESERVED),
                              fid=self.props.fid, fh=self.fh)

    def query_fn(self) -> Z.ClpQueryPciFnResponse:
        cfg = self.function.config
        sizes, bars = [], []
        for i in range(6):
            bar = cfg.bars.get(i)
            size = bar.region.size if bar is not None else 0
            sizes.append(size.bit_length() - 1 if size else 0)
            bars.append(cfg.u32(0x10 + 4 * i))
        util = Z.ebcdic(self.props.util_str, 64) if self.props.util_str else bytes(64)
        return Z.ClpQueryPciFnResponse(
            response_code=Z.CLP_RC_OK, vfn=self.props.vfn,
            flags=Z.CLP_FN_UTIL_STR if self.props.util_str else 0,
            pfgid=self.props.pfgid, fid=self.props.fid, bar_size=tuple(sizes),
            pchid=self.props.pchid, bar=tuple(bars), pfip=bytes(4),
            fmb_len=FMB_LENGTH // 4, pft=0, sdma=self.sdma, edma=self.edma,
            uid=self.props.uid, util_str=util,
        )

    def query_group(self) -> Z.ClpQueryPciFnGrpResponse:
        flags = Z.CLP_FNGRP_REFRESH
        if self.props.rtr:
            flags |= Z.CLP_FNGRP_RTR
        if self.props.relaxed_alignment:
            flags |= Z.CLP_FNGRP_RELAXED_ALIGNMENT
        msix = self.function.msix
        return Z.ClpQueryPciFnGrpResponse(
            response_code=Z.CLP_RC_OK, noi=msix.nvec if msix else 0, version=0, flags=flags,
            maxstbl=self.props.maxstbl, mui=DEFAULT_MUI, dtsm=Z.ZPCI_DTSM_RTTO, dasm=0,
            msia=DEFAULT_MSIA,
        )

    def publish(self) -> None:
        """Refresh everything read-only the VMM reads from the region."""
        mm = self.mm
        if mm.closed:
            return
        struct.pack_into("<I", mm, HDR_MODE, self.mode)
        struct.pack_into("<Q", mm, HDR_MEM_LIMIT, self.mem_limit)
        struct.pack_into("<IIIIIIII", mm, HDR_STATE, self.state, self.fh, self.props.fid,
                         self.props.uid, (1 if self.ioat else 0) | (2 if self.direct else 0),
                         self.shadow.mapped, self.shadow.available, self.events_lost)
        # The CLP blocks change only with the handle, configuration state, BARs,
        # aperture or properties: rebuild them only then (publish runs per intercept).
        cfg = self.function.config
        key = (self.fh, self.state, self.mem_limit, bytes(cfg.data[0x10:0x28]), self.props,
               self.function.msix.nvec if self.function.msix else 0)
        if key == self._clp_key:
            return
        self._clp_key = key
        mm[CLP_LIST_ENTRY : CLP_LIST_ENTRY + 16] = self.list_entry().pack()
        q = self.query_fn().pack()
        mm[CLP_QUERY_FN : CLP_QUERY_FN + len(q)] = q
        g = self.query_group().pack()
        mm[CLP_QUERY_GRP : CLP_QUERY_GRP + len(g)] = g

    def header_written(self, start: int, end: int) -> None:
        """Apply writable header fields (mode, guest memory limit)."""
        if start < HDR_MEM_LIMIT + 8 and end > HDR_MODE:
            mode = struct.unpack_from("<I", self.mm, HDR_MODE)[0]
            limit = struct.unpack_from("<Q", self.mm, HDR_MEM_LIMIT)[0]
            self.set_mode(mode)
            if limit != self.mem_limit:
                if self.state in (State.ENABLED, State.BLOCKED, State.ERROR):
                    self.log.warning("zpci_refused", what="memory limit change while enabled")
                else:
                    self.mem_limit = limit
            self.publish()

    def set_mode(self, mode: int) -> bool:
        if mode == self.mode:
            return True
        if mode not in MODE_NAMES or self.state not in (State.DISABLED, State.STANDBY) \
                or len(self.function.dma):
            # The mode decides what DMA_MAP keys mean: only before any map and enable.
            self.log.warning("zpci_refused", what="mode change", mode=mode)
            self.publish()
            return False
        self.mode = mode
        self.log.info("zpci_mode", mode=MODE_NAMES[mode])
        return True

    # ------------------------------------------------------------------ events
    def _event(self, kind: int, pec: int, faddr: int = 0, *, reason: str = "") -> None:
        if kind == Z.ZPCI_EVENT_ERROR:
            ccdf = Z.ErrorCcdf(fh=self.fh, fid=self.props.fid, pec=pec, faddr=faddr).pack()
        else:
            ccdf = Z.AvailabilityCcdf(fh=self.fh, fid=self.props.fid, pec=pec).pack()
        entry = {"seq": self.events_produced, "type": "error" if kind == Z.ZPCI_EVENT_ERROR else "availability",
                 "pec": pec, "fh": self.fh, "faddr": faddr, "time": time.time(), "reason": reason}
        self.event_log.append(entry)
        consumer = struct.unpack_from("<I", self.mm, EVENTS + EV_CONSUMER)[0]
        if self.events_produced - consumer >= EV_SLOTS:
            self.events_lost += 1  # ring full: the VMM is not draining it
        else:
            slot = EVENTS + EV_RING + (self.events_produced % EV_SLOTS) * EV_SLOT_SIZE
            struct.pack_into("<IIQ", self.mm, slot, kind, pec, time.time_ns())
            self.mm[slot + 16 : slot + 48] = ccdf
            self.events_produced += 1
            struct.pack_into("<I", self.mm, EVENTS + EV_PRODUCER, self.events_produced)
        if kind == Z.ZPCI_EVENT_ERROR:
            self.function.counters.errors[f"pec_{pec:#04x}"] += 1
        self.log.warning("zpci_event", pec=hex(pec), faddr=hex(faddr), reason=reason,
                         kind=entry["type"])
        self.function.irqs.signal(C.VFIO_PCI_ERR_IRQ_INDEX)
        self.publish()

    def error(self, pec: int, faddr: int = 0, reason: str = "") -> None:
        """A function error: error state plus an error event."""
        if self.state in (State.ENABLED, State.BLOCKED):
            self.state = State.ERROR
            self.log.warning("zpci_state", state=self.state.name)
        self._event(Z.ZPCI_EVENT_ERROR, pec, faddr, reason=reason)

    def availability(self, pec: int, reason: str = "") -> None:
        """Queue an availability event (e.g. 0x0303: deconfiguration requested)."""
        self._event(Z.ZPCI_EVENT_AVAILABILITY, pec, reason=reason)

    def inject_error(self, pec: int = Z.ZPCI_PEC_SYSTEM_ERROR) -> dict[str, Any]:
        self.error(pec, 0, "injected")
        return {"state": self.state.name, "pec": pec}

    # ------------------------------------------------------------------ mailbox
    async def doorbell(self) -> None:
        mm = self.mm
        cmd, = struct.unpack_from("<I", mm, MAILBOX + MB_DOORBELL)
        r1, r2, r3 = struct.unpack_from("<QQQ", mm, MAILBOX + MB_R1)
        try:
            out = await self.execute(cmd, r1, r2, r3)
        except Exception:
            self.log.exception("zpci_command_failed", cmd=cmd)
            out = Outcome(result=RES_BAD_REQUEST)
        struct.pack_into("<IBBBBQ", mm, MAILBOX + MB_RESULT, out.result, out.cc, out.status,
                         out.exception, 0, out.r1 if out.r1 is not None else r1)
        if out.fib is not None:
            mm[MAILBOX + MB_FIB_OUT : MAILBOX + MB_FIB_OUT + len(out.fib)] = out.fib
        self.publish()

    async def execute(self, cmd: int, r1: int, r2: int, r3: int) -> Outcome:
        if cmd == CMD_CLP:
            return self._clp()
        if cmd == CMD_MPCIFC:
            fib = bytes(self.mm[MAILBOX + MB_FIB : MAILBOX + MB_FIB + 80])
            return self.mpcifc(r1, fib)
        if cmd == CMD_STPCIFC:
            return self.stpcifc(r1)
        if cmd == CMD_RPCIT:
            return await self.rpcit(r1, r2, r3)
        if cmd == CMD_PCISTB:
            length = r1 & 0x1FFF
            data = bytes(self.mm[MB_DATA : MB_DATA + min(length, MB_DATA_SIZE)])
            return await self.pcistb(r1, r3, r2, data)
        if cmd == CMD_PCILG:
            return await self.pcilg(r2, r3)
        if cmd == CMD_PCISTG:
            return await self.pcistg(r1, r2, r3)
        return Outcome(result=RES_BAD_COMMAND)

    # ------------------------------------------------------------------ CLP
    def _clp(self) -> Outcome:
        req = bytes(self.mm[MAILBOX + MB_CLP_REQ : MAILBOX + MB_CLP_REQ + 32])
        resp = self.clp(req)
        base = MAILBOX + MB_CLP_RESP
        self.mm[base : base + 0x100] = bytes(0x100)
        self.mm[base : base + len(resp)] = resp
        return Outcome()

    def clp(self, block: bytes) -> bytes:
        """Execute one CLP request block for this function; returns the response block."""
        req, rc = Z.ClpRequest.parse(block)
        if req is None:
            return Z.ClpHeader(length=16, code=rc).pack()
        if isinstance(req, Z.ClpListRequest):
            if req.resume_token != 0:
                return Z.ClpHeader(length=16, code=Z.CLP_RC_LISTPCI_BADRT).pack()
            return Z.ClpListResponse(response_code=Z.CLP_RC_OK, resume_token=0, mdd=Z.FH_MASK_SHM,
                                     max_fn=4096, flags=0x01, entries=(self.list_entry(),)).pack()
        if isinstance(req, Z.ClpQueryPciFnRequest):
            if req.fh & ~Z.FH_MASK_ENABLE != self.fh & ~Z.FH_MASK_ENABLE:
                return Z.ClpHeader(length=16, code=Z.CLP_RC_SETPCIFN_FH).pack()
            return self.query_fn().pack()
        if isinstance(req, Z.ClpQueryPciFnGrpRequest):
            if req.pfgid != self.props.pfgid:
                return Z.ClpHeader(length=16, code=Z.CLP_RC_QUERYPCIFG_PFGID).pack()
            return self.query_group().pack()
        rc = self.set_pci_fn(req.fh, req.oc, req.ndas)
        return Z.ClpSetPciFnResponse(response_code=rc, fh=self.fh).pack()

    def set_pci_fn(self, fh: int, oc: int, ndas: int) -> int:
        if fh & ~Z.FH_MASK_ENABLE != self.fh & ~Z.FH_MASK_ENABLE:
            return Z.CLP_RC_SETPCIFN_FH
        if self.state == State.PERMANENT_ERROR:
            return Z.CLP_RC_SETPCIFN_ERR
        if oc == Z.CLP_SET_ENABLE_PCI_FN:
            if ndas == 0:
                return Z.CLP_RC_SETPCIFN_DMAAS
            if ndas > 1:
                return Z.CLP_RC_SETPCIFN_RES
            if self.fh & Z.FH_MASK_ENABLE:
                return Z.CLP_RC_SETPCIFN_FHOP
            self.fh |= Z.FH_MASK_ENABLE
            self.state = State.ENABLED
        elif oc == Z.CLP_SET_DISABLE_PCI_FN:
            if not self.fh & Z.FH_MASK_ENABLE:
                return Z.CLP_RC_SETPCIFN_FHOP
            self.function_reset()
        else:
            return Z.CLP_RC_SETPCIFN_FHOP
        self.log.info("zpci_state", state=self.state.name, fh=hex(self.fh))
        self.publish()
        return Z.CLP_RC_OK

    # ------------------------------------------------------------------ MPCIFC
    def _lookup(self, fh: int) -> Outcome | None:
        """cc 3 unless ``fh`` is this function's current handle and it is usable."""
        if fh != self.fh or self.state in _NOT_AVAILABLE:
            return Outcome(cc=Z.ZPCI_PCI_LS_INVAL_HANDLE)
        return None

    def mpcifc(self, r1: int, fib_bytes: bytes) -> Outcome:
        fh, dmaas, oc = r1 >> 32, (r1 >> 16) & 0xFF, r1 & 0xFF
        bad = self._lookup(fh)
        if bad:
            return bad
        try:
            fib = Z.Fib.unpack(fib_bytes)
        except ProtocolError:
            return Outcome(exception=EXC_OPERAND)
        if fib.fmt != 0:
            return Outcome(exception=EXC_OPERAND)
        err = lambda st: Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=st)  # noqa: E731
        if oc == Z.ZPCI_MOD_FC_REG_INT:
            return self._register_interrupts(fib)
        if oc == Z.ZPCI_MOD_FC_DEREG_INT:
            if self.aif is None:
                return err(Z.ZPCI_MOD_ST_SEQUENCE)
            self.aif = None
            self.function.msix.deliver_hook = None
            self.log.info("zpci_aif", registered=False)
            return Outcome()
        if oc in (Z.ZPCI_MOD_FC_REG_IOAT, Z.ZPCI_MOD_FC_DEREG_IOAT, Z.ZPCI_MOD_FC_REREG_IOAT):
            if dmaas != 0:
                return err(Z.ZPCI_MOD_ST_DMAAS_INVAL)
            if oc == Z.ZPCI_MOD_FC_REG_IOAT:
                if self.ioat:
                    return err(Z.ZPCI_MOD_ST_SEQUENCE)
                return self._register_ioat(fib)
            if not self.ioat:
                return err(Z.ZPCI_MOD_ST_SEQUENCE)
            self._deregister_ioat()
            if oc == Z.ZPCI_MOD_FC_DEREG_IOAT:
                return Outcome()
            out = self._register_ioat(fib)
            if out.exception == EXC_NONE and out.cc:
                out.status = Z.ZPCI_MOD_ST_INSUF_RES
            return out
        if oc == Z.ZPCI_MOD_FC_RESET_ERROR:
            if self.state not in (State.ERROR, State.BLOCKED):
                return err(Z.ZPCI_MOD_ST_SEQUENCE)
            self._set_state(State.ENABLED)
            return Outcome()
        if oc == Z.ZPCI_MOD_FC_RESET_BLOCK:
            if self.state != State.ERROR:
                return err(Z.ZPCI_MOD_ST_SEQUENCE)
            self._set_state(State.BLOCKED)
            return Outcome()
        if oc == Z.ZPCI_MOD_FC_SET_MEASURE:
            return self._set_measurement(fib.fmb_addr)
        return Outcome(exception=EXC_OPERAND)

    def _set_state(self, state: State) -> None:
        self.state = state
        self.log.info("zpci_state", state=state.name)
        self.publish()

    def _register_ioat(self, fib) -> Outcome:
        pba = fib.pba & ~0xFFF
        pal = fib.pal | 0xFFF
        if pba > pal or pba < self.sdma or pal > self.edma:
            return Outcome(exception=EXC_OPERAND)
        iota = T.Iota.unpack(fib.iota)
        if iota.translate:
            if iota.designation_type != T.ZPCI_IOTA_RTTO:
                return Outcome(exception=EXC_OPERAND)
            self.direct = False
        else:
            if not self.props.rtr:
                # The guest asked for no translation but RTR was never offered.
                self.log.warning("zpci_refused", what="IOTA without translation", rtr=False)
                return Outcome(exception=EXC_OPERAND)
            self.direct = True
        self.pba, self.pal, self.iota, self.ioat = pba, pal, fib.iota, True
        self.log.info("zpci_ioat", registered=True, pba=hex(pba), pal=hex(pal),
                      iota=hex(fib.iota), direct=self.direct)
        self.publish()
        return Outcome()

    def _deregister_ioat(self) -> None:
        n = self.shadow.clear()
        self.function.counters.pages_unmapped += n
        self.pba = self.pal = self.iota = 0
        self.ioat = self.direct = False
        self.log.info("zpci_ioat", registered=False, unmapped=n)
        self.publish()

    def _register_interrupts(self, fib) -> Outcome:
        if self.aif is not None:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_MOD_ST_SEQUENCE)
        msix = self.function.msix
        if msix is None or fib.noi == 0 or fib.noi > msix.nvec:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_MOD_ST_RES_NOT_AVAIL)
        aif = AdapterInterrupts(fib.isc, fib.noi, fib.aibvo, bool(fib.sum), fib.aisbo,
                                fib.aibv, fib.aisb)
        try:
            self._guest_view(aif.aibv, (aif.aibvo + aif.noi + 7) // 8, True)
            if aif.summary:
                self._guest_view(aif.aisb, (aif.aisbo // 8) + 1, True)
        except DmaFault:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_MOD_ST_RES_NOT_AVAIL)
        self.aif = aif
        msix.deliver_hook = self._adapter_interrupt
        self.log.info("zpci_aif", registered=True, isc=aif.isc, noi=aif.noi, aibv=hex(aif.aibv),
                      aisb=hex(aif.aisb))
        return Outcome()

    def _set_measurement(self, addr: int) -> Outcome:
        if addr & 0xF:
            self.fmb_addr = 0
            self._event(Z.ZPCI_EVENT_ERROR, Z.ZPCI_PEC_FMB_PROTECTION, addr, reason="FMB misaligned")
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR)
        self.fmb_addr = addr
        if addr:
            self._fmb_update()
        self.log.info("zpci_fmb", addr=hex(addr))
        return Outcome()

    def _fmb_update(self) -> None:
        if not self.fmb_addr or not self.translating:
            return
        f = self.fmb
        f["samples"] += 1
        # The lowest TOD bit (~0.24 ns) doubles as the update-in-progress flag.
        tod = _tod() & ~Z.ZPCI_FMB_UPDATE_IN_PROGRESS
        try:
            view = self._guest_view(self.fmb_addr, FMB_LENGTH, True)
            # Same sequence as firmware: mark the update in progress, write the
            # counters, then the final timestamp with the in-progress bit clear.
            struct.pack_into(">Q", view, 8, tod | Z.ZPCI_FMB_UPDATE_IN_PROGRESS)
            block = Z.Fmb(fmt=0, format_indicators=0x800000, samples=f["samples"],
                          last_update=tod | Z.ZPCI_FMB_UPDATE_IN_PROGRESS,
                          ld_ops=f["ld"], st_ops=f["st"], stb_ops=f["stb"], rpcit_ops=f["rpcit"],
                          dma_rbytes=f["dma_r"], dma_wbytes=f["dma_w"]).pack()
            view[: len(block)] = block
            struct.pack_into(">Q", view, 8, tod)
        except DmaFault:
            addr, self.fmb_addr = self.fmb_addr, 0
            self._event(Z.ZPCI_EVENT_ERROR, Z.ZPCI_PEC_FMB_ADDR, addr, reason="FMB not writable")

    def _count(self, key: str, n: int = 1) -> None:
        self.fmb[key] += n
        if self.fmb_addr:
            self._fmb_update()

    # ------------------------------------------------------------------ STPCIFC
    def stpcifc(self, r1: int) -> Outcome:
        fh, dmaas = r1 >> 32, (r1 >> 16) & 0xFF
        if dmaas != 0:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_STPCIFC_ST_INVAL_DMAAS)
        if (fh & Z.FH_MASK_INDEX) != (self.fh & Z.FH_MASK_INDEX) or self.state in (
                State.RESERVED, State.STANDBY):
            return Outcome(cc=Z.ZPCI_PCI_LS_INVAL_HANDLE)
        if self.state == State.DISABLED:
            if fh & Z.FH_MASK_ENABLE:
                return Outcome(cc=Z.ZPCI_PCI_LS_INVAL_HANDLE)
            return Outcome(fib=Z.Fib().pack())
        if self.state == State.PERMANENT_ERROR:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_STPCIFC_ST_PERM_ERROR)
        fc = Z.ZPCI_FIB_FC_ENABLED
        if self.state == State.BLOCKED:
            fc |= Z.ZPCI_FIB_FC_ERROR
        elif self.state == State.ERROR:
            fc |= Z.ZPCI_FIB_FC_ERROR | Z.ZPCI_FIB_FC_LS_BLOCKED
        if self.ioat:
            fc |= Z.ZPCI_FIB_FC_DMAAS_REG
        a = self.aif
        fib = Z.Fib(fmt=0, fc=fc, pba=self.pba, pal=self.pal, iota=self.iota,
                    isc=a.isc if a else 0, noi=a.noi if a else 0, aibvo=a.aibvo if a else 0,
                    sum=int(a.summary) if a else 0, aisbo=a.aisbo if a else 0,
                    aibv=a.aibv if a else 0, aisb=a.aisb if a else 0, fmb_addr=self.fmb_addr)
        r1_out = r1 | (1 << 63) if not fh & Z.FH_MASK_ENABLE else r1
        return Outcome(fib=fib.pack(), r1=r1_out)

    # ------------------------------------------------------------------ RPCIT
    async def rpcit(self, r1: int, start: int, length: int) -> Outcome:
        if not self.translating:
            return Outcome(result=RES_WRONG_MODE)
        fh = r1 >> 32
        bad = self._lookup(fh)
        if bad:
            return bad
        self.function.counters.rpcit_calls += 1
        if self.state == State.ERROR:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_PCI_ST_FUNC_NOT_AVAIL,
                           r1=_with_status(r1, Z.ZPCI_PCI_ST_FUNC_NOT_AVAIL))
        if self.iota == 0:
            return self._rpcit_error(r1, Z.ZPCI_PEC_INVALID_AS, start, "no IOTA registered")
        if self.direct:
            self._count("rpcit")
            return Outcome(r1=r1)  # nothing to shadow: every IOVA is already mapped
        if length == 0 and self.pba <= start <= self.pal:
            self._count("rpcit")
            return Outcome(r1=r1)  # nothing to refresh (QEMU answers cc 0 as well)
        if length == 0 or start + length - 1 < self.pba or start > self.pal:
            return self._rpcit_error(r1, Z.ZPCI_PEC_OUT_OF_RANGE, start, "range outside PBA-PAL")
        # The walker clips to [PBA, PAL] itself and reports failures from ``start`` on.
        result = await walk_rpcit(self.shadow, self.function.dma, self.iota, self.pba, self.pal, start, length)
        c = self.function.counters
        c.pages_mapped += result.mapped + result.changed
        c.pages_unmapped += result.unmapped
        self._count("rpcit")
        if log.debug_enabled():  # per intercept: not even a filtered call
            self.log.debug("rpcit", start=hex(start), length=hex(length), mapped=result.mapped,
                           unmapped=result.unmapped, changed=result.changed, skipped=result.skipped)
        if result.error is not None:
            e = result.error
            return self._rpcit_error(r1, e.pec, e.iova, str(e))
        self.publish()
        if result.insufficient_resources:
            c.errors["rpcit_insufficient_resources"] += 1
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_RPCIT_ST_INSUFF_RES,
                           r1=_with_status(r1, Z.ZPCI_RPCIT_ST_INSUFF_RES))
        return Outcome(r1=r1)

    def _rpcit_error(self, r1: int, pec: int, addr: int, reason: str) -> Outcome:
        self.error(pec, addr, reason)
        return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_PCI_ST_FUNC_IN_ERR,
                       r1=_with_status(r1, Z.ZPCI_PCI_ST_FUNC_IN_ERR))

    # ------------------------------------------------------------------ load/store
    def _ls_check(self, fh: int) -> Outcome | None:
        if not fh & Z.FH_MASK_ENABLE or fh != self.fh or self.state in _NOT_AVAILABLE:
            return Outcome(cc=Z.ZPCI_PCI_LS_INVAL_HANDLE)
        if self.state == State.ERROR:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_PCI_ST_BLOCKED)
        return None

    async def pcistb(self, r1: int, offset: int, gaddr: int, data: bytes) -> Outcome:
        fh, pcias, length = r1 >> 32, (r1 >> 16) & 0xF, r1 & 0x1FFF
        bad = self._ls_check(fh)
        if bad:
            return bad
        if pcias > 5 or pcias not in self.function.config.bars:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_PCI_ST_INVAL_AS,
                           r1=_with_status(r1, Z.ZPCI_PCI_ST_INVAL_AS))
        if length > self.props.maxstbl or length == 0 or length > MB_DATA_SIZE:
            return Outcome(exception=EXC_SPECIFICATION)
        if (offset & 0xFFF) + length > PAGE:
            return Outcome(exception=EXC_SPECIFICATION)
        if not self.props.relaxed_alignment and (offset % 8 or length <= 8 or length % 8 or gaddr % 8):
            return Outcome(exception=EXC_SPECIFICATION)
        region = self.function.config.bars[pcias].region
        if offset + length > region.size:
            return Outcome(exception=EXC_OPERAND)
        # One access of the whole block: never split into smaller stores.
        await self.function.region_write(pcias, offset, data[:length])
        self._count("stb")
        return Outcome(r1=r1)

    def _ls_args(self, req: int, offset: int):
        fh, pcias, length = req >> 32, (req >> 16) & 0xF, req & 0xF
        bad = self._ls_check(fh)
        if bad:
            return bad, None
        if pcias == 15:
            if length not in (1, 2, 4) or (offset % 4) + length > 4 or offset + length > 4096:
                return Outcome(exception=EXC_OPERAND), None
            return None, (7, length)
        if pcias > 5 or pcias not in self.function.config.bars:
            return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=Z.ZPCI_PCI_ST_INVAL_AS), None
        if not 1 <= length <= 8 or (offset % 8) + length > 8 \
                or offset + length > self.function.config.bars[pcias].region.size:
            return Outcome(exception=EXC_OPERAND), None
        return None, (pcias, length)

    async def pcilg(self, req: int, offset: int) -> Outcome:
        bad, args = self._ls_args(req, offset)
        if bad:
            return bad
        index, length = args
        data = await self.function.region_read(index, offset, length)
        self._count("ld")
        # Storage order, right-justified: the lowest-addressed byte is most significant.
        return Outcome(r1=int.from_bytes(data, "big"))

    async def pcistg(self, value: int, req: int, offset: int) -> Outcome:
        bad, args = self._ls_args(req, offset)
        if bad:
            return bad
        index, length = args
        await self.function.region_write(index, offset, (value & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))
        self._count("st")
        return Outcome(r1=value)

    # ------------------------------------------------------------------ DMA path
    def _guest_view(self, gpa: int, length: int, write: bool) -> memoryview:
        return self.function.dma.view(gpa, length, write)

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        """IOVA range -> guest address pieces, or an error event plus DmaFault."""
        if self.state not in (State.ENABLED, State.BLOCKED) or not self.ioat:
            raise DmaFault(iova, length, write, f"function {self.state.name.lower()}, DMA not enabled")
        if iova < self.pba or iova + length - 1 > self.pal:
            self.error(Z.ZPCI_PEC_OUT_OF_RANGE, iova, "DMA outside PBA-PAL")
            raise DmaFault(iova, length, write, "outside the DMA aperture")
        if self.direct:
            gpa = iova - self.sdma
            if self.mem_limit and gpa + length > self.mem_limit:
                self.error(Z.ZPCI_PEC_OUT_OF_RANGE, iova, "DMA beyond guest memory")
                raise DmaFault(iova, length, write, "beyond guest memory")
            return [(gpa, length)]
        try:
            return self.shadow.translate(iova, length, write)
        except TranslationError as exc:
            self.error(exc.pec, exc.iova, "DMA translation fault")
            raise DmaFault(iova, length, write, str(exc)) from None

    def _adapter_interrupt(self, vector: int) -> bool:
        """MSI-X vector -> AIBV bit (+ summary bit); True if the VMM must be signalled."""
        a = self.aif
        if a is None or not self.translating:
            return True
        if self.state != State.ENABLED or vector >= a.noi:
            return False
        try:
            bit = a.aibvo + vector
            set_indicator_bit(self._address(a.aibv + bit // 8), bit % 8)
            raise_irq = True
            if a.summary:
                raise_irq = set_indicator_bit(self._address(a.aisb + a.aisbo // 8), a.aisbo % 8)
        except DmaFault:
            self.error(Z.ZPCI_PEC_AI_INDICATOR, a.aibv, "adapter interrupt indicators not mapped")
            return False
        self.function.counters.interrupts += 1
        # The guest scans every vector once it sees the summary bit: an interrupt
        # is only needed when that bit went from 0 to 1.
        return raise_irq

    def _address(self, gpa: int) -> int:
        """Process address of a writable guest byte, or DmaFault (unmapped, read-only, message mode)."""
        self._guest_view(gpa, 1, True)  # the same checks as every other guest access
        r = self.function.dma.find(gpa)
        return r.file.address + r.mm_offset + (gpa - r.iova)

    # ------------------------------------------------------------------ control socket
    def describe(self) -> dict[str, Any]:
        a = self.aif
        return {
            "state": self.state.name.lower(),
            "mode": MODE_NAMES[self.mode],
            "fh": self.fh,
            "pfgid": self.props.pfgid,
            "pchid": self.props.pchid,
            "compat": self.props.compat,
            "relaxed_translation": self.props.rtr,
            "ioat": {"registered": self.ioat, "pba": self.pba, "pal": self.pal, "iota": self.iota},
            "direct_map": self.direct,
            "shadow_mappings": self.shadow.mapped,
            "dma_limit": self.shadow.limit,
            "dma_limit_remaining": self.shadow.available,
            "adapter_interrupts": None if a is None else attrs.asdict(a),
            "fmb_addr": self.fmb_addr,
            "fmb": dict(self.fmb),
            "sdma": self.sdma,
            "edma": self.edma,
            "events": len(self.event_log),
        }


_TOD_UNIX_EPOCH_US = 2208988800 * 1_000_000  # 1900-01-01 to 1970-01-01


def _tod() -> int:
    """The s390 TOD clock value for now (bit 51 = 1 microsecond)."""
    return ((time.time_ns() // 1000 + _TOD_UNIX_EPOCH_US) << 12) & ((1 << 64) - 1)


def _with_status(r1: int, status: int) -> int:
    return (r1 & ~(0xFF << 24)) | ((status & 0xFF) << 24)


class ZpciDmaPath:
    """The DMA API device models use; translates IOVAs in zpcid-translates mode."""

    def __init__(self, core: ZpciCore):
        self.core = core
        self.space = core.function.dma

    async def read(self, iova: int, length: int) -> bytes:
        core = self.core
        if not core.translating:
            return await self.space.read(iova, length)
        pieces = core.translate(iova, length, False)
        out = [await self.space.read(gpa, n) for gpa, n in pieces]
        core._count("dma_r", length)
        core.function.counters.dma_bytes_read += length
        return out[0] if len(out) == 1 else b"".join(out)

    async def write(self, iova: int, data) -> None:
        core = self.core
        if not core.translating:
            await self.space.write(iova, data)
            return
        pieces = core.translate(iova, len(data), True)
        pos = 0
        view = memoryview(data)
        for gpa, n in pieces:
            await self.space.write(gpa, view[pos : pos + n])
            pos += n
        core._count("dma_w", len(data))
        core.function.counters.dma_bytes_written += len(data)

    @property
    def view_generation(self) -> int | None:
        """Changes whenever a view taken earlier may no longer be what its IOVA maps to;
        None while the IOMMU translates (RPCIT can change a mapping at any time)."""
        return None if self.core.translating else self.space.generation

    def views(self, iova: int, length: int, write: bool) -> list[memoryview] | None:
        """Memoryviews of the client memory behind an IOVA range, for I/O straight into
        or out of it; None where the memory is reachable only through DMA messages."""
        core = self.core
        if not core.translating:
            return self.space.views(iova, length, write)
        out: list[memoryview] = []
        for gpa, n in core.translate(iova, length, write):
            piece = self.space.views(gpa, n, write)
            if piece is None:
                return None
            out += piece
        core._count("dma_w" if write else "dma_r", length)
        if write:
            core.function.counters.dma_bytes_written += length
        else:
            core.function.counters.dma_bytes_read += length
        return out

    async def copy(self, dst: int, src: int, length: int) -> None:
        """Device-internal copy between two IOVA ranges: one memcpy per contiguous piece."""
        core = self.core
        if core.translating:
            spieces = core.translate(src, length, False)
            dpieces = core.translate(dst, length, True)
        else:
            spieces, dpieces = [(src, length)], [(dst, length)]
        space = self.space
        si = di = 0
        (sa, sn), (da, dn) = spieces[0], dpieces[0]
        while True:
            n = min(sn, dn)
            try:
                space.view(da, n, True)[:] = space.view(sa, n, False)
            except DmaFault:
                # message-mode or discontiguous client memory: go through read/write
                await space.write(da, await space.read(sa, n))
            sa, sn, da, dn = sa + n, sn - n, da + n, dn - n
            if sn == 0:
                si += 1
                if si == len(spieces):
                    break
                sa, sn = spieces[si]
            if dn == 0:
                di += 1
                da, dn = dpieces[di]
        if core.translating:
            core._count("dma_r", length)
            core._count("dma_w", length)
            core.function.counters.dma_bytes_read += length
            core.function.counters.dma_bytes_written += length
