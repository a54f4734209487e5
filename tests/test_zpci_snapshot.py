"""zPCI layer snapshots: snapshot -> restore into a fresh object -> identical
snapshot and identical behaviour (shadow IOTLB on its own with hypothesis;
the whole zPCI function — state, registrations, shadow, direct map, FMB,
event ring, adapter interrupts — through a real socket and a real guest)."""

import os
import struct

import attrs
import pytest
import trio
from hypothesis import given, settings, strategies as st

from protocol.zpci import formats as Z
from protocol.zpci import region as Zr
from zpcid import snapshot as S
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.vmm import client as vclient
from zpcid.vmm.zpci_client import ZpciMailbox
from zpcid.zpci.iommu import ShadowIotlb, TranslationError
from zpcid.zpci.iommu.shadow import SH_VALID, SH_WRITE
from helpers import serving
from zpci_env import GUEST_MEM, SDMA, props, zpci_env

PAGE = 4096


def through_bytes(snap):
    """What a hand-over does: JSON bytes plus duplicated fds, decoded again."""
    blob, fds = S.dumps(S.dup_fds(snap))
    return S.loads(blob, fds)


# ----------------------------------------------------------------- shadow IOTLB
spans = st.lists(st.tuples(st.integers(0, 4095),  # first page (16 MiB of IOVA space)
                           st.lists(st.integers(0, 3), min_size=1, max_size=40)),  # 0 unmap, 1 ro, 2-3 rw
                 max_size=12)


def shadow_from(ops, limit):
    sh = ShadowIotlb(limit)
    sh.pba, sh.pal = 0x10000, (1 << 24) - 1
    for first, kinds in ops:
        new = [0 if k == 0 else ((first + i) * 0x3000 % (1 << 30)) & ~0xFFF | SH_VALID | (SH_WRITE if k > 1 else 0)
               for i, k in enumerate(kinds)]
        sh.apply_pages(first * PAGE, new)
    return sh


def behaviour(sh, probes):
    out = []
    for iova, n, write in probes:
        try:
            out.append(sh.translate(iova, n, write))
        except TranslationError as exc:
            out.append((exc.pec, exc.iova))
    return out, sh.ranges(), sh.mapped, sh.available


probes = st.lists(st.tuples(st.integers(0, (1 << 24) - 1), st.integers(1, 3 * PAGE), st.booleans()),
                  min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(ops=spans, limit=st.one_of(st.none(), st.integers(0, 200)), probe=probes)
def test_shadow_round_trip(ops, limit, probe):
    old = shadow_from(ops, limit)
    snap = old.snapshot()
    new = ShadowIotlb(limit)
    new.restore(through_bytes(snap))
    new.check()
    assert S.same(new.snapshot(), snap)
    assert behaviour(new, probe) == behaviour(old, probe)
    # and they go on alike
    for sh in (old, new):
        sh.apply_pages(0x20 * PAGE, [0x777000 | SH_VALID] * 3)
    assert S.same(new.snapshot(), old.snapshot())


def test_shadow_restore_refuses_inconsistent_snapshots():
    sh = shadow_from([(16, [2, 2, 2])], None)
    snap = sh.snapshot()
    for bad in (attrs.evolve(snap, segments=((0, b"\0" * 2048),)),  # an empty segment
                attrs.evolve(snap, segments=((0, b"\1" * 10),)),  # wrong size
                attrs.evolve(snap, limit=1)):  # more mappings than the limit
        with pytest.raises(S.SnapshotError):
            ShadowIotlb(None).restore(bad)


# ----------------------------------------------------------------- the whole zPCI function
async def test_zpci_function_round_trip_through_a_real_socket(sock_dir, autojump_clock):
    """Enabled, translation registered with shadow mappings, adapter interrupts,
    FMB, vmm fields and events: the restored function serves the same VMM on
    (its region memfd, its eventfds, its guest memory) as if nothing happened."""
    make = lambda: D.DmaEngine("d0", zpci=props())  # noqa: E731
    fn = make()
    async with zpci_env(sock_dir, fn) as env:
        box, gt, mem = env.box, env.tables, env.mem
        await box.set_vmm(Zr.VMM_EVENTS, fid=0x77, uid=0x88)
        assert (await env.register_ioat()).cc == 0
        gt.map(SDMA, 0x10_0000, 8)
        assert (await box.rpcit(SDMA, 8 * PAGE)).cc == 0
        aibv, aisb, fmb = 0x6000, 0x6100, 0x7000
        fib = Z.Fib(isc=3, noi=2, aibvo=8, sum=1, aisbo=5, aibv=aibv, aisb=aisb).pack()
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_REG_INT, fib)).cc == 0
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, Z.Fib(fmb_addr=fmb).pack())).cc == 0
        fn.inject_error(Z.ZPCI_PEC_SYSTEM_ERROR)  # one event in the ring, the function in error
        assert (await box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, Z.Fib().pack())).cc == 0
        assert vclient.read_eventfd(env.err_fd) == 1
        fib_before = (await box.stpcifc()).fib
        header_before = bytes(box.mm[:0x100])

        snap = fn.snapshot()
        fresh = make()
        fresh.restore(through_bytes(snap))
        assert S.same(fresh.snapshot(), snap)
        assert S.same(fresh.zpci.snapshot(), fn.zpci.snapshot())
        # In a real hand-over the old process is gone; here it lives on, so its
        # measurement timer must not keep writing the same guest block.
        fn.zpci.fmb.stop()
        async with serving(fresh, sock_dir, "new.sock") as new_srv:
            async with vclient.connect(new_srv.path) as c2:
                # The new process serves the same region file: the VMM's mmap sees it
                box2 = ZpciMailbox(c2, Zr.ZPCI_REGION_INDEX, box.mm)
                assert bytes(box.mm[:0x100]) == header_before
                assert (await box2.stpcifc()).fib == fib_before
                # the shadow translates as before, into the first VMM's guest memory
                mem.write(0x10_0000, b"shadowed")
                assert D.status_error(await Driver(c2).run(D.OP_COPY, SDMA, SDMA + 4 * PAGE, 8)) == 0
                assert mem.read(0x10_4000, 8) == b"shadowed"
                # a completion interrupt sets the indicator bits and signals the old eventfd
                await c2.region_write(0, D.REG_VECTOR, struct.pack("<I", 1))
                await c2.region_write(0, D.REG_CTRL, struct.pack("<I", D.CTRL_IRQ))
                assert D.status_error(await Driver(c2).run(D.OP_FILL, 0, SDMA, 8, 1)) == 0
                assert mem.read(aibv + 1, 1) == bytes([0x40])  # bit 8 + 1
                assert mem.read(aisb, 1) == bytes([0x04])  # bit 5
                assert await vclient.wait_eventfd(env.eventfds[1]) == 1
                # the FMB timer runs in the new session
                await trio.sleep(4.5)  # mock clock: one MUI (4 s) later
                block = Z.Fmb.unpack(mem.read(fmb, 64))
                assert block.samples >= 1 and (block.dma_rbytes, block.dma_wbytes) == (8, 16)
                # the event ring goes on from where it was
                fresh.inject_error(Z.ZPCI_PEC_SYSTEM_ERROR)
                assert [p for _, p, _ in box2.events()] == [Z.ZPCI_PEC_SYSTEM_ERROR] * 2
                assert vclient.read_eventfd(env.err_fd) == 1


async def test_direct_map_round_trip(sock_dir):
    make = lambda: D.DmaEngine("d0", zpci=props())  # noqa: E731
    fn = make()
    async with zpci_env(sock_dir, fn, tables=False) as env:
        assert (await env.box.mpcifc(Z.ZPCI_MOD_FC_REG_IOAT,
                                     Z.Fib(pba=SDMA, pal=SDMA + GUEST_MEM - 1, iota=0).pack())).cc == 0
        fresh = make()
        fresh.restore(through_bytes(fn.snapshot()))
        assert fresh.zpci.direct and fresh.zpci_mappings() == fn.zpci_mappings()
        assert S.same(fresh.zpci.snapshot(), fn.zpci.snapshot())
        env.mem.write(0x30_0000, b"direct")
        assert await fresh.dma_path.read(SDMA + 0x30_0000, 6) == b"direct"
        with pytest.raises(Exception):
            await fresh.dma_path.read(SDMA + GUEST_MEM, 8)  # beyond the guest memory limit
        assert fresh.zpci.state == Zr.State.ERROR


async def test_snapshot_carries_the_refresh_bit(sock_dir):
    """The guest was told the refresh bit: a restore keeps it whatever the new
    configuration says, and a snapshot from before the property keeps the bit on."""
    fn = D.DmaEngine("d0", zpci=props())  # compat 3: lazy translation
    async with zpci_env(sock_dir, fn) as env:
        assert (await env.register_ioat()).cc == 0
        env.tables.map(SDMA, 0x10_0000, 4)
        env.mem.write(0x10_0000, b"lazy")
        assert await fn.dma_path.read(SDMA, 4) == b"lazy"  # a miss filled the shadow
        snap = fn.snapshot()
        assert snap.props["tlb_refresh"] is None and snap.props["compat"] == 3
        fresh = D.DmaEngine("d1", zpci=props(tlb_refresh=True))  # configured otherwise now
        fresh.restore(through_bytes(snap))
        assert fresh.zpci.lazy and fresh.zpci_mappings() == fn.zpci_mappings()
        group = Z.ClpQueryPciFnGrpResponse.unpack(fresh.zpci.query_group().pack())
        assert not group.flags & Z.CLP_FNGRP_REFRESH
        env.tables.map(SDMA + 4 * PAGE, 0x20_0000, 1)  # a new mapping, no RPCIT
        env.mem.write(0x20_0000, b"new")
        assert await fresh.dma_path.read(SDMA + 4 * PAGE, 3) == b"new"
        fresh.close()
        # a snapshot taken before tlb_refresh existed (its function ran at compat 2)
        old = attrs.evolve(S.dup_fds(fn.snapshot()), props={k: v for k, v in snap.props.items()
                                                            if k != "tlb_refresh"} | {"compat": 2})
        fresh = D.DmaEngine("d2", zpci=props(tlb_refresh=False))
        fresh.restore(old)
        assert fresh.zpci.props.refresh and not fresh.zpci.lazy
        fresh.close()


def test_zpci_snapshot_of_an_unknown_mode_is_refused_and_fds_closed():
    fn = D.DmaEngine("d0", zpci=props())
    snap = S.dup_fds(fn.zpci.snapshot())
    bad = attrs.evolve(snap, mode=7)
    fd = bad.region.fd
    with pytest.raises(S.SnapshotError):
        D.DmaEngine("d1", zpci=props()).zpci.restore(bad)
    with pytest.raises(OSError):
        os.fstat(fd)
    fn.close()
