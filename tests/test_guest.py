"""The guest-side table builder writes exactly what Linux's s390 IOMMU driver writes."""

import struct

import pytest

from protocol.zpci import tables as T
from zpcid.vmm.guest import GuestTables, dma_space
from zpcid.vfio_user.memfd import Memfd

MiB = 1 << 20
TABLES = 8 * MiB


def u64(m: Memfd, addr: int) -> int:
    return struct.unpack(">Q", m.read(addr, 8))[0]


@pytest.fixture
def mem():
    m = Memfd(16 * MiB)
    yield m
    m.close()


def test_root_is_an_invalid_filled_region_third_table(mem):
    g = GuestTables(mem, TABLES, 4 * MiB)
    assert g.root == TABLES and g.root % T.ZPCI_TABLE_ALIGN == 0
    assert g.iota == g.root | 0x804
    iota = T.Iota.unpack(g.iota)
    assert iota.translate and iota.designation_type == T.ZPCI_IOTA_RTTO
    assert iota.table_origin == g.root and not iota.protected
    raw = mem.read(g.root, T.ZPCI_TABLE_SIZE)
    assert raw == struct.pack(">Q", 0x20) * 2048


def test_map_writes_linux_entries(mem):
    g = GuestTables(mem, TABLES, 4 * MiB)
    iova = (3 << 31) | (5 << 20) | (7 << 12)  # RTX 3, SX 5, PX 7
    g.map(iova, 0x123000, 2)
    g.map(iova + 2 * 4096, 0x200000, 1, writable=False)
    rte = u64(mem, g.root + 3 * 8)
    sto = rte & ~0x3FFF
    assert rte == sto | 0x4 | 0x3  # origin | type RTX | length 3, offset 0, valid
    assert sto % T.ZPCI_TABLE_ALIGN == 0 and TABLES <= sto < TABLES + 4 * MiB
    assert mem.read(sto, 8 * 5) == struct.pack(">Q", 0x20) * 5  # untouched entries stay invalid
    ste = u64(mem, sto + 5 * 8)
    pto = ste & ~0x7FF
    assert ste == pto  # type SX 0, valid, unprotected
    assert pto % T.ZPCI_PT_ALIGN == 0
    assert [u64(mem, pto + i * 8) for i in range(6, 11)] == [0x400, 0x123000, 0x124000, 0x200200, 0x400]
    assert u64(mem, pto + 255 * 8) == 0x400
    assert g.pte(iova) == 0x123000 and g.segment_entry(iova) == ste and g.region_entry(iova) == rte


def test_unmap_keeps_the_frame_and_sets_invalid(mem):
    g = GuestTables(mem, TABLES, 4 * MiB)
    g.map(0x100000, 0x300000, 4, writable=False)
    g.unmap(0x101000, 2)
    assert [g.pte(0x100000 + i * 4096) for i in range(4)] == [
        0x300200, 0x301400, 0x302400, 0x303200]


def test_map_spanning_segments_and_regions(mem):
    g = GuestTables(mem, TABLES, 4 * MiB)
    iova = (1 << 31) - 2 * 4096  # last two pages of region entry 0, then region entry 1
    g.map(iova, 0x400000, 4)
    assert [g.pte(iova + i * 4096) for i in range(4)] == [0x400000, 0x401000, 0x402000, 0x403000]
    assert u64(mem, g.root) & 0x20 == 0 and u64(mem, g.root + 8) & 0x20 == 0


def test_page_tables_share_16k_blocks_and_exhaustion(mem):
    g = GuestTables(mem, TABLES, 4 * T.ZPCI_TABLE_SIZE)  # root + segment table + 2 blocks
    ptos = []
    for seg in range(16):
        g.map(seg << 20, 0x100000, 1)
        ptos.append(g.page_table(seg << 20, create=False))
    assert len(set(ptos)) == 16 and all(p % 2048 == 0 for p in ptos)
    with pytest.raises(MemoryError):
        g.map(16 << 20, 0x100000, 1)


@pytest.mark.parametrize("level,flag,typ", [
    (T.LEVEL_REGION_SECOND, 0x808, 0x8),
    (T.LEVEL_REGION_FIRST, 0x80C, 0xC),
    (T.LEVEL_SEGMENT, 0x800, None),
])
def test_other_roots(mem, level, flag, typ):
    g = GuestTables(mem, TABLES, 4 * MiB, root_level=level)
    assert g.iota == g.root | flag
    iova = {T.LEVEL_REGION_SECOND: 5 << 42, T.LEVEL_REGION_FIRST: 9 << 53,
            T.LEVEL_SEGMENT: 7 << 20}[level] | 0x3000
    g.map(iova, 0x500000, 1)
    assert g.pte(iova) == 0x500000
    if typ is not None:
        top = u64(mem, g.root + ((iova >> T.LEVEL_SHIFT[level]) & 0x7FF) * 8)
        assert top & 0xF == typ | 0x3 and top & 0x20 == 0
        assert g.region_entry(iova, T.LEVEL_REGION_THIRD) & 0xF == 0x4 | 0x3
    with pytest.raises(ValueError):
        g.map(g.reach, 0, 1) if g.reach < 1 << 64 else g.map(-4096, 0, 1)


def test_raw_setters_and_1m_frames(mem):
    g = GuestTables(mem, TABLES, 4 * MiB)
    g.map_1m_frame(0x300000, 0x500000, writable=False)
    assert g.segment_entry(0x300000) == 0x500000 | 0x400 | 0x200
    g.set_segment_entry(0x400000, 0xDEADBEEF)
    g.set_region_entry(0x80000000, 0)
    g.set_pte(0x600000, 0x7777)
    assert g.segment_entry(0x400000) == 0xDEADBEEF
    assert u64(mem, g.root + 8) == 0
    assert g.pte(0x600000) == 0x7777
    g.protect(0x600000, "pte")
    assert g.pte(0x600000) == 0x7777 | 0x200
    with pytest.raises(ValueError):
        g.map_1m_frame(0x301000, 0x500000)


def test_dma_space_helper_is_guest_memory(mem):
    space = dma_space(mem)
    mem.write(0x1234, b"hello")
    assert bytes(space.view(0x1234, 5)) == b"hello"
    space.close()


def test_iota_helpers():
    io = T.Iota.for_table(0x4000, T.ZPCI_IOTA_RSTO, protected=True)
    assert io.value == 0x4000 | 0x808 | 0x200 and io.protected and io.reach == 1 << 53
    assert T.Iota.unpack(0).reach == 0 and not T.Iota.unpack(0).is_table_designation
    assert T.Iota.unpack(0x800 | (4 << 2) | 1).frame_size == 1
    assert T.Iota.unpack(0x804).check_aperture(0, (1 << 42) - 1) is None
    assert "reach" in T.Iota.unpack(0x804).check_aperture(0, 1 << 42)
    assert "designation" in T.Iota.unpack(0x800 | (7 << 2)).check_aperture(0, 4095)
    with pytest.raises(ValueError):
        T.Iota.for_table(0x4100)


def test_following_a_garbage_origin_is_a_clean_error():
    """A planted entry whose origin lies far outside guest memory (top bit set)."""
    from zpcid.vfio_user.memfd import Memfd

    with Memfd(4 << 20) as mem:
        gt = GuestTables(mem, 1 << 20, 1 << 20)
        gt.map(1 << 32, 1 << 20, 1)
        gt.set_segment_entry(1 << 32, gt.segment_entry(1 << 32) ^ (1 << 63))
        with pytest.raises(ValueError):
            gt.pte(1 << 32)
        with pytest.raises(ValueError):
            gt.map(1 << 32, 2 << 20, 1)
