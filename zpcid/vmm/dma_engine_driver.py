"""Guest-side driver for the dma-engine register interface (demo, benchmarks, tests)."""

from __future__ import annotations

import struct

import trio

from zpcid.devices import dma_engine as D
from zpcid.vmm.client import wait_eventfd


class Driver:
    """Programs one operation at a time or rings the descriptor-ring doorbell.

    With ``irq_fd`` (the eventfd of ``vector``) it sleeps until the completion
    interrupt, as a real driver does; otherwise it polls STATUS with back-off.
    """

    def __init__(self, client, bar: int = 0, *, irq_fd: int | None = None, vector: int = 0):
        self.client, self.bar = client, bar
        self.irq_fd, self.vector = irq_fd, vector
        self._irq_programmed = False

    async def reg(self, offset: int, fmt: str = "<I") -> int:
        return struct.unpack(fmt, await self.client.region_read(self.bar, offset, struct.calcsize(fmt)))[0]

    async def wait(self, timeout: float = 10.0) -> int:
        """STATUS once the engine is idle."""
        with trio.fail_after(timeout):
            if self.irq_fd is not None:
                await wait_eventfd(self.irq_fd, timeout)
                return await self.reg(D.REG_STATUS)
            delay = 20e-6
            while True:
                st = await self.reg(D.REG_STATUS)
                if not st & D.STATUS_BUSY:
                    return st
                await trio.sleep(delay)
                delay = min(delay * 2, 1e-3)

    async def run(self, op: int, src: int = 0, dst: int = 0, length: int = 0, pattern: int = 0) -> int:
        """Program one operation, ring the doorbell, return STATUS when done."""
        if self.irq_fd is not None and not self._irq_programmed:
            await self.client.region_write(self.bar, D.REG_VECTOR, struct.pack("<I", self.vector))
            await self.client.region_write(self.bar, D.REG_CTRL, struct.pack("<I", D.CTRL_IRQ))
            self._irq_programmed = True
        await self.client.region_write(self.bar, D.REG_SRC, struct.pack("<QQIIQ", src, dst, length, op, pattern))
        await self.client.region_write(self.bar, D.REG_DOORBELL, b"\1\0\0\0")
        return await self.wait()

    async def submit(self, tail: int) -> int:
        """Ring the descriptor-ring doorbell; STATUS when the batch is done."""
        await self.client.region_write(self.bar, D.REG_RING_TAIL, struct.pack("<I", tail))
        return await self.wait()
