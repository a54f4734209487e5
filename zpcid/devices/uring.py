"""Linux io_uring for a trio loop: file reads, writes and syncs submitted from the loop
itself, completions woken through the ring's fd (it polls readable while completions
wait), like QEMU's ``aio=io_uring``.

Why: a request through a worker thread costs two thread wake-ups and a GIL hand-over
(loop -> thread -> loop). A ring submission is one system call from the loop that never
blocks on the file (the kernel tries the I/O without blocking and otherwise hands it to
its own workers), and a completion is one readable fd.

stdlib only: the three io_uring system calls through ``ctypes`` (their numbers, 425-427,
are the same on every architecture since Linux 5.1), the rings through ``mmap``. Only
on x86_64 and s390x, whose memory order (stores seen in order, loads not passed by
loads) makes plain loads and stores of the shared ring indices correct; elsewhere
creating a ``Ring`` raises ``Unavailable`` and callers use threads.

A submitted operation cannot be called back: ``Ring.run`` waits for its completion
even when cancelled (as ``trio.to_thread.run_sync`` waits for its thread), so buffers
handed to the kernel stay owned until it is done with them, and ``Ring.reaper`` keeps
reaping after a cancellation until nothing is in flight.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct

import trio

SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
MACHINES = frozenset(("x86_64", "s390x"))

# include/uapi/linux/io_uring.h
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_FSYNC_DATASYNC = 1 << 0

_params = struct.Struct("<7I12x" + "7I4xQ" + "7I4xQ")  # struct io_uring_params (120 bytes)
_sqe = struct.Struct("<BBHiQQIIQ16x")  # struct io_uring_sqe, up to user_data (64 bytes)
_cqe = struct.Struct("<QiI")  # struct io_uring_cqe
_u32 = struct.Struct("<I")
_iovec = struct.Struct("@PN")  # struct iovec
SQE_SIZE, CQE_SIZE = 64, _cqe.size

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class Unavailable(Exception):
    """This kernel or machine has no usable io_uring (the reason is the message)."""


def address(view: memoryview) -> int:
    """Process address of a buffer's first byte."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except TypeError:  # read-only buffer: ctypes refuses it, numpy does not mind
        import numpy as np
        return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class Ring:
    """One io_uring instance, driven from one trio loop.

    At most ``entries`` operations are in flight (callers bound their requests);
    the completion ring has twice as many slots, so it cannot overflow.
    """

    def __init__(self, entries: int):
        if os.uname().machine not in MACHINES:
            raise Unavailable(f"io_uring engine not built for {os.uname().machine}")
        entries = 1 << max(0, entries - 1).bit_length()
        params = ctypes.create_string_buffer(_params.size)
        fd = _syscall(SYS_IO_URING_SETUP, ctypes.c_uint(entries), params)
        if fd < 0:
            err = ctypes.get_errno()
            raise Unavailable(f"io_uring_setup: {os.strerror(err)}")
        self.fd = fd
        self._maps: list[mmap.mmap] = []
        try:
            p = _params.unpack(params.raw)
            sq_entries, cq_entries, _flags, _cpu, _idle, features, _wq = p[:7]
            sq_head, sq_tail, sq_mask, _sq_n, _sq_flags, _dropped, sq_array, _ = p[7:15]
            cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes, _cq_flags, _ = p[15:23]
            if not features & IORING_FEAT_NODROP:
                raise Unavailable("io_uring without IORING_FEAT_NODROP (Linux < 5.5)")
            sq_size = sq_array + 4 * sq_entries
            cq_size = cqes + CQE_SIZE * cq_entries
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            if features & IORING_FEAT_SINGLE_MMAP:
                sq = cq = self._map(max(sq_size, cq_size), IORING_OFF_SQ_RING, flags, prot)
            else:
                sq = self._map(sq_size, IORING_OFF_SQ_RING, flags, prot)
                cq = self._map(cq_size, IORING_OFF_CQ_RING, flags, prot)
            self.sqes = self._map(SQE_SIZE * sq_entries, IORING_OFF_SQES, flags, prot)
        except BaseException:
            self.close()
            raise
        self.sq, self.cq = sq, cq
        self.entries = sq_entries
        self.sq_mask = _u32.unpack_from(sq, sq_mask)[0]
        self.cq_mask = _u32.unpack_from(cq, cq_mask)[0]
        self.sq_tail_off, self.cq_head_off, self.cq_tail_off = sq_tail, cq_head, cq_tail
        self.sq_head_off, self.cqes_off = sq_head, cqes
        # The submission array maps ring slot i to SQE i, once and for all.
        for i in range(sq_entries):
            _u32.pack_into(sq, sq_array + 4 * i, i)
        self.sq_tail = _u32.unpack_from(sq, sq_tail)[0]
        self.cq_head = _u32.unpack_from(cq, cq_head)[0]
        self.unsubmitted = 0
        self.pending: dict[int, list] = {}  # user_data -> [task, result, keep-alive]
        self._next_id = 1
        self.accepting = True

    def _map(self, size: int, offset: int, flags: int, prot: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, flags=flags, prot=prot, offset=offset)
        self._maps.append(m)
        return m

    # ------------------------------------------------------------------ submit
    def _queue(self, opcode: int, fd: int, offset: int, addr: int, length: int, rw_flags: int,
               keep) -> int:
        if not self.accepting:
            raise trio.ClosedResourceError("io_uring is shutting down")
        if len(self.pending) >= self.entries:
            raise RuntimeError("io_uring full (the caller bounds its requests)")
        uid = self._next_id
        self._next_id = uid + 1
        slot = self.sq_tail & self.sq_mask
        _sqe.pack_into(self.sqes, SQE_SIZE * slot, opcode, 0, 0, fd, offset, addr, length,
                       rw_flags, uid)
        self.sq_tail = (self.sq_tail + 1) & 0xFFFFFFFF
        # The SQE is written before the tail that hands it to the kernel (TSO, see above).
        _u32.pack_into(self.sq, self.sq_tail_off, self.sq_tail)
        self.unsubmitted += 1
        self.pending[uid] = [None, None, keep]
        return uid

    def submit(self) -> None:
        """Hand queued operations to the kernel (never blocks on the file)."""
        while self.unsubmitted:
            n = _syscall(SYS_IO_URING_ENTER, self.fd, self.unsubmitted, 0, 0, None, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                # (EAGAIN/EBUSY cannot happen with in-flight work bounded below the
                # completion ring; anything else means the ring itself is broken.)
                # Take no more work: the SQEs left in the ring are never submitted, so
                # the kernel never touches the buffers their callers now let go of.
                self.accepting = False
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
            self.unsubmitted -= n

    async def _wait(self, uid: int) -> int:
        entry = self.pending[uid]
        if entry[1] is None:
            entry[0] = trio.lowlevel.current_task()
            # Not cancellable: the kernel owns the buffers until the completion arrives.
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        del self.pending[uid]
        return entry[1]

    async def run(self, opcode: int, fd: int, offset: int, addr: int, length: int,
                  rw_flags: int = 0, keep=None) -> int:
        """One operation: its result (bytes moved, or -errno)."""
        uid = self._queue(opcode, fd, offset, addr, length, rw_flags, keep)
        try:
            self.submit()
        except BaseException:
            del self.pending[uid]
            raise
        return await self._wait(uid)

    async def preadv(self, fd: int, views: list[memoryview], offset: int,
                     iov: bytearray | None = None) -> int:
        """``os.preadv`` through the ring (``iov``: ``iovecs(views)[0]`` if already built)."""
        if iov is None:
            iov = iovecs(views)[0]
        return await self.run(IORING_OP_READV, fd, offset, address(iov), len(views), keep=(iov, views))

    async def pwritev(self, fd: int, views: list[memoryview], offset: int,
                      iov: bytearray | None = None) -> int:
        if iov is None:
            iov = iovecs(views)[0]
        return await self.run(IORING_OP_WRITEV, fd, offset, address(iov), len(views), keep=(iov, views))

    async def fdatasync(self, fd: int) -> int:
        return await self.run(IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC)

    # ------------------------------------------------------------------ complete
    def reap(self) -> int:
        """Wake the tasks whose operations completed; returns how many did."""
        head = self.cq_head
        tail = _u32.unpack_from(self.cq, self.cq_tail_off)[0]
        n = 0
        while head != tail:
            uid, res, _flags = _cqe.unpack_from(self.cq, self.cqes_off + CQE_SIZE * (head & self.cq_mask))
            head = (head + 1) & 0xFFFFFFFF
            entry = self.pending.get(uid)
            if entry is not None:
                entry[1] = res
                entry[2] = None  # the kernel is done with the buffers
                if entry[0] is not None:
                    trio.lowlevel.reschedule(entry[0])
            n += 1
        if n:
            self.cq_head = head
            _u32.pack_into(self.cq, self.cq_head_off, head)
        return n

    async def reaper(self, stopped) -> None:
        """Reap completions while the owner runs; once cancelled (or ``stopped()``
        says so), stop accepting work and keep reaping until nothing is in flight."""
        try:
            while not stopped():
                await trio.lowlevel.wait_readable(self.fd)
                self.reap()
        finally:
            self.accepting = False
            with trio.CancelScope(shield=True):
                while any(e[1] is None for e in self.pending.values()):
                    if not self.reap():
                        await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if getattr(self, "fd", -1) < 0:
            return
        for m in getattr(self, "_maps", ()):
            m.close()
        self._maps = []
        trio.lowlevel.notify_closing(self.fd) if _in_trio() else None
        os.close(self.fd)
        self.fd = -1


def iovecs(views: list[memoryview]) -> tuple[bytearray, int]:
    """The ``struct iovec`` array for ``views``, and every address and length OR-ed
    together (its low bits say whether all of them are aligned, as O_DIRECT needs)."""
    iov = bytearray(_iovec.size * len(views))
    bits = 0
    pack, size = _iovec.pack_into, _iovec.size
    for i, v in enumerate(views):
        n = len(v)
        a = address(v) if n else 0
        bits |= a | n
        pack(iov, size * i, a, n)
    return iov, bits


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_trio_token()
        return True
    except RuntimeError:
        return False
