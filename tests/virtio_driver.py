"""The test-side guest: zpcid.vmm.virtio_driver (a Linux-like virtio-pci/virtio-blk driver
over the reference client) plus helpers for writing broken rings by hand."""

from __future__ import annotations

import contextlib
import struct

import trio

from helpers import serving
from zpcid.vmm import client as zclient
from zpcid.devices.virtio import pci as vp
from zpcid.vmm.virtio_driver import (S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN,  # noqa: F401
                                 T_OUT, T_WRITE_ZEROES, DriverError, DriverQueue, GuestMemory,
                                 VirtioBlkDriver, open_blk)
from zpcid.devices.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE  # noqa: F401

GUEST_MEM = 16 << 20
WAIT = 5.0  # guard against a hung device; never a performance assertion


@contextlib.asynccontextmanager
async def blk_guest(function, sock_dir: str, *, shared: bool = True, seal: int | None = None, **init):
    """Serve ``function``, attach the reference client, bring the driver up."""
    async with serving(function, sock_dir) as server:
        async with zclient.connect(server.path) as client:
            mem = GuestMemory(GUEST_MEM, shared=shared, **({} if seal is None else {"seal": seal}))
            try:
                async with open_blk(client, mem, **init) as drv:
                    yield drv
            finally:
                mem.close()


async def raw_chain(q: DriverQueue, descs: list[tuple[int, int, int, int]], head: int = 0,
                    *, notify: bool = True) -> None:
    """Write descriptors (addr, len, flags, next) at indexes 0.., publish ``head``, notify."""
    for i, d in enumerate(descs):
        q.write_desc(i, *d)
    q.publish(head)
    if notify:
        await q.notify()


async def wait_status(drv: VirtioBlkDriver, bits: int) -> int:
    """Poll the device status until ``bits`` are set (the device reacts in a task of its own)."""
    with trio.fail_after(WAIT):
        while True:
            s = await drv.status()
            if s & bits == bits:
                return s
            await trio.sleep(0.005)


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


NEEDS_RESET = vp.VIRTIO_CONFIG_S_NEEDS_RESET
