"""The function measurement block: counters, and their copy in guest memory
written at registration and then every MUI by a trio timer."""

from __future__ import annotations

import struct
import time
from typing import Callable

import trio

from protocol.zpci import formats as Z
from zpcid.vfio_user.dma import DmaFault

DEFAULT_MUI = 4000  # ms, advertised in the Query PCI Function Group response
FMB_LENGTH = 64
COUNTERS = ("ld", "st", "stb", "rpcit", "dma_r", "dma_w")

_TOD_UNIX_EPOCH_US = 2208988800 * 1_000_000  # 1900-01-01 to 1970-01-01


def tod() -> int:
    """The s390 TOD clock value for now (bit 51 = 1 microsecond)."""
    return ((time.time_ns() // 1000 + _TOD_UNIX_EPOCH_US) << 12) & ((1 << 64) - 1)


class Measurement:
    """FMB registration of one function.

    ``view(gpa, length)`` gives writable guest memory (DmaFault outside it);
    ``spawn(async_fn)`` starts a task in the session (False without one);
    ``failed(addr)`` reports a block that cannot be written (event 0x2a).
    """

    def __init__(self, view: Callable[[int, int], memoryview], spawn: Callable[..., bool],
                 failed: Callable[[int], None], mui_ms: int = DEFAULT_MUI):
        self.view = view
        self.spawn = spawn
        self.failed = failed
        self.mui_ms = mui_ms
        self.addr = 0
        self.counters = self.fresh()
        self._scope: trio.CancelScope | None = None

    @staticmethod
    def fresh() -> dict[str, int]:
        return dict(samples=0, **{k: 0 for k in COUNTERS})

    def count(self, key: str, n: int = 1) -> None:
        """Counted always; the guest sees the counters at the next update."""
        self.counters[key] += n

    def start(self, addr: int) -> None:
        """Register a block: counters from zero, written now and then every MUI."""
        self.stop()
        self.addr = addr
        self.counters = self.fresh()
        self.update()
        self.arm()

    def stop(self) -> None:
        self.addr = 0
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def arm(self) -> None:
        """Start the MUI timer if a block is registered and none runs (e.g. after a restore)."""
        if self.addr and self._scope is None:
            scope = trio.CancelScope()
            if self.spawn(self._timer, scope):
                self._scope = scope

    def disarm(self) -> None:
        """The session ended: its task is gone with it (the registration stays)."""
        self._scope = None

    async def _timer(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(self.mui_ms / 1000)
                self.update()

    def update(self) -> None:
        """Write the block; ``samples`` is the number of earlier updates."""
        if not self.addr:
            return
        f = self.counters
        # The lowest TOD bit (~0.24 ns) doubles as the update-in-progress flag.
        now = tod() & ~Z.ZPCI_FMB_UPDATE_IN_PROGRESS
        try:
            view = self.view(self.addr, FMB_LENGTH)
            # Same sequence as firmware: mark the update in progress, write the
            # counters, then the final timestamp with the in-progress bit clear.
            struct.pack_into(">Q", view, 8, now | Z.ZPCI_FMB_UPDATE_IN_PROGRESS)
            block = Z.Fmb(fmt=0, format_indicators=Z.ZPCI_FMB_DMA_COUNTER_VALID,
                          samples=f["samples"] & 0xFFFFFFFF,
                          last_update=now | Z.ZPCI_FMB_UPDATE_IN_PROGRESS,
                          ld_ops=f["ld"], st_ops=f["st"], stb_ops=f["stb"], rpcit_ops=f["rpcit"],
                          dma_rbytes=f["dma_r"], dma_wbytes=f["dma_w"]).pack()
            view[: len(block)] = block
            struct.pack_into(">Q", view, 8, now)
            del view
        except DmaFault:
            addr = self.addr
            self.stop()
            self.failed(addr)
            return
        f["samples"] += 1
