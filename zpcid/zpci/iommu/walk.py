"""The RPCIT table walk: the one place that validates an RPCIT and refreshes the shadow.

``rpcit`` walks the guest's region/segment/page tables in guest memory (any
object with ``view(gpa, length, write=False) -> memoryview`` that raises
``DmaFault`` outside guest memory, i.e. ``DmaSpace`` in zpcid-translates mode)
and brings a ``ShadowIotlb`` up to date.  The walk is vectorised with numpy:
whole segment tables and batches of page tables are read as big-endian u64
arrays and compared with the shadow a segment table (up to 2 GiB) at a time.

Choices where QEMU and the architecture digest (§5) leave room are marked
"Decision:" below.  One applies throughout: only an all-zero entry is an
invalid-table-entry error; a valid entry whose next-table origin or frame
address is 0 is followed (QEMU reports those as a table-type error).
"""

from __future__ import annotations

import functools
import struct
import time
from typing import Sequence

import attrs
import numpy as np
import trio

from protocol.zpci import tables as T
from zpcid import log
from zpcid.vfio_user.dma import DmaFault

from zpcid.zpci.iommu.errors import GuestMemory, TranslationError
from zpcid.zpci.iommu.shadow import _U64, PAGE, SEG_PAGES, SH_VALID, SH_WRITE, ShadowIotlb

_SH_VALID = np.uint64(SH_VALID)
_SH_RW = np.uint64(SH_VALID | SH_WRITE)

_N_RTE_ADDR = np.uint64(T.ZPCI_RTE_ADDR_MASK)
_N_STE_ADDR = np.uint64(T.ZPCI_STE_ADDR_MASK)
_N_SFAA = np.uint64(T.ZPCI_SFAA_MASK)
_N_PTE_ADDR = np.uint64(T.ZPCI_PTE_ADDR_MASK)
_N_INVALID = np.uint64(T.ZPCI_TABLE_INVALID)
_N_PTE_INVALID = np.uint64(T.ZPCI_PTE_INVALID)
_N_PROT = np.uint64(T.ZPCI_TABLE_PROTECTED)
_N_TYPE = np.uint64(T.ZPCI_TABLE_TYPE_MASK)
_N_LEN = np.uint64(T.ZPCI_TABLE_LEN_MASK)
_N_OFFSET = np.uint64(T.ZPCI_TABLE_OFFSET_MASK)
_N_FC = np.uint64(T.ZPCI_TABLE_FC)
_PAGE_OFFSETS = np.arange(SEG_PAGES, dtype=np.uint64) * np.uint64(PAGE)

# RPCITs over at most this many pages are walked entry by entry in plain
# Python (_SmallWalk): the vectorised walk costs ~80 us of numpy call overhead
# even for one page, and Linux refreshes one DMA mapping (a few pages) at a
# time.  Chosen by measurement: up to ~150 pages the scalar walk is the cheaper
# one for new mappings, unmaps and unchanged refreshes alike (1 page: ~11 us).
SMALL_WALK_PAGES = 128
# The scalar walk never sees a whole region/segment table (2 GiB or more), so
# it need not track which tables held content (_Walk.empty); keep it below that.
_SMALL_WALK_MAX = 1 << (T.ZPCI_RT_SHIFT - T.PAGE_SHIFT)

# A lazy proxy (see zpcid.log): it follows later log.configure() calls.
_log = log.get("zpcid.zpci.iommu")
# Iota is immutable; a guest refreshes with the same IOTA over and over.
_unpack_iota = functools.lru_cache(maxsize=64)(T.Iota.unpack)



# ------------------------------------------------------------------ RPCIT


@attrs.define
class RpcitResult:
    """What one RPCIT did to the shadow; ``error`` set means the walk stopped there."""

    mapped: int = 0
    unmapped: int = 0
    changed: int = 0
    skipped: int = 0  # new mappings left out for the DMA limit in the final pass
    rewalks: int = 0
    pages: int = 0  # pages examined over all passes
    truncated: bool = False  # final pass stopped early: limit exhausted, nothing left to unmap
    error: TranslationError | None = None

    @property
    def insufficient_resources(self) -> bool:
        """The caller answers cc 1 status 16 (the Linux guest then refreshes globally)."""
        return self.error is None and (self.skipped > 0 or self.truncated)


class _Stop(Exception):
    """Internal: the walk cannot achieve more in this pass."""


def _entry_views(mem: GuestMemory, addr: int, count: int):
    """Yield (first, end, view) over the ``count`` u64 entries at ``addr`` that are mapped.

    One view when the range is mapped whole, else one per 4 KiB page (guest
    memory is mapped with page granularity).  Decision: entries outside guest
    memory are skipped, so readers see 0 there, like QEMU's loads from
    unassigned memory, and they surface as PEC 0x07 (invalid table entry).
    """
    n = min(count * 8, max(0, (1 << 64) - addr) & ~7)  # never past the 64-bit space
    if n == 0:
        return
    try:
        v = mem.view(addr, n)
    except DmaFault:
        pass
    else:
        yield 0, n // 8, v
        return
    pos = addr
    end = addr + n
    while pos < end:
        stop = min(end, (pos | (PAGE - 1)) + 1)
        try:
            v = mem.view(pos, stop - pos)
        except DmaFault:
            pass
        else:
            yield (pos - addr) // 8, (stop - addr) // 8, v
        pos = stop


def _read_entries(mem: GuestMemory, addr: int, count: int) -> np.ndarray:
    """``count`` big-endian u64 table entries at ``addr`` as native uint64 (0 where unmapped)."""
    out = np.zeros(count, np.uint64)
    for first, end, v in _entry_views(mem, addr, count):
        out[first:end] = np.frombuffer(v, dtype=">u8")
    return out


def _gather_page_tables(mem: GuestMemory, ptos: np.ndarray) -> np.ndarray:
    """The 256-entry page tables at ``ptos`` (2 KiB aligned) as a (k, 256) array.

    Reads one view spanning all of them when guest memory is contiguous there
    (the usual case), splitting the span in halves where it is not.  Tables
    outside guest memory read as zeros (-> PEC 0x07).
    """
    k = len(ptos)
    out = np.zeros((k, SEG_PAGES), np.uint64)
    order = np.argsort(ptos, kind="stable")
    srt = ptos[order]

    def fill(a: int, b: int) -> None:
        lo = int(srt[a])
        hi = int(srt[b - 1]) + T.ZPCI_PT_SIZE
        try:
            v = mem.view(lo, hi - lo)
        except DmaFault:
            if b - a == 1:
                return
            mid = (a + b) // 2
            fill(a, mid)
            fill(mid, b)
            return
        arr = np.frombuffer(v, dtype=">u8").reshape(-1, SEG_PAGES)
        rows = ((srt[a:b] - np.uint64(lo)) >> np.uint64(11)).astype(np.intp)
        out[order[a:b]] = arr[rows]
        del arr, v

    fill(0, k)
    return out


class _Walk:
    """One pass of the table walk over [lo, hi) (page aligned, inside [PBA, PAL])."""

    def __init__(self, shadow: ShadowIotlb, mem: GuestMemory, start: int, lo: int, hi: int):
        self.shadow = shadow
        self.mem = mem
        self.start = start  # the RPCIT operand, for the failing address of the first page
        self.hi = hi
        self.mapped = self.unmapped = self.changed = self.skipped = 0
        self.pages = 0
        self.content = 0  # tables seen holding at least one valid leaf entry
        self.empty: set[tuple[int, int]] = set()  # (level, origin) of tables without any
        self.truncated = False
        self.error: TranslationError | None = None

    def account(self, counts: tuple[int, int, int, int], lo: int, end: int) -> None:
        """Add one applied span's (mapped, unmapped, changed, skipped) to the pass."""
        mp, um, ch, sk = counts
        self.mapped += mp
        self.unmapped += um
        self.changed += ch
        self.skipped += sk
        self.pages += (end - lo) >> T.PAGE_SHIFT

    def fail(self, pec: int, iova: int, message: str) -> None:
        self.error = TranslationError(pec, max(iova, self.start), message)
        raise _Stop

    def unmap(self, lo: int, hi: int) -> None:
        if hi > lo:
            self.unmapped += self.shadow.unmap_range(lo, hi)
            self.pages += (hi - lo) >> T.PAGE_SHIFT

    def maybe_stop(self, pos: int) -> None:
        # Decision: once the DMA limit is exhausted, something was skipped and
        # no shadow mapping is left at or above pos, the rest of the pass can
        # neither map nor unmap anything, so stop instead of walking (possibly
        # huge, possibly aliased) tables whose result is already known:
        # insufficient resources.  Bounds the work a guest can cause to the
        # limit plus what is populated.
        if self.skipped and self.shadow.available == 0 and not self.shadow.populated_from(pos, self.hi):
            self.truncated = True
            raise _Stop

    # --------------------------------------------------------------- levels
    def table(self, origin: int, level: int, prot: bool, lo: int, hi: int) -> None:
        """Process [lo, hi), which lies within the span of one table at ``level``."""
        key = (level, origin)
        if key in self.empty:
            self.unmap(lo, hi)
            return
        full = hi - lo == 1 << (T.LEVEL_SHIFT[level] + T.ZPCI_TABLE_BITS)
        content = self.content
        if level == T.LEVEL_SEGMENT:
            self.segment_table(origin, prot, lo, hi)
        else:
            self.region_table(origin, level, prot, lo, hi)
        if full and self.content == content:
            # A whole table (and everything below it) without a valid leaf
            # and without an error: later entries pointing at it again in
            # this pass only unmap.  Keeps aliased tables from a guest cheap.
            self.empty.add(key)

    def region_table(self, origin: int, level: int, prot: bool, lo: int, hi: int) -> None:
        shift = T.LEVEL_SHIFT[level]
        i0 = (lo >> shift) & T.ZPCI_INDEX_MASK
        n = (((hi - 1) >> shift) & T.ZPCI_INDEX_MASK) - i0 + 1
        ent = _read_entries(self.mem, origin + i0 * 8, n)
        base = (lo >> shift) << shift  # start of entry i0's span
        zero = ent == 0
        inv = ((ent & _N_INVALID) != 0) & ~zero
        ok = ~zero & ~inv
        badlen = ok & (((ent & _N_LEN) != np.uint64(T.ZPCI_TABLE_LEN_RTX)) | ((ent & _N_OFFSET) != 0))
        badtype = ok & ~badlen & ((ent & _N_TYPE) != np.uint64(T.table_type_of_level(level)))
        err = zero | badlen | badtype
        first_err = int(np.argmax(err)) if err.any() else n
        pos = lo
        for k in np.flatnonzero(ok[:first_err]).tolist():
            e_lo = max(lo, base + (k << shift))
            e_hi = min(hi, base + ((k + 1) << shift))
            self.unmap(pos, e_lo)
            self.maybe_stop(e_lo)
            e = int(ent[k])
            self.table(e & T.ZPCI_RTE_ADDR_MASK, level - 1,
                       prot or bool(e & T.ZPCI_TABLE_PROTECTED), e_lo, e_hi)
            pos = e_hi
        if first_err == n:
            self.unmap(pos, hi)
            return
        fail_at = max(lo, base + (first_err << shift))
        self.unmap(pos, fail_at)
        if zero[first_err]:
            self.fail(T.ZPCI_PEC_INVALID_TABLE_ENTRY, fail_at,
                      f"zero {T.LEVEL_NAME[level]} entry")
        if badlen[first_err]:
            self.fail(T.ZPCI_PEC_TABLE_LENGTH, fail_at,
                      f"{T.LEVEL_NAME[level]} entry {int(ent[first_err]):#x}: length/offset")
        self.fail(T.ZPCI_PEC_TABLE_TYPE, fail_at,
                  f"{T.LEVEL_NAME[level]} entry {int(ent[first_err]):#x}: table type")

    def segment_table(self, origin: int, prot: bool, lo: int, hi: int) -> None:
        s0 = lo >> T.ZPCI_ST_SHIFT
        n = ((hi - 1) >> T.ZPCI_ST_SHIFT) - s0 + 1
        ste = _read_entries(self.mem, origin + (s0 & T.ZPCI_INDEX_MASK) * 8, n)
        zero = ste == 0
        inv = ((ste & _N_INVALID) != 0) & ~zero
        ok = ~zero & ~inv
        badtype = ok & ((ste & _N_TYPE) != np.uint64(T.ZPCI_TABLE_TYPE_SX))
        err = zero | badtype
        end = hi
        error: tuple[int, int, str] | None = None
        m = n
        if err.any():
            m = int(np.argmax(err))
            end = max(lo, (s0 + m) << T.ZPCI_ST_SHIFT)
            error = ((T.ZPCI_PEC_INVALID_TABLE_ENTRY, end, "zero segment entry") if zero[m] else
                     (T.ZPCI_PEC_TABLE_TYPE, end, f"segment entry {int(ste[m]):#x}: table type"))
        ok = ok[:m]
        ste = ste[:m]
        sprot = ((ste & _N_PROT) != 0) | prot
        fc = ok & ((ste & _N_FC) != 0)
        pt = ok & ~fc
        pt_vals = None
        if pt.any():
            pt_rows = np.flatnonzero(pt)
            # Page tables shared by several segment entries are read and checked once.
            uniq, inverse = np.unique(ste[pt_rows] & _N_STE_ADDR, return_inverse=True)
            ptes_u = _gather_page_tables(self.mem, uniq)
            zerr_u = ptes_u == 0
            if zerr_u.any():
                pte_err = self._first_zero_pte(zerr_u, inverse, pt_rows, s0, lo, hi)
                if pte_err is not None and pte_err < end:
                    end = pte_err
                    error = (T.ZPCI_PEC_INVALID_TABLE_ENTRY, pte_err, "zero page-table entry")
            if ((ptes_u & _N_PTE_INVALID) == 0).any():
                ptes = ptes_u[inverse]
                pprot = ((ptes & _N_PROT) != 0) | sprot[pt_rows][:, None]
                pt_vals = (ptes & _N_PTE_ADDR) | np.where(pprot, _SH_VALID, _SH_RW)
                pt_vals[(ptes & _N_PTE_INVALID) != 0] = 0
        if end > lo:
            if pt_vals is None and not fc.any():
                # Nothing valid below this table: the range only unmaps.
                self.unmap(lo, end)
            else:
                self.content += 1
                new = np.zeros((m, SEG_PAGES), np.uint64)
                if pt_vals is not None:
                    new[pt_rows] = pt_vals
                if fc.any():
                    fc_rows = np.flatnonzero(fc)
                    frames = (ste[fc_rows] & _N_SFAA) | np.where(sprot[fc_rows], _SH_VALID, _SH_RW)
                    new[fc_rows] = frames[:, None] + _PAGE_OFFSETS
                rows = ((end - 1) >> T.ZPCI_ST_SHIFT) - s0 + 1
                self.account(self.shadow.apply_rows(s0, new[:rows], lo, end), lo, end)
        if error is not None:
            self.fail(*error)

    @staticmethod
    def _first_zero_pte(zerr_u: np.ndarray, inverse: np.ndarray, pt_rows: np.ndarray,
                        s0: int, lo: int, hi: int) -> int | None:
        """IOVA of the first all-zero PTE inside [lo, hi), or None."""
        has0 = zerr_u.any(axis=1)
        first = np.argmax(zerr_u, axis=1)
        row_has0 = has0[inverse].copy()
        row_col = first[inverse].copy()
        last_seg = (hi - 1) >> T.ZPCI_ST_SHIFT
        # The first and last segment may be only partly inside the range.
        for r in {0, len(pt_rows) - 1}:
            seg = s0 + int(pt_rows[r])
            c_lo = (lo >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK if seg == s0 else 0
            c_hi = (((hi - 1) >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK) + 1 if seg == last_seg else SEG_PAGES
            z = np.flatnonzero(zerr_u[inverse[r], c_lo:c_hi])
            row_has0[r] = len(z) > 0
            row_col[r] = c_lo + int(z[0]) if len(z) else 0
        if not row_has0.any():
            return None
        r = int(np.argmax(row_has0))
        return ((s0 + int(pt_rows[r])) << T.ZPCI_ST_SHIFT) | (int(row_col[r]) << T.PAGE_SHIFT)


_STRUCTS: dict[int, struct.Struct] = {}


def _unpack_u64s(buf, count: int, offset: int = 0) -> tuple[int, ...]:
    st = _STRUCTS.get(count)
    if st is None:
        st = _STRUCTS[count] = struct.Struct(f">{count}Q")
    return st.unpack_from(buf, offset)


def _read_u64s(mem: GuestMemory, addr: int, count: int) -> Sequence[int]:
    """``_read_entries`` as ints: the same views, the same zeros outside memory."""
    if 0 < count and addr + count * 8 <= 1 << 64:
        try:  # the usual case, one view (without _entry_views' generator)
            return _unpack_u64s(mem.view(addr, count * 8), count)
        except DmaFault:
            pass
    out = [0] * count
    for first, end, v in _entry_views(mem, addr, count):
        out[first:end] = _unpack_u64s(v, end - first)
    return out


class _SmallWalk(_Walk):
    """``_Walk`` for a few pages, entry by entry without numpy; same results and shadow.

    Each segment-table call still applies its pages as one batch (unmaps free
    their DMA-limit units before new mappings take them), like ``apply_rows``.
    """

    def region_table(self, origin: int, level: int, prot: bool, lo: int, hi: int) -> None:
        shift = T.LEVEL_SHIFT[level]
        i0 = (lo >> shift) & T.ZPCI_INDEX_MASK
        n = (((hi - 1) >> shift) & T.ZPCI_INDEX_MASK) - i0 + 1
        ent = _read_u64s(self.mem, origin + i0 * 8, n)
        base = (lo >> shift) << shift
        want_type = T.table_type_of_level(level)
        pos = lo
        for k, e in enumerate(ent):
            if e and e & T.ZPCI_TABLE_INVALID:
                continue
            e_lo = max(lo, base + (k << shift))
            if not e:
                self.unmap(pos, e_lo)
                self.fail(T.ZPCI_PEC_INVALID_TABLE_ENTRY, e_lo, f"zero {T.LEVEL_NAME[level]} entry")
            if (e & T.ZPCI_TABLE_LEN_MASK) != T.ZPCI_TABLE_LEN_RTX or e & T.ZPCI_TABLE_OFFSET_MASK:
                self.unmap(pos, e_lo)
                self.fail(T.ZPCI_PEC_TABLE_LENGTH, e_lo,
                          f"{T.LEVEL_NAME[level]} entry {e:#x}: length/offset")
            if (e & T.ZPCI_TABLE_TYPE_MASK) != want_type:
                self.unmap(pos, e_lo)
                self.fail(T.ZPCI_PEC_TABLE_TYPE, e_lo, f"{T.LEVEL_NAME[level]} entry {e:#x}: table type")
            e_hi = min(hi, base + ((k + 1) << shift))
            self.unmap(pos, e_lo)
            self.maybe_stop(e_lo)
            self.table(e & T.ZPCI_RTE_ADDR_MASK, level - 1,
                       prot or bool(e & T.ZPCI_TABLE_PROTECTED), e_lo, e_hi)
            pos = e_hi
        self.unmap(pos, hi)

    def segment_table(self, origin: int, prot: bool, lo: int, hi: int) -> None:
        s0 = lo >> T.ZPCI_ST_SHIFT
        ste = _read_u64s(self.mem, origin + (s0 & T.ZPCI_INDEX_MASK) * 8,
                         ((hi - 1) >> T.ZPCI_ST_SHIFT) - s0 + 1)
        new: list[int] = []  # shadow value of every page in [lo, end), in IOVA order
        end = hi
        error: tuple[int, int, str] | None = None
        pos = lo
        for e in ste:
            seg_end = min(hi, ((pos >> T.ZPCI_ST_SHIFT) + 1) << T.ZPCI_ST_SHIFT)
            c0 = (pos >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
            c1 = c0 + ((seg_end - pos) >> T.PAGE_SHIFT)
            if not e:
                end = pos
                error = (T.ZPCI_PEC_INVALID_TABLE_ENTRY, pos, "zero segment entry")
                break
            if e & T.ZPCI_TABLE_INVALID:
                new.extend([0] * (c1 - c0))
            elif (e & T.ZPCI_TABLE_TYPE_MASK) != T.ZPCI_TABLE_TYPE_SX:
                end = pos
                error = (T.ZPCI_PEC_TABLE_TYPE, pos, f"segment entry {e:#x}: table type")
                break
            else:
                flags = SH_VALID if prot or e & T.ZPCI_TABLE_PROTECTED else SH_VALID | SH_WRITE
                if e & T.ZPCI_TABLE_FC:
                    frame = e & T.ZPCI_SFAA_MASK
                    new.extend([(frame + (c << T.PAGE_SHIFT)) | flags for c in range(c0, c1)])
                else:
                    # Like _gather_page_tables: the whole 2 KiB table or zeros.
                    pto = e & T.ZPCI_STE_ADDR_MASK
                    try:
                        v = self.mem.view(pto, T.ZPCI_PT_SIZE)
                    except DmaFault:
                        v = None
                    ptes = (_unpack_u64s(v, c1 - c0, c0 * 8) if v is not None
                            else [0] * (c1 - c0))
                    del v
                    for c, p in enumerate(ptes, c0):
                        if not p:
                            error = (T.ZPCI_PEC_INVALID_TABLE_ENTRY, pos + ((c - c0) << T.PAGE_SHIFT),
                                     "zero page-table entry")
                            break
                        if p & T.ZPCI_PTE_INVALID:
                            new.append(0)
                        elif p & T.ZPCI_TABLE_PROTECTED:
                            new.append((p & T.ZPCI_PTE_ADDR_MASK) | SH_VALID)
                        else:
                            new.append((p & T.ZPCI_PTE_ADDR_MASK) | flags)
                    if error is not None:
                        end = error[1]
                        break
            pos = seg_end
        if end > lo:
            self.account(self.shadow.apply_pages(lo, new), lo, end)
        if error is not None:
            self.fail(*error)


def _checked_range(iota: int, pba: int, pal: int, start: int, length: int):
    """RPCIT's checks in QEMU's order: (result, IOTA, lo, hi).

    ``result.error`` is set when the RPCIT fails; otherwise [lo, hi) is the page
    aligned range inside [PBA, PAL] to refresh (empty: nothing to do, e.g. a
    direct mapping).
    """
    res = RpcitResult()
    start &= _U64
    length &= _U64
    io = _unpack_iota(iota)
    # QEMU's order: no IOTA (PEC 0x01; also Linux's identity-domain IOTA 0),
    # then the range against [PBA, PAL] (PEC 0x02) -- for a T = 0 IOTA too.
    if iota == 0:
        res.error = TranslationError(T.ZPCI_PEC_INVALID_AS, start, "no IOTA registered")
        return res, io, 0, 0
    end = min(start + length, 1 << 64)
    last = start + max(length, 1) - 1
    # QEMU refuses only a range entirely outside [PBA, PAL].  Decision: pages
    # of a partly overlapping range that lie outside are not shadowed (DMA
    # there faults with PEC 0x02 anyway; they would only use DMA-limit units).
    if last < pba or start > pal:
        res.error = TranslationError(T.ZPCI_PEC_OUT_OF_RANGE, start, "range outside [PBA, PAL]")
        return res, io, 0, 0
    if not io.translate:
        return res, io, 0, 0  # direct mapping (T = 0): every IOVA is mapped, no tables to refresh
    if not io.is_table_designation:
        res.error = TranslationError(T.ZPCI_PEC_INVALID_TRANSLATION_FORMAT, start,
                                     f"designation type {io.designation_type} has no tables")
        return res, io, 0, 0
    lo = max(start, pba) & ~(PAGE - 1)
    hi = min(end, pal + 1)
    hi = min((hi + PAGE - 1) & ~(PAGE - 1), 1 << 64)
    if length == 0 or hi <= lo:
        return res, io, 0, 0
    return res, io, lo, hi


def invalidate(shadow: ShadowIotlb, iota: int, pba: int, pal: int,
               start: int, length: int) -> RpcitResult:
    """RPCIT without the group's refresh bit: the same checks as ``rpcit``, then
    the shadow forgets [start, start+length) and refills on the next miss.

    Costs what is populated in the range, never the range's size: Linux's
    flush-queue refresh of its whole aperture stays cheap.
    """
    res, _, lo, hi = _checked_range(iota, pba, pal, start, length)
    if res.error is None and hi > lo:
        res.unmapped = shadow.unmap_range(lo, hi)
    return res


def rpcit(shadow: ShadowIotlb, mem: GuestMemory, iota: int, pba: int, pal: int,
          start: int, length: int, *, max_rewalks: int = 8,
          small_walk_pages: int | None = None) -> RpcitResult:
    """Refresh the shadow for [start, start+length) from the guest's tables.

    Never raises for guest-controlled input: a walk error is returned in
    ``result.error`` (PEC and failing IOVA), with everything before it applied.
    ``small_walk_pages`` overrides SMALL_WALK_PAGES (tests compare both walks).
    """
    res, io, lo, hi = _checked_range(iota, pba, pal, start, length)
    if res.error is not None or hi <= lo:
        return res
    start &= _U64
    length &= _U64
    reach = io.reach
    walk_hi = min(hi, reach)
    small = SMALL_WALK_PAGES if small_walk_pages is None else small_walk_pages
    npages = (walk_hi - lo) >> T.PAGE_SHIFT
    walk = _SmallWalk if npages <= small and npages < _SMALL_WALK_MAX else _Walk
    for attempt in range(max_rewalks + 1):
        w = walk(shadow, mem, start, lo, walk_hi)
        try:
            if lo < walk_hi:
                w.table(io.table_origin, io.root_level, io.protected, lo, walk_hi)
            if hi > reach:
                # Decision: IOVAs beyond what the designated tables can
                # translate are out of range (QEMU would silently wrap them).
                w.fail(T.ZPCI_PEC_OUT_OF_RANGE, max(lo, reach), "IOVA beyond the tables' reach")
        except _Stop:
            pass
        res.mapped += w.mapped
        res.unmapped += w.unmapped
        res.changed += w.changed
        res.pages += w.pages
        res.skipped = w.skipped
        res.truncated = w.truncated
        res.error = w.error
        # Re-walk (as QEMU does) when maps were skipped but units were freed
        # later in the pass; bounded so a guest cannot keep us here.
        if w.error is not None or not w.skipped or shadow.available == 0 or attempt == max_rewalks:
            break
        res.rewalks += 1
    if log.debug_enabled():  # per intercept: not even a filtered call
        _log.debug("rpcit", start=hex(start), length=hex(length), mapped=res.mapped,
                   unmapped=res.unmapped, changed=res.changed, skipped=res.skipped,
                   rewalks=res.rewalks, pec=res.error.pec if res.error else None)
    return res


# Aperture walked between two checkpoints of ``rpcit_sliced``: starts at
# SLICE_START and adapts so that one slice takes about SLICE_TARGET seconds
# (table content, not size, decides the cost).
SLICE_START = 16 << 20
SLICE_MIN, SLICE_MAX = 1 << 20, 1 << 30
SLICE_TARGET = 0.004


async def rpcit_sliced(shadow: ShadowIotlb, mem: GuestMemory, iota: int, pba: int, pal: int,
                       start: int, length: int, *, max_rewalks: int = 8) -> RpcitResult:
    """``rpcit`` over a range of any size without holding the event loop.

    A guest can ask for one refresh of its whole aperture (64 GiB and more) over
    tables that alias each other: one walk would hold the loop for a second.
    Decision: the range is refreshed as consecutive slices of the aperture with
    a checkpoint between them; each slice is an ``rpcit`` of its own, so the
    shadow is consistent after every slice (other device DMA of the function
    sees old or new translations per page, as during a real refresh).  The
    first error ends the refresh with everything before it applied, as in one
    walk; maps skipped for the DMA limit are retried in another sliced pass
    when units were freed later, as ``rpcit`` re-walks.
    """
    start &= _U64
    length &= _U64
    lo = max(start, pba) & ~(PAGE - 1)
    hi = min(start + length, pal + 1, 1 << 64)
    if length == 0 or hi - lo <= SLICE_MIN or not _unpack_iota(iota).translate:
        return rpcit(shadow, mem, iota, pba, pal, start, length, max_rewalks=max_rewalks)
    step = SLICE_START
    total = RpcitResult()
    for attempt in range(max_rewalks + 1):
        skipped = 0
        truncated = False
        pos = lo
        while pos < hi:
            # Slices end on aperture boundaries of their size (whole tables);
            # the first one carries the guest's start for the failing address.
            stop = min(hi, (pos & ~(step - 1)) + step)
            first = start if pos == lo else pos
            t0 = time.perf_counter()
            res = rpcit(shadow, mem, iota, pba, pal, first, stop - first, max_rewalks=0)
            took = time.perf_counter() - t0
            total.mapped += res.mapped
            total.unmapped += res.unmapped
            total.changed += res.changed
            total.pages += res.pages
            skipped += res.skipped
            truncated |= res.truncated
            if res.error is not None:
                total.error = res.error
                break
            pos = stop
            if took < SLICE_TARGET / 4:
                step = min(step * 2, SLICE_MAX)
            elif took > SLICE_TARGET:
                step = max(step // 2, SLICE_MIN)
            await trio.lowlevel.checkpoint()
        total.skipped, total.truncated = skipped, truncated
        if total.error is not None or not skipped or shadow.available == 0 or attempt == max_rewalks:
            break
        total.rewalks += 1
    return total
