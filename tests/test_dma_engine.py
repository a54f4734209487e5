"""dma-engine through the real path: register mode, descriptor rings, bad input."""

import os
import struct

import pytest

from protocol.zpci import formats as Z
from zpcid.vmm import client as vclient
from zpcid.zpci import core as Zr
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.vmm.model import attach
from helpers import serving
from zpci_env import props

SDMA = 0x1_0000_0000
PAGE = 4096
MEM = 64 << 20


# CRC-32C known answers: the check value of the Castagnoli CRC catalogue and the
# iSCSI test vectors of RFC 3720 appendix B.4.
CRC32C_VECTORS = [
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]
# CRC-32C over any data followed by its own CRC (little-endian) is this constant.
CRC32C_RESIDUE = 0x48674BC7


def engine(**kw):
    return D.DmaEngine("d0", zpci=props(), **kw)


async def regs(vmm, **values):
    layout = {"src": (D.REG_SRC, "<Q"), "dst": (D.REG_DST, "<Q"), "len": (D.REG_LEN, "<I"),
              "op": (D.REG_OP, "<I"), "pattern": (D.REG_PATTERN, "<Q"), "vector": (D.REG_VECTOR, "<I"),
              "ctrl": (D.REG_CTRL, "<I"), "ring_base": (D.REG_RING_BASE, "<Q"),
              "ring_size": (D.REG_RING_SIZE, "<I")}
    for k, v in values.items():
        off, fmt = layout[k]
        await vmm.client.region_write(0, off, struct.pack(fmt, v))


async def reg(vmm, off, fmt="<I"):
    return struct.unpack(fmt, await vmm.client.region_read(0, off, struct.calcsize(fmt)))[0]


async def run(vmm, **values):
    await regs(vmm, **values)
    await vmm.client.region_write(0, D.REG_DOORBELL, b"\1\0\0\0")
    return await Driver(vmm.client).wait()


async def tail(vmm, value):
    return await Driver(vmm.client).submit(value)


def error_of(status):
    return (status >> 8) & 0xFF if status & D.STATUS_ERROR else 0


async def direct(vmm):
    r = await vmm.register_translation(SDMA, SDMA + MEM - 1, 0)
    assert r.cc == 0


def desc(op, length, src, dst, flags=0):
    return D.DESC.pack(op, flags, length, src, dst, 0, 0)


async def test_identity_and_register_operations(sock_dir):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM) as vmm:
            assert await reg(vmm, D.REG_ID) == D.ID_VALUE
            assert await reg(vmm, D.REG_MAX_LEN) == 64 << 20
            await direct(vmm)
            data = os.urandom(3 * PAGE + 5)
            vmm.mem.write(0x10_0000, data)
            st = await run(vmm, src=SDMA + 0x10_0000, dst=SDMA + 0x20_0000, len=len(data), op=D.OP_COPY)
            assert error_of(st) == 0 and vmm.mem.read(0x20_0000, len(data)) == data
            st = await run(vmm, src=SDMA + 0x20_0000, len=len(data), op=D.OP_CRC32C)
            assert error_of(st) == 0
            # Checked by the CRC's own residue, not by another CRC implementation.
            vmm.mem.write(0x20_0000 + len(data), struct.pack("<I", await reg(vmm, D.REG_RESULT)))
            st = await run(vmm, src=SDMA + 0x20_0000, len=len(data) + 4, op=D.OP_CRC32C)
            assert error_of(st) == 0 and await reg(vmm, D.REG_RESULT) == CRC32C_RESIDUE
            st = await run(vmm, dst=SDMA + 0x30_0003, len=13, op=D.OP_FILL, pattern=0x0102030405060708)
            assert vmm.mem.read(0x30_0003, 13) == bytes.fromhex("0807060504030201080706050403")[:13]
            assert await reg(vmm, D.REG_COMPLETED) == 4


@pytest.mark.parametrize("data,expected", CRC32C_VECTORS, ids=[f"{e:#010x}" for _, e in CRC32C_VECTORS])
async def test_crc32c_known_answers(sock_dir, data, expected):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM) as vmm:
            await direct(vmm)
            # Straddle a page boundary so the device reads through two translations.
            gpa = 0x10_0000 + PAGE - 5
            vmm.mem.write(gpa, data)
            st = await run(vmm, src=SDMA + gpa, len=len(data), op=D.OP_CRC32C)
            assert error_of(st) == 0 and await reg(vmm, D.REG_RESULT) == expected


@pytest.mark.parametrize("length", [0, (64 << 20) + 1])
async def test_zero_and_huge_lengths_are_bad_requests(sock_dir, length):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM) as vmm:
            await direct(vmm)
            st = await run(vmm, src=SDMA, dst=SDMA + PAGE, len=length & 0xFFFFFFFF, op=D.OP_COPY)
            assert error_of(st) == D.ERR_BAD_DESC
            assert vmm.box.state == Zr.State.ENABLED  # a bad request is not a function error


async def test_unknown_operation(sock_dir):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM) as vmm:
            await direct(vmm)
            assert error_of(await run(vmm, src=SDMA, dst=SDMA, len=8, op=9)) == D.ERR_BAD_DESC


async def test_doorbell_while_disabled_or_in_error(sock_dir):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM, enable=False) as vmm:
            # zPCI function disabled: no DMA may happen, the device reports a fault
            st = await run(vmm, src=SDMA, dst=SDMA + PAGE, len=64, op=D.OP_COPY)
            assert error_of(st) == D.ERR_FAULT and vmm.box.state == Zr.State.DISABLED
            await vmm.enable_function()
            await direct(vmm)
            srv.function.zpci.error(Z.ZPCI_PEC_SYSTEM_ERROR, 0, "test")
            st = await run(vmm, src=SDMA, dst=SDMA + PAGE, len=64, op=D.OP_COPY)
            assert error_of(st) == D.ERR_FAULT
            # bus mastering off: the device refuses before touching memory
            await vmm.box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, vmm.fib())
            await vmm.client.region_write(7, 4, b"\x02\x00")
            st = await run(vmm, src=SDMA, dst=SDMA + PAGE, len=64, op=D.OP_COPY)
            assert error_of(st) == D.ERR_NOT_READY


async def test_descriptor_ring_batch_wraps_and_interrupts(sock_dir):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM) as vmm:
            await direct(vmm)
            ring, size = 0x8000, 4
            await regs(vmm, ring_base=SDMA + ring, ring_size=size, vector=3)
            expected = {}
            head = 0
            for batch in range(3):  # 3 batches of 3 descriptors: the ring wraps twice
                for i in range(3):
                    idx = head + i
                    src, dst = 0x10_0000 + idx * PAGE, 0x40_0000 + idx * PAGE
                    data = os.urandom(PAGE)
                    vmm.mem.write(src, data)
                    expected[dst] = data
                    vmm.mem.write(ring + (idx % size) * 32,
                                  desc(D.OP_COPY, PAGE, SDMA + src, SDMA + dst, D.DESC_F_IRQ if i == 2 else 0))
                head += 3
                assert error_of(await tail(vmm, head)) == 0
                assert await reg(vmm, D.REG_RING_HEAD) == head
                assert vclient.read_eventfd(vmm.msix_fds[3]) == 1
            for dst, data in expected.items():
                assert vmm.mem.read(dst, PAGE) == data
            status = struct.unpack_from("<I", vmm.mem.read(ring + ((head - 1) % size) * 32 + 28, 4))[0]
            assert status == D.DESC_ST_OK


async def test_ring_errors(sock_dir):
    async with serving(engine(), sock_dir) as srv:
        async with attach(srv.path, guest_memory=MEM) as vmm:
            await direct(vmm)
            await regs(vmm, ring_base=SDMA + 0x8000, ring_size=3)  # not a power of two
            assert error_of(await tail(vmm, 1)) == D.ERR_RING
            await regs(vmm, ring_size=4)
            # tail more than a ring ahead of head: descriptors would be overwritten
            assert error_of(await tail(vmm, 5)) == D.ERR_RING
            assert await reg(vmm, D.REG_RING_HEAD) == 0
            # a descriptor pointing outside the aperture stops the batch there
            vmm.mem.write(0x8000, desc(D.OP_FILL, 64, 0, SDMA + 0x20_0000))
            vmm.mem.write(0x8020, desc(D.OP_FILL, 64, 0, SDMA + MEM + PAGE))
            vmm.mem.write(0x8040, desc(D.OP_FILL, 64, 0, SDMA + 0x20_0000))
            assert error_of(await tail(vmm, 3)) == D.ERR_FAULT
            assert await reg(vmm, D.REG_RING_HEAD) == 2
            assert await reg(vmm, D.REG_FAULT_ADDR, "<Q") == SDMA + MEM + PAGE
            # the first descriptor completed and was written back; the failing one
            # could not be (the function is in the error state, DMA is off)
            assert struct.unpack_from("<I", vmm.mem.read(0x8000 + 28, 4))[0] == D.DESC_ST_OK
            assert struct.unpack_from("<I", vmm.mem.read(0x8020 + 28, 4))[0] == 0
            assert vmm.box.state == Zr.State.ERROR
            assert [p for _, p, _ in vmm.box.events()] == [Z.ZPCI_PEC_OUT_OF_RANGE]
            # a ring itself outside guest memory
            await vmm.box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, vmm.fib())
            await regs(vmm, ring_base=SDMA + MEM + 0x1000)
            assert error_of(await tail(vmm, 3)) == D.ERR_FAULT


async def test_vmm_translates_mode_message_dma(sock_dir):
    """DMA_MAP without an fd: the engine's accesses travel as DMA_READ/DMA_WRITE."""
    async with serving(engine(), sock_dir) as srv:
        async with vclient.connect(srv.path) as c:
            await c.region_write(7, 4, b"\x06\x00")
            buf = bytearray(os.urandom(2 * PAGE))
            await c.dma_map(0x100000, len(buf), buf=buf)
            st = await Driver(c).run(D.OP_COPY, 0x100000, 0x100000 + PAGE, 100)
            assert error_of(st) == 0 and buf[PAGE : PAGE + 100] == buf[:100]
            assert c.dma_requests >= 2


async def test_demo_runs_clean():
    import io

    from zpcid.tools.demo import run_demo

    out = io.StringIO()
    assert await run_demo(out) == 0, out.getvalue()
    assert "steps behaved" in out.getvalue() and "FAIL" not in out.getvalue()
