"""zPCI core through the real path: reference client as the VMM, control region
mailbox, Linux-style translation tables in a memfd, dma-engine doing DMA."""

import os
import struct

import pytest

from protocol.zpci import formats as Z
from protocol.zpci import tables as T
from zpcid.vmm import client as vclient
from protocol.zpci import region as Zr
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.devices.memory import MemoryFunction
from zpcid.vfio_user.dma import DmaFault
from zpcid.vmm.guest import pte
from zpcid.vmm.zpci_client import ZpciMailbox
from helpers import serving
from zpci_env import GUEST_MEM, SDMA, props, zpci_env

PAGE = 4096


def engine(**kw):
    return D.DmaEngine("d0", zpci=props(**kw))


async def dma(env, op, src, dst, length, pattern=0):
    return await Driver(env.client).run(op, src, dst, length, pattern)


def ok(status):
    return status & D.STATUS_DONE and not status & D.STATUS_ERROR


# ---------------------------------------------------------------- CLP data


async def test_clp_blocks_describe_the_function(sock_dir):
    fn = engine(pfgid=0x21, pchid=0x0100, util_str="ZPCID TEST")
    async with zpci_env(sock_dir, fn, enable=False) as env:
        box = env.box
        entry = Z.ClpListEntry.unpack(box.clp_block("list"))
        assert (entry.vendor_id, entry.device_id) == (D.DEFAULT_VENDOR, D.DEFAULT_DEVICE)
        assert entry.fid == 0x10 and entry.configured and not entry.fh & Z.FH_MASK_ENABLE
        q = Z.ClpQueryPciFnResponse.unpack(box.clp_block("query"))
        assert (q.fid, q.uid, q.pfgid, q.pchid) == (0x10, 0x1234, 0x21, 0x0100)
        assert q.bar_size[0] == 12 and q.bar_size[2] == 14 and q.bar_size[1] == 0
        assert q.sdma == SDMA and q.edma == SDMA + GUEST_MEM - 1  # RTR: full aperture
        assert Z.from_ebcdic(q.util_str) == "ZPCID TEST" and q.flags & Z.CLP_FN_UTIL_STR
        g = Z.ClpQueryPciFnGrpResponse.unpack(box.clp_block("group"))
        assert g.flags & Z.CLP_FNGRP_RTR and not g.flags & Z.CLP_FNGRP_REFRESH  # compat 3: lazy
        assert g.maxstbl == 128 and g.dtsm == Z.ZPCI_DTSM_RTTO and g.noi == fn.msix.nvec
        # the same blocks come back through the CLP command
        req = Z.ClpQueryPciFnGrpRequest(pfgid=0x21).pack()
        assert await box.clp(req) == box.clp_block("group")
        bad = await box.clp(Z.ClpQueryPciFnGrpRequest(pfgid=0x22).pack())
        assert Z.ClpHeader.unpack(bad).code == Z.CLP_RC_QUERYPCIFG_PFGID


@pytest.mark.parametrize("compat,explicit,rtr", [(1, None, False), (2, None, True),
                                                 (1, True, True), (2, False, False)])
async def test_relaxed_translation_follows_compat(sock_dir, compat, explicit, rtr):
    fn = engine(compat=compat, relaxed_translation=explicit)
    async with zpci_env(sock_dir, fn, enable=False) as env:
        g = Z.ClpQueryPciFnGrpResponse.unpack(env.box.clp_block("group"))
        assert bool(g.flags & Z.CLP_FNGRP_RTR) is rtr
        assert bool(env.box.features & Zr.FEAT_RELAXED_TRANSLATION) is rtr
        q = Z.ClpQueryPciFnResponse.unpack(env.box.clp_block("query"))
        if not rtr:  # aperture limited to what the DMA limit can map
            assert q.edma == SDMA + 65535 * PAGE - 1


async def test_set_pci_function_enable_disable(sock_dir):
    async with zpci_env(sock_dir, engine(), enable=False) as env:
        box = env.box
        fh0 = box.fh
        rc, fh = await box.set_pci_fn(fh0, Z.CLP_SET_ENABLE_PCI_FN, ndas=0)
        assert rc == Z.CLP_RC_SETPCIFN_DMAAS
        rc, fh = await box.set_pci_fn(fh0 ^ 0x1, Z.CLP_SET_ENABLE_PCI_FN)
        assert rc == Z.CLP_RC_SETPCIFN_FH
        rc, fh = await box.set_pci_fn(fh0, Z.CLP_SET_ENABLE_PCI_FN)
        assert rc == Z.CLP_RC_OK and fh == fh0 | Z.FH_MASK_ENABLE and box.state == Zr.State.ENABLED
        rc, _ = await box.set_pci_fn(fh, Z.CLP_SET_ENABLE_PCI_FN)
        assert rc == Z.CLP_RC_SETPCIFN_FHOP
        assert Z.ClpListEntry.unpack(box.clp_block("list")).fh == fh
        rc, fh2 = await box.set_pci_fn(fh, Z.CLP_SET_DISABLE_PCI_FN)
        assert rc == Z.CLP_RC_OK and fh2 == fh0 and box.state == Zr.State.DISABLED


async def test_mode_is_fixed_once_memory_is_mapped(sock_dir):
    async with zpci_env(sock_dir, engine(), mode=Zr.MODE_VMM, enable=False) as env:
        # guest memory is already DMA-mapped: switching meaning of the keys is refused
        assert await env.box.set_mode(Zr.MODE_ZPCID) == Zr.MODE_VMM
        r = await env.box.rpcit(0, PAGE)
        assert r.result == Zr.RES_WRONG_MODE


# ---------------------------------------------------------------- MPCIFC / STPCIFC


async def test_register_ioat_checks_and_stpcifc(sock_dir):
    async with zpci_env(sock_dir, engine()) as env:
        box = env.box
        r = await box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA - PAGE, pal=SDMA + PAGE, iota=env.tables.iota))
        assert r.exception == Zr.EXC_OPERAND  # PBA below SDMA
        r = await box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA, pal=SDMA + PAGE, iota=env.tables.iota),
                             dmaas=1)
        assert (r.cc, r.status) == (1, Z.ZPCI_MOD_ST_DMAAS_INVAL)
        r = await box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA, pal=SDMA + PAGE,
                                                             iota=env.tables.root | 0x808))
        assert r.exception == Zr.EXC_OPERAND  # region-second not offered (dtsm)
        r = await env.register_ioat()
        assert (r.cc, r.exception) == (0, 0)
        r = await env.register_ioat()
        assert (r.cc, r.status) == (1, Z.ZPCI_MOD_ST_SEQUENCE)
        s = await box.stpcifc()
        fib = Z.Fib.unpack(s.fib)
        assert s.cc == 0 and fib.fc == Z.ZPCI_FIB_FC_ENABLED | Z.ZPCI_FIB_FC_DMAAS_REG
        assert (fib.pba, fib.pal, fib.iota) == (SDMA, SDMA + (32 << 20) - 1, env.tables.iota)
        r = await box.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT, env.fib())
        assert r.cc == 0
        r = await box.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT, env.fib())
        assert (r.cc, r.status) == (1, Z.ZPCI_MOD_ST_SEQUENCE)
        r = await box.mpcifc(11, env.fib())
        assert r.exception == Zr.EXC_OPERAND
        r = await box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(), fh=box.fh & ~Z.FH_MASK_ENABLE)
        assert r.cc == Z.ZPCI_PCI_LS_INVAL_HANDLE


async def test_disabled_function_answers_cc3(sock_dir):
    async with zpci_env(sock_dir, engine(), enable=False) as env:
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib())
        assert r.cc == 3
        s = await env.box.stpcifc()
        assert s.cc == 0 and Z.Fib.unpack(s.fib).fc == 0


# ---------------------------------------------------------------- RPCIT + DMA


async def test_rpcit_shadows_guest_tables_and_dma_follows(sock_dir):
    fn = engine(tlb_refresh=True)
    async with zpci_env(sock_dir, fn) as env:
        gt, mem = env.tables, env.mem
        assert (await env.register_ioat()).cc == 0
        src_gpa, dst_gpa = 0x10_0000, 0x20_0000
        iova_src, iova_dst = SDMA + 0x40_0000, SDMA + 0x80_0000
        gt.map(iova_src, src_gpa, 4)
        gt.map(iova_dst, dst_gpa, 4)
        payload = os.urandom(3 * PAGE + 100)
        mem.write(src_gpa, payload)
        # before RPCIT the IOVAs are not in the shadow: the first DMA faults
        st = await dma(env, D.OP_COPY, iova_src, iova_dst, len(payload))
        assert st & D.STATUS_ERROR and (st >> 8) & 0xFF == D.ERR_FAULT
        assert env.box.state == Zr.State.ERROR
        ev = env.box.events()
        assert [(k, p) for k, p, _ in ev] == [(Z.ZPCI_EVENT_ERROR, Z.ZPCI_PEC_TRANSLATION_PROTECTION)]
        ccdf = Z.ErrorCcdf.unpack(ev[0][2])
        assert ccdf.faddr == iova_src and ccdf.fid == 0x10 and ccdf.fh == env.box.fh
        assert vclient.read_eventfd(env.err_fd) == 1
        # RPCIT while in error: cc 1 status 40; recover like Linux does
        r = await env.box.rpcit(iova_src, 4 * PAGE)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_FUNC_NOT_AVAIL)
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK, env.fib())).cc == 0
        assert env.box.state == Zr.State.BLOCKED
        assert Z.Fib.unpack((await env.box.stpcifc()).fib).fc & Z.ZPCI_FIB_FC_ERROR
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, env.fib())).cc == 0
        assert env.box.state == Zr.State.ENABLED
        for iova in (iova_src, iova_dst):
            r = await env.box.rpcit(iova, 4 * PAGE)
            assert (r.cc, r.status) == (0, 0)
        assert fn.zpci.shadow.mapped == 8
        assert ok(await dma(env, D.OP_COPY, iova_src, iova_dst, len(payload)))
        assert mem.read(dst_gpa, len(payload)) == payload
        # CRC and fill through the same translation
        # (the CRC of data followed by its own CRC is CRC-32C's fixed residue)
        assert ok(await dma(env, D.OP_CRC32C, iova_dst, 0, len(payload)))
        crc = await env.client.region_read(0, D.REG_RESULT, 4)
        assert ok(await dma(env, D.OP_COPY, iova_dst, iova_src, len(payload)))
        mem.write(src_gpa + len(payload), crc)
        assert ok(await dma(env, D.OP_CRC32C, iova_src, 0, len(payload) + 4))
        assert struct.unpack("<I", await env.client.region_read(0, D.REG_RESULT, 4))[0] == 0x48674BC7
        assert ok(await dma(env, D.OP_FILL, 0, iova_dst, 2 * PAGE, 0x1122334455667788))
        assert mem.read(dst_gpa, 16) == bytes.fromhex("8877665544332211") * 2
        # the guest unmaps a page and refreshes: DMA to it faults again
        gt.unmap(iova_dst + PAGE, 1)
        r = await env.box.rpcit(iova_dst + PAGE, PAGE)
        assert r.cc == 0 and fn.zpci.shadow.mapped == 7
        st = await dma(env, D.OP_FILL, 0, iova_dst, 2 * PAGE)
        assert st & D.STATUS_ERROR
        assert struct.unpack("<Q", await env.client.region_read(0, D.REG_FAULT_ADDR, 8))[0] == iova_dst
        assert env.box.state == Zr.State.ERROR


async def test_read_only_mapping_protects(sock_dir):
    fn = engine()
    async with zpci_env(sock_dir, fn) as env:
        assert (await env.register_ioat()).cc == 0
        iova = SDMA + 0x10_0000
        env.tables.map(iova, 0x30_0000, 1, writable=False)
        env.tables.map(iova + PAGE, 0x31_0000, 1)
        assert (await env.box.rpcit(iova, 2 * PAGE)).cc == 0
        assert ok(await dma(env, D.OP_COPY, iova, iova + PAGE, 64))  # read from RO is fine
        st = await dma(env, D.OP_COPY, iova + PAGE, iova, 64)
        assert st & D.STATUS_ERROR
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_TRANSLATION_PROTECTION]


async def test_walk_errors_put_function_in_error_state(sock_dir):
    async with zpci_env(sock_dir, engine(tlb_refresh=True)) as env:
        assert (await env.register_ioat()).cc == 0
        iova = SDMA + 0x20_0000
        env.tables.map(iova, 0x40_0000, 2)
        env.tables.set_segment_entry(iova, 0)  # a zero entry is an error, not "invalid"
        r = await env.box.rpcit(iova, 2 * PAGE)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert (r.r1 >> 24) & 0xFF == Z.ZPCI_PCI_ST_FUNC_IN_ERR
        assert env.box.state == Zr.State.ERROR
        (kind, pec, ccdf), = env.box.events()
        assert pec == Z.ZPCI_PEC_INVALID_TABLE_ENTRY and Z.ErrorCcdf.unpack(ccdf).faddr == iova


async def test_rpcit_outside_aperture_and_without_iota(sock_dir):
    async with zpci_env(sock_dir, engine()) as env:
        r = await env.box.rpcit(SDMA, PAGE)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_INVALID_AS]
        await env.box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, env.fib())
        assert (await env.register_ioat(pal=SDMA + (1 << 20) - 1)).cc == 0
        r = await env.box.rpcit(SDMA + (2 << 20), PAGE)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_OUT_OF_RANGE]


async def test_dma_limit_insufficient_resources_then_global_refresh(sock_dir):
    fn = engine(dma_limit=16, tlb_refresh=True)
    async with zpci_env(sock_dir, fn) as env:
        gt = env.tables
        assert (await env.register_ioat(pal=SDMA + 16 * PAGE * 4 - 1)).cc == 0
        gt.map(SDMA, 0x10_0000, 12)
        assert (await env.box.rpcit(SDMA, 12 * PAGE)).cc == 0
        gt.map(SDMA + 12 * PAGE, 0x20_0000, 8)
        r = await env.box.rpcit(SDMA + 12 * PAGE, 8 * PAGE)
        assert (r.cc, r.status) == (1, Z.ZPCI_RPCIT_ST_INSUFF_RES)
        assert fn.zpci.shadow.mapped == 16 and env.box.state == Zr.State.ENABLED
        # Linux invalidated some pages lazily; its answer to status 16 is a global refresh
        gt.unmap(SDMA, 8)
        r = await env.box.rpcit(SDMA, 64 * PAGE)
        assert (r.cc, r.status) == (0, 0)
        assert fn.zpci.shadow.mapped == 12
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 19 * PAGE, PAGE, 7))


# ---------------------------------------------------------------- lazy translation (refresh bit off)


def shadowed(env) -> int:
    return env.box.u32(Zr.HDR_SHADOW)


async def test_lazy_translation_dma_without_rpcit_then_invalidate(sock_dir):
    fn = engine()  # compat 3: the group's refresh bit is off
    async with zpci_env(sock_dir, fn) as env:
        gt, mem, box = env.tables, env.mem, env.box
        assert not Z.ClpQueryPciFnGrpResponse.unpack(box.clp_block("group")).flags & Z.CLP_FNGRP_REFRESH
        assert (await env.register_ioat()).cc == 0
        src_gpa, dst_gpa = 0x10_0000, 0x20_0000
        iova_src, iova_dst = SDMA + 0x40_0000, SDMA + 0x80_0000
        gt.map(iova_src, src_gpa, 4, writable=False)
        gt.map(iova_dst, dst_gpa, 4)
        payload = os.urandom(3 * PAGE + 100)
        mem.write(src_gpa, payload)
        # no RPCIT: the first DMA walks the tables and caches what it used
        assert ok(await dma(env, D.OP_COPY, iova_src, iova_dst, len(payload)))
        assert mem.read(dst_gpa, len(payload)) == payload
        assert shadowed(env) == 8 and box.state == Zr.State.ENABLED
        assert [(m["iova"], m["size"], m["gpa"], m["writable"]) for m in fn.zpci_mappings()] == \
            [(iova_src, 4 * PAGE, src_gpa, False), (iova_dst, 4 * PAGE, dst_gpa, True)]
        assert fn.counters.rpcit_calls == 0 and fn.counters.shadow_fills == 2
        # cached: the same DMA again walks nothing
        assert ok(await dma(env, D.OP_CRC32C, iova_dst, 0, len(payload)))
        assert fn.counters.shadow_fills == 2
        # the guest invalidates a page and refreshes it: DMA there faults, architected event
        gt.unmap(iova_dst + PAGE, 1)
        r = await box.rpcit(iova_dst + PAGE, PAGE)
        assert (r.cc, r.status) == (0, 0) and shadowed(env) == 7
        st = await dma(env, D.OP_FILL, 0, iova_dst, 2 * PAGE, 0x0101010101010101)
        assert st & D.STATUS_ERROR and (st >> 8) & 0xFF == D.ERR_FAULT
        fault = struct.unpack("<Q", await env.client.region_read(0, D.REG_FAULT_ADDR, 8))[0]
        assert fault == iova_dst and box.state == Zr.State.ERROR  # the device names its access
        (kind, pec, ccdf), = box.events()
        assert (kind, pec) == (Z.ZPCI_EVENT_ERROR, Z.ZPCI_PEC_TRANSLATION_PROTECTION)
        assert Z.ErrorCcdf.unpack(ccdf).faddr == iova_dst + PAGE
        assert vclient.read_eventfd(env.err_fd) == 1
        assert shadowed(env) == 7  # nothing invalid was cached
        # recovery, then the guest maps the page again elsewhere, still no RPCIT
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK, env.fib())).cc == 0
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, env.fib())).cc == 0
        gt.map(iova_dst + PAGE, 0x30_0000, 1)
        assert ok(await dma(env, D.OP_FILL, 0, iova_dst, 2 * PAGE, 0x0202020202020202))
        assert mem.read(0x30_0000, PAGE) == b"\2" * PAGE and mem.read(dst_gpa, PAGE) == b"\2" * PAGE
        assert mem.read(dst_gpa + PAGE, 8) != b"\2" * 8
        # Linux's flush queue refreshes the whole aperture: the shadow forgets, DMA refills it
        r = await box.rpcit(SDMA, 32 << 20)
        assert (r.cc, r.status) == (0, 0) and shadowed(env) == 0
        assert ok(await dma(env, D.OP_COPY, iova_src, iova_dst, PAGE))
        assert shadowed(env) == 2


async def test_lazy_translation_forgets_what_the_error_state_kept_from_rpcit(sock_dir):
    """RPCIT is refused in the error state (Linux ignores a refused flush and
    reuses the IOVAs): once the error state ends, no cached translation from
    before it may be used."""
    fn = engine()
    async with zpci_env(sock_dir, fn) as env:
        gt, mem, box = env.tables, env.mem, env.box
        assert (await env.register_ioat()).cc == 0
        old_gpa, new_gpa, dst_gpa = 0x10_0000, 0x30_0000, 0x20_0000
        iova_src, iova_dst = SDMA + 0x40_0000, SDMA + 0x80_0000
        gt.map(iova_src, old_gpa, 1, writable=False)
        gt.map(iova_dst, dst_gpa, 1)
        mem.write(old_gpa, b"\x11" * PAGE)
        mem.write(new_gpa, b"\x22" * PAGE)
        assert ok(await dma(env, D.OP_COPY, iova_src, iova_dst, PAGE))
        assert mem.read(dst_gpa, PAGE) == b"\x11" * PAGE and shadowed(env) == 2
        # a DMA fault puts the function into the error state
        st = await dma(env, D.OP_FILL, 0, iova_dst + 8 * PAGE, PAGE, 0)
        assert st & D.STATUS_ERROR and box.state == Zr.State.ERROR
        # meanwhile the guest moves the IOVA to another page; its RPCIT is refused
        gt.unmap(iova_src, 1)
        gt.map(iova_src, new_gpa, 1, writable=False)
        r = await box.rpcit(iova_src, PAGE)
        assert r.cc == 1 and r.status == Z.ZPCI_PCI_ST_FUNC_NOT_AVAIL
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK, env.fib())).cc == 0
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, env.fib())).cc == 0
        assert shadowed(env) == 0
        assert ok(await dma(env, D.OP_COPY, iova_src, iova_dst, PAGE))
        assert mem.read(dst_gpa, PAGE) == b"\x22" * PAGE


async def test_lazy_translation_dma_limit_bounds_the_cache_never_the_dma(sock_dir):
    fn = engine(dma_limit=4)
    async with zpci_env(sock_dir, fn) as env:
        gt, mem = env.tables, env.mem
        assert (await env.register_ioat(pal=SDMA + 4 * PAGE * 64 - 1)).cc == 0
        gt.map(SDMA, 0x10_0000, 32)
        assert ok(await dma(env, D.OP_FILL, 0, SDMA, 3 * PAGE, 0x0303030303030303))
        assert shadowed(env) == 3 and env.box.u32(Zr.HDR_DMA_AVAIL) == 1
        # three more pages do not fit: the cache is flushed and refilled
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 8 * PAGE, 3 * PAGE, 0x0404040404040404))
        assert shadowed(env) == 3
        assert [m["iova"] for m in fn.zpci_mappings()] == [SDMA + 8 * PAGE]
        # an access bigger than the whole limit is translated without caching
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 16 * PAGE, 12 * PAGE, 0x0505050505050505))
        assert mem.read(0x10_0000 + 16 * PAGE, 12 * PAGE) == b"\5" * 12 * PAGE
        assert mem.read(0x10_0000, 3 * PAGE) == b"\3" * 3 * PAGE
        assert shadowed(env) == 3 and env.box.state == Zr.State.ENABLED and env.box.events() == []
        # RPCIT never answers insufficient resources without the refresh bit
        r = await env.box.rpcit(SDMA, 32 * PAGE)
        assert (r.cc, r.status) == (0, 0) and shadowed(env) == 0


async def test_direct_mapping_under_relaxed_translation(sock_dir):
    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT,
                                 env.fib(pba=SDMA, pal=SDMA + GUEST_MEM - 1, iota=0))
        assert (r.cc, r.exception) == (0, 0)
        assert fn.zpci.direct and fn.zpci.shadow.mapped == 0
        payload = os.urandom(5 * PAGE)
        env.mem.write(0x30_0000, payload)
        assert ok(await dma(env, D.OP_COPY, SDMA + 0x30_0000, SDMA + 0x50_0000, len(payload)))
        assert env.mem.read(0x50_0000, len(payload)) == payload
        # Like QEMU: the IOTA Linux registers for an identity domain is 0, and an
        # RPCIT against it is the "no IOTA" error; direct mapping itself goes on.
        r = await env.box.rpcit(SDMA, PAGE)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_FUNC_IN_ERR)
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_INVALID_AS]
        await env.box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, env.fib())
        assert fn.zpci.direct
        # beyond the registered range: out of range
        st = await dma(env, D.OP_FILL, 0, SDMA + GUEST_MEM, 8)
        assert st & D.STATUS_ERROR
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_OUT_OF_RANGE]
        await env.box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, env.fib())
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_DEREG_IOAT, env.fib())).cc == 0
        assert not fn.zpci.direct
        # no translation registered: the DMA fails and is an error event (ABI 1.1)
        st = await dma(env, D.OP_FILL, 0, SDMA + 0x50_0000, 8)
        assert st & D.STATUS_ERROR and fn.zpci.state == Zr.State.ERROR
        (kind, pec, ccdf), = env.box.events()
        assert pec == Z.ZPCI_PEC_INVALID_AS and Z.ErrorCcdf.unpack(ccdf).faddr == SDMA + 0x50_0000


async def test_direct_map_resolves_a_request_in_one_pass(sock_dir):
    """A device model's scatter-gather list under a direct map: every piece is the
    guest memory at IOVA - SDMA, counted as DMA, and a piece outside the aperture
    is the same out-of-range error at that piece's IOVA as a single access."""
    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT,
                                 env.fib(pba=SDMA, pal=SDMA + GUEST_MEM - 1, iota=0))
        assert (r.cc, r.exception) == (0, 0)
        path = fn.zpci.dma_path
        gpas = [(0x30_0000, PAGE), (0x12_3008, 100), (0x30_1000, 2 * PAGE), (0x40_0000, 0),
                (GUEST_MEM - PAGE, PAGE)]
        payload = os.urandom(sum(n for _, n in gpas))
        pos = 0
        for gpa, n in gpas:
            env.mem.write(gpa, payload[pos:pos + n])
            pos += n
        before = fn.counters.dma_bytes_read
        views = path.views_many([(SDMA + gpa, n) for gpa, n in gpas], False)
        assert b"".join(bytes(v) for v in views) == payload
        assert fn.counters.dma_bytes_read - before == len(payload)
        # written through the views: the guest sees it at the guest addresses
        views = path.views_many([(SDMA + 0x50_0000, PAGE), (SDMA + 0x20_0010, 16)], True)
        views[0][:] = b"\7" * PAGE
        views[1][:] = b"\x55" * 16
        assert env.mem.read(0x50_0000, PAGE) == b"\7" * PAGE and env.mem.read(0x20_0010, 16) == b"\x55" * 16
        assert env.box.events() == []
        # the last piece runs past guest memory: the request fails at that piece
        bad = SDMA + GUEST_MEM - PAGE
        with pytest.raises(DmaFault):
            path.views_many([(SDMA + 0x30_0000, PAGE), (bad, 2 * PAGE)], False)
        (kind, pec, ccdf), = env.box.events()
        assert pec == Z.ZPCI_PEC_OUT_OF_RANGE and Z.ErrorCcdf.unpack(ccdf).faddr == bad
        assert fn.zpci.state == Zr.State.ERROR


async def test_no_translation_refused_without_rtr(sock_dir):
    async with zpci_env(sock_dir, engine(compat=1), tables=False) as env:
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA, pal=SDMA + (1 << 20) - 1, iota=0))
        assert r.exception == Zr.EXC_OPERAND and not env.function.zpci.ioat


# ---------------------------------------------------------------- adapter interrupts


async def test_adapter_interrupt_sets_indicator_bits(sock_dir):
    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        aibv, aisb = 0x5000, 0x6000
        iw = dict(isc=2, noi=4, aibvo=3, sum=1, aisbo=9)
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_INT, env.fib(aibv=aibv, aisb=aisb, **iw))
        assert r.cc == 0
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_INT, env.fib(aibv=aibv, aisb=aisb, **iw))
        assert (r.cc, r.status) == (1, Z.ZPCI_MOD_ST_SEQUENCE)
        env.mem.write(aibv, b"\x01")  # another vector's bit, must survive
        await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA, pal=SDMA + GUEST_MEM - 1, iota=0))
        await env.client.region_write(0, D.REG_VECTOR, struct.pack("<I", 2))
        await env.client.region_write(0, D.REG_CTRL, struct.pack("<I", D.CTRL_IRQ))
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 0x10000, 64))
        # bit AIBVO + 2 = 5 -> byte 0, mask 0x80 >> 5
        assert env.mem.read(aibv, 1)[0] == 0x01 | (0x80 >> 5)
        assert env.mem.read(aisb + 1, 1)[0] == 0x80 >> 1  # summary bit 9
        assert vclient.read_eventfd(env.eventfds[2]) == 1
        # summary bit still set: the guest will scan, no second interrupt needed
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 0x10000, 64))
        assert vclient.read_eventfd(env.eventfds[2]) == 0
        env.mem.write(aisb + 1, b"\0")  # guest handled it
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 0x10000, 64))
        assert vclient.read_eventfd(env.eventfds[2]) == 1
        s = Z.Fib.unpack((await env.box.stpcifc()).fib)
        assert (s.isc, s.noi, s.aibvo, s.sum, s.aisbo, s.aibv, s.aisb) == (2, 4, 3, 1, 9, aibv, aisb)
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_DEREG_INT, env.fib())).cc == 0
        env.mem.write(aisb + 1, b"\0")
        env.mem.write(aibv, b"\0")
        assert ok(await dma(env, D.OP_FILL, 0, SDMA + 0x10000, 64))
        assert env.mem.read(aibv, 1) == b"\0"  # deregistered: plain MSI-X
        assert vclient.read_eventfd(env.eventfds[2]) == 1


async def test_adapter_interrupt_indicators_must_be_mapped(sock_dir):
    async with zpci_env(sock_dir, engine(), tables=False) as env:
        r = await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_INT,
                                 env.fib(aibv=GUEST_MEM + PAGE, aisb=0x6000, isc=2, noi=1, sum=1))
        assert (r.cc, r.status) == (1, Z.ZPCI_MOD_ST_RES_NOT_AVAIL)


# ---------------------------------------------------------------- PCISTB / PCILG / PCISTG


async def test_pcistb_rules(sock_dir):
    fn = MemoryFunction("m0", zpci=props())
    writes = []
    orig = fn.ram.write

    async def spy(offset, data):  # observe the access size the BAR sees
        writes.append((offset, len(data)))
        await orig(offset, data)

    fn.ram.write = spy
    async with zpci_env(sock_dir, fn, tables=False) as env:
        box = env.box
        block = os.urandom(128)
        r = await box.pcistb(0, 0x100, block, gaddr=0x8000)
        assert (r.cc, r.exception) == (0, 0)
        assert writes == [(0x100, 128)] and fn.ram.mm[0x100:0x180] == block
        assert (await box.pcistb(0, 0x100, os.urandom(136))).exception == Zr.EXC_SPECIFICATION  # > maxstbl
        assert (await box.pcistb(0, 0x104, block)).exception == Zr.EXC_SPECIFICATION  # unaligned offset
        assert (await box.pcistb(0, 0x100, block[:12])).exception == Zr.EXC_SPECIFICATION  # not *8
        assert (await box.pcistb(0, 0x100, block[:8])).exception == Zr.EXC_SPECIFICATION  # <= 8
        assert (await box.pcistb(0, 0xFC0, block)).exception == Zr.EXC_SPECIFICATION  # crosses 4K
        assert (await box.pcistb(0, 0x100, block, gaddr=0x8004)).exception == Zr.EXC_SPECIFICATION
        r = await box.pcistb(1, 0x100, block)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_INVAL_AS)
        r = await box.pcistb(0, 0x100, block, fh=box.fh & ~Z.FH_MASK_ENABLE)
        assert r.cc == 3


async def test_pcistb_relaxed_alignment(sock_dir):
    fn = MemoryFunction("m0", zpci=props(relaxed_alignment=True))
    async with zpci_env(sock_dir, fn, tables=False) as env:
        g = Z.ClpQueryPciFnGrpResponse.unpack(env.box.clp_block("group"))
        assert g.flags & Z.CLP_FNGRP_RELAXED_ALIGNMENT
        data = os.urandom(13)
        r = await env.box.pcistb(0, 0x203, data, gaddr=0x8001)
        assert (r.cc, r.exception) == (0, 0) and fn.ram.mm[0x203:0x210] == data
        # the 4 KiB rule stays
        assert (await env.box.pcistb(0, 0xFFB, data)).exception == Zr.EXC_SPECIFICATION


async def test_pcilg_pcistg_storage_order(sock_dir):
    fn = MemoryFunction("m0", zpci=props())
    async with zpci_env(sock_dir, fn, tables=False) as env:
        box = env.box
        r = await box.pcilg(15, 0, 2)  # vendor ID from config space
        assert r.cc == 0 and r.r1 == int.from_bytes((0x1014).to_bytes(2, "little"), "big")
        r = await box.pcistg(4, 0x08, 4, 0x11223344)  # SCRATCH register in BAR4
        assert r.cc == 0
        assert bytes(fn.regs[0x08:0x0C]) == bytes.fromhex("11223344")
        r = await box.pcilg(4, 0x08, 4)
        assert r.r1 == 0x11223344
        assert (await box.pcilg(4, 0x06, 4)).exception == Zr.EXC_OPERAND  # crosses a doubleword
        assert (await box.pcilg(15, 2, 4)).exception == Zr.EXC_OPERAND  # crosses a word
        fn.inject_error(Z.ZPCI_PEC_SYSTEM_ERROR)
        r = await box.pcilg(4, 0, 4)
        assert (r.cc, r.status) == (1, Z.ZPCI_PCI_ST_BLOCKED)


# ---------------------------------------------------------------- FMB, lifecycle


async def test_fmb_counts_refreshes_and_dma(sock_dir, autojump_clock):
    import trio

    fn = engine()
    async with zpci_env(sock_dir, fn) as env:
        fmb = 0x7000
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, env.fib(fmb_addr=fmb + 8))).cc == 1
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_FMB_PROTECTION]
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, env.fib(fmb_addr=fmb))).cc == 0
        assert (await env.register_ioat()).cc == 0
        env.tables.map(SDMA, 0x10_0000, 2)
        for _ in range(3):
            assert (await env.box.rpcit(SDMA, 2 * PAGE)).cc == 0
        assert ok(await dma(env, D.OP_COPY, SDMA, SDMA + PAGE, 1000))
        # written at registration, then every MUI (not after each operation)
        assert Z.Fmb.unpack(env.mem.read(fmb, 64)).rpcit_ops == 0
        mui = Z.ClpQueryPciFnGrpResponse.unpack(env.box.clp_block("group")).mui
        await trio.sleep(mui / 1000 + 0.5)  # mock clock: one MUI tick
        block = Z.Fmb.unpack(env.mem.read(fmb, 64))
        assert block.rpcit_ops == 3 and block.dma_rbytes == 1000 and block.dma_wbytes == 1000
        assert block.samples == 1 and not block.last_update & 1


async def test_detach_resets_zpci_state(sock_dir):
    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA, pal=SDMA + GUEST_MEM - 1, iota=0))
        path = env.server.path
        assert fn.zpci.state == Zr.State.ENABLED
    assert fn.zpci.state == Zr.State.DISABLED and not fn.zpci.ioat and fn.zpci.mode == Zr.MODE_VMM


async def test_device_reset_disables_function(sock_dir):
    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT, env.fib(pba=SDMA, pal=SDMA + GUEST_MEM - 1, iota=0))
        await env.client.reset()
        assert env.box.state == Zr.State.DISABLED and not env.box.fh & Z.FH_MASK_ENABLE
        assert not fn.zpci.ioat and fn.zpci.mode == Zr.MODE_ZPCID  # mode survives a guest reset


async def test_vmm_translates_mode_dma_goes_straight(sock_dir):
    fn = engine()
    async with zpci_env(sock_dir, fn, mode=Zr.MODE_VMM, tables=False) as env:
        env.mem.write(0x1000, b"abc" * 100)
        assert ok(await dma(env, D.OP_COPY, 0x1000, 0x9000, 300))
        assert env.mem.read(0x9000, 300) == b"abc" * 100


async def test_garbage_mailbox_commands_do_not_hurt(sock_dir):
    async with zpci_env(sock_dir, engine()) as env:
        r = await env.box.command(99)
        assert r.result == Zr.RES_BAD_COMMAND
        junk = await env.box.clp(os.urandom(32))
        assert Z.ClpHeader.unpack(junk[:16]).code != Z.CLP_RC_OK or len(junk) >= 16
        # header fields zpcid owns cannot be overwritten through REGION_WRITE
        await env.client.region_write(env.box.index, Zr.HDR_STATE, b"\xff" * 8, via_mmap=False)
        assert env.box.state == Zr.State.ENABLED
        assert (await env.register_ioat()).cc == 0


async def test_release_request_queues_availability_event(sock_dir):
    import trio

    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        req = await env.client.enable_irq_eventfds(4, 1)  # REQ
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.server.request_release, 0.2)
                await vclient.wait_eventfd(req[0])
                (kind, pec, ccdf), = env.box.events()
                assert (kind, pec) == (Z.ZPCI_EVENT_AVAILABILITY, Z.ZPCI_PEC_AVAIL_DECONFIG_REQUESTED)
                assert Z.AvailabilityCcdf.unpack(ccdf).fid == 0x10
                assert vclient.read_eventfd(env.err_fd) == 1
        finally:
            os.close(req[0])
    # the VMM did not let go: the release was forced and the function reset
    assert not env.server.attached and fn.zpci.state == Zr.State.DISABLED


async def test_stock_vmm_gets_no_err_irq_for_errors_or_removal(sock_dir):
    """A VMM that never set VMM_EVENTS (stock QEMU stops the VM on the ERR IRQ):
    events still go into the ring, removal is asked through the REQ IRQ only."""
    import trio

    fn = engine()
    async with zpci_env(sock_dir, fn, tables=False, vmm_flags=0) as env:
        fn.inject_error(Z.ZPCI_PEC_SYSTEM_ERROR)
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_SYSTEM_ERROR]
        assert vclient.read_eventfd(env.err_fd) == 0
        req = await env.client.enable_irq_eventfds(4, 1)  # REQ
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(env.server.request_release, 0.2)
                await vclient.wait_eventfd(req[0])
                assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_AVAIL_DECONFIG_REQUESTED]
                assert vclient.read_eventfd(env.err_fd) == 0
        finally:
            os.close(req[0])


async def test_dma_path_views_follow_the_shadow_and_fault_at_the_iova(sock_dir):
    """Views (what virtio-blk does I/O into) go through the same translation."""
    fn = engine()
    async with zpci_env(sock_dir, fn) as env:
        assert (await env.register_ioat()).cc == 0
        iova = SDMA + 0x10_0000
        env.tables.map(iova, 0x30_0000, 1)
        env.tables.map(iova + PAGE, 0x50_0000, 1)
        assert (await env.box.rpcit(iova, 2 * PAGE)).cc == 0
        views = fn.dma_path.views(iova + PAGE - 8, 16, True)
        assert [len(v) for v in views] == [8, 8]
        views[0][:] = b"A" * 8
        views[1][:] = b"B" * 8
        assert env.mem.read(0x30_0000 + PAGE - 8, 8) == b"A" * 8 and env.mem.read(0x50_0000, 8) == b"B" * 8
        with pytest.raises(DmaFault) as e:
            fn.dma_path.views(iova + 2 * PAGE, 8, False)
        assert e.value.addr == iova + 2 * PAGE and env.box.state == Zr.State.ERROR
        assert [p for _, p, _ in env.box.events()] == [Z.ZPCI_PEC_TRANSLATION_PROTECTION]


# ---------------------------------------------------------------- error state: DMA held back


async def test_error_state_holds_virtio_dma_back_until_it_ends(sock_dir):
    """A virtio device's DMA waits out the error state instead of failing (the
    guest memory stays untouched meanwhile); clear-error, or a disable, ends the wait."""
    import structlog
    import trio
    import trio.testing

    from zpcid.devices.virtio.queue import GuardedDma, Service

    fn = engine()
    async with zpci_env(sock_dir, fn) as env:
        assert (await env.register_ioat()).cc == 0
        iova = SDMA + 0x10_0000
        env.tables.map(iova, 0x30_0000, 1)
        assert (await env.box.rpcit(iova, PAGE)).cc == 0
        env.mem.write(0x30_0000, b"before")
        dma = GuardedDma(fn, Service("t", structlog.get_logger()))
        assert not fn.dma_path.blocked
        with pytest.raises(ValueError, match="not in the error state"):
            fn.clear_error()

        fn.inject_error(Z.ZPCI_PEC_SYSTEM_ERROR)
        assert fn.dma_path.blocked and dma.views([(iova, 6)], True) is None
        got = []
        async with trio.open_nursery() as nursery:
            async def read():
                got.append(await dma.read(iova, 6))

            async def write():
                await dma.write(iova + 8, b"during")

            nursery.start_soon(read)
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert got == [] and env.mem.read(0x30_0000 + 8, 6) == bytes(6)  # held, not failed
            with pytest.raises(DmaFault):  # the path itself still refuses
                await fn.dma_path.read(iova, 6)
            assert fn.clear_error() == {"state": "ENABLED"}
        assert got == [b"before"] and env.mem.read(0x30_0000 + 8, 6) == b"during"
        assert env.box.state == Zr.State.ENABLED

        # A function disabled while in the error state: the held access fails then.
        fn.inject_error(Z.ZPCI_PEC_SYSTEM_ERROR)
        failed = []
        async with trio.open_nursery() as nursery:
            async def held():
                try:
                    await dma.read(iova, 6)
                except DmaFault as exc:
                    failed.append(exc)

            nursery.start_soon(held)
            await trio.testing.wait_all_tasks_blocked()
            assert failed == []
            assert (await env.box.set_pci_fn(env.box.fh, Z.CLP_SET_DISABLE_PCI_FN))[0] == Z.CLP_RC_OK
        assert len(failed) == 1 and env.box.state == Zr.State.DISABLED
