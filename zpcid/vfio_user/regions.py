"""Device regions as vfio-user exposes them: BARs, config space, vendor regions."""

from __future__ import annotations

import errno
import mmap
import os
from typing import Awaitable, Callable

import attrs

from protocol.errors import ErrnoError
from protocol.vfio_user import consts as C
from protocol.vfio_user.messages import RegionCap, SparseMmapCap
from zpcid.snapshot import Fd, Snapshot, expect, require
from zpcid.vfio_user.memfd import cannot_shrink, sealed_memfd


class RegionError(ErrnoError):
    """A region access or query that cannot be honoured."""

    def __init__(self, message: str, errno_: int = errno.EINVAL):
        super().__init__(message, errno_)


def store_writable(buf, ranges, offset: int, data) -> None:
    """Store the bytes of a write at ``offset`` that fall inside ``ranges`` ((lo, hi)
    pairs) into ``buf``, one slice per range; the rest of the write is dropped
    (read-only fields of a register block)."""
    end = offset + len(data)
    for lo, hi in ranges:
        if lo < end and offset < hi:
            a = lo if lo > offset else offset
            b = hi if hi < end else end
            buf[a:b] = data[a - offset : b - offset]


class Region:
    """A region: bounds-checked reads/writes, optionally mmappable through an fd."""

    size: int = 0
    readable = True
    writable = True

    def mmap_fd(self) -> int | None:
        return None

    def sparse_areas(self) -> tuple[tuple[int, int], ...]:
        return ()

    def caps(self) -> tuple[RegionCap, ...]:
        areas = self.sparse_areas()
        return (SparseMmapCap(areas),) if areas else ()

    def flags(self) -> int:
        f = 0
        if self.readable:
            f |= C.VFIO_REGION_INFO_FLAG_READ
        if self.writable:
            f |= C.VFIO_REGION_INFO_FLAG_WRITE
        if self.mmap_fd() is not None:
            f |= C.VFIO_REGION_INFO_FLAG_MMAP
        return f

    def check(self, offset: int, count: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size:
            raise RegionError(f"access {offset:#x}+{count:#x} outside region of {self.size:#x} bytes")

    async def read(self, offset: int, count: int) -> bytes:
        raise RegionError("region is not readable")

    async def write(self, offset: int, data: bytes) -> None:
        raise RegionError("region is not writable")


class MemfdRegion(Region):
    """RAM backed by a memfd (or a shared file), mmappable by the client.

    The memfd is sealed (size fixed) before its descriptor can be sent, so a
    client cannot shrink it under our mapping.  A shared file cannot be sealed:
    zpcid then never maps it itself (``mm`` is None) and reaches it with
    pread/pwrite, where a truncated file reads as zeros instead of SIGBUS.
    """

    def __init__(self, size: int, name: str = "zpcid-region", path: str | None = None):
        self.size = size
        self.mm: mmap.mmap | None = None
        if path is None:
            self.fd = sealed_memfd(name, size)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(self.fd).st_size < size:
                os.ftruncate(self.fd, size)

    def mmap_fd(self) -> int | None:
        return self.fd

    def sparse_areas(self) -> tuple[tuple[int, int], ...]:
        return ((0, self.size),)

    async def read(self, offset: int, count: int) -> bytes:
        if self.mm is None:
            return os.pread(self.fd, count, offset).ljust(count, b"\0")
        return self.mm[offset : offset + count]

    async def write(self, offset: int, data: bytes) -> None:
        if self.mm is None:
            # Within the region only: a client that shrank the file does not
            # get it grown back beyond what it left.
            end = min(offset + len(data), os.fstat(self.fd).st_size)
            if end > offset:
                os.pwrite(self.fd, memoryview(data)[: end - offset], offset)
            return
        self.mm[offset : offset + len(data)] = data

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass
        os.close(self.fd)

    def snapshot(self) -> "MemfdRegionSnapshot":
        """The memory itself is the fd: the client has it mapped, so the next process
        must serve the same file, never a copy."""
        return MemfdRegionSnapshot(size=self.size, fd=Fd(self.fd))

    def restore(self, snap: "MemfdRegionSnapshot") -> None:
        """Serve the snapshot's file instead of our own (takes its fd)."""
        try:
            expect(snap, MemfdRegionSnapshot)
            require(snap.size == self.size, f"region of {snap.size:#x} bytes restored into one of {self.size:#x}")
            require(os.fstat(snap.fd).st_size >= self.size, "region file is shorter than the region")
            # Mapped only if nobody can shrink it (a sealed memfd); a shared file
            # stays on pread/pwrite, as in __init__.
            mm = (mmap.mmap(snap.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                  if cannot_shrink(snap.fd) else None)
        except BaseException:
            snap.close_fds()
            raise
        self.close()
        self.fd, self.mm = int(snap.fd), mm


ReadFn = Callable[[int, int], Awaitable[bytes]]
WriteFn = Callable[[int, bytes], Awaitable[None]]


@attrs.define
class Window:
    offset: int
    size: int
    read: ReadFn
    write: WriteFn


class WindowedRegion(Region):
    """A region made of windows, each served by its own handler (registers, MSI-X, ...)."""

    def __init__(self, size: int):
        self.size = size
        self.windows: list[Window] = []

    def add(self, offset: int, size: int, read: ReadFn, write: WriteFn) -> None:
        self.windows.append(Window(offset, size, read, write))
        self.windows.sort(key=lambda w: w.offset)

    def _window(self, offset: int, count: int) -> Window | None:
        for w in self.windows:
            if w.offset <= offset and offset + count <= w.offset + w.size:
                return w
        return None

    async def read(self, offset: int, count: int) -> bytes:
        w = self._window(offset, count)
        if w is None:
            return bytes(count)  # unclaimed space reads as zero
        return await w.read(offset - w.offset, count)

    async def write(self, offset: int, data: bytes) -> None:
        w = self._window(offset, len(data))
        if w is not None:
            await w.write(offset - w.offset, data)


@attrs.frozen
class MemfdRegionSnapshot(Snapshot):
    KIND = "vfio_user.memfd_region"
    size: int
    fd: Fd
