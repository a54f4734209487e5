"""The DMA address space a client shares with a function (DMA_MAP / DMA_UNMAP).

Ranges mapped with a file descriptor that cannot shrink (F_SEAL_SHRINK) are
mmapped (one mapping per file, however many DMA_MAPs reference it); other
descriptors are reached with pread/pwrite, so a client that truncates its file
causes a DMA fault instead of a SIGBUS (docs/reliability.md).  Ranges without
a descriptor are reached through DMA_READ/DMA_WRITE messages to the client.  Lookups bisect a sorted list, so
they stay O(log n) with tens of thousands of maps.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import fcntl
import mmap
import os
import stat
from typing import Callable, Protocol

import attrs

from protocol.errors import ErrnoError
from zpcid import log
from zpcid.snapshot import Fd, Snapshot, SnapshotError, expect, require
from zpcid.vfio_user.memfd import cannot_shrink

PAGE = 4096
# Distinct files one client may DMA-map (QEMU uses one per RAM block): each
# costs a descriptor, and a function's descriptors must not run out.
MAX_DMA_FILES = 512
# Largest read-only view copied out of a file reached by pread (table walks
# split larger spans themselves).
MAX_COPIED_VIEW = 1 << 20
_log = log.get("zpcid.vfio_user.dma")


class DmaError(ErrnoError):
    """A DMA map request that cannot be honoured; carries the errno for the reply."""

    def __init__(self, message: str, errno_: int = errno.EINVAL):
        super().__init__(message, errno_)


class DmaFault(ErrnoError):
    """An access outside mapped memory or against its permissions (EFAULT).

    ``client_gone``: a message-mode access failed because the client left.
    """

    def __init__(self, addr: int, length: int, write: bool, reason: str, *, client_gone: bool = False):
        super().__init__(f"DMA {'write' if write else 'read'} {addr:#x}+{length:#x}: {reason}",
                         errno.EFAULT)
        self.client_gone = client_gone
        self.addr = addr
        self.length = length
        self.write = write
        self.reason = reason


class MessageIO(Protocol):
    """Message-mode DMA: the client performs the access (DMA_READ/DMA_WRITE)."""

    async def dma_read(self, addr: int, count: int) -> bytes: ...
    async def dma_write(self, addr: int, data: bytes) -> None: ...


@attrs.define(eq=False)
class FileMap:
    """One file shared by every DMA region that references it: an mmap of it when
    it cannot shrink, else (``mm`` None) our own descriptor for pread/pwrite."""

    key: tuple
    mm: mmap.mmap | None
    start: int  # file offset mapped at mm[0]
    length: int
    writable: bool
    fd: int = -1  # our own duplicate: what a snapshot hands to the next process, and pread/pwrite use
    refs: int = 0
    _addr: int | None = None

    def pread(self, offset: int, n: int, addr: int) -> bytes:
        """``n`` bytes at file ``offset``; a short read (file truncated) is a DMA fault."""
        try:
            data = os.pread(self.fd, n, offset)
        except OSError as exc:
            raise DmaFault(addr, n, False, f"read from client file failed: {exc}") from None
        if len(data) != n:
            raise DmaFault(addr, n, False, "client file shorter than its DMA mapping")
        return data

    def pwrite(self, offset: int, data, addr: int) -> None:
        n = len(data)
        try:
            # Never write past the end: that would grow a file the client shrank.
            if offset + n > os.fstat(self.fd).st_size:
                raise DmaFault(addr, n, True, "client file shorter than its DMA mapping")
            done = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise DmaFault(addr, n, True, f"write to client file failed: {exc}") from None
        if done != n:
            raise DmaFault(addr, n, True, "short write to client file")

    def close(self) -> None:
        try:
            if self.mm is not None:
                self.mm.close()
        except BufferError:
            # A device still holds a view; the mapping goes when the view does.
            _log.warning("dma_mapping_busy", key=str(self.key[:2]))
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def address(self) -> int | None:
        """Process address of mm[0] (for atomic operations); None without a mapping."""
        if self.mm is None:
            return None
        if self._addr is None:
            holder = ctypes.c_char.from_buffer(self.mm)
            self._addr = ctypes.addressof(holder)
            del holder
        return self._addr


@attrs.define(eq=False)
class DmaRegion:
    iova: int
    size: int
    readable: bool
    writable: bool
    file: FileMap | None
    offset: int  # file offset of iova

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def mm_offset(self) -> int:
        assert self.file is not None
        return self.offset - self.file.start


class DmaSpace:
    """Client DMA mappings of one attached session."""

    def __init__(self, max_maps: int = 65535):
        self.max_maps = max_maps
        self._starts: list[int] = []
        self._regions: list[DmaRegion] = []
        self._files: dict[tuple, FileMap] = {}
        self.message_io: MessageIO | None = None
        self.listeners: list[Callable[[str, DmaRegion], None]] = []
        self.generation = 0  # bumped on every change, lets caches notice

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._regions)

    @property
    def regions(self) -> list[DmaRegion]:
        return list(self._regions)

    def find(self, addr: int) -> DmaRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr < r.iova + r.size:
                return r
        return None

    def _check(self, r: DmaRegion | None, addr: int, length: int, write: bool) -> DmaRegion:
        if r is None:
            raise DmaFault(addr, length, write, "not mapped")
        if write and not r.writable:
            raise DmaFault(addr, length, write, "mapping is read-only")
        if not write and not r.readable:
            raise DmaFault(addr, length, write, "mapping is not readable")
        return r

    def view(self, addr: int, length: int, write: bool = False) -> memoryview:
        """A memoryview of mapped memory; the range may span adjacent regions of one file."""
        # The common case first (a table walk asks this per level): inside one
        # mapped, permitted region of a mapped file.
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and length > 0:
            r = self._regions[i]
            f = r.file
            if (addr + length <= r.iova + r.size and f is not None and f.mm is not None
                    and (r.writable if write else r.readable)):
                start = r.offset - f.start + (addr - r.iova)
                return memoryview(f.mm)[start : start + length]
        r = self._check(self.find(addr), addr, length, write)
        if r.file is None:
            raise DmaFault(addr, length, write, "range has no shared memory (message mode)")
        if r.file.mm is None and (write or length > MAX_COPIED_VIEW):
            raise DmaFault(addr, length, write, "client file can shrink: no direct view")
        start = r.mm_offset + (addr - r.iova)
        end_addr = addr + length
        cur = r
        while cur.end < end_addr:
            nxt = self._check(self.find(cur.end), cur.end, end_addr - cur.end, write)
            if nxt.file is not r.file or nxt.offset != cur.offset + cur.size:
                raise DmaFault(addr, length, write, "range crosses discontiguous mappings")
            cur = nxt
        if r.file.mm is None:
            # A snapshot: readers (table walks) only look at it.
            return memoryview(r.file.pread(r.offset + (addr - r.iova), length, addr))
        return memoryview(r.file.mm)[start : start + length]

    def segments(self, addr: int, length: int, write: bool):
        """Yield (region, addr, length) pieces covering the range, or raise DmaFault."""
        end = addr + length
        while addr < end:
            r = self._check(self.find(addr), addr, end - addr, write)
            n = min(end, r.end) - addr
            yield r, addr, n
            addr += n

    def views(self, addr: int, length: int, write: bool) -> list[memoryview] | None:
        """Memoryviews covering the range, one per mapping it crosses; None if a piece
        is reachable only through DMA messages or pread/pwrite; DmaFault if a piece is
        not mapped."""
        out = []
        for r, a, n in self.segments(addr, length, write):
            if r.file is None or r.file.mm is None:
                return None  # (a file the client could shrink is never mapped)
            off = r.mm_offset + (a - r.iova)
            out.append(memoryview(r.file.mm)[off : off + n])
        return out

    def views_many(self, pieces: list[tuple[int, int]], write: bool) -> list[memoryview] | None:
        """``views`` of several (addr, len) pieces, looking a region up only when a piece
        leaves the region of the piece before (a request's buffers mostly share one)."""
        out: list[memoryview] = []
        lo = hi = shift = 0
        base = None
        for a, n in pieces:
            if not n:
                continue
            if base is None or a < lo or a + n > hi:
                r = self.find(a)
                if r is None or a + n > r.end or r.file is None or r.file.mm is None:
                    base = None  # not mapped, crossing regions, no views: the general path
                    piece = self.views(a, n, write)
                    if piece is None:
                        return None
                    out += piece
                    continue
                self._check(r, a, n, write)
                lo, hi, shift = r.iova, r.end, r.mm_offset - r.iova
                base = memoryview(r.file.mm)
            out.append(base[a + shift : a + shift + n])
        return out

    async def read(self, addr: int, length: int) -> bytes:
        if length == 0:
            return b""
        out = []
        for r, a, n in list(self.segments(addr, length, False)):
            if r.file is not None:
                if r.file.mm is None:
                    out.append(r.file.pread(r.offset + (a - r.iova), n, a))
                    continue
                off = r.mm_offset + (a - r.iova)
                out.append(r.file.mm[off : off + n])
            else:
                out.append(await self._message_io(a, n, False).dma_read(a, n))
        return out[0] if len(out) == 1 else b"".join(out)

    async def write(self, addr: int, data: bytes | memoryview) -> None:
        pos = 0
        for r, a, n in list(self.segments(addr, len(data), True)):
            chunk = data[pos : pos + n]
            if r.file is not None:
                if r.file.mm is None:
                    r.file.pwrite(r.offset + (a - r.iova), chunk, a)
                else:
                    off = r.mm_offset + (a - r.iova)
                    r.file.mm[off : off + n] = chunk
            else:
                await self._message_io(a, n, True).dma_write(a, bytes(chunk))
            pos += n

    def _message_io(self, addr: int, n: int, write: bool) -> MessageIO:
        if self.message_io is None:
            raise DmaFault(addr, n, write, "message-mode DMA without a client")
        return self.message_io

    # ------------------------------------------------------------------ changes
    def _file_map(self, fd: int, offset: int, size: int, writable: bool) -> FileMap:
        st = os.fstat(fd)
        accmode = _accmode(fd)
        fd_writable = accmode in (os.O_RDWR, os.O_WRONLY)
        if writable and not fd_writable:
            raise DmaError("writable DMA map with a read-only descriptor", errno.EACCES)
        if offset % PAGE:
            raise DmaError(f"DMA_MAP offset {offset:#x} is not page aligned")
        if stat.S_ISREG(st.st_mode):
            if offset + size > st.st_size:
                raise DmaError(
                    f"DMA_MAP range {offset:#x}+{size:#x} beyond end of file ({st.st_size:#x})"
                )
            key: tuple = (st.st_dev, st.st_ino, fd_writable)
            fm = self._files.get(key)
            if fm is not None and fm.start + fm.length >= offset + size:
                return fm
            start, length = 0, st.st_size
        else:
            key = (st.st_dev, st.st_ino, fd_writable, offset, size)
            fm = self._files.get(key)
            if fm is not None:
                return fm
            start, length = offset, (size + PAGE - 1) & ~(PAGE - 1)
        if len(self._files) >= MAX_DMA_FILES:
            raise DmaError(f"DMA maps reference more than {MAX_DMA_FILES} distinct files", errno.ENOSPC)
        if not cannot_shrink(fd):
            # Policy (docs/reliability.md): a file the client could truncate under
            # us is never mapped; touching a page past its new end would be SIGBUS.
            if not stat.S_ISREG(st.st_mode):
                raise DmaError("DMA_MAP descriptor is neither a shrink-sealed memfd nor a "
                               "regular file", errno.EINVAL)
            mm = None
        else:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if fd_writable else 0)
            try:
                mm = mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=start)
            except (OSError, ValueError, OverflowError) as exc:
                raise DmaError(f"cannot mmap DMA descriptor: {exc}",
                               getattr(exc, "errno", None) or errno.EINVAL)
        try:
            own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        except OSError as exc:
            if mm is not None:
                mm.close()
            raise DmaError(f"cannot keep DMA descriptor: {exc}", exc.errno or errno.EMFILE)
        fm = FileMap(key, mm, start, length, fd_writable, own)
        old = self._files.get(key)
        if old is not None:
            # Superseded by a larger mapping; the old one lives on while referenced.
            old.key = old.key + ("superseded", id(old))
            self._files[old.key] = old
        self._files[key] = fm
        return fm

    def add(self, iova: int, size: int, readable: bool, writable: bool,
            fd: int | None = None, offset: int = 0) -> DmaRegion:
        """Map [iova, iova+size); the caller keeps ownership of ``fd``."""
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise DmaError("DMA_MAP range is empty or outside the 64-bit space")
        i = bisect.bisect_right(self._starts, iova) - 1
        overlap = None
        if i >= 0 and self._regions[i].end > iova:
            overlap = self._regions[i]
        elif i + 1 < len(self._regions) and self._regions[i + 1].iova < iova + size:
            overlap = self._regions[i + 1]
        if overlap is not None:
            if (overlap.iova == iova and overlap.size == size and overlap.readable == readable
                    and overlap.writable == writable and fd is not None and overlap.file is not None
                    and _same_file(fd, overlap.file) and overlap.offset == offset):
                return overlap  # an exact repeat of a live mapping is harmless
            raise DmaError(
                f"DMA_MAP {iova:#x}+{size:#x} overlaps {overlap.iova:#x}+{overlap.size:#x}",
                errno.EEXIST,
            )
        if len(self._regions) >= self.max_maps:
            raise DmaError(f"DMA map limit {self.max_maps} reached", errno.ENOSPC)
        fm = self._file_map(fd, offset, size, writable) if fd is not None else None
        region = DmaRegion(iova, size, readable, writable, fm, offset)
        if fm is not None:
            fm.refs += 1
        self._starts.insert(i + 1, iova)
        self._regions.insert(i + 1, region)
        self.generation += 1
        if log.debug_enabled():  # one per guest page on stock s390x QEMU
            _log.debug("dma_map", iova=hex(iova), size=hex(size), fd=fd is not None,
                       prot=("r" if readable else "") + ("w" if writable else ""))
        for cb in self.listeners:
            cb("map", region)
        return region

    def remove(self, iova: int, size: int) -> list[DmaRegion]:
        """Unmap every region fully inside the range (type1 semantics).

        Succeeds when nothing is mapped there; fails only if a region would be split.
        """
        end = iova + size
        lo = bisect.bisect_right(self._starts, iova) - 1
        if lo >= 0 and self._regions[lo].end > iova and self._regions[lo].iova < iova:
            r = self._regions[lo]
            raise DmaError(f"DMA_UNMAP would split {r.iova:#x}+{r.size:#x}", errno.EINVAL)
        lo = bisect.bisect_left(self._starts, iova)
        hi = bisect.bisect_left(self._starts, end)
        if hi > lo and self._regions[hi - 1].end > end:
            r = self._regions[hi - 1]
            raise DmaError(f"DMA_UNMAP would split {r.iova:#x}+{r.size:#x}", errno.EINVAL)
        removed = self._regions[lo:hi]
        del self._regions[lo:hi]
        del self._starts[lo:hi]
        for r in removed:
            self._release(r)
        if removed:
            self.generation += 1
        return removed

    def clear(self) -> list[DmaRegion]:
        removed = self._regions
        self._regions, self._starts = [], []
        for r in removed:
            self._release(r)
        self.generation += 1
        return removed

    def _release(self, r: DmaRegion) -> None:
        if log.debug_enabled():
            _log.debug("dma_unmap", iova=hex(r.iova), size=hex(r.size))
        for cb in self.listeners:
            cb("unmap", r)
        fm = r.file
        r.file = None
        if fm is not None:
            fm.refs -= 1
            if fm.refs == 0:
                self._files.pop(fm.key, None)
                fm.close()

    def close(self) -> None:
        self.clear()
        for fm in list(self._files.values()):
            fm.close()
        self._files.clear()

    @property
    def file_count(self) -> int:
        return len(self._files)

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> "DmaSnapshot":
        """Every mapping, with the fd of the file it maps (borrowed)."""
        return DmaSnapshot(maps=tuple(
            (r.iova, r.size, r.readable, r.writable,
             Fd(r.file.fd) if r.file is not None else None, r.offset)
            for r in self._regions))

    def restore(self, snap: "DmaSnapshot") -> None:
        """Map what ``snap`` holds into this (empty) space; takes its fds."""
        try:
            expect(snap, DmaSnapshot)
            require(not self._regions, "DMA space to restore into is not empty")
            require(len(snap.maps) <= self.max_maps,
                    f"{len(snap.maps)} DMA maps exceed the limit of {self.max_maps}")
            for iova, size, readable, writable, fd, offset in snap.maps:
                try:
                    self.add(iova, size, readable, writable, fd, offset)
                except DmaError as exc:
                    self.clear()
                    raise SnapshotError(f"DMA map {iova:#x}+{size:#x}: {exc}") from None
        finally:
            snap.close_fds()  # add() keeps its own duplicates


def _accmode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _same_file(fd: int, fm: FileMap) -> bool:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino) == fm.key[:2]


@attrs.frozen
class DmaSnapshot(Snapshot):
    """The client's DMA maps: (iova, size, readable, writable, fd or None, file offset)."""

    KIND = "vfio_user.dma"
    maps: tuple = ()
