"""The `memory` function type through its device API: registers, BARs, DMA engine, reset."""

import os

import pytest

from protocol.vfio_user import consts as C
from zpcid.devices import TYPES, load_all
from zpcid.devices.memory import (DEFAULT_DEVICE, DEFAULT_VENDOR, DMA_CMD_FROM_HOST,
                                  DMA_CMD_TO_HOST, MAGIC, REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_LEN,
                                  REG_DMA_STATUS, REG_DOORBELL, REG_MAGIC, REG_RAM_SIZE,
                                  REG_RINGS, REG_SCRATCH, REG_VERSION, MemoryFunction)
from zpcid.vfio_user.memfd import Memfd
from zpcid.vfio_user.regions import RegionError

BAR0, BAR2, BAR4 = 0, 2, 4


@pytest.fixture
def fn():
    f = MemoryFunction("mem", ram_size=1 << 16, vendor=0x1234, device=0x5678, msix_vectors=2)
    yield f
    f.close()


async def reg(fn, off, size=4):
    return int.from_bytes(await fn.region_read(BAR4, off, size), "little")


async def set_reg(fn, off, value, size=4):
    await fn.region_write(BAR4, off, value.to_bytes(size, "little"))


def test_registered_by_name():
    load_all()
    f = TYPES["memory"]("by-name")
    try:
        assert isinstance(f, MemoryFunction) and f.type_name == "memory"
        assert (f.config.u16(0), f.config.u16(2)) == (DEFAULT_VENDOR, DEFAULT_DEVICE)
    finally:
        f.close()


async def test_identity_and_read_only_registers(fn):
    assert (fn.config.u16(0), fn.config.u16(2)) == (0x1234, 0x5678)
    assert await reg(fn, REG_MAGIC) == MAGIC and await reg(fn, REG_VERSION) == 1
    assert await reg(fn, REG_RAM_SIZE, 8) == 1 << 16
    for off in (REG_MAGIC, REG_VERSION, REG_RAM_SIZE, REG_DMA_STATUS):
        await set_reg(fn, off, 0xDEAD)
    assert await reg(fn, REG_MAGIC) == MAGIC and await reg(fn, REG_VERSION) == 1
    assert await reg(fn, REG_RAM_SIZE, 8) == 1 << 16 and await reg(fn, REG_DMA_STATUS) == 0
    await set_reg(fn, REG_SCRATCH, 0xCAFEF00D)
    assert await reg(fn, REG_SCRATCH) == 0xCAFEF00D
    # Beyond the register block the BAR reads as zero and ignores writes.
    await set_reg(fn, 0x800, 0xFFFFFFFF)
    assert await fn.region_read(BAR4, 0x3C, 8) == bytes(8)
    assert await fn.region_read(BAR4, 0x800, 4) == bytes(4)


async def test_bar_layout(fn):
    d0, d2, d4 = fn.region_info(BAR0), fn.region_info(BAR2), fn.region_info(BAR4)
    assert d0.flags & C.VFIO_REGION_INFO_FLAG_MMAP and d0.fd is not None
    assert not d2.flags & C.VFIO_REGION_INFO_FLAG_MMAP and d2.fd is None
    assert not d4.flags & C.VFIO_REGION_INFO_FLAG_MMAP and d4.size == 0x1000
    assert fn.config.u32(0x10) & 0xF == 0xC  # 64-bit prefetchable RAM
    assert fn.config.u32(0x18) & 0xF == 0x4 and fn.config.u32(0x20) & 0xF == 0x4
    with pytest.raises(RegionError):
        await fn.region_read(BAR4, 0xFFE, 4)
    with pytest.raises(RegionError):
        await fn.region_read(3, 0, 4)


async def test_doorbell_counts_rings(fn):
    for v in (0, 1, 5):
        await set_reg(fn, REG_DOORBELL, v)
    assert await reg(fn, REG_RINGS) == 3


async def test_dma_engine_with_fd_backed_memory(fn):
    with Memfd(1 << 16, "zpcid-test-guest") as guest:
        fn.dma.add(0x8000_0000, 1 << 16, True, True, guest.fd, 0)
        guest.write(0x100, b"abcdef")
        await set_reg(fn, REG_DMA_ADDR, 0x8000_0100, 8)
        await set_reg(fn, REG_DMA_LEN, 6)
        await set_reg(fn, REG_DMA_CMD, DMA_CMD_FROM_HOST)
        assert await reg(fn, REG_DMA_STATUS) == 0
        assert fn.ram.mm[:6] == b"abcdef"
        fn.ram.mm[:6] = b"ABCDEF"
        await set_reg(fn, REG_DMA_ADDR, 0x8000_0200, 8)
        await set_reg(fn, REG_DMA_CMD, DMA_CMD_TO_HOST)
        assert await reg(fn, REG_DMA_STATUS) == 0 and guest.read(0x200, 6) == b"ABCDEF"
        # Length clipped to the RAM size; the tail of guest memory is beyond the map.
        await set_reg(fn, REG_DMA_LEN, 0xFFFFFFFF)
        await set_reg(fn, REG_DMA_CMD, DMA_CMD_TO_HOST)
        assert await reg(fn, REG_DMA_STATUS) == 1
        await set_reg(fn, REG_DMA_ADDR, 0x8000_0000, 8)
        await set_reg(fn, REG_DMA_CMD, DMA_CMD_TO_HOST)
        assert await reg(fn, REG_DMA_STATUS) == 0
        fn.detach()


async def test_dma_engine_uses_the_dma_path(fn):
    """Device DMA goes through ``function.dma_path`` (where zPCI puts its IOMMU)."""
    with Memfd(1 << 16, "zpcid-test-guest") as guest:
        fn.dma.add(0, 1 << 16, True, True, guest.fd, 0)
        calls = []

        class Offset:  # a translation layer in front of the client map, as zPCI adds
            async def read(self, iova, n):
                calls.append(("r", iova))
                return await fn.dma.read(iova - 0x1000, n)

            async def write(self, iova, data):
                calls.append(("w", iova))
                await fn.dma.write(iova - 0x1000, data)

        fn.dma_path = Offset()
        guest.write(0, b"xy")
        await set_reg(fn, REG_DMA_ADDR, 0x1000, 8)
        await set_reg(fn, REG_DMA_LEN, 2)
        await set_reg(fn, REG_DMA_CMD, DMA_CMD_FROM_HOST)
        assert calls == [("r", 0x1000)] and fn.ram.mm[:2] == b"xy"
        fn.detach()


async def test_reset_state_keeps_ram_clears_registers(fn):
    await fn.region_write(BAR0, 0, b"persist")
    await set_reg(fn, REG_SCRATCH, 7)
    await set_reg(fn, REG_DOORBELL, 0)
    fn.config.write(0x04, b"\x06\x00")
    await fn.reset()
    assert await fn.region_read(BAR0, 0, 7) == b"persist"
    assert await reg(fn, REG_SCRATCH) == 0 and await reg(fn, REG_RINGS) == 0
    assert fn.config.command == 0 and await reg(fn, REG_MAGIC) == MAGIC


async def test_backing_file(sock_dir):
    path = os.path.join(sock_dir, "bar0.img")
    f = MemoryFunction("file", ram_size=1 << 16, backing=path)
    try:
        # A file cannot be sealed: zpcid reaches it through pread/pwrite, never a mapping.
        assert f.ram.mm is None
        await f.region_write(BAR0, 0, b"saved")
    finally:
        f.close()
    assert os.path.getsize(path) == 1 << 16
    with open(path, "rb") as fh:
        assert fh.read(5) == b"saved"
    again = MemoryFunction("file", ram_size=1 << 16, backing=path)
    try:
        assert await again.region_read(BAR0, 0, 5) == b"saved"
    finally:
        again.close()


def test_describe(fn):
    d = fn.describe()
    assert d["type"] == "memory" and d["vendor"] == 0x1234 and d["device"] == 0x5678
    assert d["attached"] is False and d["dma_maps"] == 0 and d["msix_enabled"] is False
    import json
    json.dumps(d)
