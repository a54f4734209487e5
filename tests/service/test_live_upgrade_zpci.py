"""zPCI state across live restarts, zpcid-translates mode, under the model VMM (issue 13):
registrations, the exact shadow IOTLB, adapter-interrupt registration, FMB and pending
events are identical before and after `zpcictl restart` and `zpcictl upgrade`, and the
device keeps doing DMA through the shadow and raising adapter interrupts afterwards."""

from __future__ import annotations

import struct

import pytest
import trio

from protocol.zpci import formats as Z
from zpcid.devices import dma_engine as D
from zpcid.vmm import client as vclient
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.vmm.model import attach
from zpcid.zpci import core as zcore

SDMA = 1 << 32
PAGE = 4096
AIBV, AISB, FMB = 0x5000, 0x6000, 0x7000

pytestmark = pytest.mark.skipif(not hasattr(zcore.ZpciCore, "snapshot"),
                                reason="this build's zPCI layer has no snapshot")


def _state(d) -> dict:
    """What the control socket shows of the function's zPCI state (volatile counters aside)."""
    show = d.ctl_json("show", "1")
    z = dict(show["zpci"])
    return {"zpci": z, "mappings": d.ctl_json("mappings", "1"), "events": d.ctl_json("events", "1")}


async def _copy_and_interrupt(vmm, drv, n: int) -> None:
    src, dst = 0x100000 + n * PAGE, 0x200000 + n * PAGE
    vmm.mem.write(src, bytes([n + 1]) * PAGE)
    st = await drv.run(D.OP_COPY, src=SDMA + src, dst=SDMA + dst, length=PAGE)
    assert D.status_error(st) == 0
    assert vmm.mem.read(dst, PAGE) == bytes([n + 1]) * PAGE
    # adapter interrupt: vector 2 -> AIBV bit AIBVO + 2, summary bit, then the eventfd
    assert vmm.mem.read(AIBV, 1)[0] & (0x80 >> 5)
    assert vclient.read_eventfd(vmm.msix_fds[2]) == 1
    vmm.mem.write(AIBV, b"\0")
    vmm.mem.write(AISB + 1, b"\0")


async def test_zpci_state_survives_restart_and_upgrade(daemons):
    d = daemons(functions=[{"type": "dma-engine", "fid": 1, "uid": 1, "name": "f1"}]).start()
    async with attach(d.socket("f1"), guest_memory=64 << 20) as vmm:
        tables = vmm.tables(48 << 20, 16 << 20)
        tables.map(SDMA + 0x100000, 0x100000, 512)  # 2 MiB of guest memory behind the IOVAs
        r = await vmm.register_translation(SDMA, SDMA + (32 << 20) - 1, tables.iota)
        assert r.cc == 0
        assert (await vmm.box.rpcit(SDMA + 0x100000, 512 * PAGE)).cc == 0
        iw = dict(isc=2, noi=4, aibvo=3, sum=1, aisbo=9)
        assert (await vmm.box.mpcifc(Z.ZPCI_MOD_FC_REG_INT, vmm.fib(aibv=AIBV, aisb=AISB, **iw))).cc == 0
        assert (await vmm.box.mpcifc(Z.ZPCI_MOD_FC_SET_MEASURE, vmm.fib(fmb_addr=FMB))).cc == 0
        drv = Driver(vmm.client, irq_fd=None, vector=2)
        await vmm.client.region_write(0, D.REG_VECTOR, struct.pack("<I", 2))
        await vmm.client.region_write(0, D.REG_CTRL, struct.pack("<I", D.CTRL_IRQ))
        await _copy_and_interrupt(vmm, drv, 0)
        region = bytes(vmm.box.mm[:0x100])
        before = _state(d)
        assert before["mappings"] and before["zpci"]
        for step, command in enumerate((("restart", "1"), ("upgrade",))):
            rc, _, err = await trio.to_thread.run_sync(d.ctl, *command)
            assert rc == 0, err
            after = _state(d)
            assert after["mappings"] == before["mappings"]  # the exact shadow IOTLB
            assert after["events"] == before["events"]
            for key, value in before["zpci"].items():
                if "count" not in key and key not in ("fmb",):  # counters move with the DMA below
                    assert after["zpci"].get(key) == value, key
            assert bytes(vmm.box.mm[:0x100]) == region  # what the VMM reads in the region
            stored = Z.Fib.unpack((await vmm.box.stpcifc()).fib)
            assert (stored.isc, stored.noi, stored.aibvo, stored.sum, stored.aisbo,
                    stored.aibv, stored.aisb) == (2, 4, 3, 1, 9, AIBV, AISB)
            await _copy_and_interrupt(vmm, drv, step + 1)  # DMA and interrupts go on
            before = _state(d)
            region = bytes(vmm.box.mm[:0x100])
        # pending events carried over, too
        rc, _, err = await trio.to_thread.run_sync(d.ctl, "inject-error", "1")
        assert rc == 0, err
        events = d.ctl_json("events", "1")
        assert events
        rc, _, err = await trio.to_thread.run_sync(d.ctl, "restart", "1")
        assert rc == 0, err
        assert d.ctl_json("events", "1") == events
