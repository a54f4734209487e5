"""Shared test plumbing: serve a function on a real socket inside a trio test."""

import contextlib
import os

import trio

from zpcid.vfio_user.server import FunctionServer


@contextlib.asynccontextmanager
async def serving(function, sock_dir: str, name: str = "fn.sock"):
    path = os.path.join(sock_dir, name)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(FunctionServer(function, path).serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def mapping_count(pattern: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(pattern in line for line in f)


async def prepare_vmm(client, mem, nvec: int = 4) -> list[int]:
    """What a VMM in vmm-translates mode does after VERSION: guest memory mapped at 0,
    BARs looked up, memory space + bus master on, MSI-X enabled with eventfds (returned)."""
    import struct

    from protocol.vfio_user import consts as C

    await client.dma_map(0, mem.size, mem.fd, 0)
    for i in range(6):
        await client.region_info(i)
    await client.region_write(7, 4, struct.pack("<H", 0x6))
    fds = await client.enable_irq_eventfds(C.VFIO_PCI_MSIX_IRQ_INDEX, nvec)
    cfg = await client.region_read(7, 0, 256)
    cap = cfg[0x34]
    while cfg[cap] != 0x11:  # PCI_CAP_ID_MSIX
        cap = cfg[cap + 1]
    await client.region_write(7, cap + 2, struct.pack("<H", 0x8000 | (nvec - 1)))
    return fds
