"""Shared anonymous memory (memfd) as guest RAM or device memory."""

from __future__ import annotations

import mmap
import os


class Memfd:
    """A memfd of ``size`` bytes mapped into this process (sparse until touched)."""

    def __init__(self, size: int, name: str = "zpcid-mem"):
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
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
