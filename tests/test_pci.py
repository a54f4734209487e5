"""PCI config space: BAR sizing, ROM BAR, capability list, write masks, BAR rules."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from vfio_raw import find_capability
from zpcid.devices.memory import MemoryFunction
from zpcid.pci.config import (CONFIG_SIZE, PCI_BASE_ADDRESS_0, PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX,
                       PCI_CAPABILITY_LIST, PCI_COMMAND, PCI_ROM_ADDRESS, PCI_STATUS,
                       PCI_STATUS_CAP_LIST, Bar, ConfigSpace)
from zpcid.vfio_user.regions import MemfdRegion, RegionError, WindowedRegion


def u32(cfg, off):
    return struct.unpack_from("<I", cfg.read(off, 4))[0]


def put32(cfg, off, v):
    cfg.write(off, struct.pack("<I", v))


def space_with_bars():
    cfg = ConfigSpace(0x1014, 0xFE00, class_code=0x050000, subsys_vendor=0x1AF4, subsys=0x1100,
                      revision=3)
    cfg.add_bar(Bar(0, WindowedRegion(1 << 20), is64=True, prefetch=True))
    cfg.add_bar(Bar(2, WindowedRegion(0x4000), is64=False))
    cfg.add_bar(Bar(4, WindowedRegion(8 << 30), is64=True))
    return cfg


def test_identity_registers():
    cfg = space_with_bars()
    vendor, device = struct.unpack("<HH", cfg.read(0, 4))
    assert (vendor, device) == (0x1014, 0xFE00)
    assert cfg.read(0x08, 4) == bytes([3, 0x00, 0x00, 0x05])  # revision, prog-if, sub, base class
    assert struct.unpack("<HH", cfg.read(0x2C, 4)) == (0x1AF4, 0x1100)
    assert cfg.read(0x0E, 1) == b"\0"  # type 0 header


def test_bar_sizing_64bit():
    cfg = space_with_bars()
    assert u32(cfg, PCI_BASE_ADDRESS_0) == 0x4 | 0x8  # 64-bit, prefetchable, memory
    put32(cfg, PCI_BASE_ADDRESS_0, 0xFFFFFFFF)
    put32(cfg, PCI_BASE_ADDRESS_0 + 4, 0xFFFFFFFF)
    assert u32(cfg, PCI_BASE_ADDRESS_0) == 0xFFF0000C
    assert u32(cfg, PCI_BASE_ADDRESS_0 + 4) == 0xFFFFFFFF
    # Program an address above 4 GiB; the low bits stay the type bits.
    put32(cfg, PCI_BASE_ADDRESS_0, 0xC0012345)
    put32(cfg, PCI_BASE_ADDRESS_0 + 4, 0x00000020)
    assert u32(cfg, PCI_BASE_ADDRESS_0) == 0xC000000C
    assert u32(cfg, PCI_BASE_ADDRESS_0 + 4) == 0x20


def test_bar_sizing_above_4g_and_32bit():
    cfg = space_with_bars()
    put32(cfg, PCI_BASE_ADDRESS_0 + 16, 0xFFFFFFFF)
    put32(cfg, PCI_BASE_ADDRESS_0 + 20, 0xFFFFFFFF)
    assert u32(cfg, PCI_BASE_ADDRESS_0 + 16) == 0x4           # 8 GiB: nothing writable below 4 GiB
    assert u32(cfg, PCI_BASE_ADDRESS_0 + 20) == 0xFFFFFFFE    # size mask continues in the upper half
    put32(cfg, PCI_BASE_ADDRESS_0 + 8, 0xFFFFFFFF)
    assert u32(cfg, PCI_BASE_ADDRESS_0 + 8) == 0xFFFFC000     # 16 KiB, 32-bit, not prefetchable


def test_byte_writes_to_a_bar_register():
    cfg = space_with_bars()
    cfg.write(PCI_BASE_ADDRESS_0 + 3, b"\xFF")
    assert u32(cfg, PCI_BASE_ADDRESS_0) == 0xFF00000C
    cfg.write(PCI_BASE_ADDRESS_0, b"\xFF\xFF\xFF")
    assert u32(cfg, PCI_BASE_ADDRESS_0) == 0xFFF0000C


def test_unimplemented_bars_and_rom_read_zero_after_sizing():
    cfg = ConfigSpace(0x1014, 0xFE00)
    cfg.add_bar(Bar(0, WindowedRegion(0x1000), is64=False))
    for reg in range(1, 6):
        put32(cfg, PCI_BASE_ADDRESS_0 + 4 * reg, 0xFFFFFFFF)
        assert u32(cfg, PCI_BASE_ADDRESS_0 + 4 * reg) == 0
    # QEMU sizes the expansion ROM through config space: no ROM must read back 0.
    put32(cfg, PCI_ROM_ADDRESS, 0xFFFFF800)
    assert u32(cfg, PCI_ROM_ADDRESS) == 0
    put32(cfg, PCI_ROM_ADDRESS, 0xFFFFFFFF)
    assert u32(cfg, PCI_ROM_ADDRESS) == 0


def walk(config: bytes):
    """Every (offset, id) on the list, checking it is well formed."""
    assert config[PCI_STATUS] & PCI_STATUS_CAP_LIST
    out, pos = [], config[PCI_CAPABILITY_LIST]
    while pos:
        assert pos % 4 == 0 and 0x40 <= pos <= 0xFC
        assert pos not in [o for o, _ in out], "capability list loops"
        out.append((pos, config[pos]))
        pos = config[pos + 1]
    return out


def test_capability_list_is_well_formed():
    fn = MemoryFunction("pci", msix_vectors=16)
    try:
        cfg = fn.config.read(0, CONFIG_SIZE)
        caps = walk(cfg)
        ids = [cid for _, cid in caps]
        assert PCI_CAP_ID_EXP in ids and PCI_CAP_ID_MSIX in ids
        exp = find_capability(cfg, PCI_CAP_ID_EXP)
        assert cfg[exp + 2] & 0xF == 2 and (cfg[exp + 2] >> 4) & 0xF == 0  # v2, endpoint
        msix = find_capability(cfg, PCI_CAP_ID_MSIX)
        ctl, table, pba = struct.unpack_from("<HII", cfg, msix + 2)
        assert ctl & 0x7FF == 15  # table size is N-1
        assert table & 7 == pba & 7 == 2 and fn.regions[2].size >= (pba & ~7) + 8
        # Capabilities do not overlap: each ends before the next starts.
        lengths = {PCI_CAP_ID_EXP: 0x3C, PCI_CAP_ID_MSIX: 12}
        spans = sorted((o, o + lengths[c]) for o, c in caps)
        assert all(a_end <= b for (_, a_end), (b, _) in zip(spans, spans[1:]))
        assert cfg[0x100:0x104] == bytes(4)  # no extended capabilities
    finally:
        fn.close()


def test_capability_list_overflow_is_refused():
    cfg = ConfigSpace(1, 2)
    for _ in range(11):
        cfg.add_capability(0x09, bytes(14))
    with pytest.raises(ValueError):
        cfg.add_capability(0x09, bytes(60))
    assert len(walk(cfg.read(0, 256))) == 11


CONFIG_WRITES = st.lists(
    st.tuples(st.integers(0, CONFIG_SIZE - 1), st.binary(min_size=1, max_size=8)), max_size=20)


@settings(max_examples=100, deadline=None)
@given(CONFIG_WRITES)
def test_read_only_bytes_never_change(writes):
    fn = MemoryFunction("pci")
    try:
        cfg = fn.config
        before = cfg.read(0, CONFIG_SIZE)
        fixed = [o for o in range(CONFIG_SIZE)
                 if not cfg.wmask[o] and not cfg.w1c[o] and not 0x10 <= o < 0x28]
        for off, data in writes:
            data = data[: CONFIG_SIZE - off]
            cfg.write(off, data)
        after = cfg.read(0, CONFIG_SIZE)
        assert [after[o] for o in fixed] == [before[o] for o in fixed]
        # Vendor/device IDs, class code and the capability pointer are among them.
        assert {0, 1, 2, 3, 9, 10, 11, PCI_CAPABILITY_LIST} <= set(fixed)
    finally:
        fn.close()


def test_command_register_mask_and_status_w1c():
    cfg = ConfigSpace(0x1014, 0xFE00)
    cfg.write(PCI_COMMAND, b"\xFF\xFF")
    assert struct.unpack("<H", cfg.read(PCI_COMMAND, 2))[0] == 0x0506  # MEM|MASTER|SERR|INTX_DIS
    cfg.write(0x00, b"\xFF\xFF\xFF\xFF")
    assert struct.unpack("<HH", cfg.read(0, 4)) == (0x1014, 0xFE00)
    cfg.data[PCI_STATUS + 1] = 0x81  # a device-set error bit and a plain one
    cfg.write(PCI_STATUS, b"\x00\xFF")
    assert cfg.read(PCI_STATUS + 1, 1) == b"\x00"
    cfg.write(0x3C, b"\x0B")
    assert cfg.read(0x3C, 1) == b"\x0B"


def test_write_hooks_see_every_write():
    cfg = ConfigSpace(1, 2)
    seen = []
    cfg.write_hooks.append(lambda off, n: seen.append((off, n)))
    cfg.write(0x04, b"\x02\x00")
    cfg.write(0x10, b"\xFF" * 4)
    assert seen == [(0x04, 2), (0x10, 4)]


def test_out_of_range_access():
    cfg = ConfigSpace(1, 2)
    for off, n in ((CONFIG_SIZE - 1, 2), (CONFIG_SIZE, 1), (-1, 2)):
        with pytest.raises(RegionError):
            cfg.read(off, n)
        with pytest.raises(RegionError):
            cfg.write(off, bytes(n))


@pytest.mark.parametrize("size", [0, 8, 24, 3 << 12, (1 << 20) + 4096])
def test_bad_bar_sizes_are_rejected(size):
    with pytest.raises(ValueError):
        Bar(0, WindowedRegion(size))


def test_bar_index_rules():
    with pytest.raises(ValueError):
        Bar(1, WindowedRegion(0x1000), is64=True)  # 64-bit BARs take an even/odd pair
    cfg = ConfigSpace(1, 2)
    cfg.add_bar(Bar(0, WindowedRegion(0x1000), is64=True))
    with pytest.raises(ValueError):
        cfg.add_bar(Bar(1, WindowedRegion(0x1000), is64=False))  # the upper half of BAR0
    with pytest.raises(ValueError):
        cfg.add_bar(Bar(0, WindowedRegion(0x1000), is64=False))
    with pytest.raises(ValueError):
        cfg.add_bar(Bar(6, WindowedRegion(0x1000), is64=False))
    cfg.add_bar(Bar(5, WindowedRegion(0x1000), is64=False))


def test_memory_function_rejects_non_power_of_two_ram():
    with pytest.raises(ValueError):
        MemoryFunction("bad", ram_size=3 << 20)


def test_memfd_bar_region_info():
    fn = MemoryFunction("pci", ram_size=1 << 21)
    try:
        desc = fn.region_info(0)
        assert desc.size == 1 << 21 and desc.fd == fn.ram.fd
        assert desc.caps and desc.caps[0].areas == ((0, 1 << 21),)
        assert fn.region_info(1).size == 0 and fn.region_info(6).size == 0
        with pytest.raises(RegionError):
            fn.region_info(10)  # 0-8 PCI, 9 the zPCI control region
    finally:
        fn.close()
    assert isinstance(fn.ram, MemfdRegion)


def test_reset_restores_power_on_state():
    fn = MemoryFunction("pci")
    try:
        cfg = fn.config
        pristine = cfg.read(0, CONFIG_SIZE)
        put32(cfg, PCI_BASE_ADDRESS_0, 0xC0000000)
        put32(cfg, PCI_BASE_ADDRESS_0 + 4, 0x1)
        cfg.write(PCI_COMMAND, b"\x06\x05")
        cfg.write(0x3C, b"\x0B")
        cfg.write(fn.msix.cap + 2, b"\x00\xC0")
        assert cfg.read(0, CONFIG_SIZE) != pristine
        cfg.reset()
        assert cfg.read(0, CONFIG_SIZE) == pristine
    finally:
        fn.close()
