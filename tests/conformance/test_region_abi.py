"""Conformance of the zPCI control-region ABI 1.1 (docs/zpci-region.md).

Every test drives zpcid only through the region's bytes — the reference VMM
over a real vfio-user socket, real memfd guest memory, real s390 translation
tables — once with the region mmapped and once through REGION_READ/WRITE.
The rows follow the doc's outcome table: cc, which register gets the status
(after the VMM applied the write-back mask), which gets a value, or which
program exception.
"""

import os
import struct

import pytest

from protocol.zpci import formats as Z
from zpcid.vmm import client as vclient
from protocol.zpci import region as Zr
from zpcid.devices import dma_engine as D
from zpcid.devices.memory import MemoryFunction
from abi_env import ACCESS, GUEST_MEM, PAGE, SDMA, fib, guest, props

R1_STATUS = lambda reg: (reg >> 24) & 0xFF  # noqa: E731


@pytest.fixture(params=ACCESS)
def access(request):
    return request.param


def engine(**kw):
    return D.DmaEngine("d0", zpci=props(**kw))


def memfn(**kw):
    return MemoryFunction("m0", zpci=props(**kw))


def status_in_r1(a, status):
    """cc 1 with the status in r1 only (r2 untouched)."""
    assert (a.cc, a.exception, a.result) == (1, 0, 0)
    assert a.res.status == status and a.res.writeback == Zr.WB_R1
    assert R1_STATUS(a.r1) == status


def status_in_r2(a, r2_in, status):
    assert (a.cc, a.exception, a.result) == (1, 0, 0)
    assert a.res.status == status and a.res.writeback == Zr.WB_R2
    assert a.r2 == (r2_in & ~0xFF000000) | (status << 24)


def nothing_written(a, cc):
    assert (a.cc, a.exception, a.result, a.res.writeback) == (cc, 0, 0, 0)


def exception(a, exc):
    assert a.exception == exc and a.result == 0
    # a program exception: no cc, nothing stored (the VMM ignores the mask)


# ==================================================================== header


async def test_header_advertises_abi_1_1(sock_dir, access):
    async with guest(sock_dir, engine(), access, vmm_flags=Zr.VMM_EVENTS) as g:
        h = await g.header()
        assert (h["magic"], h["major"], h["minor"]) == (Zr.MAGIC, 1, 1)
        for bit in (Zr.FEAT_WRITEBACK, Zr.FEAT_VMM_FLAGS, Zr.FEAT_VMM_IDS, Zr.FEAT_DMA_FAULT_EVENTS):
            assert h["features"] & bit
        assert h["vmm_flags"] == Zr.VMM_EVENTS and h["limit"] == GUEST_MEM
        await g.box.set_vmm(Zr.VMM_EVENTS | Zr.VMM_ADAPTER | 0x80, fid=0x1234, uid=0x55)
        h = await g.header()
        # unknown flag bits are not kept; the IDs are informational
        assert (h["vmm_flags"], h["vmm_fid"], h["vmm_uid"]) == (Zr.VMM_EVENTS | Zr.VMM_ADAPTER, 0x1234, 0x55)


async def test_guest_memory_limit_overflow_refused_old_value_kept(sock_dir, access):
    async with guest(sock_dir, engine(), access, enable=False) as g:
        q0 = await g.box.read(Zr.CLP_QUERY_FN, 256)
        for limit in ((1 << 64) - SDMA + 1, (1 << 64) - 1):
            with pytest.raises(vclient.VfioUserError) as e:
                await g.box.set_mode(Zr.MODE_ZPCID, limit)
            assert e.value.errno == 22  # EINVAL
            h = await g.header()
            assert h["limit"] == GUEST_MEM and h["mode"] == Zr.MODE_ZPCID
            assert await g.box.read(Zr.CLP_QUERY_FN, 256) == q0  # the aperture did not move
        # the largest limit whose aperture still fits is taken
        await g.box.set_mode(Zr.MODE_ZPCID, (1 << 64) - SDMA)
        assert (await g.header())["limit"] == (1 << 64) - SDMA
        edma = Z.ClpQueryPciFnResponse.unpack(await g.box.read(Zr.CLP_QUERY_FN, 256)).edma
        assert edma == (1 << 64) - 1


async def test_device_reset_keeps_mode_limit_and_vmm_fields(sock_dir, access):
    async with guest(sock_dir, engine(), access) as g:
        await g.box.set_vmm(Zr.VMM_EVENTS, fid=7, uid=8)
        await g.client.reset()
        h = await g.header()
        assert h["state"] == Zr.State.DISABLED and not h["fh"] & Z.FH_MASK_ENABLE
        assert (h["mode"], h["limit"], h["vmm_flags"], h["vmm_fid"], h["vmm_uid"]) == \
            (Zr.MODE_ZPCID, GUEST_MEM, Zr.VMM_EVENTS, 7, 8)


# ==================================================================== mailbox results


async def test_unknown_command_and_wrong_mode(sock_dir, access):
    async with guest(sock_dir, engine(), access, mode=Zr.MODE_VMM) as g:
        r = await g.box.command(99)
        assert r.result == Zr.RES_BAD_COMMAND and r.writeback == 0
        # vmm-translates: RPCIT and the MPCIFC controls that need guest addresses
        assert (await g.rpcit(SDMA, PAGE)).result == Zr.RES_WRONG_MODE
        for oc in (Z.ZPCI_MOD_FC_REG_INT, Z.ZPCI_MOD_FC_DEREG_INT, Z.ZPCI_MOD_FC_SET_MEASURE):
            a = await g.mpcifc(oc, fib(noi=1, aibv=0x1000, aisb=0x2000, fmb_addr=0x3000))
            assert a.result == Zr.RES_WRONG_MODE and a.res.writeback == 0
        # ... while zpcid serves the IOAT and reset controls in that mode
        a = await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(pba=SDMA, pal=SDMA + (1 << 20) - 1, iota=0))
        nothing_written(a, 0)
        assert Z.Fib.unpack((await g.stpcifc()).res.fib).fc & Z.ZPCI_FIB_FC_DMAAS_REG
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT), 0)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR), Z.ZPCI_MOD_ST_SEQUENCE)


# ==================================================================== CLP


async def test_clp_answers_in_the_response_block(sock_dir, access):
    async with guest(sock_dir, engine(), access, enable=False) as g:
        box = g.box
        lst = await box.clp(Z.ClpListRequest().pack())
        assert Z.ClpHeader.unpack(lst[:16]).code == Z.CLP_RC_OK
        bad = await box.clp(Z.ClpListRequest(resume_token=5).pack())
        assert Z.ClpHeader.unpack(bad[:16]).code == Z.CLP_RC_LISTPCI_BADRT
        fh = await g.fh()
        q = await box.clp(Z.ClpQueryPciFnRequest(fh=fh).pack())
        assert q == await box.read(Zr.CLP_QUERY_FN, 256)
        garbage = await box.clp(struct.pack(">HH", 40, 3).ljust(32, b"\0"))
        assert Z.ClpHeader.unpack(garbage[:16]).code == Z.CLP_RC_LEN
        rc, new_fh = await box.set_pci_fn(fh, Z.CLP_SET_ENABLE_PCI_FN)
        assert rc == Z.CLP_RC_OK and new_fh == fh | Z.FH_MASK_ENABLE == await g.fh()
        rc, _ = await box.set_pci_fn(new_fh, Z.CLP_SET_ENABLE_PCI_FN)
        assert rc == Z.CLP_RC_SETPCIFN_FHOP
        r = await box.command(Zr.CMD_CLP)
        assert (r.cc, r.writeback) == (0, 0)  # CLP never writes registers


@pytest.mark.parametrize("mode,compat,tlb_refresh,refresh", [
    (Zr.MODE_ZPCID, 3, None, False),  # level 3: zpcid fetches new translations itself
    (Zr.MODE_ZPCID, 3, True, True),
    (Zr.MODE_ZPCID, 2, None, True),  # levels 1 and 2 keep what their guests saw
    (Zr.MODE_ZPCID, 2, False, False),
    (Zr.MODE_VMM, 3, None, True),  # a VMM that translates needs every RPCIT
    (Zr.MODE_VMM, 3, False, True),
])
async def test_query_group_refresh_bit(sock_dir, access, mode, compat, tlb_refresh, refresh):
    fn = engine(compat=compat, tlb_refresh=tlb_refresh)
    async with guest(sock_dir, fn, access, mode=mode, enable=False) as g:
        block = await g.box.read(Zr.CLP_QUERY_GRP, Zr.CLP_QUERY_GRP_SIZE)
        answer = await g.box.clp(Z.ClpQueryPciFnGrpRequest(pfgid=fn.zpci.props.pfgid).pack())
        assert answer[:Zr.CLP_QUERY_GRP_SIZE] == block
        grp = Z.ClpQueryPciFnGrpResponse.unpack(block)
        assert grp.response_code == Z.CLP_RC_OK
        assert bool(grp.flags & Z.CLP_FNGRP_REFRESH) is refresh
        assert grp.flags & Z.CLP_FNGRP_RTR  # the rest of the block is unchanged


# ==================================================================== MPCIFC


async def test_mpcifc_outcomes(sock_dir, access):
    async with guest(sock_dir, engine(), access) as g:
        fh = await g.fh()
        # cc 3: handle not current / not enabled -- nothing stored
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(), fh=fh & ~Z.FH_MASK_ENABLE), 3)
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(), fh=fh ^ 1), 3)
        # program exceptions
        exception(await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(fmt=1)), Zr.EXC_OPERAND)
        exception(await g.mpcifc(1, fib()), Zr.EXC_OPERAND)  # unknown operation control
        exception(await g.mpcifc(Z.ZPCI_MOD_FC_REG_INT_D, fib()), Zr.EXC_OPERAND)
        for bad in (dict(pba=SDMA + PAGE, pal=SDMA), dict(pba=SDMA - PAGE, pal=SDMA + PAGE),
                    dict(pba=SDMA, pal=SDMA + GUEST_MEM), dict(pba=SDMA, pal=SDMA + PAGE,
                                                               iota=g.tables.iota | 0xC)):
            bad.setdefault("iota", g.tables.iota)
            exception(await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(**bad)), Zr.EXC_OPERAND)
        # cc 1 with the status in r1, for every failure kind
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(pba=SDMA, pal=SDMA + PAGE), dmaas=1),
                     Z.ZPCI_MOD_ST_DMAAS_INVAL)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT), Z.ZPCI_MOD_ST_SEQUENCE)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_REREG_IOAT), Z.ZPCI_MOD_ST_SEQUENCE)
        nothing_written(await g.register_ioat(), 0)
        status_in_r1(await g.register_ioat(), Z.ZPCI_MOD_ST_SEQUENCE)  # twice
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_REREG_IOAT,
                                       fib(pba=SDMA, pal=SDMA + (8 << 20) - 1, iota=g.tables.iota)), 0)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_DEREG_INT), Z.ZPCI_MOD_ST_SEQUENCE)
        for bad in (dict(noi=0), dict(noi=99), dict(noi=1, aibv=GUEST_MEM + PAGE)):
            status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_REG_INT, fib(**bad)), Z.ZPCI_MOD_ST_RES_NOT_AVAIL)
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_REG_INT, fib(noi=2, aibv=0x1000)), 0)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_REG_INT, fib(noi=2, aibv=0x1000)),
                     Z.ZPCI_MOD_ST_SEQUENCE)
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_DEREG_INT), 0)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR), Z.ZPCI_MOD_ST_SEQUENCE)
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK), Z.ZPCI_MOD_ST_SEQUENCE)
        # FMB address with low bits: cc 1, status byte 0 (QEMU stores none), event 0x2c
        a = await g.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, fib(fmb_addr=0x7008))
        status_in_r1(a, 0)
        assert [(p, c.faddr) for _, p, c in await g.events()] == [(Z.ZPCI_PEC_FMB_PROTECTION, 0x7008)]
        assert g.err_irqs() == 1
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, fib(fmb_addr=0x7000)), 0)
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, fib(fmb_addr=0)), 0)
        # a disabled function: cc 3
        await g.box.set_pci_fn(await g.fh(), Z.CLP_SET_DISABLE_PCI_FN)
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, fib(), fh=fh), 3)


async def test_mpcifc_reset_controls_in_error_and_blocked(sock_dir, access):
    async with guest(sock_dir, engine(), access) as g:
        assert (await g.register_ioat()).cc == 0
        assert (await g.dma(D.OP_FILL, 0, SDMA, 8))[0] == D.ERR_FAULT  # nothing mapped yet
        assert await g.state() == Zr.State.ERROR
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK), 0)
        assert await g.state() == Zr.State.BLOCKED
        status_in_r1(await g.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK), Z.ZPCI_MOD_ST_SEQUENCE)
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR), 0)
        assert await g.state() == Zr.State.ENABLED


# ==================================================================== STPCIFC


async def test_stpcifc_outcomes(sock_dir, access):
    async with guest(sock_dir, engine(), access, enable=False) as g:
        fh = await g.fh()
        a = await g.stpcifc()  # disabled, handle without the enable bit: zeroed FIB, cc 0
        nothing_written(a, 0)
        assert a.res.fib == bytes(80)
        nothing_written(await g.stpcifc(fh=fh | Z.FH_MASK_ENABLE), 3)
        nothing_written(await g.stpcifc(fh=fh ^ 1), 3)
        status_in_r1(await g.stpcifc(dmaas=2), Z.ZPCI_STPCIFC_ST_INVAL_DMAAS)
        await g.box.enable()
        efh = await g.fh()
        assert (await g.register_ioat()).cc == 0
        a = await g.stpcifc()
        nothing_written(a, 0)
        f = Z.Fib.unpack(a.res.fib)
        assert f.fc == Z.ZPCI_FIB_FC_ENABLED | Z.ZPCI_FIB_FC_DMAAS_REG and f.pba == SDMA
        assert f.iota == g.tables.iota
        # the handle without the enable bit: bit 63 of r1 is set (the only cc 0 write-back)
        a = await g.stpcifc(fh=efh & ~Z.FH_MASK_ENABLE)
        assert (a.cc, a.res.writeback) == (0, Zr.WB_R1) and a.r1 >> 63 == 1
        assert a.r1 & ~(1 << 63) == (efh & ~Z.FH_MASK_ENABLE) << 32
        # error state: fc shows error + blocked
        assert (await g.dma(D.OP_FILL, 0, SDMA, 8))[0] == D.ERR_FAULT
        fc = Z.Fib.unpack((await g.stpcifc()).res.fib).fc
        assert fc & Z.ZPCI_FIB_FC_ERROR and fc & Z.ZPCI_FIB_FC_LS_BLOCKED


# ==================================================================== RPCIT


async def _rpcit_checks_before_the_walk(g) -> None:
    """The rows RPCIT answers alike with and without the refresh bit (handle,
    no IOTA, error state, range); leaves a translation registered up to 1 MiB."""
    fh = await g.fh()
    nothing_written(await g.rpcit(SDMA, PAGE, fh=fh & ~Z.FH_MASK_ENABLE), 3)
    # no IOTA: error state, event 0x01, cc 1 status 8 in r1
    status_in_r1(await g.rpcit(SDMA, PAGE), Z.ZPCI_PCI_ST_FUNC_IN_ERR)
    assert [(p, c.faddr) for _, p, c in await g.events()] == [(Z.ZPCI_PEC_INVALID_AS, SDMA)]
    assert await g.state() == Zr.State.ERROR
    # in the error state: cc 1 status 40
    status_in_r1(await g.rpcit(SDMA, PAGE), Z.ZPCI_PCI_ST_FUNC_NOT_AVAIL)
    await g.recover()
    pal = SDMA + (1 << 20) - 1
    assert (await g.register_ioat(pal=pal)).cc == 0
    g.tables.map(SDMA, 0x10_0000, 4)
    nothing_written(await g.rpcit(SDMA, 4 * PAGE), 0)
    nothing_written(await g.rpcit(SDMA + PAGE, 0), 0)  # zero length inside
    # outside [PBA, PAL]: cc 1 status 8, event 0x02 at the start address
    for start, length in ((pal + 1, PAGE), (SDMA - 2 * PAGE, PAGE), (pal + 1, 0)):
        status_in_r1(await g.rpcit(start, length), Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [(p, c.faddr) for _, p, c in await g.events()] == [(Z.ZPCI_PEC_OUT_OF_RANGE, start)]
        await g.recover()


async def test_rpcit_outcomes(sock_dir, access):
    async with guest(sock_dir, engine(dma_limit=8, tlb_refresh=True), access) as g:
        await _rpcit_checks_before_the_walk(g)
        # walk errors: zero entry (0x07), bad table length (0x08), table type (0x09)
        iova = SDMA + 0x8_0000
        g.tables.map(iova, 0x20_0000, 1)
        seg = g.tables.segment_entry(iova)
        for entry, pec in ((0, Z.ZPCI_PEC_INVALID_TABLE_ENTRY),
                           (seg & ~0xC | 0x4, Z.ZPCI_PEC_TABLE_TYPE)):
            g.tables.set_segment_entry(iova, entry)
            status_in_r1(await g.rpcit(iova, PAGE), Z.ZPCI_PCI_ST_FUNC_IN_ERR)
            assert [(p, c.faddr) for _, p, c in await g.events()] == [(pec, iova)]
            await g.recover()
        g.tables.set_segment_entry(iova, seg)
        rte = g.tables.region_entry(iova)
        g.tables.set_region_entry(iova, rte | 0x40)  # table offset != 0
        status_in_r1(await g.rpcit(iova, PAGE), Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [p for _, p, _ in await g.events()] == [Z.ZPCI_PEC_TABLE_LENGTH]
        await g.recover()
        g.tables.set_region_entry(iova, rte)
        # the DMA limit (8 mappings): cc 1 status 16 in r1, function stays enabled
        g.tables.map(SDMA + 0x4_0000, 0x30_0000, 8)
        status_in_r1(await g.rpcit(SDMA + 0x4_0000, 8 * PAGE), Z.ZPCI_RPCIT_ST_INSUFF_RES)
        assert await g.state() == Zr.State.ENABLED and (await g.header())["dma_available"] == 0


async def test_rpcit_outcomes_without_refresh_bit(sock_dir, access):
    """Refresh bit off: RPCIT keeps its handle, state and range rows, then only
    drops the range from the shadow; the tables are walked by device DMA."""
    async with guest(sock_dir, engine(dma_limit=8), access) as g:
        await _rpcit_checks_before_the_walk(g)
        # a zero segment entry is not RPCIT's business any more ...
        iova = SDMA + 0x8_0000
        g.tables.map(iova, 0x20_0000, 1)
        seg = g.tables.segment_entry(iova)
        g.tables.set_segment_entry(iova, 0)
        nothing_written(await g.rpcit(iova, PAGE), 0)
        assert await g.events() == []
        g.tables.set_segment_entry(iova, seg)
        # ... nor is the DMA limit: more new mappings than the limit, cc 0
        g.tables.map(SDMA + 0x4_0000, 0x30_0000, 16)
        nothing_written(await g.rpcit(SDMA + 0x4_0000, 16 * PAGE), 0)
        assert await g.state() == Zr.State.ENABLED
        # device DMA fetches the translations: the shadow holds what was used
        assert (await g.dma(D.OP_FILL, 0, SDMA + 0x4_0000, 4 * PAGE, 0x1111111111111111))[0] == 0
        assert (await g.header())["shadow"] == 4
        assert g.mem.read(0x30_0000, 4 * PAGE) == bytes([0x11]) * 4 * PAGE
        # an RPCIT of the whole aperture only forgets
        nothing_written(await g.rpcit(SDMA, 1 << 20), 0)
        assert (await g.header())["shadow"] == 0
        assert (await g.header())["dma_available"] == 8


async def test_rpcit_range_checked_first_with_direct_map(sock_dir, access):
    async with guest(sock_dir, engine(), access) as g:
        pal = SDMA + (16 << 20) - 1
        # a non-zero T=0 IOTA: direct map, nothing to shadow
        nothing_written(await g.register_ioat(pal=pal, iota=0x1000), 0)
        assert (await g.header())["ioat"] == 3
        nothing_written(await g.rpcit(SDMA, PAGE), 0)
        status_in_r1(await g.rpcit(pal + 1, PAGE), Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [(p, c.faddr) for _, p, c in await g.events()] == [(Z.ZPCI_PEC_OUT_OF_RANGE, pal + 1)]
        await g.recover()
        # IOTA 0 (Linux's identity domain): the "no IOTA" error, as QEMU
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT), 0)
        nothing_written(await g.register_ioat(pal=pal, iota=0), 0)
        status_in_r1(await g.rpcit(SDMA, PAGE), Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [p for _, p, _ in await g.events()] == [Z.ZPCI_PEC_INVALID_AS]


# ==================================================================== PCISTB / PCILG / PCISTG


async def test_pcistb_outcomes(sock_dir, access):
    fn = MemoryFunction("m0", ram_size=0x800, zpci=props())  # a BAR smaller than a page
    async with guest(sock_dir, fn, access) as g:
        data = os.urandom(64)
        nothing_written(await g.pcistb(0, 0x100, data), 0)
        a = await g.pcilg(0, 0x100, 8)
        assert a.r1 == int.from_bytes(data[:8], "big")
        fh = await g.fh()
        nothing_written(await g.pcistb(0, 0, data, fh=fh & ~Z.FH_MASK_ENABLE), 3)
        nothing_written(await g.pcistb(0, 0, data, fh=fh ^ 1), 3)
        status_in_r1(await g.pcistb(1, 0, data), Z.ZPCI_PCI_ST_INVAL_AS)  # no BAR 1
        status_in_r1(await g.pcistb(15, 0, data), Z.ZPCI_PCI_ST_INVAL_AS)
        for off, blk, gaddr in ((4, data, 0x8000), (0, data[:12], 0x8000), (0, data[:8], 0x8000),
                                (0, data, 0x8004), (0xFE0, data, 0x8000), (0, bytes(256), 0x8000)):
            exception(await g.pcistb(0, off, blk, gaddr=gaddr), Zr.EXC_SPECIFICATION)
        exception(await g.pcistb(0, 0x7E0, data), Zr.EXC_OPERAND)  # beyond the 2 KiB BAR 0
        await _error_state(g)
        status_in_r1(await g.pcistb(0, 0, data), Z.ZPCI_PCI_ST_BLOCKED)


async def test_pcilg_pcistg_outcomes(sock_dir, access):
    fn = memfn()
    async with guest(sock_dir, fn, access) as g:
        a = await g.pcilg(15, 0, 2)  # vendor ID, storage order
        assert (a.cc, a.res.writeback) == (0, Zr.WB_R1)
        assert a.r1 == int.from_bytes(struct.pack("<H", 0x1014), "big") and a.r2 == a.res.r2
        nothing_written(await g.pcistg(4, 0x08, 4, 0x11223344), 0)
        assert (await g.pcilg(4, 0x08, 4)).r1 == 0x11223344
        fh = await g.fh()
        nothing_written(await g.pcilg(4, 0, 4, fh=fh & ~Z.FH_MASK_ENABLE), 3)
        nothing_written(await g.pcistg(4, 0, 4, 1, fh=fh ^ 1), 3)
        req = lambda pcias, n: (fh << 32) | (pcias << 16) | n  # noqa: E731
        a = await g.pcilg(1, 0, 4)
        status_in_r2(a, req(1, 4), Z.ZPCI_PCI_ST_INVAL_AS)
        assert a.r1 == 0x5A5A5A5A5A5A5A5A  # the load value register is left alone
        status_in_r2(await g.pcistg(3, 0, 4, 9), req(3, 4), Z.ZPCI_PCI_ST_INVAL_AS)
        for pcias, off, n in ((4, 6, 4), (4, 0, 9), (4, 0, 0), (15, 2, 4), (15, 0, 3), (4, 0xFFC, 8)):
            exception(await g.pcilg(pcias, off, n), Zr.EXC_OPERAND)
            exception(await g.pcistg(pcias, off, n, 0), Zr.EXC_OPERAND)
        await _error_state(g)
        a = await g.pcilg(4, 0, 4)
        status_in_r2(a, req(4, 4), Z.ZPCI_PCI_ST_BLOCKED)
        assert a.r1 == 0x5A5A5A5A5A5A5A5A
        status_in_r2(await g.pcistg(4, 0, 4, 1), req(4, 4), Z.ZPCI_PCI_ST_BLOCKED)


async def _error_state(g):
    """Put the function in the error state the way a guest can: the memory
    function's DMA command (docs: BAR4 DMA_ADDR/DMA_LEN/DMA_CMD) with no
    translation registered."""
    import trio

    await g.client.region_write(4, 0x20, struct.pack("<QI", SDMA, 64))
    await g.client.region_write(4, 0x2C, struct.pack("<I", 1))
    while struct.unpack("<I", await g.client.region_read(4, 0x30, 4))[0] == 2:  # busy
        await trio.sleep(0.001)
    assert struct.unpack("<I", await g.client.region_read(4, 0x30, 4))[0] == 1  # the device saw it
    assert await g.state() == Zr.State.ERROR
    (kind, pec, ccdf), = await g.events()
    assert pec == Z.ZPCI_PEC_INVALID_AS and ccdf.faddr == SDMA


# ==================================================================== device DMA faults


FAULTS = ("not-in-shadow", "read-only", "outside-pba-pal", "no-translation", "hole-shadow",
          "hole-direct", "unmapped-after-rpcit")


@pytest.mark.parametrize("kind", FAULTS)
async def test_every_dma_fault_is_an_error_event_at_the_iova(sock_dir, access, kind):
    # The refresh bit on: a page is translated only after its RPCIT.
    async with guest(sock_dir, engine(tlb_refresh=True), access) as g:
        t = g.tables
        iova = SDMA + 0x40_0000
        hole_gpa = 0x20_0000  # the VMM will unmap [2 MiB, 3 MiB) of guest memory
        if kind == "no-translation":
            fail = iova
            pec = Z.ZPCI_PEC_INVALID_AS
        elif kind == "outside-pba-pal":
            assert (await g.register_ioat(pal=SDMA + (1 << 20) - 1)).cc == 0
            fail, pec = iova, Z.ZPCI_PEC_OUT_OF_RANGE
        elif kind in ("hole-direct",):
            assert (await g.register_ioat(pal=SDMA + GUEST_MEM - 1, iota=0)).cc == 0
            await g.punch_hole(hole_gpa, 1 << 20)
            iova = SDMA + hole_gpa
            fail, pec = iova, Z.ZPCI_PEC_ACCESS_PROTECTION
        else:
            assert (await g.register_ioat()).cc == 0
            t.map(iova, 0x10_0000, 1, writable=kind != "read-only")
            t.map(iova + PAGE, hole_gpa, 1)
            if kind == "hole-shadow":  # the tables point where the VMM never mapped memory
                await g.punch_hole(hole_gpa, 1 << 20)
            assert (await g.rpcit(iova, 2 * PAGE)).cc == 0
            fail, pec = iova, Z.ZPCI_PEC_TRANSLATION_PROTECTION
            if kind == "not-in-shadow":
                t.map(iova + 2 * PAGE, 0x11_0000, 1)  # mapped in the tables, no RPCIT yet
                iova = fail = iova + 2 * PAGE
            elif kind in ("hole-shadow", "unmapped-after-rpcit"):
                if kind == "unmapped-after-rpcit":
                    await g.punch_hole(hole_gpa, 1 << 20)
                iova = fail = iova + PAGE
                pec = Z.ZPCI_PEC_ACCESS_PROTECTION
        assert g.err_irqs() == 0
        err, fault_reg = await g.dma(D.OP_FILL, 0, iova, 64, 0x55)
        # the device sees its own error, with the IOVA it used
        assert err == D.ERR_FAULT and fault_reg == iova
        assert await g.state() == Zr.State.ERROR
        (kind_, pec_, ccdf), = await g.events()
        assert (kind_, pec_) == (Z.ZPCI_EVENT_ERROR, pec)
        assert ccdf.faddr == fail and ccdf.fh == await g.fh() and ccdf.fid == 0x21
        assert g.err_irqs() == 1
        # while in the error state more faults fail quietly (one event per error)
        assert (await g.dma(D.OP_FILL, 0, iova, 64))[0] == D.ERR_FAULT
        assert await g.events() == [] and g.err_irqs() == 0


LAZY_FAULTS = {  # refresh bit off: what the walk on a shadow miss finds
    "invalid-pte": Z.ZPCI_PEC_TRANSLATION_PROTECTION,
    "invalid-segment": Z.ZPCI_PEC_TRANSLATION_PROTECTION,
    "zero-segment-entry": Z.ZPCI_PEC_INVALID_TABLE_ENTRY,
    "segment-table-type": Z.ZPCI_PEC_TABLE_TYPE,
    "read-only": Z.ZPCI_PEC_TRANSLATION_PROTECTION,
    "invalidated": Z.ZPCI_PEC_TRANSLATION_PROTECTION,
    "hole": Z.ZPCI_PEC_ACCESS_PROTECTION,
}


@pytest.mark.parametrize("kind", LAZY_FAULTS)
async def test_dma_faults_without_refresh_bit(sock_dir, access, kind):
    async with guest(sock_dir, engine(), access) as g:
        t = g.tables
        assert (await g.register_ioat()).cc == 0
        iova = SDMA + 0x40_0000
        hole_gpa = 0x20_0000
        t.map(iova, 0x10_0000, 1, writable=kind != "read-only")  # no RPCIT: the refresh bit is off
        t.map(iova + PAGE, hole_gpa if kind == "hole" else 0x11_0000, 1)
        # the first page is read from the first access on
        assert (await g.dma(D.OP_CRC32C, iova, 0, 64))[0] == 0
        assert (await g.header())["shadow"] == 1
        fail = iova + PAGE
        if kind == "invalid-pte":
            t.unmap(iova + PAGE, 1)  # valid -> invalid (the guest's RPCIT would follow; not needed here)
        elif kind == "invalid-segment":
            fail = iova + (1 << 20)  # a segment the tables never mapped
        elif kind == "zero-segment-entry":
            fail = iova + (1 << 20)
            t.map(fail, 0x12_0000, 1)
            t.set_segment_entry(fail, 0)
        elif kind == "segment-table-type":
            fail = iova + (1 << 20)
            t.map(fail, 0x12_0000, 1)
            t.set_segment_entry(fail, t.segment_entry(fail) & ~0xC | 0x4)
        elif kind == "read-only":
            fail = iova
        elif kind == "invalidated":
            assert (await g.dma(D.OP_FILL, 0, fail, 64, 0x66))[0] == 0  # cached now
            t.unmap(fail, 1)
            nothing_written(await g.rpcit(fail, PAGE), 0)
        elif kind == "hole":
            await g.punch_hole(hole_gpa, 1 << 20)
        err, fault_reg = await g.dma(D.OP_FILL, 0, fail, 64, 0x55)
        assert err == D.ERR_FAULT and fault_reg == fail
        assert await g.state() == Zr.State.ERROR
        (kind_, pec_, ccdf), = await g.events()
        assert (kind_, pec_) == (Z.ZPCI_EVENT_ERROR, LAZY_FAULTS[kind])
        assert ccdf.faddr == fail and ccdf.fh == await g.fh()
        assert g.err_irqs() == 1
        # only valid translations are cached (the hole's page is one: its memory is missing)
        assert (await g.header())["shadow"] == (2 if kind == "hole" else 1)


async def test_vmm_translates_unmapped_iova_is_an_event(sock_dir, access):
    async with guest(sock_dir, engine(), access, mode=Zr.MODE_VMM) as g:
        assert (await g.dma(D.OP_FILL, 0, 0x1000, 64))[0] == 0  # keys are IOVAs: mapped
        err, fault = await g.dma(D.OP_FILL, 0, GUEST_MEM + 0x1000, 64)
        assert (err, fault) == (D.ERR_FAULT, GUEST_MEM + 0x1000)
        assert [(p, c.faddr) for _, p, c in await g.events()] == \
            [(Z.ZPCI_PEC_TRANSLATION_PROTECTION, GUEST_MEM + 0x1000)]
        assert await g.state() == Zr.State.ERROR


async def test_err_irq_only_for_a_vmm_that_consumes_events(sock_dir, access):
    async with guest(sock_dir, engine(), access, vmm_flags=0) as g:
        assert (await g.dma(D.OP_FILL, 0, SDMA, 8))[0] == D.ERR_FAULT
        # the event is in the ring, but a stock VMM is never sent the ERR IRQ
        assert [p for _, p, _ in await g.events()] == [Z.ZPCI_PEC_INVALID_AS]
        assert g.err_irqs() == 0
        await g.recover()
        await g.box.set_vmm(Zr.VMM_EVENTS)
        assert (await g.dma(D.OP_FILL, 0, SDMA, 8))[0] == D.ERR_FAULT
        assert g.err_irqs() == 1


# ==================================================================== FMB


async def test_fmb_updated_at_mui_and_at_registration(sock_dir, access, autojump_clock):
    import trio

    async with guest(sock_dir, engine(), access) as g:
        fmb = 0x7000
        assert (await g.register_ioat()).cc == 0
        g.tables.map(SDMA, 0x10_0000, 2)
        assert (await g.rpcit(SDMA, 2 * PAGE)).cc == 0
        nothing_written(await g.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, fib(fmb_addr=fmb)), 0)
        b0 = Z.Fmb.unpack(g.mem.read(fmb, 64))
        assert b0.samples == 0 and b0.rpcit_ops == 0 and b0.last_update and not b0.last_update & 1
        assert b0.format_indicators == Z.ZPCI_FMB_DMA_COUNTER_VALID
        assert (await g.rpcit(SDMA, 2 * PAGE)).cc == 0
        assert (await g.dma(D.OP_COPY, SDMA, SDMA + PAGE, 100))[0] == 0
        assert Z.Fmb.unpack(g.mem.read(fmb, 64)) == b0  # not after every operation
        mui = Z.ClpQueryPciFnGrpResponse.unpack(await g.box.read(Zr.CLP_QUERY_GRP, 64)).mui
        await trio.sleep(mui / 1000 + 0.5)
        b1 = Z.Fmb.unpack(g.mem.read(fmb, 64))
        assert (b1.samples, b1.rpcit_ops, b1.dma_rbytes, b1.dma_wbytes) == (1, 1, 100, 100)
        await trio.sleep(mui / 1000)
        assert Z.Fmb.unpack(g.mem.read(fmb, 64)).samples == 2
        # stopping measurement: no more updates
        assert (await g.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, fib(fmb_addr=0))).cc == 0
        g.mem.write(fmb, bytes(64))
        await trio.sleep(3 * mui / 1000)
        assert g.mem.read(fmb, 64) == bytes(64)


async def test_fmb_write_failure_stops_measurement(sock_dir, access, autojump_clock):
    import trio

    async with guest(sock_dir, engine(), access) as g:
        fmb = 0x30_0000
        assert (await g.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, fib(fmb_addr=fmb))).cc == 0
        await g.punch_hole(fmb & ~0xFFFFF, 1 << 20)
        mui = Z.ClpQueryPciFnGrpResponse.unpack(await g.box.read(Zr.CLP_QUERY_GRP, 64)).mui
        await trio.sleep(mui / 1000 + 0.5)
        assert [(p, c.faddr) for _, p, c in await g.events()] == [(Z.ZPCI_PEC_FMB_ADDR, fmb)]
        assert Z.Fib.unpack((await g.stpcifc()).res.fib).fmb_addr == 0


# ==================================================================== the no-mmap flow


async def test_no_mmap_flow_byte_by_byte(sock_dir):
    """The exact REGION_WRITE/REGION_READ sequence the doc gives for a VMM
    without the mmap, done by hand with the raw vfio-user client."""
    fn = memfn()
    async with guest(sock_dir, fn, "regio", enable=False) as g:
        c, idx = g.client, g.box.index

        async def intercept(cmd, r1=0, r2=0, r3=0, fib_bytes=b""):
            await c.region_write(idx, 0x1000, struct.pack("<I4xQQQ", cmd, r1, r2, r3) + fib_bytes,
                                 via_mmap=False)
            out = await c.region_read(idx, 0x1080, 0x68, via_mmap=False)
            result, cc, status, exc, wb, r1_out = struct.unpack_from("<IBBBBQ", out)
            return result, cc, status, exc, wb, r1_out, out[0x10:0x60], struct.unpack_from("<Q", out, 0x60)[0]

        # header: one read of the first 0x64 bytes
        hdr = await c.region_read(idx, 0, 0x64, via_mmap=False)
        fh = struct.unpack_from("<I", hdr, 0x24)[0]
        # CLP Set PCI Function (enable): request block, doorbell, result, response header, rest
        req = Z.ClpSetPciFnRequest(fh=fh, oc=Z.CLP_SET_ENABLE_PCI_FN, ndas=1).pack()
        await c.region_write(idx, 0x1100, req, via_mmap=False)
        await c.region_write(idx, 0x1000, struct.pack("<I", Zr.CMD_CLP), via_mmap=False)
        assert (await c.region_read(idx, 0x1080, 0x68, via_mmap=False))[:4] == bytes(4)
        head = await c.region_read(idx, 0x1200, 16, via_mmap=False)
        length, code = struct.unpack_from(">HH", head)
        assert (length, code) == (32, Z.CLP_RC_OK)
        rest = await c.region_read(idx, 0x1210, length - 16, via_mmap=False)
        fh = struct.unpack_from(">I", rest, 0)[0]
        assert fh & Z.FH_MASK_ENABLE
        # PCISTB: source bytes to 0x2000 first, then operands with the doorbell
        data = os.urandom(32)
        await c.region_write(idx, 0x2000, data, via_mmap=False)
        res = await intercept(Zr.CMD_PCISTB, (fh << 32) | (0 << 16) | 32, 0x8000, 0x40)
        assert res[:5] == (0, 0, 0, 0, 0) and bytes(fn.ram.mm[0x40:0x60]) == data
        # PCILG: value in r1_out, writeback bit 0
        res = await intercept(Zr.CMD_PCILG, 0, (fh << 32) | 8, 0x40)
        assert res[1] == 0 and res[4] == Zr.WB_R1 and res[5] == int.from_bytes(data[:8], "big")
        # PCISTG with a bad address space: status into r2_out, writeback bit 1
        res = await intercept(Zr.CMD_PCISTG, 7, (fh << 32) | (3 << 16) | 4, 0)
        assert res[1:3] == (1, Z.ZPCI_PCI_ST_INVAL_AS) and res[4] == Zr.WB_R2
        assert res[7] == (fh << 32) | (Z.ZPCI_PCI_ST_INVAL_AS << 24) | (3 << 16) | 4
        # MPCIFC: FIB right after the operands in the same write; STPCIFC: FIB from the result read
        f = fib(pba=SDMA, pal=SDMA + (1 << 20) - 1, iota=0x1000)
        res = await intercept(Zr.CMD_MPCIFC, (fh << 32) | Z.ZPCI_MOD_FC_REG_IOAT, fib_bytes=f)
        assert res[:5] == (0, 0, 0, 0, 0)
        res = await intercept(Zr.CMD_STPCIFC, fh << 32)
        assert Z.Fib.unpack(res[6]).iota == 0x1000
        # events: indexes, slot, new consumer index
        prod, cons = struct.unpack("<II", await c.region_read(idx, 0x3000, 8, via_mmap=False))
        assert prod == cons == 0
