"""DmaSpace: interval lookups at scale, views over real memfd mappings, permission and bounds checks."""

import bisect
import errno
import fcntl
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from helpers import mapping_count
from zpcid.vfio_user.dma import PAGE, DmaError, DmaFault, DmaSpace
from zpcid.vfio_user.memfd import Memfd

GUEST = "zpcid-test-dma"


def model_find(model, addr):
    for iova, size in model:
        if iova <= addr < iova + size:
            return iova
    return None


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32))
def test_thousands_of_maps_lookup_and_unmap(seed):
    rnd = random.Random(seed)
    space = DmaSpace(max_maps=100_000)
    # Non-overlapping ranges with random gaps (some zero: adjacent maps), added in random order.
    ranges, pos = [], rnd.randrange(0, 1 << 40)
    for _ in range(3000):
        pos += rnd.choice((0, PAGE, rnd.randrange(1, 1 << 20)))
        size = rnd.randrange(1, 1 << 16)
        ranges.append((pos, size))
        pos += size
    for iova, size in rnd.sample(ranges, len(ranges)):
        space.add(iova, size, True, True)
    assert len(space) == len(ranges)
    starts = [r[0] for r in ranges]
    ends = {r[0]: r[0] + r[1] for r in ranges}

    def expected(addr):
        i = bisect.bisect_right(starts, addr) - 1
        return starts[i] if i >= 0 and addr < ends[starts[i]] else None

    probes = [rnd.randrange(ranges[0][0] - 10, pos + 10) for _ in range(2000)]
    probes += [a for r in rnd.sample(ranges, 200) for a in (r[0], r[0] + r[1] - 1, r[0] + r[1], r[0] - 1)]
    for addr in probes:
        r = space.find(addr)
        assert (r.iova if r else None) == expected(addr)

    # Unmap random windows: type1 semantics against a brute-force model.
    live = dict(ranges)
    for _ in range(200):
        lo = rnd.randrange(ranges[0][0], pos)
        hi = lo + rnd.randrange(1, 1 << 22)
        split = any(i < lo < i + s or i < hi < i + s for i, s in live.items())
        if split:
            with pytest.raises(DmaError) as ei:
                space.remove(lo, hi - lo)
            assert ei.value.errno == errno.EINVAL
        else:
            gone = {r.iova for r in space.remove(lo, hi - lo)}
            assert gone == {i for i, s in live.items() if lo <= i and i + s <= hi}
            for i in gone:
                del live[i]
    assert sorted((r.iova, r.size) for r in space.regions) == sorted(live.items())
    for addr in rnd.sample(probes, 300):
        r = space.find(addr)
        assert (r.iova if r else None) == model_find(
            [(i, s) for i, s in live.items() if i <= addr < i + s], addr)


def test_overlaps_and_limits():
    space = DmaSpace(max_maps=3)
    space.add(0x1000, 0x1000, True, True)
    for iova, size in ((0x1000, 0x1000), (0x800, 0x1000), (0x1800, 0x10), (0, 0x10000)):
        with pytest.raises(DmaError) as ei:
            space.add(iova, size, True, True)
        assert ei.value.errno == errno.EEXIST
    space.add(0x2000, 0x1000, True, False)  # adjacent is fine
    space.add(0x0, 0x1000, True, False)
    with pytest.raises(DmaError) as ei:
        space.add(0x10000, 0x1000, True, True)
    assert ei.value.errno == errno.ENOSPC
    for iova, size in ((0, 0), ((1 << 64) - 0x1000, 0x2000)):
        with pytest.raises(DmaError):
            space.add(iova, size, True, True)


def test_remove_semantics():
    space = DmaSpace()
    for i in range(4):
        space.add(0x10000 * (i + 1), 0x10000, True, True)
    assert space.remove(0, 0x10000) == []
    assert space.remove(0x100000, 1 << 40) == []
    for iova, size in ((0x18000, 0x1000), (0x10000, 0x8000), (0x8000, 0x10000), (0x48000, 0x10000)):
        with pytest.raises(DmaError):
            space.remove(iova, size)
    assert len(space) == 4
    assert [r.iova for r in space.remove(0x10000, 0x20000)] == [0x10000, 0x20000]
    assert [r.iova for r in space.remove(0, 1 << 63)] == [0x30000, 0x40000]


async def test_same_file_is_mapped_once_and_unmapped_with_the_last_map():
    with Memfd(1 << 20, GUEST) as guest:
        base = mapping_count(GUEST)
        space = DmaSpace()
        for i in range(16):
            space.add(0x1_0000_0000 + i * PAGE, PAGE, True, True, guest.fd, i * PAGE)
        assert space.file_count == 1 and mapping_count(GUEST) == base + 1
        # A second descriptor for the same file (as QEMU sends with every DMA_MAP).
        dup = os.open(f"/proc/self/fd/{guest.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            space.add(0x2_0000_0000, PAGE, True, True, dup, 0)
        finally:
            os.close(dup)
        assert space.file_count == 1 and mapping_count(GUEST) == base + 1
        guest.write(3 * PAGE, b"hello")
        assert await space.read(0x1_0000_0000 + 3 * PAGE, 5) == b"hello"
        await space.write(0x2_0000_0000, b"bye")
        assert guest.read(0, 3) == b"bye"
        space.remove(0x1_0000_0000, 16 * PAGE)
        assert space.file_count == 1
        space.remove(0x2_0000_0000, PAGE)
        assert space.file_count == 0 and mapping_count(GUEST) == base


def test_file_growing_gets_a_new_mapping_and_the_old_one_is_released():
    # Sealed against shrinking only, so it may grow (and be mapped).
    with Memfd(1 << 16, GUEST, seal=fcntl.F_SEAL_SHRINK) as guest:
        base = mapping_count(GUEST)
        space = DmaSpace()
        space.add(0, 1 << 16, True, True, guest.fd, 0)
        os.ftruncate(guest.fd, 1 << 17)
        space.add(1 << 16, 1 << 16, True, True, guest.fd, 1 << 16)
        assert mapping_count(GUEST) == base + 2
        space.remove(0, 1 << 16)
        assert mapping_count(GUEST) == base + 1
        space.close()
        assert mapping_count(GUEST) == base and space.file_count == 0


def test_view_spans_adjacent_maps_of_one_file():
    with Memfd(1 << 16, GUEST) as guest:
        space = DmaSpace()
        space.add(0x10000, PAGE, True, True, guest.fd, 0)
        space.add(0x11000, PAGE, True, True, guest.fd, PAGE)
        space.add(0x12000, PAGE, True, True, guest.fd, 5 * PAGE)  # adjacent iova, not file
        with space.view(0x10800, PAGE, write=True) as v:
            v[:] = b"\xAB" * PAGE
        assert guest.read(0x800, PAGE) == b"\xAB" * PAGE
        with pytest.raises(DmaFault):
            space.view(0x11800, PAGE)
        with pytest.raises(DmaFault):
            space.view(0x12800, PAGE)  # runs into unmapped space
        with pytest.raises(DmaFault):
            space.view(0x13000, 1)
        space.close()


def test_views_of_many_pieces_match_piece_by_piece_views():
    with Memfd(1 << 16, GUEST) as a, Memfd(1 << 16, GUEST) as b:
        a.write(0, bytes(range(256)) * 256)
        b.write(0, bytes(reversed(range(256))) * 256)
        space = DmaSpace()
        space.add(0, 4 * PAGE, True, True, a.fd, 0)
        space.add(4 * PAGE, PAGE, True, True, b.fd, 0)  # adjacent, another file
        space.add(8 * PAGE, PAGE, True, False, a.fd, 0)  # read-only
        space.add(9 * PAGE, PAGE, True, True)  # message mode
        pieces = [(0x10, 100), (PAGE + 3, 0), (3 * PAGE - 8, 16), (4 * PAGE - 4, 8), (8 * PAGE, 32),
                  (0x20, 7)]
        got = space.views_many(pieces, False)
        want = [v for p, n in pieces if n for v in space.views(p, n, False)]
        assert [bytes(v) for v in got] == [bytes(v) for v in want] and len(got) == 6
        got[0][:2] = b"\xfe\xfd"  # views of the mapping itself, not copies
        assert a.read(0x10, 2) == b"\xfe\xfd"
        with pytest.raises(DmaFault):
            space.views_many([(0, 16), (8 * PAGE, 16)], True)  # read-only piece
        with pytest.raises(DmaFault):
            space.views_many([(0, 16), (5 * PAGE, 16)], False)  # unmapped piece
        assert space.views_many([(0, 16), (9 * PAGE, 16)], False) is None  # only messages reach it
        for v in got + want:
            v.release()
        space.close()


def test_view_refuses_maps_of_different_files_and_message_mode():
    with Memfd(1 << 16, GUEST) as a, Memfd(1 << 16, GUEST) as b:
        space = DmaSpace()
        space.add(0, PAGE, True, True, a.fd, 0)
        space.add(PAGE, PAGE, True, True, b.fd, PAGE)
        space.add(2 * PAGE, PAGE, True, True)
        with pytest.raises(DmaFault):
            space.view(0x800, PAGE)
        with pytest.raises(DmaFault):
            space.view(2 * PAGE, 16)
        assert space.file_count == 2
        space.close()


async def test_read_and_write_span_maps_of_different_files():
    with Memfd(1 << 16, GUEST) as a, Memfd(1 << 16, GUEST) as b:
        space = DmaSpace()
        space.add(0, PAGE, True, True, a.fd, 0)
        space.add(PAGE, PAGE, True, True, b.fd, 0)
        await space.write(PAGE - 2, b"wxyz")
        assert a.read(PAGE - 2, 2) == b"wx" and b.read(0, 2) == b"yz"
        assert await space.read(PAGE - 2, 4) == b"wxyz"
        space.close()


async def test_read_only_map_refuses_writes():
    with Memfd(1 << 16, GUEST) as guest:
        space = DmaSpace()
        space.add(0, 1 << 16, True, False, guest.fd, 0)
        with pytest.raises(DmaFault) as ei:
            await space.write(0x100, b"x")
        assert ei.value.write and ei.value.addr == 0x100
        with pytest.raises(DmaFault):
            space.view(0, 16, write=True)
        assert guest.read(0x100, 1) == b"\0"
        space.view(0, 16).release()
        space.add(1 << 20, PAGE, False, True, guest.fd, 0)
        with pytest.raises(DmaFault):
            await space.read(1 << 20, 4)  # write-only
        space.close()


def test_offset_beyond_file_end_and_bad_descriptors_are_refused():
    with Memfd(1 << 16, GUEST) as guest:
        space = DmaSpace()
        for offset, size in (((1 << 16), PAGE), (PAGE, 1 << 16), (1 << 62, PAGE)):
            with pytest.raises(DmaError) as ei:
                space.add(0, size, True, True, guest.fd, offset)
            assert ei.value.errno == errno.EINVAL
        with pytest.raises(DmaError):
            space.add(0, PAGE, True, True, guest.fd, 100)  # unaligned
        ro = os.open(f"/proc/self/fd/{guest.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(DmaError) as ei:
                space.add(0, PAGE, True, True, ro, 0)
            assert ei.value.errno == errno.EACCES
            space.add(0, PAGE, True, False, ro, 0)  # read-only map with a read-only fd is fine
        finally:
            os.close(ro)
        assert len(space) == 1
        space.close()


async def test_message_mode_without_a_client_faults():
    space = DmaSpace()
    space.add(0, PAGE, True, True)
    with pytest.raises(DmaFault):
        await space.read(0, 4)
    with pytest.raises(DmaFault):
        await space.write(0, b"x")
    with pytest.raises(DmaFault):
        await space.read(PAGE, 4)  # unmapped


def test_listeners_and_generation():
    space = DmaSpace()
    events = []
    space.listeners.append(lambda kind, r: events.append((kind, r.iova)))
    g = space.generation
    space.add(0, PAGE, True, True)
    space.add(PAGE, PAGE, True, True)
    space.remove(0, PAGE)
    space.clear()
    assert events == [("map", 0), ("map", PAGE), ("unmap", 0), ("unmap", PAGE)]
    assert space.generation >= g + 4
