"""The zPCI control region: zpcid's ABI with the VMM (``docs/zpci-region.md``).

Offsets, codes and layouts only — what both sides of the region need. The
daemon's implementation is ``zpcid.zpci``; a VMM (``zpcid.vmm``) imports this
module and never the daemon core.
"""

from __future__ import annotations

import enum

from protocol.zpci import formats as Z

ABI_MAJOR, ABI_MINOR = 1, 1
IBM_VENDOR_ID = 0x1014
ZPCI_REGION_INDEX = 9  # where zpcid puts it; a VMM finds it by type/subtype
ZPCI_REGION_SUBTYPE = 0x7A70  # "zp"
ZPCI_REGION_TYPE = 0x80000000 | IBM_VENDOR_ID  # VFIO_REGION_TYPE_PCI_VENDOR_TYPE | IBM
REGION_SIZE = 0x4000
MAGIC = 0x5A504349  # "ZPCI"

# ---------------------------------------------------------------- header (little-endian)
HDR_MAGIC, HDR_VERSION, HDR_FEATURES, HDR_MODE = 0x000, 0x004, 0x008, 0x010
HDR_REGION_SIZE, HDR_MEM_LIMIT, HDR_STATE, HDR_FH = 0x014, 0x018, 0x020, 0x024
HDR_FID, HDR_UID, HDR_IOAT, HDR_SHADOW = 0x028, 0x02C, 0x030, 0x034
HDR_DMA_AVAIL, HDR_EVENTS_LOST = 0x038, 0x03C
HDR_OFFSETS = 0x040  # u32 offsets: list entry, query fn, query group, mailbox, mb data, events
HDR_VMM_FLAGS, HDR_VMM_FID, HDR_VMM_UID = 0x058, 0x05C, 0x060  # 1.1, written by the VMM
HDR_IOAT_REGISTERED, HDR_IOAT_DIRECT = 1 << 0, 1 << 1  # bits of HDR_IOAT

# ---------------------------------------------------------------- layout
CLP_LIST_ENTRY, CLP_QUERY_FN, CLP_QUERY_GRP = 0x100, 0x200, 0x400
CLP_LIST_ENTRY_SIZE, CLP_QUERY_FN_SIZE, CLP_QUERY_GRP_SIZE = 16, 256, 64
MAILBOX, MB_DATA, EVENTS = 0x1000, 0x2000, 0x3000
MB_DATA_SIZE = 0x1000

# ---------------------------------------------------------------- features
FEAT_MAILBOX, FEAT_EVENTS, FEAT_ADAPTER_INT = 1 << 0, 1 << 1, 1 << 2
FEAT_RELAXED_TRANSLATION, FEAT_RELAXED_ALIGNMENT, FEAT_FMB = 1 << 3, 1 << 4, 1 << 5
FEAT_PCILG_PCISTG = 1 << 6
FEAT_WRITEBACK, FEAT_VMM_FLAGS, FEAT_VMM_IDS, FEAT_DMA_FAULT_EVENTS = 1 << 7, 1 << 8, 1 << 9, 1 << 10

# vmm_flags (header 0x58)
VMM_EVENTS = 1 << 0  # the VMM consumes the event ring: signal the ERR IRQ for new events
VMM_ADAPTER = 1 << 1  # the VMM's MSI-X eventfds inject adapter interrupts (informational)
VMM_FLAGS_KNOWN = VMM_EVENTS | VMM_ADAPTER

# modes (header 0x10)
MODE_VMM, MODE_ZPCID = 0, 1
MODE_NAMES = {MODE_VMM: "vmm-translates", MODE_ZPCID: "zpcid-translates"}


class State(enum.IntEnum):
    """Function states as published at header 0x20."""

    RESERVED = 0
    STANDBY = 1
    DISABLED = 2
    ENABLED = 3
    BLOCKED = 4
    ERROR = 5
    PERMANENT_ERROR = 6


# ---------------------------------------------------------------- mailbox (offsets from MAILBOX)
MB_DOORBELL, MB_R1, MB_R2, MB_R3, MB_FIB = 0x00, 0x08, 0x10, 0x18, 0x20
MB_RESULT, MB_CC, MB_STATUS, MB_EXCEPTION, MB_R1_OUT, MB_FIB_OUT = 0x80, 0x84, 0x85, 0x86, 0x88, 0x90
MB_WRITEBACK, MB_R2_OUT = 0x87, 0xE0  # 1.1
MB_RESULTS_END = 0xE8  # without mmap the results are REGION_READ MAILBOX+MB_RESULT .. MAILBOX+0xE8
MB_CLP_REQ, MB_CLP_RESP = 0x100, 0x200
MB_CLP_REQ_SIZE, MB_CLP_RESP_SIZE = 32, 256
FIB_SIZE = 80
RESULT_FORMAT = "<IBBBBQ"  # result, cc, status, exception, writeback, r1_out
OPERANDS_FORMAT = "<I4xQQQ"  # doorbell, padding, r1, r2, r3

# writeback mask: which registers the VMM stores into the guest (valid when exception == 0)
WB_R1, WB_R2 = 1 << 0, 1 << 1

# commands (doorbell values)
CMD_CLP, CMD_MPCIFC, CMD_STPCIFC, CMD_RPCIT, CMD_PCISTB, CMD_PCILG, CMD_PCISTG = 1, 2, 3, 4, 5, 6, 7
# instructions whose status goes into r1 / into r2 (Linux pci_insn.c, QEMU s390-pci-inst.c)
STATUS_IN_R1 = frozenset({CMD_MPCIFC, CMD_STPCIFC, CMD_RPCIT, CMD_PCISTB})
STATUS_IN_R2 = frozenset({CMD_PCILG, CMD_PCISTG})

# mailbox results (ABI level, not architected)
RES_OK, RES_BAD_COMMAND, RES_WRONG_MODE, RES_BAD_REQUEST = 0, 1, 2, 3
# program exceptions the VMM must inject instead of setting a cc
EXC_NONE, EXC_OPERAND, EXC_SPECIFICATION = 0, 1, 2

# MPCIFC operation controls that need guest absolute addresses: in vmm-translates
# mode they answer RES_WRONG_MODE and the VMM must emulate them.
VMM_EMULATED_OCS = frozenset({Z.ZPCI_MOD_FC_REG_INT, Z.ZPCI_MOD_FC_DEREG_INT, Z.ZPCI_MOD_FC_SET_MEASURE})

# ---------------------------------------------------------------- event ring (offsets from EVENTS)
EV_PRODUCER, EV_CONSUMER, EV_ENTRIES, EV_ENTRY_SIZE, EV_RING = 0x00, 0x04, 0x08, 0x0C, 0x40
EV_SLOT_SIZE = 64
EV_SLOTS = (REGION_SIZE - EVENTS - EV_RING) // EV_SLOT_SIZE  # 63
EV_SLOT_FORMAT = "<IIQ"  # type, pec, timestamp (ns); the 32-byte CCDF follows at +16
EV_CCDF = 16

# the fields a REGION_WRITE may change (everything else is zpcid's)
WRITABLE_RANGES = (
    (HDR_MODE, HDR_MODE + 4),
    (HDR_MEM_LIMIT, HDR_MEM_LIMIT + 8),
    (HDR_VMM_FLAGS, HDR_VMM_UID + 4),
    (MAILBOX, MAILBOX + MB_RESULT),
    (MAILBOX + MB_CLP_REQ, MAILBOX + MB_CLP_RESP),
    (MB_DATA, MB_DATA + MB_DATA_SIZE),
    (EVENTS + EV_CONSUMER, EVENTS + EV_CONSUMER + 4),
)


def with_status(reg: int, status: int) -> int:
    """A register with the status code stored at bits 24-31 (as the instructions store it)."""
    return (reg & ~(0xFF << 24)) | ((status & 0xFF) << 24)
