"""Shared anonymous memory (memfd) as guest RAM or device memory, and its seals.

A process that maps a file another process can ``ftruncate`` gets SIGBUS when
it touches a page past the new end; Python cannot turn that into an exception.
So every memfd zpcid hands out is sealed against shrinking and growing before
the descriptor leaves the process, and a client's descriptor is mapped only if
it carries F_SEAL_SHRINK itself (QEMU's memory-backend-memfd seals by default).
"""

from __future__ import annotations

import fcntl
import mmap
import os

# What a shared memfd gets before its descriptor is sent: its size is fixed for
# good, and nobody can remove (or add) seals later.
SHARE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, size: int, seal: int = SHARE_SEALS) -> int:
    """A memfd of ``size`` bytes with the seals ``seal`` (default: its size never changes)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if size:
            os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seal)
    except BaseException:
        os.close(fd)
        raise
    return fd


def seals(fd: int) -> int:
    """The F_SEAL_* bits of ``fd``; 0 for files that do not support seals."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # EINVAL: not a memfd / shmem / hugetlbfs file
        return 0


def cannot_shrink(fd: int) -> bool:
    """True if no process can make ``fd``'s file smaller (safe to mmap)."""
    return bool(seals(fd) & fcntl.F_SEAL_SHRINK)


class Memfd:
    """A sealed memfd of ``size`` bytes mapped into this process (sparse until touched)."""

    def __init__(self, size: int, name: str = "zpcid-mem", seal: int = SHARE_SEALS):
        self.size = size
        self.fd = sealed_memfd(name, size, seal)
        try:
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, addr: int, n: int) -> bytes:
        return self.mm[addr : addr + n]

    def write(self, addr: int, data: bytes) -> None:
        self.mm[addr : addr + len(data)] = data

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.mm.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Memfd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
