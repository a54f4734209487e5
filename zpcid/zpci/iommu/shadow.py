"""The shadow IOTLB: IOVA page -> (guest frame, writable), the one writer of its state."""

from __future__ import annotations

import bisect
import sys

import attrs
import numpy as np

from protocol.zpci import tables as T
from zpcid.snapshot import Snapshot, expect, require
from zpcid.zpci.iommu.errors import TranslationError

PAGE = T.PAGE_SIZE
SEG_PAGES = T.ZPCI_PT_ENTRIES  # 256 pages per 1 MiB segment
_U64 = (1 << 64) - 1

# Shadow entry encoding: 0 = not mapped, else guest frame | flags.  Frames are
# 4 KiB aligned so the low bits are free; SH_VALID makes guest frame 0 mappable.
SH_VALID = 0x1
SH_WRITE = 0x2
_SH_ADDR = np.uint64(T.ZPCI_PTE_ADDR_MASK)

# sys.getsizeof of an ndarray includes the data it owns.
_SEG_ARRAY_BYTES = sys.getsizeof(np.zeros(SEG_PAGES, np.uint64))


class ShadowIotlb:
    """The shadow IOMMU of one function: IOVA page -> (guest frame, writable).

    One uint64[256] array per populated 1 MiB segment, keyed by ``iova >> 20``,
    plus a sorted list of the populated keys so range operations visit only
    populated segments.  ``limit`` is the DMA limit in mapped 4 KiB pages
    (None = unlimited); ``pba``/``pal`` bound ``translate`` (PEC 0x02 outside).
    """

    def __init__(self, limit: int | None = 65535):
        self.limit = limit
        self.mapped = 0
        self.generation = 0  # bumped on every change so caches can notice
        self.pba = 0
        self.pal = _U64
        self._segs: dict[int, np.ndarray] = {}
        self._keys: list[int] = []

    # ----------------------------------------------------------------- queries
    @property
    def available(self) -> int:
        """DMA-limit units (pages) still free; a large number when unlimited."""
        if self.limit is None:
            return 1 << 62
        return max(0, self.limit - self.mapped)

    @property
    def segments(self) -> int:
        return len(self._segs)

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the shadow (arrays, dict and key list)."""
        return (len(self._segs) * _SEG_ARRAY_BYTES + sys.getsizeof(self._segs)
                + sys.getsizeof(self._keys) + 32 * len(self._keys))

    def lookup(self, iova: int) -> tuple[int, bool] | None:
        """(guest address of ``iova``, writable), or None when not mapped."""
        a = self._segs.get(iova >> T.ZPCI_ST_SHIFT)
        if a is None:
            return None
        v = int(a[(iova >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK])
        if not v:
            return None
        return (v & T.ZPCI_PTE_ADDR_MASK) | (iova & (PAGE - 1)), bool(v & SH_WRITE)

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        """Guest (address, length) pieces for a DMA access; contiguous pages coalesce.

        Raises TranslationError: PEC 0x02 outside [pba, pal]; PEC 0x04 for an
        unmapped page or a write to a read-only one (QEMU's IOMMU reports both
        as translation protection).
        """
        if length <= 0:
            return []
        end = iova + length
        if iova < self.pba or end - 1 > self.pal or end > 1 << 64:
            raise TranslationError(T.ZPCI_PEC_OUT_OF_RANGE, max(iova, 0),
                                   "DMA outside the registered aperture")
        if (iova ^ (end - 1)) < PAGE:  # within one page: the common small DMA
            v = self._entry(iova)
            if not v or (write and not v & SH_WRITE):
                raise TranslationError(T.ZPCI_PEC_TRANSLATION_PROTECTION, iova,
                                       "read-only page" if v else "page not mapped")
            return [((v & T.ZPCI_PTE_ADDR_MASK) | (iova & (PAGE - 1)), length)]
        pieces: list[list[int]] = []
        pos = iova
        while pos < end:
            seg = pos >> T.ZPCI_ST_SHIFT
            seg_end = min(end, (seg + 1) << T.ZPCI_ST_SHIFT)
            c0 = (pos >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
            c1 = ((seg_end - 1) >> T.PAGE_SHIFT & T.ZPCI_PT_MASK) + 1
            a = self._segs.get(seg)
            if a is None:
                raise TranslationError(T.ZPCI_PEC_TRANSLATION_PROTECTION, pos, "page not mapped")
            part = a[c0:c1]
            bad = (part == 0) | ((part & np.uint64(SH_WRITE)) == 0) if write else part == 0
            if bad.any():
                k = int(np.argmax(bad))
                fail = max(pos, (seg << T.ZPCI_ST_SHIFT) + ((c0 + k) << T.PAGE_SHIFT))
                raise TranslationError(T.ZPCI_PEC_TRANSLATION_PROTECTION, fail,
                                       "read-only page" if part[k] else "page not mapped")
            frames = part & _SH_ADDR
            breaks = (np.flatnonzero(np.diff(frames) != np.uint64(PAGE)) + 1).tolist()
            starts = [0] + breaks
            stops = breaks + [len(frames)]
            for s, e in zip(starts, stops):
                p_lo = max(pos, (seg << T.ZPCI_ST_SHIFT) + ((c0 + s) << T.PAGE_SHIFT))
                p_hi = min(seg_end, (seg << T.ZPCI_ST_SHIFT) + ((c0 + e) << T.PAGE_SHIFT))
                gpa = int(frames[s]) | (p_lo & (PAGE - 1))
                if pieces and pieces[-1][0] + pieces[-1][1] == gpa:
                    pieces[-1][1] += p_hi - p_lo
                else:
                    pieces.append([gpa, p_hi - p_lo])
            pos = seg_end
        return [(g, n) for g, n in pieces]

    def ranges(self) -> list[tuple[int, int, int, bool]]:
        """Mapped ranges (iova, size, gpa, writable), coalesced for display."""
        out: list[list] = []
        for seg in self._keys:
            a = self._segs[seg]
            cols = np.flatnonzero(a)
            if not len(cols):
                continue
            vals = a[cols]
            frames = vals & _SH_ADDR
            wr = (vals & np.uint64(SH_WRITE)) != 0
            brk = np.ones(len(cols), bool)
            brk[1:] = (np.diff(cols) != 1) | (np.diff(frames) != np.uint64(PAGE)) | (wr[1:] != wr[:-1])
            starts = np.flatnonzero(brk).tolist() + [len(cols)]
            for s, e in zip(starts[:-1], starts[1:]):
                iova = (seg << T.ZPCI_ST_SHIFT) + (int(cols[s]) << T.PAGE_SHIFT)
                gpa, w, size = int(frames[s]), bool(wr[s]), (e - s) * PAGE
                if out and out[-1][0] + out[-1][1] == iova and out[-1][2] + out[-1][1] == gpa \
                        and out[-1][3] == w:
                    out[-1][1] += size
                else:
                    out.append([iova, size, gpa, w])
        return [tuple(r) for r in out]  # type: ignore[misc]

    # ----------------------------------------------------------------- changes
    def clear(self) -> int:
        """Drop every mapping; returns the number of pages that were mapped."""
        n = self.mapped
        self._segs.clear()
        self._keys.clear()
        self.mapped = 0
        self.generation += 1
        return n

    def populated_from(self, iova: int, end: int) -> bool:
        """Whether any populated segment intersects [iova, end)."""
        if end <= iova:
            return False
        i = bisect.bisect_left(self._keys, iova >> T.ZPCI_ST_SHIFT)
        return i < len(self._keys) and self._keys[i] <= (end - 1) >> T.ZPCI_ST_SHIFT

    def _entry(self, iova: int) -> int:
        a = self._segs.get(iova >> T.ZPCI_ST_SHIFT)
        return 0 if a is None else int(a[(iova >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK])

    def unmap_range(self, lo: int, hi: int) -> int:
        """Unmap every page in [lo, hi) (page aligned); returns pages unmapped."""
        if hi <= lo:
            return 0
        s0, s1 = lo >> T.ZPCI_ST_SHIFT, (hi - 1) >> T.ZPCI_ST_SHIFT
        keys = self._keys
        i = bisect.bisect_left(keys, s0)
        j = bisect.bisect_right(keys, s1)
        if i == j:
            return 0
        segs = self._segs
        count = 0
        for seg in keys[i:j]:
            c_lo = (lo >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK if seg == s0 else 0
            c_hi = (((hi - 1) >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK) + 1 if seg == s1 else SEG_PAGES
            a = segs[seg]
            if c_lo == 0 and c_hi == SEG_PAGES:
                count += int(np.count_nonzero(a))
                del segs[seg]
                continue
            part = a[c_lo:c_hi]
            n = int(np.count_nonzero(part))
            if n:
                part[:] = 0
                count += n
                if not a.any():
                    del segs[seg]
        keys[i:j] = [s for s in keys[i:j] if s in segs]
        if count:
            self.mapped -= count
            self.generation += 1
        return count

    def apply_rows(self, s0: int, new: np.ndarray, lo: int, hi: int) -> tuple[int, int, int, int]:
        """Make segments s0.. hold ``new`` (rows of 256 shadow entries) within [lo, hi).

        Entries outside [lo, hi) in the first and last row keep their value.
        New mappings beyond the DMA limit are skipped in IOVA order, after
        this batch's unmaps have freed their units.  Decision: a changed
        mapping costs no unit and is always applied (QEMU skips it when the
        counter is 0, leaving a stale translation).  Returns (mapped,
        unmapped, changed, skipped).
        """
        rows = new.shape[0]
        keys, segs = self._keys, self._segs
        i = bisect.bisect_left(keys, s0)
        j = bisect.bisect_left(keys, s0 + rows)
        if i == j and not new.any():
            return 0, 0, 0, 0
        old = np.zeros_like(new)
        for seg in keys[i:j]:
            old[seg - s0] = segs[seg]
        c0 = (lo >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
        if c0:
            new[0, :c0] = old[0, :c0]
        c1 = (hi >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
        if c1 and ((hi - 1) >> T.ZPCI_ST_SHIFT) == s0 + rows - 1:
            new[rows - 1, c1:] = old[rows - 1, c1:]
        o_nz = old != 0
        n_nz = new != 0
        diff = old != new
        unmaps = int(np.count_nonzero(o_nz & ~n_nz))
        maps_mask = n_nz & ~o_nz
        maps = int(np.count_nonzero(maps_mask))
        changed = int(np.count_nonzero(diff & o_nz & n_nz))
        self.mapped -= unmaps
        skipped = 0
        avail = self.available
        if maps > avail:
            # Architecturally the counter runs page by page in IOVA order; keep
            # the first `avail` new mappings and leave the rest unmapped.
            flat = new.reshape(-1)
            skip_idx = np.flatnonzero(maps_mask.reshape(-1))[avail:]
            flat[skip_idx] = 0
            skipped = len(skip_idx)
            maps -= skipped
            diff = old != new
        self.mapped += maps
        if not (maps or unmaps or changed):
            return 0, 0, 0, skipped
        row_changed = np.flatnonzero(diff.any(axis=1)).tolist()
        row_pop = new.any(axis=1)
        for k in row_changed:
            seg = s0 + k
            if not row_pop[k]:
                segs.pop(seg, None)
            elif seg in segs:
                segs[seg][:] = new[k]
            else:
                segs[seg] = new[k].copy()
        keys[i:j] = (np.flatnonzero(row_pop) + s0).tolist()
        self.generation += 1
        return maps, unmaps, changed, skipped

    def apply_pages(self, lo: int, new: list[int]) -> tuple[int, int, int, int]:
        """``apply_rows`` for a few pages from ``lo`` given as a list of shadow values
        (the scalar walk): (mapped, unmapped, changed, skipped)."""
        sh = self
        segs = sh._segs
        old: list[int] = []
        pos = lo
        end = lo + (len(new) << T.PAGE_SHIFT)
        while pos < end:
            seg = pos >> T.ZPCI_ST_SHIFT
            c0 = (pos >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
            c1 = min(SEG_PAGES, c0 + ((end - pos) >> T.PAGE_SHIFT))
            a = segs.get(seg)
            if a is None:
                old.extend([0] * (c1 - c0))
            elif c1 - c0 == 1:
                old.append(a.item(c0))
            else:
                old.extend(a[c0:c1].tolist())
            pos = (seg + 1) << T.ZPCI_ST_SHIFT
        if old == new:  # the common refresh of an unchanged mapping
            return 0, 0, 0, 0
        unmaps = changed = 0
        maps: list[int] = []
        for i, (o, n) in enumerate(zip(old, new)):
            if o:
                if not n:
                    unmaps += 1
                elif n != o:
                    changed += 1
            elif n:
                maps.append(i)
        sh.mapped -= unmaps
        avail = sh.available
        skipped = 0
        if len(maps) > avail:
            # The first `avail` new mappings in IOVA order win, as in apply_rows.
            for i in maps[avail:]:
                new[i] = 0
            skipped = len(maps) - avail
            del maps[avail:]
        sh.mapped += len(maps)
        if not (maps or unmaps or changed):
            return 0, 0, 0, skipped
        keys = sh._keys
        emptied: set[int] = set()
        for i, (o, n) in enumerate(zip(old, new)):
            if o == n:
                continue
            iova = lo + (i << T.PAGE_SHIFT)
            seg = iova >> T.ZPCI_ST_SHIFT
            a = segs.get(seg)
            if a is None:
                a = segs[seg] = np.zeros(SEG_PAGES, np.uint64)
                bisect.insort(keys, seg)
            a[(iova >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK] = n
            if not n:
                emptied.add(seg)
        for seg in emptied:
            if not segs[seg].any():
                del segs[seg]
                keys.remove(seg)
        sh.generation += 1
        return len(maps), unmaps, changed, skipped

    # ----------------------------------------------------------------- snapshot
    def snapshot(self) -> "ShadowSnapshot":
        """The populated segments as 256 native u64 entries each (and the aperture)."""
        return ShadowSnapshot(limit=self.limit, pba=self.pba, pal=self.pal,
                              segments=tuple((k, self._segs[k].astype("<u8").tobytes()) for k in self._keys))

    def restore(self, snap: "ShadowSnapshot") -> None:
        expect(snap, ShadowSnapshot)
        segs: dict[int, np.ndarray] = {}
        for key, raw in snap.segments:
            require(isinstance(raw, bytes) and len(raw) == SEG_PAGES * 8, f"segment {key:#x}: bad size")
            require(0 <= key < 1 << (64 - T.ZPCI_ST_SHIFT) and key not in segs, f"segment {key:#x}: bad key")
            a = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
            require(bool(a.any()), f"segment {key:#x} is empty")
            segs[key] = a
        mapped = sum(int(np.count_nonzero(a)) for a in segs.values())
        require(snap.limit is None or mapped <= snap.limit, "more mappings than the DMA limit")
        self.limit, self.pba, self.pal = snap.limit, snap.pba, snap.pal
        self._segs = segs
        self._keys = sorted(segs)
        self.mapped = mapped
        self.generation += 1

    def check(self) -> None:
        """Assert internal consistency (tests and debugging)."""
        assert self._keys == sorted(self._segs), "key list out of sync"
        total = 0
        for seg, a in self._segs.items():
            n = int(np.count_nonzero(a))
            assert n, f"empty segment {seg:#x} kept"
            total += n
        assert total == self.mapped, (total, self.mapped)




@attrs.frozen
class ShadowSnapshot(Snapshot):
    KIND = "zpci.shadow"
    limit: int | None
    pba: int
    pal: int
    segments: tuple  # (segment key = iova >> 20, 256 little-endian u64 shadow entries)
