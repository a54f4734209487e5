"""A guest-side model of Linux's s390 IOMMU driver: builds I/O translation tables.

Tables are written big-endian into guest memory (a ``Memfd`` or any writable
buffer) inside a region reserved for them, with the entry formats, fill
patterns and alignments Linux uses: region and segment tables of 2048
entries (16 KiB, filled with 0x20 = invalid), page tables of 256 entries
(2 KiB, filled with 0x400 = invalid).  Raw setters let tests plant
arbitrary or garbage entries.  Used by tests and benchmarks, not the daemon.
"""

from __future__ import annotations

import struct

import numpy as np

from protocol.zpci import tables as T
from zpcid.vfio_user.dma import DmaSpace
from zpcid.vfio_user.memfd import Memfd

_FLAG_WORD = {
    T.LEVEL_SEGMENT: T.ZPCI_IOTA_STO_FLAG,
    T.LEVEL_REGION_THIRD: T.ZPCI_IOTA_RTTO_FLAG,
    T.LEVEL_REGION_SECOND: T.ZPCI_IOTA_RSTO_FLAG,
    T.LEVEL_REGION_FIRST: T.ZPCI_IOTA_RFTO_FLAG,
}


def dma_space(memfd: Memfd) -> DmaSpace:
    """A DmaSpace with ``memfd`` mapped at guest absolute address 0 (zpcid-translates)."""
    space = DmaSpace()
    space.add(0, memfd.size, True, True, memfd.fd, 0)
    return space


def region_entry(origin: int, level: int, protected: bool = False) -> int:
    """A valid entry in a region table of ``level`` pointing at the next table."""
    return ((origin & T.ZPCI_RTE_ADDR_MASK) | T.table_type_of_level(level) | T.ZPCI_TABLE_LEN_RTX
            | (T.ZPCI_TABLE_PROTECTED if protected else 0))


def segment_entry(pto: int, protected: bool = False) -> int:
    """A valid segment entry pointing at a page table."""
    return (pto & T.ZPCI_STE_ADDR_MASK) | T.ZPCI_TABLE_TYPE_SX | (T.ZPCI_TABLE_PROTECTED if protected else 0)


def pte(frame: int, writable: bool = True) -> int:
    """A valid page-table entry; Linux marks read-only mappings protected."""
    return (frame & T.ZPCI_PTE_ADDR_MASK) | (0 if writable else T.ZPCI_TABLE_PROTECTED)


class GuestTables:
    """One I/O address space's tables, as Linux builds them, in guest memory.

    ``table_base``/``table_size`` reserve the part of guest memory the tables
    are carved from (bump allocation, never freed: Linux keeps tables until
    the domain goes away).  ``root_level`` picks the root: region-third
    (RTTO, the default), region-second (RSTO), region-first (RFTO) or
    segment (STO).
    """

    def __init__(self, mem, table_base: int, table_size: int, *,
                 root_level: int = T.LEVEL_REGION_THIRD):
        self._buf = mem.mm if hasattr(mem, "mm") else mem
        self.memory_size = len(self._buf)
        if table_base % T.ZPCI_TABLE_ALIGN or table_base + table_size > self.memory_size:
            raise ValueError("table region must be 16 KiB aligned and inside guest memory")
        self.table_base = table_base
        self.table_end = table_base + table_size
        self._next = table_base
        self._pt_free: list[int] = []  # 2 KiB slots left over from 16 KiB allocations
        self.root_level = root_level
        self.root = self.alloc_table()

    # ----------------------------------------------------------------- memory
    def _alloc(self, size: int) -> int:
        addr = self._next
        if addr + size > self.table_end:
            raise MemoryError("guest table region exhausted")
        self._next = addr + size
        return addr

    def alloc_table(self) -> int:
        """A 16 KiB region/segment table filled with invalid entries."""
        addr = self._alloc(T.ZPCI_TABLE_SIZE)
        self._fill(addr, T.ZPCI_TABLE_ENTRIES, T.ZPCI_TABLE_INVALID)
        return addr

    def alloc_page_table(self) -> int:
        """A 2 KiB page table filled with invalid PTEs."""
        if not self._pt_free:
            block = self._alloc(T.ZPCI_TABLE_SIZE)
            self._pt_free = list(range(block + T.ZPCI_TABLE_SIZE - T.ZPCI_PT_SIZE, block - 1,
                                       -T.ZPCI_PT_SIZE))
        addr = self._pt_free.pop()
        self._fill(addr, T.ZPCI_PT_ENTRIES, T.ZPCI_PTE_INVALID)
        return addr

    def _check(self, addr: int, size: int) -> None:
        # Tests plant garbage origins; following one must fail like any other
        # bad address instead of overflowing the buffer APIs.
        if addr < 0 or addr + size > self.memory_size:
            raise ValueError(f"guest address {addr:#x}+{size:#x} outside guest memory")

    def _entries(self, addr: int, count: int) -> np.ndarray:
        self._check(addr, count * 8)
        return np.frombuffer(self._buf, dtype=">u8", count=count, offset=addr)

    def _fill(self, addr: int, count: int, value: int) -> None:
        self._entries(addr, count)[:] = value

    def read_u64(self, addr: int) -> int:
        self._check(addr, 8)
        return struct.unpack_from(">Q", self._buf, addr)[0]

    def write_u64(self, addr: int, value: int) -> None:
        self._check(addr, 8)
        struct.pack_into(">Q", self._buf, addr, value & 0xFFFF_FFFF_FFFF_FFFF)

    # ----------------------------------------------------------------- walking
    @property
    def iota(self) -> int:
        """Root origin | the designation flag word Linux registers (e.g. 0x804)."""
        return self.root | _FLAG_WORD[self.root_level]

    @property
    def reach(self) -> int:
        return T.designation_reach(self.root_level)

    def _index(self, iova: int, level: int) -> int:
        return (iova >> T.LEVEL_SHIFT[level]) & T.ZPCI_INDEX_MASK

    def table_at(self, iova: int, level: int, create: bool = True) -> int | None:
        """Origin of the table at ``level`` covering ``iova`` (allocating like Linux)."""
        if not 0 <= iova < self.reach or level > self.root_level:
            raise ValueError(f"IOVA {iova:#x} / level {level} outside these tables")
        origin = self.root
        for lv in range(self.root_level, level, -1):
            slot = origin + self._index(iova, lv) * 8
            e = self.read_u64(slot)
            if not e & T.ZPCI_TABLE_INVALID:
                origin = e & T.ZPCI_RTE_ADDR_MASK
                continue
            if not create:
                return None
            nxt = self.alloc_table()
            self.write_u64(slot, region_entry(nxt, lv))
            origin = nxt
        return origin

    def page_table(self, iova: int, create: bool = True) -> int | None:
        """Origin of the page table covering ``iova``."""
        sto = self.table_at(iova, T.LEVEL_SEGMENT, create)
        if sto is None:
            return None
        slot = sto + self._index(iova, T.LEVEL_SEGMENT) * 8
        e = self.read_u64(slot)
        if not e & T.ZPCI_TABLE_INVALID and not e & T.ZPCI_TABLE_FC:
            return e & T.ZPCI_STE_ADDR_MASK
        if not create:
            return None
        pto = self.alloc_page_table()
        self.write_u64(slot, segment_entry(pto))
        return pto

    # ----------------------------------------------------------------- Linux ops
    def map(self, iova: int, gpa: int, npages: int, writable: bool = True) -> None:
        """Map ``npages`` 4 KiB pages at ``iova`` to guest frames from ``gpa``."""
        if (iova | gpa) % T.PAGE_SIZE:
            raise ValueError("map needs page-aligned addresses")
        flags = np.uint64(0 if writable else T.ZPCI_TABLE_PROTECTED)
        done = 0
        while done < npages:
            cur = iova + done * T.PAGE_SIZE
            px = (cur >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
            n = min(npages - done, T.ZPCI_PT_ENTRIES - px)
            pto = self.page_table(cur)
            frames = np.uint64(gpa + done * T.PAGE_SIZE) + np.arange(n, dtype=np.uint64) * np.uint64(T.PAGE_SIZE)
            self._entries(pto + px * 8, n)[:] = frames | flags
            done += n

    def unmap(self, iova: int, npages: int) -> None:
        """Invalidate PTEs as Linux does: keep the frame, clear protection, set 0x400."""
        done = 0
        while done < npages:
            cur = iova + done * T.PAGE_SIZE
            px = (cur >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK
            n = min(npages - done, T.ZPCI_PT_ENTRIES - px)
            pto = self.page_table(cur, create=False)
            if pto is not None:
                e = self._entries(pto + px * 8, n)
                e[:] = (e & np.uint64(T.ZPCI_PTE_ADDR_MASK)) | np.uint64(T.ZPCI_PTE_INVALID)
            done += n

    # ----------------------------------------------------------------- raw access
    def region_entry_addr(self, iova: int, level: int = T.LEVEL_REGION_THIRD) -> int:
        if not T.LEVEL_REGION_THIRD <= level <= self.root_level:
            raise ValueError(f"no region level {level} under root level {self.root_level}")
        return self.table_at(iova, level) + self._index(iova, level) * 8

    def segment_entry_addr(self, iova: int) -> int:
        return self.table_at(iova, T.LEVEL_SEGMENT) + self._index(iova, T.LEVEL_SEGMENT) * 8

    def pte_addr(self, iova: int) -> int:
        return self.page_table(iova) + ((iova >> T.PAGE_SHIFT) & T.ZPCI_PT_MASK) * 8

    def region_entry(self, iova: int, level: int = T.LEVEL_REGION_THIRD) -> int:
        return self.read_u64(self.region_entry_addr(iova, level))

    def segment_entry(self, iova: int) -> int:
        return self.read_u64(self.segment_entry_addr(iova))

    def pte(self, iova: int) -> int:
        return self.read_u64(self.pte_addr(iova))

    def set_region_entry(self, iova: int, value: int, level: int = T.LEVEL_REGION_THIRD) -> None:
        """Write a raw entry in the region table of ``level`` covering ``iova``."""
        self.write_u64(self.region_entry_addr(iova, level), value)

    def set_segment_entry(self, iova: int, value: int) -> None:
        self.write_u64(self.segment_entry_addr(iova), value)

    def set_pte(self, iova: int, value: int) -> None:
        self.write_u64(self.pte_addr(iova), value)

    def map_1m_frame(self, iova: int, gpa: int, writable: bool = True) -> None:
        """A segment entry with format control: the whole 1 MiB maps to frame ``gpa``."""
        if (iova | gpa) % T.SEGMENT_SIZE:
            raise ValueError("1 MiB frames need 1 MiB aligned addresses")
        self.set_segment_entry(iova, gpa | T.ZPCI_TABLE_FC | T.ZPCI_TABLE_TYPE_SX
                               | (0 if writable else T.ZPCI_TABLE_PROTECTED))

    def protect(self, iova: int, level: int | str) -> None:
        """Set the protection bit on the entry at ``level`` ("pte", "segment" or a region level)."""
        if level == "pte":
            addr = self.pte_addr(iova)
        elif level == "segment":
            addr = self.segment_entry_addr(iova)
        else:
            addr = self.region_entry_addr(iova, int(level))
        self.write_u64(addr, self.read_u64(addr) | T.ZPCI_TABLE_PROTECTED)
