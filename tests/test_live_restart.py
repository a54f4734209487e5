"""Live restart of one function: quiesce, hand over, continue — the client never
notices (same socket, same DMA memory, same eventfds, requests sent meanwhile
answered by the successor)."""

import os
import struct

import trio

from protocol.vfio_user import consts as C
from zpcid import snapshot as S
from zpcid.devices import dma_engine as D
from zpcid.devices import memory as Mem
from zpcid.vfio_user.memfd import Memfd
from zpcid.vfio_user.server import FunctionServer, bind_unix
from zpcid.vmm import client as vclient
from helpers import prepare_vmm
from zpcid.vmm.dma_engine_driver import Driver

PAGE = 4096
MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX


class Host:
    """One function served from a listening socket that outlives its servers."""

    def __init__(self, path, make):
        self.path, self.make = path, make
        self.listener = bind_unix(path)
        self.server = None
        self._scope = None

    async def start(self, nursery, function=None, resume=None):
        server = FunctionServer(function or self.make(), self.path, listener=self.listener, resume=resume)
        scope = trio.CancelScope()

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await server.serve(task_status=task_status)

        await nursery.start(run)
        self.server, self._scope = server, scope
        return server

    async def restart(self, nursery):
        """What a live restart does, in one process: the successor gets duplicates."""
        old, old_scope = self.server, self._scope
        attached = await old.quiesce()
        snap = S.dup_fds(await old.handover())
        await old.abandon()
        old_scope.cancel()
        fresh = self.make()
        fresh.restore(snap.function)
        await self.start(nursery, fresh, snap.endpoint)
        return attached, snap

    def close(self):
        self.listener.close()


async def test_memory_function_restart_keeps_the_client(sock_dir):
    mem = Memfd(1 << 20)
    host = Host(os.path.join(sock_dir, "m.sock"), lambda: Mem.MemoryFunction("m0", ram_size=16 * PAGE))
    try:
        async with trio.open_nursery() as nursery:
            await host.start(nursery)
            async with vclient.connect(host.path) as c:
                fds = await prepare_vmm(c, mem)
                await c.region_write(0, 0x40, b"survives", via_mmap=False)
                await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0x5EED))
                for round_ in range(3):
                    old = host.server
                    attached, snap = await host.restart(nursery)
                    assert attached and snap.endpoint is not None
                    assert host.server is not old and host.server.attached
                    assert old.function.session is None  # the old one let go ...
                    # ... without resetting anything the client sees
                    assert await c.region_read(4, Mem.REG_SCRATCH, 4) == struct.pack("<I", 0x5EED)
                    assert await c.region_read(0, 0x40, 8, via_mmap=False) == b"survives"
                    await c.region_write(4, Mem.REG_DOORBELL, struct.pack("<I", 1 + round_))
                    assert await vclient.wait_eventfd(fds[1 + round_]) == 1
                    rings = struct.unpack("<I", await c.region_read(4, Mem.REG_RINGS, 4))[0]
                    assert rings == 1 + round_  # counted across restarts
                # the device still DMAs into the client's memory
                mem.write(0x3000, b"from guest")
                await c.region_write(4, Mem.REG_DMA_ADDR, struct.pack("<QI", 0x3000, 10))
                await c.region_write(4, Mem.REG_DMA_CMD, struct.pack("<I", Mem.DMA_CMD_FROM_HOST))
                with trio.fail_after(5):
                    while (await c.region_read(4, Mem.REG_DMA_STATUS, 4))[0] == Mem.DMA_STATUS_BUSY:
                        await trio.sleep(0.001)
                assert await c.region_read(0, 0, 10, via_mmap=False) == b"from guest"
                assert host.server.function.counters.attaches == 1
                for fd in fds:
                    os.close(fd)
            # the client left: the successor detached normally and accepts the next one
            with trio.fail_after(5):
                while host.server.attached:
                    await trio.sleep(0.01)
            async with vclient.connect(host.path) as c2:
                assert await c2.region_read(4, Mem.REG_SCRATCH, 4) == bytes(4)  # reset on detach
            nursery.cancel_scope.cancel()
    finally:
        host.close()
        mem.close()


async def test_requests_sent_while_quiesced_are_answered_by_the_successor(sock_dir):
    mem = Memfd(1 << 20)
    host = Host(os.path.join(sock_dir, "m.sock"), lambda: Mem.MemoryFunction("m0", ram_size=16 * PAGE))
    try:
        async with trio.open_nursery() as nursery:
            await host.start(nursery)
            async with vclient.connect(host.path) as c:
                await prepare_vmm(c, mem)
                await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 77))
                old = host.server
                assert await old.quiesce()
                answers = []

                async def ask():
                    answers.append(await c.region_read(4, Mem.REG_SCRATCH, 4))

                async with trio.open_nursery() as waiting:
                    for _ in range(5):
                        waiting.start_soon(ask)
                    # give the requests time to reach the (not reading) old server
                    await trio.sleep(0.05)
                    assert answers == []
                    snap = S.dup_fds(await old.handover())
                    await old.abandon()
                    host._scope.cancel()
                    fresh = host.make()
                    fresh.restore(snap.function)
                    await host.start(nursery, fresh, snap.endpoint)
                assert answers == [struct.pack("<I", 77)] * 5
            nursery.cancel_scope.cancel()
    finally:
        host.close()
        mem.close()


async def test_quiesce_waits_for_device_work_and_resume_goes_on(sock_dir):
    mem = Memfd(4 << 20)
    host = Host(os.path.join(sock_dir, "d.sock"), lambda: D.DmaEngine("d0"))
    try:
        async with trio.open_nursery() as nursery:
            await host.start(nursery)
            async with vclient.connect(host.path) as c:
                fds = await prepare_vmm(c, mem)
                data = os.urandom(1 << 20)
                mem.write(0, data)
                await c.region_write(0, D.REG_SRC, struct.pack("<QQII", 0, 2 << 20, len(data), D.OP_COPY))
                await c.region_write(0, D.REG_DOORBELL, b"\1\0\0\0")
                assert await host.server.quiesce()
                # quiesced means the copy is complete, not half done
                assert mem.read(2 << 20, len(data)) == data
                status = struct.unpack_from("<I", host.server.function.regs, D.REG_STATUS)[0]
                assert status == D.STATUS_DONE
                host.server.resume()  # abandoned hand-over: the same server goes on
                st = await Driver(c).run(D.OP_CRC32C, src=0, length=4096)
                assert D.status_error(st) == 0
                # and a real restart after that
                await host.restart(nursery)
                st = await Driver(c).run(D.OP_FILL, dst=3 << 20, length=64, pattern=0x0101010101010101)
                assert D.status_error(st) == 0 and mem.read(3 << 20, 64) == b"\1" * 64
                for fd in fds:
                    os.close(fd)
            nursery.cancel_scope.cancel()
    finally:
        host.close()
        mem.close()


async def test_virtio_blk_restarts_under_continuous_io(sock_dir, tmp_path):
    from zpcid.devices.virtio_blk import VirtioBlkFunction
    from zpcid.vmm.virtio_driver import GuestMemory, open_blk

    disk = str(tmp_path / "disk.img")
    host = Host(os.path.join(sock_dir, "vb.sock"),
                lambda: VirtioBlkFunction("vb0", path=disk, size="8M", num_queues=2, io_threads=4))

    def pattern(seed: int) -> bytes:
        return bytes((seed * 131 + i) & 0xFF for i in range(256)) * 16

    written: dict[int, int] = {}
    try:
        async with trio.open_nursery() as nursery:
            await host.start(nursery)
            async with vclient.connect(host.path) as c:
                mem = GuestMemory(16 << 20)
                try:
                    async with open_blk(c, mem) as drv:
                        stop = trio.Event()

                        async def io(q):
                            n = 0
                            while not stop.is_set():
                                block = (q * 1000 + n) % 2000
                                await drv.write(q, block * 8, pattern(n))
                                written[block] = n
                                assert await drv.read(q, block * 8, 4096) == pattern(n)
                                n += 1

                        async with trio.open_nursery() as load:
                            for q in range(2):
                                for _ in range(4):  # several requests in flight per queue
                                    load.start_soon(io, q)
                            for _ in range(3):
                                await trio.sleep(0.05)
                                attached, snap = await host.restart(nursery)
                                assert attached and not any(
                                    q.inflight for q in host.server.function.queues.values())
                            await trio.sleep(0.05)
                            stop.set()
                finally:
                    mem.close()
            nursery.cancel_scope.cancel()
    finally:
        host.close()
    assert len(written) > 8
    with open(disk, "rb") as f:
        for block, n in written.items():
            f.seek(block * 8 * 512)
            assert f.read(4096) == pattern(n)
