"""The instructions a VMM forwards through the mailbox, one handler each (as
QEMU cuts hw/s390x/s390-pci-inst.c): CLP, MPCIFC, STPCIFC, RPCIT, PCISTB,
PCILG, PCISTG. Each returns an ``Outcome``; ``writeback`` turns it into the
registers the VMM stores (docs/zpci-region.md, "Outcome table")."""

from __future__ import annotations

from typing import Any

import attrs

from protocol.errors import ProtocolError
from protocol.zpci import formats as Z
from protocol.zpci import region as R
from protocol.zpci import tables as T
from protocol.zpci.region import State
from zpcid.zpci.state import NOT_AVAILABLE, Event

# The ZpciCore that runs us (zpcid.zpci.core imports this module, not the other way round).
Core = Any

PAGE = 4096


@attrs.define
class Outcome:
    cc: int = 0
    status: int = 0
    exception: int = R.EXC_NONE
    r1: int | None = None  # value for r1 on cc 0 (PCILG data, STPCIFC handle bit 63)
    fib: bytes | None = None
    result: int = R.RES_OK


def _cc1(status: int) -> Outcome:
    return Outcome(cc=Z.ZPCI_PCI_LS_ERR, status=status)


_CC3 = Outcome(cc=Z.ZPCI_PCI_LS_INVAL_HANDLE)


def writeback(cmd: int, out: Outcome, r1: int, r2: int) -> tuple[int, int, int]:
    """The registers the VMM stores into the guest: (mask, r1_out, r2_out).

    cc 1/2 store the status (bits 24-31) into r1, or into r2 for PCILG/PCISTG;
    cc 0 stores a value only where the instruction has one (the PCILG data, the
    STPCIFC handle with bit 63); cc 3, exceptions and ABI errors store nothing.
    """
    if out.result != R.RES_OK or out.exception != R.EXC_NONE:
        return 0, r1, r2
    if out.cc in (Z.ZPCI_PCI_LS_ERR, Z.ZPCI_PCI_LS_BUSY):
        if cmd in R.STATUS_IN_R1:
            return R.WB_R1, R.with_status(r1, out.status), r2
        if cmd in R.STATUS_IN_R2:
            return R.WB_R2, r1, R.with_status(r2, out.status)
    if out.cc == Z.ZPCI_PCI_LS_OK and out.r1 is not None:
        return R.WB_R1, out.r1, r2
    return 0, r1, r2


async def execute(z: Core, cmd: int, r1: int, r2: int, r3: int) -> Outcome:
    region = z.region
    if cmd == R.CMD_CLP:
        region.set_clp_response(clp(z, region.clp_request()))
        return Outcome()
    if cmd == R.CMD_MPCIFC:
        return mpcifc(z, r1, region.fib_in())
    if cmd == R.CMD_STPCIFC:
        return stpcifc(z, r1)
    if cmd == R.CMD_RPCIT:
        return await rpcit(z, r1, r2, r3)
    if cmd == R.CMD_PCISTB:
        return await pcistb(z, r1, r3, r2, region.data(r1 & 0x1FFF))
    if cmd == R.CMD_PCILG:
        return await pcilg(z, r2, r3)
    if cmd == R.CMD_PCISTG:
        return await pcistg(z, r1, r2, r3)
    return Outcome(result=R.RES_BAD_COMMAND)


# ---------------------------------------------------------------------- CLP


def clp(z: Core, block: bytes) -> bytes:
    """Execute one CLP request block for this function; returns the response block."""
    req, rc = Z.ClpRequest.parse(block)
    if req is None:
        return Z.ClpHeader(length=16, code=rc).pack()
    st = z.st
    if isinstance(req, Z.ClpListRequest):
        if req.resume_token != 0:
            return Z.ClpHeader(length=16, code=Z.CLP_RC_LISTPCI_BADRT).pack()
        return Z.ClpListResponse(response_code=Z.CLP_RC_OK, resume_token=0, mdd=Z.FH_MASK_SHM,
                                 max_fn=4096, flags=0x01, entries=(z.list_entry(),)).pack()
    if isinstance(req, Z.ClpQueryPciFnRequest):
        if req.fh & ~Z.FH_MASK_ENABLE != st.fh & ~Z.FH_MASK_ENABLE:
            return Z.ClpHeader(length=16, code=Z.CLP_RC_SETPCIFN_FH).pack()
        return z.query_fn().pack()
    if isinstance(req, Z.ClpQueryPciFnGrpRequest):
        if req.pfgid != z.props.pfgid:
            return Z.ClpHeader(length=16, code=Z.CLP_RC_QUERYPCIFG_PFGID).pack()
        return z.query_group().pack()
    rc = set_pci_fn(z, req.fh, req.oc, req.ndas)
    return Z.ClpSetPciFnResponse(response_code=rc, fh=st.fh).pack()


def set_pci_fn(z: Core, fh: int, oc: int, ndas: int) -> int:
    st = z.st
    if fh & ~Z.FH_MASK_ENABLE != st.fh & ~Z.FH_MASK_ENABLE:
        return Z.CLP_RC_SETPCIFN_FH
    if st.state == State.PERMANENT_ERROR:
        return Z.CLP_RC_SETPCIFN_ERR
    if oc == Z.CLP_SET_ENABLE_PCI_FN:
        if ndas == 0:
            return Z.CLP_RC_SETPCIFN_DMAAS
        if ndas > 1:
            return Z.CLP_RC_SETPCIFN_RES
        return Z.CLP_RC_OK if st.apply(Event.ENABLE) else Z.CLP_RC_SETPCIFN_FHOP
    if oc == Z.CLP_SET_DISABLE_PCI_FN:
        if not st.can(Event.DISABLE):
            return Z.CLP_RC_SETPCIFN_FHOP
        z.clear_registrations()
        st.apply(Event.DISABLE)
        return Z.CLP_RC_OK
    return Z.CLP_RC_SETPCIFN_FHOP


# ---------------------------------------------------------------------- MPCIFC


def _usable(z: Core, fh: int) -> bool:
    """``fh`` is this function's current handle and the function is usable."""
    return fh == z.st.fh and z.st.state not in NOT_AVAILABLE


def mpcifc(z: Core, r1: int, fib_bytes: bytes) -> Outcome:
    fh, dmaas, oc = r1 >> 32, (r1 >> 16) & 0xFF, r1 & 0xFF
    if not z.translating and oc in R.VMM_EMULATED_OCS:
        # AIBV, AISB and the FMB are guest absolute addresses, which
        # vmm-translates mode cannot reach: the VMM emulates these itself.
        return Outcome(result=R.RES_WRONG_MODE)
    if not _usable(z, fh):
        return _CC3
    try:
        fib = Z.Fib.unpack(fib_bytes)
    except ProtocolError:
        return Outcome(exception=R.EXC_OPERAND)
    if fib.fmt != 0:
        return Outcome(exception=R.EXC_OPERAND)
    if oc == Z.ZPCI_MOD_FC_REG_INT:
        return _register_interrupts(z, fib)
    if oc == Z.ZPCI_MOD_FC_DEREG_INT:
        return Outcome() if z.deregister_interrupts() else _cc1(Z.ZPCI_MOD_ST_SEQUENCE)
    if oc in (Z.ZPCI_MOD_FC_REG_IOAT, Z.ZPCI_MOD_FC_DEREG_IOAT, Z.ZPCI_MOD_FC_REREG_IOAT):
        if dmaas != 0:
            return _cc1(Z.ZPCI_MOD_ST_DMAAS_INVAL)
        if oc == Z.ZPCI_MOD_FC_REG_IOAT:
            return _cc1(Z.ZPCI_MOD_ST_SEQUENCE) if z.ioat else _register_ioat(z, fib)
        if not z.ioat:
            return _cc1(Z.ZPCI_MOD_ST_SEQUENCE)
        z.deregister_ioat()
        return Outcome() if oc == Z.ZPCI_MOD_FC_DEREG_IOAT else _register_ioat(z, fib)
    if oc == Z.ZPCI_MOD_FC_RESET_ERROR:
        return Outcome() if z.st.apply(Event.RESET_ERROR) else _cc1(Z.ZPCI_MOD_ST_SEQUENCE)
    if oc == Z.ZPCI_MOD_FC_RESET_BLOCK:
        return Outcome() if z.st.apply(Event.RESET_BLOCK) else _cc1(Z.ZPCI_MOD_ST_SEQUENCE)
    if oc == Z.ZPCI_MOD_FC_SET_MEASURE:
        return _set_measurement(z, fib.fmb_addr)
    return Outcome(exception=R.EXC_OPERAND)


def _register_ioat(z: Core, fib) -> Outcome:
    pba = fib.pba & ~0xFFF
    pal = fib.pal | 0xFFF
    if pba > pal or pba < z.sdma or pal > z.edma:
        return Outcome(exception=R.EXC_OPERAND)
    iota = T.Iota.unpack(fib.iota)
    if iota.translate:
        if iota.designation_type != T.ZPCI_IOTA_RTTO:
            return Outcome(exception=R.EXC_OPERAND)
    elif not z.props.rtr:
        # The guest asked for no translation but RTR was never offered.
        z.log.warning("zpci_refused", what="IOTA without translation", rtr=False)
        return Outcome(exception=R.EXC_OPERAND)
    z.register_ioat(pba, pal, fib.iota, direct=not iota.translate)
    return Outcome()


def _register_interrupts(z: Core, fib) -> Outcome:
    if z.aif is not None:
        return _cc1(Z.ZPCI_MOD_ST_SEQUENCE)
    if fib.noi == 0 or fib.noi > z.port.zpci_msix_vectors():
        return _cc1(Z.ZPCI_MOD_ST_RES_NOT_AVAIL)
    if not z.register_interrupts(fib):
        return _cc1(Z.ZPCI_MOD_ST_RES_NOT_AVAIL)
    return Outcome()


def _set_measurement(z: Core, addr: int) -> Outcome:
    z.fmb.stop()
    if addr & 0xF:
        z.error_event(Z.ZPCI_PEC_FMB_PROTECTION, addr, "FMB misaligned", enter_error=False)
        return _cc1(0)  # QEMU stores no status: the byte stays 0
    if addr:
        z.fmb.start(addr)
    z.log.info("zpci_fmb", addr=hex(addr))
    return Outcome()


# ---------------------------------------------------------------------- STPCIFC


def stpcifc(z: Core, r1: int) -> Outcome:
    fh, dmaas = r1 >> 32, (r1 >> 16) & 0xFF
    st = z.st
    if dmaas != 0:
        return _cc1(Z.ZPCI_STPCIFC_ST_INVAL_DMAAS)
    if (fh & Z.FH_MASK_INDEX) != (st.fh & Z.FH_MASK_INDEX) or st.state in (State.RESERVED, State.STANDBY):
        return _CC3
    if st.state == State.DISABLED:
        return _CC3 if fh & Z.FH_MASK_ENABLE else Outcome(fib=Z.Fib().pack())
    if st.state == State.PERMANENT_ERROR:
        return _cc1(Z.ZPCI_STPCIFC_ST_PERM_ERROR)
    fc = Z.ZPCI_FIB_FC_ENABLED
    if st.state == State.BLOCKED:
        fc |= Z.ZPCI_FIB_FC_ERROR
    elif st.state == State.ERROR:
        fc |= Z.ZPCI_FIB_FC_ERROR | Z.ZPCI_FIB_FC_LS_BLOCKED
    if z.ioat:
        fc |= Z.ZPCI_FIB_FC_DMAAS_REG
    irq = z.aif.fib_fields() if z.aif is not None else {}
    fib = Z.Fib(fmt=0, fc=fc, pba=z.pba, pal=z.pal, iota=z.iota, fmb_addr=z.fmb.addr, **irq)
    # A handle passed without the enable bit comes back with bit 63 set (QEMU).
    return Outcome(fib=fib.pack(), r1=None if fh & Z.FH_MASK_ENABLE else r1 | (1 << 63))


# ---------------------------------------------------------------------- RPCIT


async def rpcit(z: Core, r1: int, start: int, length: int) -> Outcome:
    if not z.translating:
        return Outcome(result=R.RES_WRONG_MODE)
    if not _usable(z, r1 >> 32):
        return _CC3
    z.port.zpci_count("rpcit_calls")
    if z.st.state == State.ERROR:
        return _cc1(Z.ZPCI_PCI_ST_FUNC_NOT_AVAIL)
    # The walk validates the RPCIT (no IOTA, then the range against [PBA, PAL],
    # also for a direct map) and refreshes the shadow: one place for both.
    result = await z.refresh(start, length)
    if result.error is not None:
        e = result.error
        z.error_event(e.pec, e.iova, str(e))
        return _cc1(Z.ZPCI_PCI_ST_FUNC_IN_ERR)
    if result.insufficient_resources:
        z.port.zpci_count_error("rpcit_insufficient_resources")
        return _cc1(Z.ZPCI_RPCIT_ST_INSUFF_RES)
    return Outcome()


# ---------------------------------------------------------------------- PCISTB / PCILG / PCISTG


def _ls_check(z: Core, fh: int) -> Outcome | None:
    if not fh & Z.FH_MASK_ENABLE or not _usable(z, fh):
        return _CC3
    if z.st.state == State.ERROR:
        return _cc1(Z.ZPCI_PCI_ST_BLOCKED)
    return None


async def pcistb(z: Core, r1: int, offset: int, gaddr: int, data: bytes) -> Outcome:
    fh, pcias, length = r1 >> 32, (r1 >> 16) & 0xF, r1 & 0x1FFF
    bad = _ls_check(z, fh)
    if bad:
        return bad
    bars = z.port.zpci_bars()
    if pcias > 5 or pcias not in bars:
        return _cc1(Z.ZPCI_PCI_ST_INVAL_AS)
    if length > z.props.maxstbl or length == 0 or length > R.MB_DATA_SIZE:
        return Outcome(exception=R.EXC_SPECIFICATION)
    if (offset & 0xFFF) + length > PAGE:
        return Outcome(exception=R.EXC_SPECIFICATION)
    if not z.props.relaxed_alignment and (offset % 8 or length <= 8 or length % 8 or gaddr % 8):
        return Outcome(exception=R.EXC_SPECIFICATION)
    if offset + length > bars[pcias][0]:
        return Outcome(exception=R.EXC_OPERAND)
    # One access of the whole block: never split into smaller stores.
    await z.port.zpci_store(pcias, offset, data[:length])
    z.fmb.count("stb")
    return Outcome()


CONFIG_SPACE = 15
_CONFIG_REGION = 7  # VFIO_PCI_CONFIG_REGION_INDEX


def _ls_args(z: Core, req: int, offset: int) -> tuple[Outcome | None, tuple[int, int]]:
    fh, pcias, length = req >> 32, (req >> 16) & 0xF, req & 0xF
    bad = _ls_check(z, fh)
    if bad:
        return bad, (0, 0)
    if pcias == CONFIG_SPACE:
        if length not in (1, 2, 4) or (offset % 4) + length > 4 or offset + length > 4096:
            return Outcome(exception=R.EXC_OPERAND), (0, 0)
        return None, (_CONFIG_REGION, length)
    bars = z.port.zpci_bars()
    if pcias > 5 or pcias not in bars:
        return _cc1(Z.ZPCI_PCI_ST_INVAL_AS), (0, 0)
    if not 1 <= length <= 8 or (offset % 8) + length > 8 or offset + length > bars[pcias][0]:
        return Outcome(exception=R.EXC_OPERAND), (0, 0)
    return None, (pcias, length)


async def pcilg(z: Core, req: int, offset: int) -> Outcome:
    bad, (index, length) = _ls_args(z, req, offset)
    if bad:
        return bad
    data = await z.port.zpci_load(index, offset, length)
    z.fmb.count("ld")
    # Storage order, right-justified: the lowest-addressed byte is most significant.
    return Outcome(r1=int.from_bytes(data, "big"))


async def pcistg(z: Core, value: int, req: int, offset: int) -> Outcome:
    bad, (index, length) = _ls_args(z, req, offset)
    if bad:
        return bad
    await z.port.zpci_store(index, offset, (value & ((1 << (8 * length)) - 1)).to_bytes(length, "big"))
    z.fmb.count("st")
    return Outcome()
