"""Interrupt eventfds installed by the client with DEVICE_SET_IRQS."""

from __future__ import annotations

import errno
import os
from typing import Callable, Sequence

import attrs

from protocol.errors import ErrnoError
from protocol.vfio_user import consts as C
from protocol.vfio_user.messages import IrqSet
from zpcid.snapshot import Fd, Snapshot, expect, require
from zpcid.vfio_user.transport import close_fds


class IrqError(ErrnoError):
    """A DEVICE_SET_IRQS / GET_IRQ_INFO request that cannot be honoured."""

    def __init__(self, message: str, errno_: int = errno.EINVAL):
        super().__init__(message, errno_)


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd without ever blocking.

    The descriptor is non-blocking (``check_eventfd``); a counter at its maximum
    (EAGAIN) already says "interrupt pending", as the kernel's eventfd_signal()
    treats it.
    """
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def check_eventfd(fd: int) -> None:
    """Accept ``fd`` as an interrupt eventfd, or raise IrqError (EINVAL) saying why.

    Anything else (a pipe, a socket, a file) could block or fail the write that
    signals it, and with it the daemon.  The eventfd is made non-blocking: the
    flag belongs to the open file shared with the client, which QEMU creates
    non-blocking anyway; the kernel's eventfd_signal() never blocks either.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise IrqError(f"descriptor {fd} cannot be inspected: {exc}") from None
    if target != "anon_inode:[eventfd]":
        kind = target.split(":", 1)[0] if ":" in target else "file"
        raise IrqError(f"SET_IRQS needs eventfds; got a {kind} ({target.split('/')[-1][:40]})")
    os.set_blocking(fd, False)


class IrqTable:
    """Eventfds per IRQ index and vector, plus protocol-level masks."""

    def __init__(self, counts: dict[int, int], maskable: frozenset[int] = frozenset()):
        self.counts = {i: counts.get(i, 0) for i in range(C.VFIO_PCI_NUM_IRQS)}
        self.maskable = maskable
        self.fds: dict[int, list[int | None]] = {i: [None] * n for i, n in self.counts.items()}
        self.masked: dict[int, list[bool]] = {i: [False] * n for i, n in self.counts.items()}
        # Called with (index, vector) when a vector is unmasked or fired by the client.
        self.on_unmask: Callable[[int, int], None] | None = None
        self.on_trigger: Callable[[int, int], None] | None = None
        self.on_change: Callable[[int], None] | None = None

    def info(self, index: int) -> tuple[int, int]:
        if index not in self.counts:
            raise IrqError(f"IRQ index {index} does not exist")
        flags = C.VFIO_IRQ_INFO_EVENTFD
        if index in self.maskable:
            flags |= C.VFIO_IRQ_INFO_MASKABLE
        return flags, self.counts[index]

    def eventfd(self, index: int, vector: int) -> int | None:
        fds = self.fds.get(index)
        return fds[vector] if fds and vector < len(fds) else None

    def signal(self, index: int, vector: int = 0) -> bool:
        """Signal a vector's eventfd; False if none is installed."""
        fd = self.eventfd(index, vector)
        if fd is None:
            return False
        try:
            signal_eventfd(fd)
        except OSError:
            return False
        return True

    def apply(self, req: IrqSet, fds: Sequence[int]) -> list[int]:
        """Apply a SET_IRQS request; returns the fds it did not take (caller closes)."""
        index, start, count = req.index, req.start, req.count
        if index not in self.counts:
            raise IrqError(f"IRQ index {index} does not exist")
        n = self.counts[index]
        dt, act = req.data_type, req.action
        if dt != C.VFIO_IRQ_SET_DATA_EVENTFD and fds:
            raise IrqError("descriptors sent without DATA_EVENTFD")
        # Disable-all is accepted on any index, even one without vectors.
        if dt == C.VFIO_IRQ_SET_DATA_NONE and act == C.VFIO_IRQ_SET_ACTION_TRIGGER and count == 0:
            if start != 0:
                raise IrqError("disable-all needs start 0")
            self._release(index, 0, n)
            self._notify(index)
            return list(fds)
        if count == 0 or start + count > n:
            raise IrqError(f"vectors {start}..{start + count - 1} outside 0..{n - 1} of index {index}")
        vectors = range(start, start + count)
        if dt == C.VFIO_IRQ_SET_DATA_BOOL:
            vectors = [v for v, b in zip(vectors, req.data) if b]
        if act == C.VFIO_IRQ_SET_ACTION_TRIGGER:
            if dt == C.VFIO_IRQ_SET_DATA_EVENTFD:
                if fds and len(fds) != count:
                    raise IrqError(f"{len(fds)} descriptors for {count} vectors")
                for fd in fds:
                    check_eventfd(fd)
                self._release(index, start, start + count)
                for i, fd in enumerate(fds):
                    self.fds[index][start + i] = fd
                self._notify(index)
                return []
            for v in vectors:
                if self.on_trigger:
                    self.on_trigger(index, v)
            return []
        # MASK / UNMASK
        if index not in self.maskable:
            raise IrqError(f"IRQ index {index} is not maskable")
        if dt == C.VFIO_IRQ_SET_DATA_EVENTFD:
            raise IrqError("mask/unmask eventfds (resampling) are not supported", errno.ENOTSUP)
        masked = act == C.VFIO_IRQ_SET_ACTION_MASK
        for v in vectors:
            self.masked[index][v] = masked
            if not masked and self.on_unmask:
                self.on_unmask(index, v)
        return []

    def _notify(self, index: int) -> None:
        if self.on_change:
            self.on_change(index)

    def _release(self, index: int, lo: int, hi: int) -> None:
        slots = self.fds[index]
        old = [fd for fd in slots[lo:hi] if fd is not None]
        for v in range(lo, hi):
            slots[v] = None
        close_fds(old)

    def clear(self) -> None:
        for index, n in self.counts.items():
            self._release(index, 0, n)
            self.masked[index] = [False] * n

    def installed(self) -> int:
        return sum(fd is not None for slots in self.fds.values() for fd in slots)

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> "IrqSnapshot":
        """Eventfds (borrowed) and protocol masks per index and vector."""
        return IrqSnapshot(
            counts=dict(self.counts),
            eventfds={i: tuple(None if fd is None else Fd(fd) for fd in slots) for i, slots in self.fds.items()},
            masked={i: tuple(m) for i, m in self.masked.items()},
        )

    def restore(self, snap: "IrqSnapshot") -> None:
        """Install the snapshot's eventfds (taking them) and masks; signals nothing."""
        try:
            expect(snap, IrqSnapshot)
            require(dict(snap.counts) == self.counts,
                    f"IRQ vector counts {dict(snap.counts)} differ from this function's {self.counts}")
            for i, n in self.counts.items():
                require(len(snap.eventfds.get(i, ())) == n and len(snap.masked.get(i, ())) == n,
                        f"IRQ index {i} snapshot does not have {n} vectors")
        except BaseException:
            snap.close_fds()
            raise
        self.clear()
        seen: set[int] = set()
        for i, slots in snap.eventfds.items():
            for v, fd in enumerate(slots):
                if fd is not None and fd in seen:
                    fd = os.dup(fd)  # one eventfd on two vectors: each slot owns its fd
                if fd is not None:
                    seen.add(int(fd))
                self.fds[i][v] = None if fd is None else int(fd)
            self.masked[i] = [bool(m) for m in snap.masked[i]]


@attrs.frozen
class IrqSnapshot(Snapshot):
    KIND = "vfio_user.irqs"
    counts: dict
    eventfds: dict  # index -> tuple of Fd or None per vector
    masked: dict  # index -> tuple of bool per vector
