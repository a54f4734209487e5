"""The zPCI side of a function: handle and state, CLP data, registrations
(translation, adapter interruptions, measurement), error events, the DMA
path and interrupt delivery — exposed to the VMM through the control region
(``docs/zpci-region.md``). The instructions themselves are in
``zpcid.zpci.instructions``.
"""

from __future__ import annotations

import collections
import time
from typing import Any, NoReturn

import attrs
import trio

from protocol.zpci import formats as Z
from protocol.zpci import region as R
from protocol.zpci.region import State
from zpcid.snapshot import Snapshot, SnapshotError, expect, require
from zpcid.vfio_user.dma import DmaFault, DmaSpace
from zpcid.vfio_user.regions import MemfdRegionSnapshot, RegionError
from zpcid.zpci import instructions as I
from zpcid.zpci.dma_path import ZpciDmaPath
from zpcid.zpci.interrupts import AdapterInterrupts, raise_vector
from zpcid.zpci.iommu import (DirectMap, LazyIotlb, RpcitResult, ShadowIotlb, TranslationError, invalidate,
                              rpcit_sliced)
from zpcid.zpci.iommu.shadow import ShadowSnapshot
from zpcid.zpci.measurement import DEFAULT_MUI, FMB_LENGTH, Measurement
from zpcid.zpci.port import FunctionPort
from zpcid.zpci.properties import ZpciProperties
from zpcid.zpci.region import ControlRegion, EventRing
from zpcid.zpci.state import DMA_STATES, Event, FunctionState

PAGE = 4096
DEFAULT_MSIA = 0xFE00_0000_0000_0000
DEFAULT_EDMA = 0x01FF_FFFF_FFFF_FFFF
_NO_LIMIT = 1 << 64

FEATURES = (R.FEAT_MAILBOX | R.FEAT_EVENTS | R.FEAT_ADAPTER_INT | R.FEAT_FMB | R.FEAT_PCILG_PCISTG
            | R.FEAT_WRITEBACK | R.FEAT_VMM_FLAGS | R.FEAT_VMM_IDS | R.FEAT_DMA_FAULT_EVENTS)


@attrs.frozen
class Ioat:
    """A registered I/O address translation: the FIB fields and the one translator."""

    pba: int
    pal: int
    iota: int
    translator: ShadowIotlb | LazyIotlb | DirectMap

    @property
    def direct(self) -> bool:
        return isinstance(self.translator, DirectMap)


class ZpciCore:
    """zPCI state and instruction execution of one function.

    Composed onto a PCI function from above (``zpcid.zpci.function``): it is the
    function's extension (control region, DMA path, interrupt-delivery hook,
    life-cycle calls) and sees the function only as a ``FunctionPort``.
    """

    region_index = R.ZPCI_REGION_INDEX

    def __init__(self, name: str, props: ZpciProperties, log, port: FunctionPort, memory: DmaSpace,
                 index: int | None = None):
        self.props = props
        self.log = log.bind(fid=props.fid, uid=props.uid)
        self.port = port
        self.memory = memory  # guest absolute storage in zpcid-translates mode
        self._blocked = False  # DMA held back by the error state (see dma_blocked)
        self._unblocked: trio.Event | None = None
        self.st = FunctionState((props.fid & 0xFFFF) if index is None else index, self.log,
                                self._state_changed)
        self.region = ControlRegion(name, self.header_written, self.doorbell)
        self.ring = EventRing(self.region)
        self.shadow = ShadowIotlb(props.dma_limit)
        self.fmb = Measurement(lambda gpa, n: self.memory.view(gpa, n, True), port.zpci_spawn,
                               self._fmb_failed)
        self.event_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._clp_key: tuple | None = None
        self.ioat_reg: Ioat | None = None
        self.aif: AdapterInterrupts | None = None
        self.dma_path = ZpciDmaPath(self)
        self.reset_all()

    # ------------------------------------------------------------------ lifecycle
    def reset_all(self) -> None:
        """Back to power-on: configured but disabled, nothing registered, the region as new."""
        if self.region.closed:
            return  # the function was closed (daemon done with it); nothing to show any more
        self.mode = R.MODE_VMM
        self.mem_limit = 0
        self.vmm_flags = self.vmm_fid = self.vmm_uid = 0
        self.clear_registrations()
        self.region.initialise(self.features)
        self.ring.reset()
        self._clp_key = None
        self.st.apply(Event.POWER_ON)

    def clear_registrations(self) -> None:
        """Drop translation, adapter interruptions and measurement."""
        if self.ioat_reg is not None:
            self.deregister_ioat()
        self.aif = None
        self.fmb.stop()
        self.fmb.counters = self.fmb.fresh()

    def function_reset(self) -> None:
        """Disable the function as a system reset does (handle loses the enable bit)."""
        self.clear_registrations()
        self.st.apply(Event.RESET)

    # ------------------------------------------------------------------ the function's calls (FunctionExtension)
    def bars_changed(self) -> None:
        self.publish()

    def reset(self) -> None:
        self.function_reset()

    def power_on(self) -> None:
        self.reset_all()

    def release_requested(self) -> None:
        self.availability(Z.ZPCI_PEC_AVAIL_DECONFIG_REQUESTED, "removal requested")

    def function_info(self) -> dict[str, Any]:
        return {"fid": self.props.fid, "uid": self.props.uid, "zpci": self.describe()}

    def properties(self) -> dict[str, Any]:
        return attrs.asdict(self.props)

    def set_properties(self, props: dict[str, Any]) -> None:
        # A snapshot taken before the refresh bit was a property ran with the
        # compat level's default, whatever the configuration says now.
        props = {"tlb_refresh": None} | props
        try:
            new = attrs.evolve(self.props, **props)
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"zPCI properties of the snapshot: {exc}") from None
        self.set_props(new)

    def session_started(self) -> None:
        """A client's session can run tasks now: restart the FMB timer if one is registered."""
        self.fmb.arm()

    def session_ended(self) -> None:
        self.fmb.disarm()

    def set_props(self, props: ZpciProperties) -> None:
        """New properties (only while detached); the function starts over."""
        self.props = props
        self.shadow.limit = props.dma_limit
        self.reset_all()

    @property
    def features(self) -> int:
        f = FEATURES
        if self.props.rtr:
            f |= R.FEAT_RELAXED_TRANSLATION
        if self.props.relaxed_alignment:
            f |= R.FEAT_RELAXED_ALIGNMENT
        return f

    # ------------------------------------------------------------------ views for the handlers
    @property
    def state(self) -> State:
        return self.st.state

    @property
    def fh(self) -> int:
        return self.st.fh

    @property
    def translating(self) -> bool:
        return self.mode == R.MODE_ZPCID

    @property
    def lazy(self) -> bool:
        """Translations are fetched on a shadow miss (the group's refresh bit is off).

        Only when zpcid translates: a VMM that translates itself learns of new
        mappings only through the RPCITs the refresh bit asks for."""
        return self.translating and not self.props.refresh

    @property
    def ioat(self) -> bool:
        return self.ioat_reg is not None

    @property
    def direct(self) -> bool:
        return self.ioat_reg is not None and self.ioat_reg.direct

    @property
    def pba(self) -> int:
        return self.ioat_reg.pba if self.ioat_reg else 0

    @property
    def pal(self) -> int:
        return self.ioat_reg.pal if self.ioat_reg else 0

    @property
    def iota(self) -> int:
        return self.ioat_reg.iota if self.ioat_reg else 0

    @property
    def fmb_addr(self) -> int:
        return self.fmb.addr

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
        vendor, device = self.port.zpci_ids()
        return Z.ClpListEntry(device_id=device, vendor_id=vendor,
                              configured=self.state not in (State.STANDBY, State.RESERVED),
                              fid=self.props.fid, fh=self.fh)

    def query_fn(self) -> Z.ClpQueryPciFnResponse:
        bars = self.port.zpci_bars()
        sizes = tuple(bars[i][0].bit_length() - 1 if i in bars and bars[i][0] else 0 for i in range(6))
        values = tuple(bars[i][1] if i in bars else 0 for i in range(6))
        util = Z.ebcdic(self.props.util_str, 64) if self.props.util_str else bytes(64)
        return Z.ClpQueryPciFnResponse(
            response_code=Z.CLP_RC_OK, vfn=self.props.vfn,
            flags=Z.CLP_FN_UTIL_STR if self.props.util_str else 0,
            pfgid=self.props.pfgid, fid=self.props.fid, bar_size=sizes,
            pchid=self.props.pchid, bar=values, pfip=bytes(4),
            fmb_len=FMB_LENGTH // 4, pft=0, sdma=self.sdma, edma=self.edma,
            uid=self.props.uid, util_str=util,
        )

    def query_group(self) -> Z.ClpQueryPciFnGrpResponse:
        flags = 0 if self.lazy else Z.CLP_FNGRP_REFRESH
        if self.props.rtr:
            flags |= Z.CLP_FNGRP_RTR
        if self.props.relaxed_alignment:
            flags |= Z.CLP_FNGRP_RELAXED_ALIGNMENT
        return Z.ClpQueryPciFnGrpResponse(
            response_code=Z.CLP_RC_OK, noi=self.port.zpci_msix_vectors(), version=0, flags=flags,
            maxstbl=self.props.maxstbl, mui=DEFAULT_MUI, dtsm=Z.ZPCI_DTSM_RTTO, dasm=0,
            msia=DEFAULT_MSIA,
        )

    # ------------------------------------------------------------------ the region
    def publish(self) -> None:
        """Refresh everything read-only the VMM reads from the region."""
        region = self.region
        if region.closed:
            return
        reg = self.ioat_reg
        ioat = 0 if reg is None else (R.HDR_IOAT_REGISTERED | R.HDR_IOAT_DIRECT if reg.direct
                                      else R.HDR_IOAT_REGISTERED)
        st, props, shadow = self.st, self.props, self.shadow
        region.publish_header(self.mode, self.mem_limit, self.vmm_flags, self.vmm_fid, self.vmm_uid,
                              st.state, st.fh, props.fid, props.uid, ioat, shadow.mapped, shadow.available,
                              self.ring.lost)
        # The CLP blocks change only with the handle, configuration state, BARs,
        # mode (the refresh bit), aperture or properties: rebuild them only then (publish
        # runs per intercept; the port hands out the same BAR mapping while the BARs stay
        # as they are, so the comparison is by identity then).
        key = (st.fh, st.state, self.mode, self.mem_limit, self.port.zpci_bars(), props,
               self.port.zpci_msix_vectors())
        if key == self._clp_key:
            return
        self._clp_key = key
        self.region.publish_clp(self.list_entry().pack(), self.query_fn().pack(), self.query_group().pack())

    def header_written(self, start: int, end: int) -> None:
        """Apply writable header fields (mode, guest memory limit, VMM flags and IDs).

        Raises RegionError (EINVAL to the REGION_WRITE) for a guest memory limit
        whose aperture would not fit in 64 bits; the old value stays published.
        """
        if start >= R.HDR_VMM_UID + 4 or end <= R.HDR_MODE:
            return  # the mailbox, CLP, data or event-consumer fields: nothing to apply here
        mode, limit, flags, fid, uid = self.region.vmm_fields()
        if start < R.HDR_VMM_UID + 4 and end > R.HDR_VMM_FLAGS:
            if (flags, fid, uid) != (self.vmm_flags, self.vmm_fid, self.vmm_uid):
                self.vmm_flags, self.vmm_fid, self.vmm_uid = flags & R.VMM_FLAGS_KNOWN, fid, uid
                self.log.info("zpci_vmm", flags=self.vmm_flags, vmm_fid=hex(fid), vmm_uid=hex(uid))
            self.publish()
        if start < R.HDR_MEM_LIMIT + 8 and end > R.HDR_MODE:
            self.set_mode(mode)
            refused = None
            if limit != self.mem_limit:
                if self.sdma + limit - 1 >= 1 << 64:
                    refused = f"guest memory limit {limit:#x}: aperture beyond 2^64"
                elif self.state in (State.ENABLED, State.BLOCKED, State.ERROR):
                    self.log.warning("zpci_refused", what="memory limit change while enabled")
                else:
                    self.mem_limit = limit
            self.publish()
            if refused:
                self.log.warning("zpci_refused", what=refused)
                raise RegionError(refused)

    def set_mode(self, mode: int) -> bool:
        if mode == self.mode:
            return True
        if mode not in R.MODE_NAMES or self.state not in (State.DISABLED, State.STANDBY) \
                or self.port.zpci_dma_mapped():
            # The mode decides what DMA_MAP keys mean: only before any map and enable.
            self.log.warning("zpci_refused", what="mode change", mode=mode)
            self.publish()
            return False
        self.mode = mode
        self.log.info("zpci_mode", mode=R.MODE_NAMES[mode])
        return True

    async def doorbell(self) -> None:
        cmd, r1, r2, r3 = self.region.operands()
        try:
            out = await I.execute(self, cmd, r1, r2, r3)
        except Exception:
            self.log.exception("zpci_command_failed", cmd=cmd)
            out = I.Outcome(result=R.RES_BAD_REQUEST)
        mask, r1_out, r2_out = I.writeback(cmd, out, r1, r2)
        self.region.set_results(out.result, out.cc, out.status, out.exception, mask, r1_out, r2_out,
                                out.fib)
        self.publish()

    # ------------------------------------------------------------------ error state and DMA
    @property
    def dma_blocked(self) -> bool:
        """DMA is held back: the function is in the error state (zpcid-translates mode).

        Device models that can wait (virtio) hold their DMA until the error state
        ends instead of failing it: the guest's memory stays untouched meanwhile,
        and requests the driver cannot cancel (Linux virtio has no PCI error
        handlers) complete once the function is unblocked, so the driver can be
        unbound and the function recovered in place."""
        return self.translating and self.state == State.ERROR

    async def dma_unblocked(self) -> None:
        """Return once the error state is over (reset error, disable, reset)."""
        while self.dma_blocked:
            if self._unblocked is None:
                self._unblocked = trio.Event()
            await self._unblocked.wait()

    def _state_changed(self) -> None:
        was, self._blocked = self._blocked, self.dma_blocked
        ended = was and not self._blocked
        reg = self.ioat_reg
        if ended and self.lazy and reg is not None and not reg.direct:
            # RPCIT is refused in the error state and Linux does not repeat a
            # refused flush: the cache may hold translations the guest has
            # invalidated since (and whose IOVAs it reuses).  Misses re-walk.
            self.port.zpci_count("pages_unmapped", self.shadow.clear())
        self.publish()
        if ended:
            if self._unblocked is not None:
                self._unblocked.set()
                self._unblocked = None
            if self.state in DMA_STATES:
                # Doorbells the guest wrote meanwhile were refused (load/store blocked).
                # (Last: the device's interrupts may fault and change the state again.)
                self.port.zpci_dma_resumed()

    def clear_error(self) -> dict[str, Any]:
        """End the error state from outside the guest (zpcictl clear-error), as the
        guest's MPCIFC reset error indication would: load/store and DMA resume."""
        if not self.st.apply(Event.RESET_ERROR, by="control"):
            raise ValueError(f"function is {self.state.name.lower()}, not in the error state")
        return {"state": self.state.name}

    # ------------------------------------------------------------------ events
    def _event(self, kind: int, pec: int, faddr: int = 0, *, reason: str = "") -> None:
        if kind == Z.ZPCI_EVENT_ERROR:
            ccdf = Z.ErrorCcdf(fh=self.fh, fid=self.props.fid, pec=pec, faddr=faddr).pack()
        else:
            ccdf = Z.AvailabilityCcdf(fh=self.fh, fid=self.props.fid, pec=pec).pack()
        entry = {"seq": self.ring.produced, "type": "error" if kind == Z.ZPCI_EVENT_ERROR else "availability",
                 "pec": pec, "fh": self.fh, "faddr": faddr, "time": time.time(), "reason": reason}
        self.event_log.append(entry)
        self.ring.add(kind, pec, ccdf)
        if kind == Z.ZPCI_EVENT_ERROR:
            self.port.zpci_count_error(f"pec_{pec:#04x}")
        self.log.warning("zpci_event", pec=hex(pec), faddr=hex(faddr), reason=reason, kind=entry["type"])
        # Stock VMMs (QEMU's vfio-pci) stop the whole VM on the ERR IRQ: only a
        # VMM that said it consumes the ring hears about new events.
        if self.vmm_flags & R.VMM_EVENTS:
            self.port.zpci_signal_error()
        self.publish()

    def error_event(self, pec: int, faddr: int, reason: str, *, enter_error: bool = True) -> None:
        """An error event; an enabled or blocked function goes into the error state
        (unless ``enter_error`` is False: the FMB events leave the state alone, as in QEMU)."""
        if enter_error:
            self.st.apply(Event.ERROR, pec=hex(pec))
        self._event(Z.ZPCI_EVENT_ERROR, pec, faddr, reason=reason)

    def availability(self, pec: int, reason: str = "") -> None:
        """Queue an availability event (e.g. 0x0303: deconfiguration requested)."""
        self._event(Z.ZPCI_EVENT_AVAILABILITY, pec, reason=reason)

    def inject_error(self, pec: int = Z.ZPCI_PEC_SYSTEM_ERROR) -> dict[str, Any]:
        self.error_event(pec, 0, "injected")
        return {"state": self.state.name, "pec": pec}

    def _fmb_failed(self, addr: int) -> None:
        self.error_event(Z.ZPCI_PEC_FMB_ADDR, addr, "FMB not writable", enter_error=False)

    # ------------------------------------------------------------------ registrations
    def register_ioat(self, pba: int, pal: int, iota: int, *, direct: bool) -> None:
        if direct:
            limit = self.mem_limit or _NO_LIMIT
            translator: ShadowIotlb | LazyIotlb | DirectMap = DirectMap(self.sdma, pba, pal, limit)
        else:
            translator = self.shadow
            self.shadow.pba, self.shadow.pal = pba, pal
            if self.lazy:
                translator = LazyIotlb(self.shadow, self.memory, iota, pba, pal, self._filled)
        self.ioat_reg = Ioat(pba, pal, iota, translator)
        self.log.info("zpci_ioat", registered=True, pba=hex(pba), pal=hex(pal), iota=hex(iota), direct=direct)
        self.publish()

    def deregister_ioat(self) -> None:
        n = self.shadow.clear()
        self.port.zpci_count("pages_unmapped", n)
        self.ioat_reg = None
        self.log.info("zpci_ioat", registered=False, unmapped=n)
        self.publish()

    async def refresh(self, start: int, length: int) -> RpcitResult:
        """RPCIT's table walk into the shadow (validation included), in slices that
        let the event loop run; with lazy translation only the validation and
        dropping the range from the shadow (misses refill it)."""
        if self.lazy:
            result = invalidate(self.shadow, self.iota, self.pba, self.pal, start, length)
        else:
            result = await rpcit_sliced(self.shadow, self.memory, self.iota, self.pba, self.pal,
                                        start, length)
        self._count_walk(result)
        if result.error is None:
            self.fmb.count("rpcit")
        # No publish here: the doorbell that ran the RPCIT publishes once it has the results.
        return result

    def _count_walk(self, result: RpcitResult) -> None:
        # A one-page refresh of an unchanged mapping is the common RPCIT: skip the zero counts.
        if result.mapped or result.changed:
            self.port.zpci_count("pages_mapped", result.mapped + result.changed)
        if result.unmapped:
            self.port.zpci_count("pages_unmapped", result.unmapped)

    def _filled(self, result: RpcitResult) -> None:
        """A shadow miss was walked (lazy translation)."""
        self.port.zpci_count("shadow_fills")
        self._count_walk(result)
        self.publish()  # the header's shadow_mappings and dma_available

    def register_interrupts(self, fib) -> bool:
        """False when the indicators are not in mapped, writable guest memory."""
        aif = AdapterInterrupts.from_fib(fib)
        try:
            for addr, n in aif.indicator_ranges():
                self.memory.view(addr, n, True)
        except DmaFault:
            return False
        self.aif = aif
        self.log.info("zpci_aif", registered=True, isc=aif.isc, noi=aif.noi, aibv=hex(aif.aibv),
                      aisb=hex(aif.aisb))
        return True

    def deregister_interrupts(self) -> bool:
        if self.aif is None:
            return False
        self.aif = None
        self.log.info("zpci_aif", registered=False)
        return True

    # ------------------------------------------------------------------ interrupt-delivery hook
    def deliver_interrupt(self, vector: int) -> bool:
        """Called for MSI-X vector ``vector`` (the table index) before its eventfd
        is signalled; False suppresses the eventfd."""
        a = self.aif
        if a is None or not self.translating:
            return True
        if self.state != State.ENABLED or vector >= a.noi:
            return False
        try:
            signal = raise_vector(a, vector, self._address)
        except DmaFault:
            self.error_event(Z.ZPCI_PEC_AI_INDICATOR, a.aibv, "adapter interrupt indicators not mapped")
            return False
        self.port.zpci_count("interrupts")
        return signal

    def _address(self, gpa: int) -> int:
        """Process address of a writable guest byte, or DmaFault (unmapped, read-only, message mode)."""
        self.memory.view(gpa, 1, True)  # the same checks as every other guest access
        r = self.memory.find(gpa)
        return r.file.address + r.mm_offset + (gpa - r.iova)

    # ------------------------------------------------------------------ DMA path
    def dma_fault(self, pec: int, fail: int, iova: int, length: int, write: bool,
                  reason: str) -> NoReturn:
        """A device DMA that cannot complete: error state and event (IOVA ``fail``), then DmaFault.

        Only an enabled or blocked function changes state and reports; a function
        already in the error state (or not enabled) just fails the access.
        """
        if self.state in DMA_STATES:
            self.error_event(pec, fail, reason)
        raise DmaFault(iova, length, write, reason)

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int, int]]:
        """IOVA range -> (iova, guest address, length) pieces, or an error event plus DmaFault."""
        if not self.translating:
            return [(iova, iova, length)]  # DMA_MAP keys are IOVAs: the VMM translated
        if self.state not in DMA_STATES:
            raise DmaFault(iova, length, write, f"function {self.state.name.lower()}, DMA not enabled")
        if self.ioat_reg is None:
            self.dma_fault(Z.ZPCI_PEC_INVALID_AS, iova, iova, length, write,
                           "DMA without registered I/O address translation")
        try:
            pieces = self.ioat_reg.translator.translate(iova, length, write)
        except TranslationError as exc:
            self.dma_fault(exc.pec, exc.iova, iova, length, write, f"DMA translation fault: {exc}")
        out, pos = [], iova
        for gpa, n in pieces:
            out.append((pos, gpa, n))
            pos += n
        return out

    def direct_pieces(self, pieces: list[tuple[int, int]], write: bool) -> list[tuple[int, int]] | None:
        """Guest (address, length) of a request's IOVA pieces through a direct map in one
        pass; None when not direct-mapped, not able to DMA, or a piece would fault
        (``translate`` then reports it piece by piece)."""
        reg = self.ioat_reg
        if reg is None or not reg.direct or self.state not in DMA_STATES:
            return None
        return reg.translator.translate_many(pieces, write)

    def memory_fault(self, piece_iova: int, gpa: int, exc: DmaFault, iova: int, length: int,
                     write: bool) -> NoReturn:
        """A translated access that lands where the VMM mapped no guest memory."""
        if exc.client_gone:
            raise exc  # not the guest's doing: the VMM went away in the middle of the access
        fail = piece_iova + max(0, exc.addr - gpa)
        # zpcid-translates: the translation is fine, guest storage is not there;
        # vmm-translates: the VMM has no mapping for the IOVA.
        pec = Z.ZPCI_PEC_ACCESS_PROTECTION if self.translating else Z.ZPCI_PEC_TRANSLATION_PROTECTION
        self.dma_fault(pec, fail, iova, length, write, f"guest memory not mapped: {exc.reason}")

    def account_dma(self, read: int, written: int) -> None:
        if not self.translating:
            return
        if read:
            self.fmb.count("dma_r", read)
            self.port.zpci_count("dma_bytes_read", read)
        if written:
            self.fmb.count("dma_w", written)
            self.port.zpci_count("dma_bytes_written", written)

    # ------------------------------------------------------------------ control socket
    def mappings(self) -> list[dict[str, Any]]:
        if self.ioat_reg is None:
            return []
        direct = self.direct
        return [{"iova": i, "size": n, "gpa": g, "writable": w} | ({"direct": True} if direct else {})
                for i, n, g, w in self.ioat_reg.translator.ranges()]

    def describe(self) -> dict[str, Any]:
        a = self.aif
        return {
            "state": self.state.name.lower(),
            "mode": R.MODE_NAMES[self.mode],
            "vmm": {"events": bool(self.vmm_flags & R.VMM_EVENTS),
                    "adapter_interrupts": bool(self.vmm_flags & R.VMM_ADAPTER),
                    "fid": self.vmm_fid, "uid": self.vmm_uid},
            "fh": self.fh,
            "pfgid": self.props.pfgid,
            "pchid": self.props.pchid,
            "compat": self.props.compat,
            "relaxed_translation": self.props.rtr,
            "tlb_refresh": not self.lazy,
            "ioat": {"registered": self.ioat, "pba": self.pba, "pal": self.pal, "iota": self.iota},
            "direct_map": self.direct,
            "shadow_mappings": self.shadow.mapped,
            "dma_limit": self.shadow.limit,
            "dma_limit_remaining": self.shadow.available,
            "adapter_interrupts": None if a is None else attrs.asdict(a),
            "fmb_addr": self.fmb.addr,
            "fmb": dict(self.fmb.counters),
            "sdma": self.sdma,
            "edma": self.edma,
            "events": len(self.event_log),
        }

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> "ZpciSnapshot":
        """Function state, registrations, shadow IOTLB, FMB, event ring and the
        region itself (its memfd: the VMM has it mapped, so the next process must
        serve the same file)."""
        return ZpciSnapshot(
            region=self.region.snapshot(),
            state=int(self.state), fh=self.fh, mode=self.mode, mem_limit=self.mem_limit,
            vmm=(self.vmm_flags, self.vmm_fid, self.vmm_uid),
            ioat=None if self.ioat_reg is None else (self.pba, self.pal, self.iota, self.direct),
            shadow=self.shadow.snapshot(),
            aif=None if self.aif is None else attrs.astuple(self.aif),
            fmb_addr=self.fmb.addr, fmb=tuple(sorted(self.fmb.counters.items())),
            events=(self.ring.produced, self.ring.lost),
            event_log=tuple(tuple(sorted(e.items())) for e in self.event_log),
        )

    def restore(self, snap: "ZpciSnapshot") -> None:
        """Become the zPCI function ``snap`` was taken of (takes the region's fd).

        Runs after the DMA space was restored: registrations refer to guest memory.
        """
        try:
            expect(snap, ZpciSnapshot)
            require(snap.mode in R.MODE_NAMES, f"unknown mode {snap.mode}")
            require(snap.state in State._value2member_map_, f"unknown state {snap.state}")
            require(snap.shadow.limit == self.shadow.limit,
                    f"snapshot DMA limit {snap.shadow.limit} differs from {self.shadow.limit}")
        except BaseException:
            snap.close_fds()
            raise
        self.region.restore(snap.region)
        self.fmb.stop()
        self.mode, self.mem_limit = snap.mode, snap.mem_limit
        self.vmm_flags, self.vmm_fid, self.vmm_uid = snap.vmm
        self.st.restore(State(snap.state), snap.fh)
        self._blocked = self.dma_blocked
        self.shadow.restore(snap.shadow)
        self.ioat_reg = None
        if snap.ioat is not None:
            pba, pal, iota, direct = snap.ioat
            shadow_mapped = self.shadow.mapped
            self.register_ioat(pba, pal, iota, direct=direct)
            require(shadow_mapped == self.shadow.mapped, "shadow changed while restoring")
        self.aif = None if snap.aif is None else AdapterInterrupts(*snap.aif)
        self.fmb.counters = dict(snap.fmb)
        self.fmb.addr = snap.fmb_addr
        self.fmb.arm()
        self.ring.produced, self.ring.lost = snap.events
        self.event_log.clear()
        self.event_log.extend(dict(e) for e in snap.event_log)
        self._clp_key = None
        self.publish()


@attrs.frozen
class ZpciSnapshot(Snapshot):
    KIND = "zpci.function"
    region: MemfdRegionSnapshot
    state: int
    fh: int
    mode: int
    mem_limit: int
    vmm: tuple
    ioat: tuple | None  # (pba, pal, iota, direct)
    shadow: ShadowSnapshot
    aif: tuple | None  # AdapterInterrupts fields
    fmb_addr: int
    fmb: tuple  # (counter, value) pairs
    events: tuple  # (produced, lost)
    event_log: tuple  # the control socket's history, (key, value) pairs per event

