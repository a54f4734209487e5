"""RPCIT table walk, shadow IOTLB and direct map over real memfd guest memory.

Guest memory is a Memfd DMA-mapped at guest absolute address 0 in a DmaSpace
(the zpcid-translates path); tables are written into it by zpcid.vmm.guest the
way Linux's s390 IOMMU driver writes them.
"""

import struct

import numpy as np
import trio
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from protocol.zpci import tables as T
from zpcid.vfio_user.dma import DmaFault, DmaSpace
from zpcid.vmm.guest import GuestTables, dma_space
from zpcid.zpci.iommu import DirectMap, LazyIotlb, ShadowIotlb, TranslationError, invalidate, rpcit
from zpcid.vfio_user.memfd import Memfd

MiB = 1 << 20
GiB = 1 << 30
MEM = 64 * MiB
TABLE_BASE = 48 * MiB
PAL = (1 << 42) - 1


class Guest:
    def __init__(self, size=MEM, root_level=T.LEVEL_REGION_THIRD, limit=65535):
        self.memfd = Memfd(size)
        self.space = dma_space(self.memfd)
        self.tables = GuestTables(self.memfd, TABLE_BASE, 16 * MiB, root_level=root_level)
        self.shadow = ShadowIotlb(limit)
        self.pba, self.pal = 0, min(PAL, self.tables.reach - 1)

    def rpcit(self, start=None, length=None, iota=None):
        start = self.pba if start is None else start
        length = self.pal - start + 1 if length is None else length
        r = rpcit(self.shadow, self.space, self.tables.iota if iota is None else iota,
                  self.pba, self.pal, start, length)
        self.shadow.check()
        return r

    def close(self):
        self.space.close()
        self.memfd.close()


@pytest.fixture
def g():
    guest = Guest()
    yield guest
    guest.close()


def pages(shadow, iova, n):
    return [shadow.lookup(iova + i * 4096) for i in range(n)]


# ------------------------------------------------------------------ map / unmap / remap


def test_map_unmap_remap_noop(g):
    g.tables.map(0x100000, 0x200000, 10)
    r = g.rpcit(0x100000, 10 * 4096)
    assert (r.mapped, r.unmapped, r.changed, r.error) == (10, 0, 0, None)
    assert not r.insufficient_resources
    assert g.shadow.mapped == 10 and g.shadow.available == 65535 - 10
    assert pages(g.shadow, 0x100000, 10) == [(0x200000 + i * 4096, True) for i in range(10)]
    assert g.shadow.lookup(0x100000 + 10 * 4096) is None
    assert g.shadow.lookup(0x100123) == (0x200123, True)

    r = g.rpcit(0x100000, 10 * 4096)  # identical: nothing to do
    assert (r.mapped, r.unmapped, r.changed) == (0, 0, 0)

    g.tables.unmap(0x102000, 3)
    r = g.rpcit(0x102000, 3 * 4096)
    assert (r.mapped, r.unmapped, r.changed) == (0, 3, 0)
    assert g.shadow.mapped == 7 and g.shadow.lookup(0x103000) is None

    g.tables.map(0x100000, 0x900000, 2)  # remap to other frames
    g.tables.map(0x105000, 0x205000, 1, writable=False)  # same frame, now read-only
    r = g.rpcit(0x100000, 10 * 4096)
    assert (r.mapped, r.unmapped, r.changed) == (0, 0, 3)
    assert g.shadow.lookup(0x101000) == (0x901000, True)
    assert g.shadow.lookup(0x105000) == (0x205000, False)
    assert g.shadow.mapped == 7


def test_rpcit_only_touches_its_range(g):
    g.tables.map(0x100000, 0x200000, 512)
    g.rpcit(0x100000 + 4096, 4096)  # unaligned start inside the page counts too
    assert g.shadow.mapped == 1 and g.shadow.lookup(0x101000) == (0x201000, True)
    g.rpcit(0x100000 + 0x1800, 0x1000)  # touches pages 1 and 2
    assert g.shadow.mapped == 2
    r = g.rpcit(0x1FF000, 0x2000)  # crosses a segment boundary
    assert r.mapped == 2 and g.shadow.lookup(0x200000) == (0x300000, True)
    g.tables.unmap(0x100000, 512)
    r = g.rpcit(0x101000, 0x1000)
    assert r.unmapped == 1 and g.shadow.mapped == 3


def test_global_refresh_unmaps_sparse_shadow_over_huge_aperture(g):
    for iova in (0x100000, 7 << 31, (1 << 42) - (2 << 20)):
        g.tables.map(iova, 0x200000, 300)
    r = g.rpcit()
    assert r.mapped == 900 and g.shadow.segments == 6
    # The guest tears down whole region entries (2 GiB each) and one segment.
    g.tables.set_region_entry(7 << 31, 0x20)
    g.tables.set_region_entry((1 << 42) - 1, 0x20)
    g.tables.set_segment_entry(0x100000, 0x20)
    r = g.rpcit()
    assert (r.unmapped, r.mapped, r.error) == (900 - 44, 0, None)  # 44 pages live in the next segment
    assert g.shadow.ranges() == [(0x200000, 44 * 4096, 0x200000 + 256 * 4096, True)]


# ------------------------------------------------------------------ protection


@pytest.mark.parametrize("where", ["pte", "segment", "region", "iota"])
def test_protection_anywhere_on_the_path_makes_read_only(g, where):
    g.tables.map(0x100000, 0x200000, 4)
    g.tables.map(0x80000000, 0x300000, 1)  # another region entry, unaffected
    iota = g.tables.iota
    if where == "pte":
        g.tables.protect(0x101000, "pte")
    elif where == "segment":
        g.tables.protect(0x100000, "segment")
    elif where == "region":
        g.tables.protect(0x100000, T.LEVEL_REGION_THIRD)
    else:
        iota |= T.ZPCI_IOTA_PROTECTED
    r = g.rpcit(0, 4 * GiB, iota=iota)
    assert r.error is None and r.mapped == 5
    ro = {"pte": [1], "segment": [0, 1, 2, 3], "region": [0, 1, 2, 3], "iota": [0, 1, 2, 3]}[where]
    assert [w for _, w in pages(g.shadow, 0x100000, 4)] == [i not in ro for i in range(4)]
    assert g.shadow.lookup(0x80000000)[1] is (where != "iota")
    with pytest.raises(TranslationError) as e:
        g.shadow.translate(0x100000 + ro[0] * 4096 + 8, 8, write=True)
    assert e.value.pec == T.ZPCI_PEC_TRANSLATION_PROTECTION and e.value.iova == 0x100000 + ro[0] * 4096 + 8
    assert g.shadow.translate(0x100000 + ro[0] * 4096, 8, write=False) == [(0x200000 + ro[0] * 4096, 8)]


def test_1m_frames(g):
    g.tables.map_1m_frame(0x300000, 0x1000000)
    g.tables.map_1m_frame(0x400000, 0x2000000, writable=False)
    r = g.rpcit(0x300000, 2 * MiB)
    assert r.mapped == 512 and r.error is None
    assert g.shadow.ranges() == [(0x300000, MiB, 0x1000000, True), (0x400000, MiB, 0x2000000, False)]
    assert g.shadow.lookup(0x3FF123) == (0x10FF123, True)
    # A segment entry that is protected with a 1 MiB frame: the protection flag is on the entry itself.
    g.tables.set_segment_entry(0x300000, 0x1100000 | T.ZPCI_TABLE_FC)  # remap to another frame
    r = g.rpcit(0x300000, MiB)
    assert r.changed == 256 and g.shadow.lookup(0x300000) == (0x1100000, True)
    g.tables.set_segment_entry(0x400000, 0x20)
    r = g.rpcit(0x400000 + 0x80000, 0x1000)  # part of the frame only
    assert r.unmapped == 1 and g.shadow.mapped == 511


# ------------------------------------------------------------------ invalid and garbage entries


def test_invalid_entries_unmap_without_error(g):
    g.tables.map(0x100000, 0x200000, 256 + 16)
    g.rpcit()
    assert g.shadow.mapped == 272
    g.tables.set_segment_entry(0x100000, 0x20 | 0xABC000)  # invalid with junk: still just invalid
    r = g.rpcit()
    assert (r.unmapped, r.error) == (256, None)
    g.tables.set_region_entry(0, T.ZPCI_TABLE_INVALID | 0x3)
    r = g.rpcit()
    assert (r.unmapped, r.error, g.shadow.mapped) == (16, None, 0)


GARBAGE = [
    # (where, entry built from the real segment-table / page-table origins, pec)
    ("region", lambda sto, pto: 0, T.ZPCI_PEC_INVALID_TABLE_ENTRY),
    ("region", lambda sto, pto: sto | 0x4 | 0x2, T.ZPCI_PEC_TABLE_LENGTH),  # length 2
    ("region", lambda sto, pto: sto | 0x4 | 0x3 | 0x40, T.ZPCI_PEC_TABLE_LENGTH),  # table offset
    ("region", lambda sto, pto: sto | 0x0 | 0x3, T.ZPCI_PEC_TABLE_TYPE),  # segment type in an RT table
    ("region", lambda sto, pto: sto | 0x8 | 0x3, T.ZPCI_PEC_TABLE_TYPE),
    ("segment", lambda sto, pto: 0, T.ZPCI_PEC_INVALID_TABLE_ENTRY),
    ("segment", lambda sto, pto: pto | 0x4, T.ZPCI_PEC_TABLE_TYPE),
    ("segment", lambda sto, pto: pto | 0xC, T.ZPCI_PEC_TABLE_TYPE),
    ("pte", lambda sto, pto: 0, T.ZPCI_PEC_INVALID_TABLE_ENTRY),
]


@pytest.mark.parametrize("where,entry,pec", GARBAGE)
def test_garbage_entries_stop_the_walk_with_their_pec(g, where, entry, pec):
    # Mappings before, at and after the bad entry, spread over three region entries.
    bad = (1 << 31) + 5 * MiB + 7 * 4096
    g.tables.map(0x100000, 0x200000, 8)
    g.tables.map(bad - 2 * 4096, 0x400000, 5)
    g.tables.map(5 << 31, 0x600000, 8)
    value = entry(g.tables.table_at(bad, T.LEVEL_SEGMENT), g.tables.page_table(bad))
    {"region": g.tables.set_region_entry, "segment": g.tables.set_segment_entry,
     "pte": g.tables.set_pte}[where](bad, value)
    r = g.rpcit(0, 8 << 31)
    assert r.error is not None and r.error.pec == pec
    fail = {"region": 1 << 31, "segment": bad & ~(MiB - 1), "pte": bad}[where]
    assert r.error.iova == fail
    # Everything before the failing IOVA is applied, nothing after it.
    assert g.shadow.lookup(0x100000) == (0x200000, True)
    assert g.shadow.lookup(5 << 31) is None
    assert g.shadow.mapped == 8 + (2 if where == "pte" else 0)
    assert not r.insufficient_resources


def test_failing_address_is_the_rpcit_start_inside_the_first_page(g):
    g.tables.map(0x100000, 0x200000, 1)
    g.tables.set_pte(0x100000, 0)
    r = g.rpcit(0x100123, 0x10)
    assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, 0x100123)


@pytest.mark.parametrize("where", ["iota", "region", "segment"])
def test_tables_outside_guest_memory_read_as_invalid_entries(g, where):
    g.tables.map(0x100000, 0x200000, 4)
    iota = g.tables.iota
    outside = 1 << 40
    if where == "iota":
        iota = outside | 0x804
    elif where == "region":
        g.tables.set_region_entry(0x100000, outside | 0x4 | 0x3)
    else:
        g.tables.set_segment_entry(0x100000, MEM + 0x800)
    r = g.rpcit(0x100000, 4096, iota=iota)
    assert r.error.pec == T.ZPCI_PEC_INVALID_TABLE_ENTRY
    assert r.error.iova == 0x100000 and g.shadow.mapped == 0


def test_segment_table_straddling_the_end_of_guest_memory():
    # Guest memory ends 8 KiB into a segment table: entries inside work, the
    # first one beyond the end reads as an invalid (zero) entry.
    g = Guest(size=MEM + 0x2000)
    try:
        sto = MEM
        g.tables.set_region_entry(0, sto | 0x4 | 0x3)
        pto = g.tables.alloc_page_table()
        g.tables.write_u64(pto, 0x300000)
        for i in range(0x2000 // 8):
            g.tables.write_u64(sto + i * 8, pto if i == 3 else 0x20)
        r = g.rpcit(0, 2 * GiB)
        assert g.shadow.lookup(3 * MiB) == (0x300000, True) and g.shadow.mapped == 1
        assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, 1024 * MiB)
    finally:
        g.close()


def test_page_tables_in_separately_mapped_memory():
    # Two memfds: page tables in both, so no single view spans them.
    a, b = Memfd(32 * MiB), Memfd(32 * MiB)
    space = DmaSpace()
    space.add(0, 32 * MiB, True, True, a.fd, 0)
    space.add(32 * MiB, 32 * MiB, True, True, b.fd, 0)
    ta = GuestTables(a, 16 * MiB, 8 * MiB)
    shadow = ShadowIotlb(None)
    # Hand-place page tables alternately in both memories.
    for seg in range(8):
        iova = seg << 20
        pto = (20 * MiB if seg % 2 == 0 else 32 * MiB + 4 * MiB) + seg * 2048
        mem, off = (a, pto) if pto < 32 * MiB else (b, pto - 32 * MiB)
        mem.write(off, b"".join(struct.pack(">Q", (0x100000 + seg * MiB + i * 4096)) for i in range(256)))
        ta.set_segment_entry(iova, pto)
    ta.set_segment_entry(8 << 20, 40 * MiB + 64 * MiB)  # outside both
    r = rpcit(shadow, space, ta.iota, 0, PAL, 0, 16 * MiB)
    assert r.mapped == 8 * 256 and shadow.ranges() == [(0, 8 * MiB, 0x100000, True)]
    assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, 8 * MiB)
    space.close()
    a.close()
    b.close()


# ------------------------------------------------------------------ aperture and IOTA checks


def test_range_outside_pba_pal(g):
    g.pba, g.pal = 0x100000, 0x1FFFFF
    g.tables.map(0, 0x200000, 768)
    r = g.rpcit(0x200000, 4096)
    assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_OUT_OF_RANGE, 0x200000)
    r = g.rpcit(0, 0x100000)
    assert r.error.pec == T.ZPCI_PEC_OUT_OF_RANGE
    r = g.rpcit(0, 3 * MiB)  # overlaps: only the part inside [PBA, PAL] is shadowed
    assert r.error is None and r.mapped == 256
    assert g.shadow.ranges() == [(0x100000, MiB, 0x300000, True)]
    r = g.rpcit(0x100000, 0)
    assert r.error is None and r.pages == 0


def test_no_iota_and_unusable_designations(g):
    for iota, pec in [(0, T.ZPCI_PEC_INVALID_AS),
                      (0x800 | (4 << 2) | 2, T.ZPCI_PEC_INVALID_TRANSLATION_FORMAT)]:
        r = g.rpcit(0x1000, 4096, iota=iota)
        assert (r.error.pec, r.error.iova) == (pec, 0x1000)
    # T = 0 (direct mapping): nothing to refresh inside [PBA, PAL], out of range outside
    r = g.rpcit(0x1000, 4096, iota=g.tables.root)
    assert r.error is None and r.pages == 0 and g.shadow.mapped == 0
    r = g.rpcit(g.pal + 1, 4096, iota=g.tables.root)
    assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_OUT_OF_RANGE, g.pal + 1)


def test_iova_beyond_the_reach_of_the_root(g):
    g.pal = (1 << 43) - 1
    g.tables.map((1 << 42) - 4096, 0x200000, 1)
    r = g.rpcit((1 << 42) - 4096, 2 * 4096)
    assert r.mapped == 1
    assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_OUT_OF_RANGE, 1 << 42)


@pytest.mark.parametrize("level", [T.LEVEL_SEGMENT, T.LEVEL_REGION_SECOND, T.LEVEL_REGION_FIRST])
def test_other_roots(level):
    guest = Guest(root_level=level)
    try:
        iova = {T.LEVEL_SEGMENT: 0x7FF00000, T.LEVEL_REGION_SECOND: (5 << 42) + (3 << 31),
                T.LEVEL_REGION_FIRST: (3 << 53) + (5 << 42)}[level]
        guest.pal = guest.tables.reach - 1
        guest.tables.map(iova, 0x200000, 3)
        r = guest.rpcit(iova - 4096, 5 * 4096)
        assert r.mapped == 3 and guest.shadow.ranges() == [(iova, 3 * 4096, 0x200000, True)]
        if level >= T.LEVEL_REGION_SECOND:
            # An upper-level entry carrying the region-third type code is a type error.
            e = guest.tables.region_entry(iova, level)
            guest.tables.set_region_entry(iova, (e & ~0xC) | 0x4, level)
            r = guest.rpcit(iova, 4096)
            assert r.error.pec == T.ZPCI_PEC_TABLE_TYPE
            guest.tables.set_region_entry(iova, e | 0x200, level)
            r = guest.rpcit(iova, 3 * 4096)
            assert r.error is None and r.changed == 3 and guest.shadow.lookup(iova)[1] is False
    finally:
        guest.close()


def test_aliased_tables(g):
    # Two region entries share one segment table: both IOVA ranges translate alike.
    t = g.tables
    t.map(0x100000, 0x200000, 4)
    t.map((1 << 31) + 0x300000, 0x900000, 2)
    g.rpcit()
    assert g.shadow.mapped == 6
    t.set_region_entry(1 << 31, t.region_entry(0))
    r = g.rpcit()
    assert (r.unmapped, r.mapped) == (2, 4)
    assert g.shadow.lookup((1 << 31) + 0x101000) == (0x201000, True)
    # Once the shared table holds nothing valid, every alias unmaps (the walk
    # remembers the empty table instead of re-reading it).
    t.unmap(0x100000, 4)
    for k in range(2, 2048):
        t.set_region_entry(k << 31, t.region_entry(0))
    r = g.rpcit()
    assert (r.unmapped, r.mapped, r.error, g.shadow.mapped) == (8, 0, None, 0)


# ------------------------------------------------------------------ DMA limit


def test_dma_limit_exhaustion_then_global_refresh_after_guest_unmaps():
    guest = Guest(limit=100)
    try:
        t = guest.tables
        t.map(0x100000, 0x200000, 80)
        assert guest.rpcit(0x100000, 80 * 4096).mapped == 80
        # A new mapping of 50 pages: only 20 units left.
        t.map(0x800000, 0x800000, 50)
        r = guest.rpcit(0x800000, 50 * 4096)
        assert (r.mapped, r.skipped, r.error) == (20, 30, None)
        assert r.insufficient_resources
        assert guest.shadow.available == 0
        assert guest.shadow.lookup(0x800000 + 19 * 4096) is not None  # first ones in IOVA order
        assert guest.shadow.lookup(0x800000 + 20 * 4096) is None
        # Like Linux: lazily unmapped IOVAs are still cached; they are
        # invalid in the tables, and the global refresh drops them.
        t.unmap(0x100000, 60)
        r = guest.rpcit()
        assert (r.unmapped, r.mapped, r.skipped) == (60, 30, 0)
        assert not r.insufficient_resources
        assert guest.shadow.mapped == 100 - 30 and guest.shadow.available == 30
        assert guest.shadow.ranges() == [(0x100000 + 60 * 4096, 20 * 4096, 0x200000 + 60 * 4096, True),
                                         (0x800000, 50 * 4096, 0x800000, True)]
    finally:
        guest.close()


def test_changed_mappings_are_applied_even_when_the_limit_is_exhausted():
    guest = Guest(limit=10)
    try:
        guest.tables.map(0x100000, 0x200000, 10)
        guest.rpcit()
        guest.tables.map(0x100000, 0x900000, 10)
        r = guest.rpcit()
        assert (r.changed, r.skipped, r.insufficient_resources) == (10, 0, False)
        assert guest.shadow.lookup(0x100000) == (0x900000, True)
    finally:
        guest.close()


def test_rewalk_when_units_are_freed_later_in_the_pass():
    guest = Guest(limit=64)
    try:
        t = guest.tables
        t.map(7 << 31, 0x300000, 64)  # high IOVAs fill the limit
        guest.rpcit()
        t.unmap(7 << 31, 64)
        t.map(0x100000, 0x200000, 40)  # low IOVAs come first in the walk
        r = guest.rpcit()
        assert (r.rewalks, r.mapped, r.unmapped, r.skipped) == (1, 40, 64, 0)
        assert not r.insufficient_resources
        assert guest.shadow.ranges() == [(0x100000, 40 * 4096, 0x200000, True)]
    finally:
        guest.close()


def test_walk_stops_early_once_nothing_more_can_change():
    guest = Guest(limit=16)
    try:
        t = guest.tables
        for k in range(6):  # six region entries, 32 pages each
            t.map(k << 31, 0x200000, 32)
        t.set_segment_entry(5 << 31, 0)  # an error the truncated walk never reaches
        r = guest.rpcit()
        assert r.truncated and r.insufficient_resources and r.error is None
        assert guest.shadow.mapped == 16 and guest.shadow.ranges()[0][0] == 0
    finally:
        guest.close()


def test_unlimited_shadow():
    guest = Guest(limit=None)
    try:
        guest.tables.map(0, 0x100000, 70000)
        r = guest.rpcit(0, 70000 * 4096)
        assert r.mapped == 70000 and not r.insufficient_resources
        assert guest.shadow.nbytes < 70000 * 12  # about 8.7 bytes per mapped page
        assert guest.shadow.clear() == 70000 and guest.shadow.mapped == 0 and guest.shadow.segments == 0
    finally:
        guest.close()


# ------------------------------------------------------------------ shadow queries


def test_ranges_coalesce_and_translate_scatters(g):
    t = g.tables
    t.map(0xFF000, 0x500000, 3)  # crosses a segment boundary, contiguous frames
    t.map(0x102000, 0x600000, 2)  # contiguous IOVA, new frames
    t.map(0x104000, 0x602000, 1, writable=False)  # contiguous frame, read-only
    g.rpcit(0, 4 * MiB)
    assert g.shadow.ranges() == [
        (0xFF000, 3 * 4096, 0x500000, True),
        (0x102000, 2 * 4096, 0x600000, True),
        (0x104000, 4096, 0x602000, False),
    ]
    # Pieces follow guest-physical contiguity, whatever the permissions.
    assert g.shadow.translate(0xFF800, 0x5000, write=False) == [(0x500800, 0x2800), (0x600000, 0x2800)]
    assert g.shadow.translate(0xFF010, 0x20, write=True) == [(0x500010, 0x20)]
    assert g.shadow.translate(0x100000, 0, write=True) == []
    with pytest.raises(TranslationError) as e:
        g.shadow.translate(0x103F00, 0x200, write=True)
    assert (e.value.pec, e.value.iova) == (T.ZPCI_PEC_TRANSLATION_PROTECTION, 0x104000)
    with pytest.raises(TranslationError) as e:
        g.shadow.translate(0x104800, 0x1000, write=False)
    assert (e.value.pec, e.value.iova) == (T.ZPCI_PEC_TRANSLATION_PROTECTION, 0x105000)
    with pytest.raises(TranslationError) as e:
        g.shadow.translate(0x300000, 8, write=False)
    assert e.value.pec == T.ZPCI_PEC_TRANSLATION_PROTECTION
    g.shadow.pba, g.shadow.pal = 0x100000, 0x1FFFFF
    with pytest.raises(TranslationError) as e:
        g.shadow.translate(0xFF800, 0x1000, write=False)
    assert e.value.pec == T.ZPCI_PEC_OUT_OF_RANGE


def test_translate_large_access_against_memory(g):
    g.tables.map(0, 0x100000, 1024)  # 4 MiB, contiguous
    g.tables.map(0x400000, 0x900000, 256)
    g.rpcit(0, 8 * MiB)
    pieces = g.shadow.translate(0x1000, 5 * MiB - 0x1000, write=True)
    assert pieces == [(0x101000, 4 * MiB - 0x1000), (0x900000, MiB)]
    for gpa, n in pieces:
        g.space.view(gpa, n, write=True)[:4] = b"zpci"
    assert g.memfd.read(0x101000, 4) == b"zpci" and g.memfd.read(0x900000, 4) == b"zpci"


# ------------------------------------------------------------------ direct map


def test_direct_map():
    dm = DirectMap(sdma=0x100000000, pba=0x100000000, pal=0x100000000 + 64 * GiB - 1,
                   memory_limit=4 * GiB)
    assert dm.translate(0x100001000, 0x3000, write=True) == [(0x1000, 0x3000)]
    assert dm.lookup(0x100000000 + GiB) == (GiB, True)
    assert dm.lookup(0x100000000 + 4 * GiB) is None
    assert dm.ranges() == [(0x100000000, 4 * GiB, 0, True)]
    assert dm.mapped == 0
    for iova, n in [(0xFFFFF000, 0x2000), (0x100000000 + 4 * GiB - 4096, 0x2000),
                    (0x100000000 + 64 * GiB, 1)]:
        with pytest.raises(TranslationError) as e:
            dm.translate(iova, n, write=False)
        assert (e.value.pec, e.value.iova) == (T.ZPCI_PEC_OUT_OF_RANGE, iova)
        # a request with that piece among good ones: no translation, the caller goes piece by piece
        assert dm.translate_many([(0x100001000, 0x1000), (iova, n)], write=False) is None
    assert dm.translate_many([(0x100001000, 0x3000), (0x100000000 + 3 * GiB, 16), (0x100000000, 0),
                              (0x100000000 + 4 * GiB - 8, 8)], write=True) == \
        [(0x1000, 0x3000), (3 * GiB, 16), (4 * GiB - 8, 8)]
    ro = DirectMap(sdma=0, pba=0x1000, pal=0xFFFFF, memory_limit=MiB, writable=False)
    assert ro.translate(0x1000, 8, write=False) == [(0x1000, 8)]
    with pytest.raises(TranslationError) as e:
        ro.translate(0x1000, 8, write=True)
    assert e.value.pec == T.ZPCI_PEC_TRANSLATION_PROTECTION
    assert ro.translate_many([(0x1000, 8)], write=True) is None
    assert ro.translate_many([(0x1000, 8)], write=False) == [(0x1000, 8)]
    with pytest.raises(TranslationError):
        ro.translate(0, 8, write=False)  # below PBA


def test_direct_map_reaches_guest_memory(g):
    dm = DirectMap(sdma=1 << 32, pba=1 << 32, pal=(1 << 32) + MEM - 1, memory_limit=MEM)
    g.memfd.write(0x123456, b"direct")
    [(gpa, n)] = dm.translate((1 << 32) + 0x123456, 6, write=False)
    assert bytes(g.space.view(gpa, n)) == b"direct"


# ------------------------------------------------------------------ reference model and properties


def ref_walk(mem, size, io, iova):
    """Per-page walk written straight from §5.2 (plus our documented decisions)."""

    def rd(addr):
        return struct.unpack_from(">Q", mem, addr)[0] if addr + 8 <= size else 0

    level, origin, prot = io.root_level, io.table_origin, io.protected
    while level >= 1:
        e = rd(origin + ((iova >> T.LEVEL_SHIFT[level]) & 0x7FF) * 8)
        if e == 0:
            return ("err", 0x07)
        if e & 0x20:
            return None
        if e & 0x3 != 3 or e & 0xC0:
            return ("err", 0x08)
        if e & 0xC != level << 2:
            return ("err", 0x09)
        prot |= bool(e & 0x200)
        origin, level = e & ~0x3FFF, level - 1
    e = rd(origin + ((iova >> 20) & 0x7FF) * 8)
    if e == 0:
        return ("err", 0x07)
    if e & 0x20:
        return None
    if e & 0xC:
        return ("err", 0x09)
    prot |= bool(e & 0x200)
    if e & 0x400:
        return ((e & ~0xFFFFF) + (iova & 0xFF000), not prot)
    p = rd((e & ~0x7FF) + ((iova >> 12) & 0xFF) * 8)
    if p == 0:
        return ("err", 0x07)
    if p & 0x400:
        return None
    return (p & ~0xFFF, not (prot or p & 0x200))


def ref_rpcit(mem, size, iota, pba, pal, start, length):
    """{page: (gpa, writable) | None} for every page the RPCIT processes, and (pec, iova)."""
    io = T.Iota.unpack(iota)
    if not io.translate:
        return {}, (0x01, start)
    if not io.is_table_designation:
        return {}, (0x03, start)
    if start + max(length, 1) - 1 < pba or start > pal:
        return {}, (0x02, start)
    if length == 0:
        return {}, None
    lo = max(start, pba) & ~0xFFF
    hi = (min(start + length, pal + 1) + 0xFFF) & ~0xFFF
    out = {}
    for page in range(lo, min(hi, io.reach), 4096):
        r = ref_walk(mem, size, io, page)
        if r is not None and r[0] == "err":
            return out, (r[1], max(page, start))
        out[page] = r
    if hi > io.reach:
        return out, (0x02, max(lo, io.reach))
    return out, None


class RecordingMemory:
    """Guest memory that checks and records every range the walker asks for."""

    def __init__(self, space, size):
        self.space, self.size, self.asked = space, size, []

    def view(self, addr, length, write=False):
        assert not write and length > 0 and 0 <= addr and addr + length <= 1 << 64
        try:
            v = self.space.view(addr, length, write)
        except DmaFault:
            self.asked.append((addr, length, False))
            raise
        assert addr + length <= self.size
        self.asked.append((addr, length, True))
        return v


def random_tables(rng, size):
    """Guest memory full of plausible and implausible table entries."""
    n = size // 8
    kind = rng.integers(0, 9, n)
    addr16k = rng.integers(0, (size + 64 * 1024) // 16384, n, dtype=np.uint64) * np.uint64(16384)
    addr2k = rng.integers(0, (size + 8192) // 2048, n, dtype=np.uint64) * np.uint64(2048)
    frame = rng.integers(0, 1 << 30, n, dtype=np.uint64) & np.uint64(~0xFFF & (2**64 - 1))
    prot = np.where(rng.random(n) < 0.2, np.uint64(0x200), np.uint64(0))
    level_type = rng.integers(0, 4, n, dtype=np.uint64) << np.uint64(2)
    good_len = np.where(rng.random(n) < 0.9, np.uint64(3), rng.integers(0, 4, n, dtype=np.uint64))
    e = np.zeros(n, np.uint64)
    e = np.where(kind == 1, np.uint64(0x20) | (frame & np.uint64(0xFFF000)), e)
    e = np.where(kind == 2, frame | np.uint64(0x400), e)
    e = np.where(kind == 3, addr16k | np.uint64(0x4) | good_len | prot, e)
    e = np.where(kind == 4, addr16k | level_type | good_len | prot, e)
    e = np.where(kind == 5, addr2k | prot, e)
    e = np.where(kind == 6, (frame & np.uint64(~0xFFFFF & (2**64 - 1))) | np.uint64(0x400) | prot, e)
    e = np.where(kind == 7, frame | prot, e)
    e = np.where(kind == 8, rng.integers(0, 2**64, n, dtype=np.uint64), e)
    return e.astype(">u8").tobytes()


MEM_SMALL = 512 * 1024


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1),
       root_level=st.sampled_from([T.LEVEL_SEGMENT, T.LEVEL_REGION_THIRD, T.LEVEL_REGION_SECOND,
                                   T.LEVEL_REGION_FIRST]),
       root=st.integers(0, MEM_SMALL // 16384 + 2),
       iota_bits=st.sampled_from([0, 0x200, 0x3, 0x1000]),
       start_seg=st.integers(0, 2**44), start_off=st.integers(0, 2**20 - 1),
       npages=st.integers(0, 1500), limit=st.sampled_from([None, 5, 300, 65535]))
def test_random_tables_never_crash_and_match_the_reference(seed, root_level, root, iota_bits,
                                                           start_seg, start_off, npages, limit):
    rng = np.random.default_rng(seed)
    memfd = Memfd(MEM_SMALL)
    space = dma_space(memfd)
    try:
        mem = RecordingMemory(space, MEM_SMALL)
        shadow = ShadowIotlb(limit)
        iota = root * 16384 | 0x800 | (root_level << 2) | iota_bits
        # Aim at IOVAs whose top-level index hits the random root table.
        reach = T.designation_reach(root_level)
        start = ((start_seg << 20) + start_off) % reach
        length = max(0, npages * 4096 - (start_off & 0xFFF))
        results = []
        for round_ in range(2):  # walk, scramble the tables, walk again (unmaps/remaps)
            memfd.write(0, random_tables(rng, MEM_SMALL))
            before = {p: shadow.lookup(p) for p in range(start & ~0xFFF, start + max(length, 0), 4096)}
            r = rpcit(shadow, mem, iota, 0, reach - 1, start, length)
            shadow.check()
            results.append(r)
            assert r.error is None or r.error.pec in {1, 2, 3, 7, 8, 9}
            assert limit is None or shadow.mapped <= limit
            expect, err = ref_rpcit(memfd.mm, MEM_SMALL, iota, 0, reach - 1, start, max(length, 0))
            if r.truncated:
                err = None  # the truncated walk stops before reaching a later error
            got_err = (r.error.pec, r.error.iova) if r.error else None
            if not r.truncated:
                assert got_err == err
            for page, want in expect.items():
                have = shadow.lookup(page)
                if r.skipped == 0 and not r.truncated:
                    assert have == want, (hex(page), have, want)
                else:
                    assert have is None or have == want, (hex(page), have, want)
            for page, old in before.items():
                if page not in expect and not r.truncated:
                    assert shadow.lookup(page) == old  # beyond the failing IOVA: untouched
            if not r.insufficient_resources and r.error is None:
                assert all(shadow.lookup(p) == w for p, w in expect.items())
        for addr, length_, ok in mem.asked:
            if ok:
                assert 0 <= addr and addr + length_ <= MEM_SMALL
        # No view of guest memory is left exported after the walks.
        space.regions[0].file.mm.close()
    finally:
        space.close()
        memfd.close()


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["map", "map_ro", "unmap", "frame", "refresh"]),
                              st.integers(0, 40), st.integers(1, 300)), min_size=1, max_size=25),
       limit=st.sampled_from([None, 200, 1000]))
def test_linux_like_sequences_keep_the_shadow_exact(ops, limit):
    """Map/unmap like the Linux driver, refresh like it does, and compare with the tables."""
    guest = Guest(limit=limit)
    try:
        t = guest.tables
        touched = set()
        for op, slot, n in ops:
            iova = slot * 0x40000 + (1 << 31) * (slot % 3)
            if op in ("map", "map_ro"):
                t.map(iova, 0x100000 + slot * 0x10000, n, writable=op == "map")
                r = guest.rpcit(iova, n * 4096)
                if r.insufficient_resources:
                    r = guest.rpcit()  # what Linux does on cc 1 status 16
            elif op == "unmap":
                t.unmap(iova, n)
                r = guest.rpcit(iova, n * 4096)
            elif op == "frame":
                iova, n = iova & ~(MiB - 1), 256
                t.map_1m_frame(iova, (slot % 16) * MiB, writable=slot % 2 == 0)
                r = guest.rpcit(iova, MiB)
            else:
                r = guest.rpcit()
            assert r.error is None
            touched.update(range(iova, iova + n * 4096, 4096))
        r = guest.rpcit()
        assert r.error is None
        io = T.Iota.unpack(t.iota)
        want = {}
        for p in touched:
            v = ref_walk(guest.memfd.mm, MEM, io, p)
            if v is not None:
                want[p] = v
        got = {}
        for iova, size, gpa, w in guest.shadow.ranges():
            for off in range(0, size, 4096):
                got[iova + off] = (gpa + off, w)
        if limit is None or len(want) <= limit:
            assert got == want and not r.insufficient_resources
        else:
            assert r.insufficient_resources and len(got) == limit
            assert all(want[p] == v for p, v in got.items())
    finally:
        guest.close()


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["map", "map_ro", "unmap", "frame", "flush", "probe"]),
                              st.integers(0, 9), st.integers(1, 300)), min_size=1, max_size=25),
       limit=st.sampled_from([None, 5, 200]))
def test_lazy_translation_follows_the_tables(ops, limit):
    """Refresh bit off: a guest that refreshes only entries that were valid (as
    the architecture asks) always has its tables' translation, whatever was
    cached, evicted or never walked; the cache never exceeds the DMA limit."""
    guest = Guest(limit=limit)
    try:
        t = guest.tables
        lazy = LazyIotlb(guest.shadow, guest.space, t.iota, guest.pba, guest.pal)
        io = T.Iota.unpack(t.iota)
        truth = lambda p: ref_walk(guest.memfd.mm, MEM, io, p)  # noqa: E731

        def refresh(iova, n):
            r = invalidate(guest.shadow, t.iota, guest.pba, guest.pal, iova, n * 4096)
            assert r.error is None

        def check(pages):
            for p in pages:
                want = truth(p)
                try:
                    (gpa, n), = lazy.translate(p, 4096, False)
                except TranslationError as exc:
                    assert want is None and exc.pec == T.ZPCI_PEC_TRANSLATION_PROTECTION and exc.iova == p
                    continue
                try:
                    lazy.translate(p, 4096, True)
                    w = True
                except TranslationError:
                    w = False
                assert (gpa, w) == want and n == 4096
                guest.shadow.check()
                assert limit is None or guest.shadow.mapped <= limit

        touched = set()
        for op, slot, n in ops:
            iova = slot * 0x40000 + (1 << 31) * (slot % 3)
            if op == "frame":
                iova, n = iova & ~(MiB - 1), 256
            pages = range(iova, iova + n * 4096, 4096)
            # what the op can change: whole segments (a map over a 1 MiB frame replaces it)
            seg_lo, seg_hi = iova & ~(MiB - 1), (iova + n * 4096 + MiB - 1) & ~(MiB - 1)
            before = {p: truth(p) for p in range(seg_lo, seg_hi, 4096)}
            if op in ("map", "map_ro"):
                t.map(iova, 0x100000 + slot * 0x10000, n, writable=op == "map")
            elif op == "frame":
                t.map_1m_frame(iova, (slot % 16) * MiB, writable=slot % 2 == 0)
            elif op == "unmap":
                t.unmap(iova, n)
            elif op == "flush":
                refresh(guest.pba, (guest.pal - guest.pba + 1) >> 12)
            changed = [p for p, v in before.items() if v is not None and truth(p) != v]
            if changed:  # valid entries changed or went away: the RPCIT they need
                refresh(changed[0], ((changed[-1] - changed[0]) >> 12) + 1)
            touched.update(pages)
            if op == "probe" or slot % 4 == 0:
                check(pages)
            # a DMA over several pages at once (coalesced pieces, or the first fault)
            if all(truth(p) is not None for p in pages):
                pieces = lazy.translate(iova, n * 4096, False)
                assert sum(k for _, k in pieces) == n * 4096
        check(sorted(touched))
    finally:
        guest.close()


# ------------------------------------------------------------------ small-range walk == vectorised walk
# RPCITs over a few pages take a scalar walk (zpcid.zpci.iommu.walk.SMALL_WALK_PAGES);
# the same inputs through both walks must give identical results and shadows.

SCALAR, VECTOR = 1 << 20, 0  # small_walk_pages forcing one walk or the other
EQ_MEM_A = 8 * MiB - 8 * 1024  # ends inside a 16 KiB table: reads straddle the end
# A second piece of guest memory after a hole, ending 1 KiB into a page table.
EQ_MEM_B = (12 * MiB, MiB - 1024)
EQ_B_END = EQ_MEM_B[0] + EQ_MEM_B[1]


def outcome(r, shadow):
    """Everything observable about one RPCIT: its result and the whole shadow."""
    shadow.check()
    e = r.error
    return ((r.mapped, r.unmapped, r.changed, r.skipped, r.rewalks, r.pages, r.truncated,
             r.insufficient_resources),
            None if e is None else (e.pec, e.iova, e.message, e.qualifier),
            (shadow.mapped, shadow.available, shadow.segments, shadow.generation, shadow.ranges()))


class TwinShadows:
    """One guest memory, two shadows kept in lockstep by the two walks."""

    def __init__(self, root_level, limit):
        self.a, self.b = Memfd(EQ_MEM_A), Memfd(MiB)
        # Valid-looking PTEs / segment entries pointing back into the first memory.
        i = np.arange(MiB // 8, dtype=np.uint64)
        fill = ((i * np.uint64(2048)) % np.uint64(EQ_MEM_A)) | np.where(i % 5 == 0, np.uint64(0x200), np.uint64(0))
        self.b.write(0, fill.astype(">u8").tobytes())
        self.space = DmaSpace()
        self.space.add(0, EQ_MEM_A, True, True, self.a.fd, 0)
        self.space.add(EQ_MEM_B[0], EQ_MEM_B[1], True, True, self.b.fd, 0)
        self.tables = GuestTables(self.a, 4 * MiB, EQ_MEM_A - 4 * MiB - 16 * 1024, root_level=root_level)
        self.scalar, self.vector = ShadowIotlb(limit), ShadowIotlb(limit)

    def rpcit(self, iota, pba, pal, start, length):
        rs = rpcit(self.scalar, self.space, iota, pba, pal, start, length, small_walk_pages=SCALAR)
        rv = rpcit(self.vector, self.space, iota, pba, pal, start, length, small_walk_pages=VECTOR)
        got, want = outcome(rs, self.scalar), outcome(rv, self.vector)
        assert got == want
        return rv

    def close(self):
        self.space.close()
        self.a.close()
        self.b.close()


# IOVA bases near the boundaries a few pages can cross: segment (1 MiB), region-third
# entry (2 GiB), region-second entry (4 TiB), region-first entry (8 PiB).
# Segment index 1919 -> 1920 crosses the end of memory for a table planted by "straddle_b".
EQ_BASES = [0, MiB - 64 * 1024, 1920 * MiB - 64 * 1024, (1 << 31) - 96 * 1024, (1 << 42) - 64 * 1024,
            (1 << 53) - 64 * 1024]
# Entry values planted over a real entry e: guest garbage of every kind.  The
# pointer kinds carry the flags ``ok`` of a valid entry at that level.
EQ_CORRUPT = {
    "zero": lambda e, r, ok: 0,
    "invalid": lambda e, r, ok: T.ZPCI_TABLE_INVALID | (e & ~0xFFF & (2**64 - 1)),
    "protect": lambda e, r, ok: e | T.ZPCI_TABLE_PROTECTED,
    "flip": lambda e, r, ok: e ^ (1 << (r % 64)),  # type, length, offset, FC, address bits...
    "flip_low": lambda e, r, ok: e ^ (1 << (r % 12)),
    "outside": lambda e, r, ok: (1 << 40) | ok,  # next table beyond guest memory
    "hole": lambda e, r, ok: 9 * MiB | ok,  # in the hole between the two memories
    "straddle": lambda e, r, ok: (EQ_MEM_A - 8 * 1024) | ok,  # table half outside
    "other_memory": lambda e, r, ok: EQ_MEM_B[0] | ok | (r & T.ZPCI_TABLE_PROTECTED),
    "straddle_b": lambda e, r, ok: (EQ_MEM_B[0] + MiB - 16 * 1024) | ok,
    "straddle_pt": lambda e, r, ok: (EQ_MEM_B[0] + MiB - 2048) | ok,  # page table half outside
    "random": lambda e, r, ok: r,
}


def guest_op(t, op, iova, n, level, kind, r):
    if op in ("map", "map_ro"):
        t.map(iova, (r % 200) * 4096, n, writable=op == "map")
    elif op == "unmap":
        t.unmap(iova, n)
    elif op == "frame":
        t.map_1m_frame(iova & ~(MiB - 1), (r % 64) * MiB, writable=r % 3 > 0)
    elif level == "pte":
        t.set_pte(iova, EQ_CORRUPT[kind](t.pte(iova), r, 0))
    elif level == "segment":
        t.set_segment_entry(iova, EQ_CORRUPT[kind](t.segment_entry(iova), r, 0))
    elif level <= t.root_level:
        ok = T.table_type_of_level(level) | T.ZPCI_TABLE_LEN_RTX
        t.set_region_entry(iova, EQ_CORRUPT[kind](t.region_entry(iova, level), r, ok), level)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root_level=st.sampled_from([T.LEVEL_SEGMENT, T.LEVEL_REGION_THIRD, T.LEVEL_REGION_SECOND,
                                   T.LEVEL_REGION_FIRST]),
       limit=st.sampled_from([None, 0, 3, 40, 65535]),
       data=st.data())
def test_small_walk_matches_the_vectorised_walk(root_level, limit, data):
    twin = TwinShadows(root_level, limit)
    try:
        t = twin.tables
        reach = t.reach
        base = data.draw(st.sampled_from([b for b in EQ_BASES if b < reach] + [reach - 64 * 1024]))
        iova_in = st.integers(0, 80).map(lambda k: base + k * 4096)
        iota = t.iota | data.draw(st.sampled_from([0, 0, 0, T.ZPCI_IOTA_PROTECTED]))
        ops = data.draw(st.lists(st.tuples(
            st.sampled_from(["map", "map", "map", "map_ro", "unmap", "unmap", "frame", "corrupt"]),
            iova_in, st.integers(1, 40),
            st.sampled_from(["pte", "segment", 1, 2, 3]), st.sampled_from(sorted(EQ_CORRUPT)),
            st.integers(0, 2**64 - 1), iova_in, st.integers(0, 70)), min_size=1, max_size=20))
        pba = data.draw(st.sampled_from([0, 0, base + 5 * 4096]))
        pal = data.draw(st.sampled_from([reach - 1, reach - 1, base + 50 * 4096 + 0x7FF]))
        for op, iova, n, level, kind, r, start, npages in ops:
            if iova < reach:
                try:
                    guest_op(t, op, iova, min(n, (reach - iova) // 4096), level, kind, r)
                except (ValueError, IndexError, struct.error, MemoryError):
                    pass  # the guest-side builder cannot follow the garbage it planted
            # Unaligned starts and lengths, zero length, ranges past PAL / the reach.
            twin.rpcit(iota, pba, pal, start + r % 4096, max(0, npages * 4096 - (r >> 12) % 4096))
        twin.rpcit(iota, pba, pal, base, 100 * 4096)  # refresh everything once more
    finally:
        twin.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1),
       root_level=st.sampled_from([T.LEVEL_SEGMENT, T.LEVEL_REGION_THIRD, T.LEVEL_REGION_SECOND,
                                   T.LEVEL_REGION_FIRST]),
       root=st.integers(0, MEM_SMALL // 16384 + 2),
       iota_bits=st.sampled_from([0, 0x200, 0x3, 0x1000]),
       start_seg=st.integers(0, 2**44), start_off=st.integers(0, 2**20 - 1),
       npages=st.integers(0, 300), limit=st.sampled_from([None, 0, 5, 300]))
def test_small_walk_matches_the_vectorised_walk_on_random_tables(seed, root_level, root, iota_bits,
                                                                 start_seg, start_off, npages, limit):
    rng = np.random.default_rng(seed)
    memfd = Memfd(MEM_SMALL)
    space = dma_space(memfd)
    try:
        scalar, vector = ShadowIotlb(limit), ShadowIotlb(limit)
        iota = root * 16384 | 0x800 | (root_level << 2) | iota_bits
        reach = T.designation_reach(root_level)
        start = ((start_seg << 20) + start_off) % reach
        length = max(0, npages * 4096 - (start_off & 0xFFF))
        for _ in range(3):  # scrambled tables each round: maps, unmaps, changes, errors
            memfd.write(0, random_tables(rng, MEM_SMALL))
            rs = rpcit(scalar, space, iota, 0, reach - 1, start, length, small_walk_pages=SCALAR)
            rv = rpcit(vector, space, iota, 0, reach - 1, start, length, small_walk_pages=VECTOR)
            assert outcome(rs, scalar) == outcome(rv, vector)
    finally:
        space.close()
        memfd.close()


@pytest.mark.parametrize("walk", [SCALAR, VECTOR])
def test_dma_limit_unmaps_free_units_before_maps_of_the_same_segment_table(walk):
    guest = Guest(limit=8)
    try:
        t = guest.tables
        t.map(0x104000, 0x400000, 8)
        rpcit(guest.shadow, guest.space, t.iota, 0, PAL, 0x100000, 16 * 4096, small_walk_pages=walk)
        t.unmap(0x104000, 8)
        t.map(0x100000, 0x200000, 4)  # below the unmapped pages in IOVA order
        t.map(0x10C000, 0x20C000, 4)
        r = rpcit(guest.shadow, guest.space, t.iota, 0, PAL, 0x100000, 16 * 4096, small_walk_pages=walk)
        assert (r.mapped, r.unmapped, r.skipped, r.rewalks, r.error) == (8, 8, 0, 0, None)
        assert guest.shadow.ranges() == [(0x100000, 4 * 4096, 0x200000, True),
                                         (0x10C000, 4 * 4096, 0x20C000, True)]
        guest.shadow.check()
    finally:
        guest.close()


@pytest.mark.parametrize("walk", [SCALAR, VECTOR])
def test_dma_limit_units_freed_by_a_later_segment_table_need_a_rewalk(walk):
    guest = Guest(limit=8)
    try:
        t = guest.tables
        t.map(1 << 31, 0x400000, 8)  # region-third entry 1
        rpcit(guest.shadow, guest.space, t.iota, 0, PAL, 1 << 31, 8 * 4096, small_walk_pages=walk)
        t.unmap(1 << 31, 8)
        t.map((1 << 31) - 4 * 4096, 0x300000, 4)  # region-third entry 0, walked first
        r = rpcit(guest.shadow, guest.space, t.iota, 0, PAL, (1 << 31) - 4 * 4096, 12 * 4096,
                  small_walk_pages=walk)
        assert (r.mapped, r.unmapped, r.skipped, r.rewalks, r.error) == (4, 8, 0, 1, None)
        assert not r.insufficient_resources
        assert guest.shadow.ranges() == [((1 << 31) - 4 * 4096, 4 * 4096, 0x300000, True)]
        guest.shadow.check()
    finally:
        guest.close()


@pytest.mark.parametrize("walk", [SCALAR, VECTOR])
def test_failing_region_entry_after_an_invalid_one_still_unmaps_it(walk):
    guest = Guest()
    try:
        t = guest.tables
        t.map((1 << 31) - 2 * 4096, 0x200000, 4)  # two pages under each of two region entries
        start = (1 << 31) - 2 * 4096
        rpcit(guest.shadow, guest.space, t.iota, 0, PAL, start, 4 * 4096, small_walk_pages=walk)
        t.set_region_entry(0, T.ZPCI_TABLE_INVALID)
        t.set_region_entry(1 << 31, 0)
        r = rpcit(guest.shadow, guest.space, t.iota, 0, PAL, start, 4 * 4096, small_walk_pages=walk)
        assert (r.error.pec, r.error.iova, r.unmapped) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, 1 << 31, 2)
        assert guest.shadow.ranges() == [(1 << 31, 2 * 4096, 0x202000, True)]
    finally:
        guest.close()


@pytest.mark.parametrize("walk", [SCALAR, VECTOR])
def test_zero_segment_entry_fails_at_pba_when_the_range_starts_below_it(walk):
    guest = Guest()
    try:
        t = guest.tables
        t.set_segment_entry(0x300000, 0)
        pba = 0x305000
        r = rpcit(guest.shadow, guest.space, t.iota, pba, PAL, 0x300000, 16 * 4096, small_walk_pages=walk)
        assert (r.error.pec, r.error.iova) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, pba)
    finally:
        guest.close()


def test_small_walk_reads_tables_at_the_end_of_memory_like_the_vectorised_walk():
    twin = TwinShadows(T.LEVEL_REGION_THIRD, None)
    try:
        t = twin.tables
        t.map(0x1FE000, 0x200000, 4)  # columns 254, 255 of segment 1 and 0, 1 of segment 2
        twin.rpcit(t.iota, 0, PAL, 0x1FE000, 4 * 4096)
        # A page table whose second half lies past the end of memory reads as all zero.
        t.set_segment_entry(0x200000, EQ_MEM_B[0] + MiB - 2048)
        r = twin.rpcit(t.iota, 0, PAL, 0x1FE000, 4 * 4096)
        assert (r.error.pec, r.error.iova, r.unmapped) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, 0x200000, 0)
        # A segment table ending 1 KiB into a page: segment entry 1919 lies inside
        # memory, 1920 outside; one read of both reads that page piece as zeros.
        sto = EQ_MEM_B[0] + MiB - 16 * 1024
        twin.b.write(MiB - 16 * 1024 + 1919 * 8, struct.pack(">Q", t.segment_entry(0x100000)))
        t.set_region_entry(0, sto | 0x4 | 0x3)
        r = twin.rpcit(t.iota, 0, PAL, 1920 * MiB - 2 * 4096, 4 * 4096)
        assert (r.error.pec, r.error.iova, r.mapped) == (T.ZPCI_PEC_INVALID_TABLE_ENTRY, 1920 * MiB - 2 * 4096, 0)
        r = twin.rpcit(t.iota, 0, PAL, 1920 * MiB - 2 * 4096, 2 * 4096)  # entry 1919 alone
        assert (r.error, r.mapped) == (None, 2) and twin.scalar.lookup(1920 * MiB - 4096) == (0x201000, True)
    finally:
        twin.close()


# ------------------------------------------------------------------ sliced RPCIT == one walk
# rpcit_sliced refreshes big ranges slice by slice with checkpoints between them
# (issue 12 row 7); forced to tiny slices it must leave the same shadow and
# report the same error as one walk.

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["map", "map_ro", "unmap"]),
                              st.integers(0, 40), st.integers(1, 300), st.integers(0, 100)),
                    min_size=1, max_size=12),
       window=st.tuples(st.integers(0, 60), st.integers(1, 64)),
       limit=st.sampled_from([65535, 300, 40]))
def test_sliced_rpcit_equals_one_walk(monkeypatch, ops, window, limit):
    import zpcid.zpci.iommu.walk as iommu

    monkeypatch.setattr(iommu, "SLICE_MIN", 4096)
    monkeypatch.setattr(iommu, "SLICE_START", 64 * 1024)
    monkeypatch.setattr(iommu, "SLICE_TARGET", 0.0)  # never grow: many slices
    one, sliced = Guest(limit=limit), Guest(limit=limit)
    try:
        for t in (one.tables, sliced.tables):
            for op, seg, n, gpa in ops:
                iova = seg * MiB + (gpa % 7) * 4096
                if op == "unmap":
                    t.unmap(iova, n)
                else:
                    t.map(iova, gpa * 4096, n, writable=op == "map")
        start, length = window[0] * MiB + 0x800, window[1] * MiB
        r1 = one.rpcit(start, length)
        r2 = trio.run(iommu.rpcit_sliced, sliced.shadow, sliced.space, sliced.tables.iota,
                      sliced.pba, sliced.pal, start, length)
        sliced.shadow.check()
        assert one.shadow.ranges() == sliced.shadow.ranges()
        assert (r1.error and (r1.error.pec, r1.error.iova)) == (r2.error and (r2.error.pec, r2.error.iova))
        assert r1.insufficient_resources == r2.insufficient_resources
    finally:
        one.close()
        sliced.close()


async def test_sliced_rpcit_lets_other_tasks_run():
    import zpcid.zpci.iommu.walk as iommu

    g = Guest()
    try:
        g.tables.map(0, 0x10000, 16)
        g.tables.map(40 * GiB, 0x10000, 16)
        ran = 0

        async def other():
            nonlocal ran
            while True:
                ran += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            before = ran
            r = await iommu.rpcit_sliced(g.shadow, g.space, g.tables.iota, g.pba, g.pal, 0, 64 * GiB)
            nursery.cancel_scope.cancel()
        assert r.error is None and g.shadow.mapped == 32
        assert ran - before >= 2  # the refresh yielded between slices
    finally:
        g.close()
