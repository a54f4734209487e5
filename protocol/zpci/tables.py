"""zPCI I/O translation: IOTA layout, region/segment/page-table entry bits, geometry.

Masks are numeric values in LSB-0 terms; names follow the s390 documentation
(and Linux's asm/pci_dma.h, which spells the same fields).  Every table entry
is a big-endian u64 in guest memory.  Pure data: no I/O, no zpcid imports.
"""

from __future__ import annotations

import attrs

# --------------------------------------------------------------------------- IOTA
# I/O translation anchor, as registered with MPCIFC (FIB offset 32).

ZPCI_IOTA_IOT_ENABLED = 0x800  # T: translate through tables (0 = direct/relaxed)
ZPCI_IOTA_PROTECTED = 0x200  # every translation through this IOTA is read-only
ZPCI_IOTA_DT_SHIFT = 2
ZPCI_IOTA_DT_MASK = 0x7 << ZPCI_IOTA_DT_SHIFT
ZPCI_IOTA_FS_MASK = 0x3

# Designation types (DT field)
ZPCI_IOTA_STO = 0  # segment-table origin
ZPCI_IOTA_RTTO = 1  # region-third-table origin
ZPCI_IOTA_RSTO = 2  # region-second-table origin
ZPCI_IOTA_RFTO = 3  # region-first-table origin
ZPCI_IOTA_PFAA = 4  # page-frame absolute address
ZPCI_IOTA_IOPFAA = 5  # I/O page-frame absolute address
ZPCI_IOTA_IOPTO = 7  # I/O page-table origin

ZPCI_IOTA_DT_ST = ZPCI_IOTA_STO << ZPCI_IOTA_DT_SHIFT
ZPCI_IOTA_DT_RT = ZPCI_IOTA_RTTO << ZPCI_IOTA_DT_SHIFT
ZPCI_IOTA_DT_RS = ZPCI_IOTA_RSTO << ZPCI_IOTA_DT_SHIFT
ZPCI_IOTA_DT_RF = ZPCI_IOTA_RFTO << ZPCI_IOTA_DT_SHIFT
ZPCI_IOTA_DT_PF = ZPCI_IOTA_PFAA << ZPCI_IOTA_DT_SHIFT

# Frame sizes (FS field, meaningful with DT = PFAA)
ZPCI_IOTA_FS_4K = 0
ZPCI_IOTA_FS_1M = 1
ZPCI_IOTA_FS_2G = 2

# The flag words Linux ORs into a table origin (access key is always 0).
ZPCI_IOTA_STO_FLAG = ZPCI_IOTA_IOT_ENABLED | ZPCI_IOTA_DT_ST  # 0x800
ZPCI_IOTA_RTTO_FLAG = ZPCI_IOTA_IOT_ENABLED | ZPCI_IOTA_DT_RT  # 0x804
ZPCI_IOTA_RSTO_FLAG = ZPCI_IOTA_IOT_ENABLED | ZPCI_IOTA_DT_RS  # 0x808
ZPCI_IOTA_RFTO_FLAG = ZPCI_IOTA_IOT_ENABLED | ZPCI_IOTA_DT_RF  # 0x80c

# Region and segment tables are 16 KiB aligned, so the low 14 bits of a
# table-designating IOTA are flags; the origin is everything above.
ZPCI_IOTA_ORIGIN_MASK = ~0x3FFF & 0xFFFF_FFFF_FFFF_FFFF

# ------------------------------------------------------------------ table geometry
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

ZPCI_TABLE_ENTRY_SIZE = 8
ZPCI_TABLE_BITS = 11
ZPCI_PT_BITS = 8
ZPCI_TABLE_ENTRIES = 1 << ZPCI_TABLE_BITS  # 2048 (region and segment tables)
ZPCI_PT_ENTRIES = 1 << ZPCI_PT_BITS  # 256 (page tables)
ZPCI_TABLE_SIZE = ZPCI_TABLE_ENTRIES * ZPCI_TABLE_ENTRY_SIZE  # 16 KiB
ZPCI_TABLE_ALIGN = ZPCI_TABLE_SIZE
ZPCI_PT_SIZE = ZPCI_PT_ENTRIES * ZPCI_TABLE_ENTRY_SIZE  # 2 KiB
ZPCI_PT_ALIGN = ZPCI_PT_SIZE
ZPCI_INDEX_MASK = ZPCI_TABLE_ENTRIES - 1  # 0x7ff
ZPCI_PT_MASK = ZPCI_PT_ENTRIES - 1  # 0xff

# Index shifts: page (PX), segment (SX), region third/second/first (RTX/RSX/RFX)
ZPCI_PX_SHIFT = PAGE_SHIFT  # 12
ZPCI_ST_SHIFT = ZPCI_PT_BITS + PAGE_SHIFT  # 20: one segment entry covers 1 MiB
ZPCI_RT_SHIFT = ZPCI_ST_SHIFT + ZPCI_TABLE_BITS  # 31: 2 GiB
ZPCI_RS_SHIFT = ZPCI_RT_SHIFT + ZPCI_TABLE_BITS  # 42: 4 TiB
ZPCI_RF_SHIFT = ZPCI_RS_SHIFT + ZPCI_TABLE_BITS  # 53: 8 PiB

SEGMENT_SIZE = 1 << ZPCI_ST_SHIFT  # 1 MiB, also the size of a segment frame

# Reach of each designation: IOVAs at or above it cannot be translated.
ZPCI_TABLE_SIZE_ST = 1 << ZPCI_RT_SHIFT  # 2 GiB
ZPCI_TABLE_SIZE_RT = 1 << ZPCI_RS_SHIFT  # 4 TiB
ZPCI_TABLE_SIZE_RS = 1 << ZPCI_RF_SHIFT  # 8 PiB
ZPCI_TABLE_SIZE_RF = 1 << 64

# Levels used by the walker; they equal the DT value of a root at that level,
# and (level << 2) is the table-type code of an entry in such a table.
LEVEL_SEGMENT = 0
LEVEL_REGION_THIRD = 1
LEVEL_REGION_SECOND = 2
LEVEL_REGION_FIRST = 3
LEVEL_SHIFT = {0: ZPCI_ST_SHIFT, 1: ZPCI_RT_SHIFT, 2: ZPCI_RS_SHIFT, 3: ZPCI_RF_SHIFT}
LEVEL_NAME = {0: "segment", 1: "region-third", 2: "region-second", 3: "region-first"}

# ---------------------------------------------------------- region/segment entries
ZPCI_TABLE_INVALID = 0x20
ZPCI_TABLE_VALID = 0x00
ZPCI_TABLE_VALID_MASK = 0x20
ZPCI_TABLE_PROTECTED = 0x200
ZPCI_TABLE_UNPROTECTED = 0x000
ZPCI_TABLE_PROT_MASK = 0x200
ZPCI_TABLE_TYPE_MASK = 0xC  # the level of the table holding the entry
ZPCI_TABLE_TYPE_RFX = 0xC
ZPCI_TABLE_TYPE_RSX = 0x8
ZPCI_TABLE_TYPE_RTX = 0x4
ZPCI_TABLE_TYPE_SX = 0x0
ZPCI_TABLE_LEN_MASK = 0x3  # region entries: length of the next table, 3 = full
ZPCI_TABLE_LEN_RFX = 0x3
ZPCI_TABLE_LEN_RSX = 0x3
ZPCI_TABLE_LEN_RTX = 0x3
ZPCI_TABLE_OFFSET_MASK = 0xC0  # region entries: offset of the next table, must be 0
ZPCI_TABLE_FC = 0x400  # segment entries: format control, entry maps a 1 MiB frame

ZPCI_RTE_FLAG_MASK = 0x3FFF
ZPCI_RTE_ADDR_MASK = ~ZPCI_RTE_FLAG_MASK & 0xFFFF_FFFF_FFFF_FFFF
ZPCI_STE_FLAG_MASK = 0x7FF
ZPCI_STE_ADDR_MASK = ~ZPCI_STE_FLAG_MASK & 0xFFFF_FFFF_FFFF_FFFF
ZPCI_SFAA_MASK = ~(SEGMENT_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF  # segment-frame address

# ------------------------------------------------------------------ page entries
ZPCI_PTE_VALID_MASK = 0x400
ZPCI_PTE_INVALID = 0x400
ZPCI_PTE_VALID = 0x000
ZPCI_PTE_FLAG_MASK = 0xFFF
ZPCI_PTE_ADDR_MASK = ~ZPCI_PTE_FLAG_MASK & 0xFFFF_FFFF_FFFF_FFFF

# ---------------------------------------------------- PECs raised by the walk
# The same names and values as protocol/zpci.py; kept here so the table walker
# does not depend on that module.
ZPCI_PEC_INVALID_AS = 0x01  # RPCIT without a translation table registered
ZPCI_PEC_OUT_OF_RANGE = 0x02  # IOVA outside [PBA, PAL] or beyond the tables' reach
ZPCI_PEC_INVALID_TRANSLATION_FORMAT = 0x03  # IOTA designation the walker cannot use
ZPCI_PEC_TRANSLATION_PROTECTION = 0x04  # DMA to an unmapped or read-only IOVA
ZPCI_PEC_INVALID_TABLE_ENTRY = 0x07  # an all-zero entry (or one outside guest memory)
ZPCI_PEC_TABLE_LENGTH = 0x08  # region entry with length != 3 or offset != 0
ZPCI_PEC_TABLE_TYPE = 0x09  # entry whose table-type code does not match its level

_U64 = 0xFFFF_FFFF_FFFF_FFFF

TABLE_DESIGNATIONS = frozenset({ZPCI_IOTA_STO, ZPCI_IOTA_RTTO, ZPCI_IOTA_RSTO, ZPCI_IOTA_RFTO})

_REACH = {
    ZPCI_IOTA_STO: ZPCI_TABLE_SIZE_ST,
    ZPCI_IOTA_RTTO: ZPCI_TABLE_SIZE_RT,
    ZPCI_IOTA_RSTO: ZPCI_TABLE_SIZE_RS,
    ZPCI_IOTA_RFTO: ZPCI_TABLE_SIZE_RF,
}


def designation_reach(dt: int) -> int:
    """Exclusive IOVA limit translatable by tables rooted at designation ``dt`` (0 if none)."""
    return _REACH.get(dt, 0)


def table_type_of_level(level: int) -> int:
    """Table-type code an entry must carry in a table of ``level``."""
    return level << 2


@attrs.frozen(slots=True)
class Iota:
    """A decoded I/O translation anchor."""

    value: int
    translate: bool
    designation_type: int
    table_origin: int
    protected: bool
    frame_size: int

    @classmethod
    def unpack(cls, value: int) -> "Iota":
        value &= _U64
        return cls(
            value=value,
            translate=bool(value & ZPCI_IOTA_IOT_ENABLED),
            designation_type=(value & ZPCI_IOTA_DT_MASK) >> ZPCI_IOTA_DT_SHIFT,
            table_origin=value & ZPCI_IOTA_ORIGIN_MASK,
            protected=bool(value & ZPCI_IOTA_PROTECTED),
            frame_size=value & ZPCI_IOTA_FS_MASK,
        )

    @classmethod
    def for_table(cls, origin: int, dt: int = ZPCI_IOTA_RTTO, protected: bool = False) -> "Iota":
        """The IOTA Linux registers for a table at ``origin`` (16 KiB aligned)."""
        if origin & ~ZPCI_IOTA_ORIGIN_MASK or dt not in TABLE_DESIGNATIONS:
            raise ValueError(f"bad table designation origin={origin:#x} dt={dt}")
        flags = ZPCI_IOTA_IOT_ENABLED | (dt << ZPCI_IOTA_DT_SHIFT)
        return cls.unpack(origin | flags | (ZPCI_IOTA_PROTECTED if protected else 0))

    @property
    def is_table_designation(self) -> bool:
        """True when T = 1 and DT names a region or segment table the walker follows."""
        return self.translate and self.designation_type in TABLE_DESIGNATIONS

    @property
    def root_level(self) -> int:
        """Walker level of the root table (valid only for table designations)."""
        return self.designation_type

    @property
    def reach(self) -> int:
        """Exclusive IOVA limit of the designated tables; 0 if not a table designation."""
        return designation_reach(self.designation_type) if self.is_table_designation else 0

    def check_aperture(self, pba: int, pal: int) -> str | None:
        """Why [pba, pal] cannot be translated with this IOTA, or None if it can."""
        if not self.translate:
            return None
        if self.designation_type not in TABLE_DESIGNATIONS:
            return f"designation type {self.designation_type} is not a table origin"
        if pba > pal:
            return f"PBA {pba:#x} above PAL {pal:#x}"
        if pal >= self.reach:
            return f"PAL {pal:#x} beyond the reach {self.reach:#x} of the designated tables"
        return None
