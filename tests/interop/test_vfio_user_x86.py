"""QEMU's vfio-user-pci against a zpcid ``memory`` function, x86_64 guest.

One boot serves every test in this module: the daemon runs in a trio loop,
QEMU in a worker thread (the boot helper blocks). The guest enumerates the
function, pokes its BARs with busybox ``devmem`` and powers off; the host
then checks what reached the function, and that the socket, once QEMU is
gone, serves the reference client.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from pathlib import Path

import pytest

import harness
import qemu as qh
from harness import Session
from zpcid.devices import memory as mem

VENDOR, DEVICE = 0x1014, 0xFE01
CLASS = 0x050000  # memory controller, RAM (what MemoryFunction declares)
RAM_SIZE = 2 << 20  # not the type's default, so BAR0's size is ours
MSIX_BAR_SIZE = 0x4000
REGS_BAR_SIZE = 0x1000
PCI_COMMAND_MEMORY = 0x2

# <linux/ioport.h> flags, as printed in /sys/bus/pci/devices/*/resource.
IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000

SCRATCH_VALUE = 0x5A17C0DE
# (offset, value) words the guest writes into BAR0; the last word of the BAR
# shows the whole RAM is mapped, not just its first page.
GUEST_PATTERN = ((0x100, 0x11223344), (0x104, 0xA5A55A5A), (0x1000, 0xCAFEF00D),
                 (RAM_SIZE - 4, 0x0BADC0DE))
HOST_OFFSET, HOST_VALUE = 0x2000, 0x600DF00D  # the host writes, the guest reads
DMA_LEN = 36  # an ACPI table header, read from guest RAM by device DMA
UNMAPPED_IOVA = 1 << 36  # far above the guest's 512 MiB: no DMA map there

BOOT_TIMEOUT = 90.0


def _guest_body() -> str:
    """busybox sh: find the function, print its identity and BARs, access them."""
    pattern = "\n".join(
        f'wr "$B0 + {off}" 32 {val:#x}\necho "RAM_{off:X}=$(rd "$B0 + {off}" 32)"'
        for off, val in GUEST_PATTERN
    )
    return harness.find_function_sh(VENDOR, DEVICE) + f"""\
rd() {{ devmem $(printf 0x%x $(($1))) $2; }}
wr() {{ devmem $(printf 0x%x $(($1))) $2 $3; }}
# No driver binds the function: 'enable' has the kernel turn on memory decoding.
echo 1 > $D/enable || echo ENABLE=failed
echo "COMMAND=0x$(dd if=$D/config bs=2 skip=2 count=1 2>/dev/null | od -An -tx2 | tr -d ' ')"
B0=$(sed -n 1p $D/resource | cut -d' ' -f1)
B4=$(sed -n 5p $D/resource | cut -d' ' -f1)
echo "MAGIC=$(rd "$B4 + {mem.REG_MAGIC}" 32)"
echo "VERSION=$(rd "$B4 + {mem.REG_VERSION}" 32)"
echo "REG_RAM_SIZE=$(rd "$B4 + {mem.REG_RAM_SIZE}" 64)"
wr "$B4 + {mem.REG_SCRATCH}" 32 {SCRATCH_VALUE:#x}
echo "SCRATCH=$(rd "$B4 + {mem.REG_SCRATCH}" 32)"
echo "HOST_WORD=$(rd "$B0 + {HOST_OFFSET}" 32)"
# Device DMA from guest RAM into BAR0[0:len]: the DSDT header, whose physical
# address is the FADT's 32-bit Dsdt field (offset 40).
DSDT=$(od -An -tu4 -j40 -N4 /sys/firmware/acpi/tables/FACP | tr -d ' ')
echo "DSDT_ADDR=$DSDT"
echo "DSDT_HEAD=$(od -An -tx1 -N{DMA_LEN} /sys/firmware/acpi/tables/DSDT | tr -d ' \\n')"
wr "$B4 + {mem.REG_DMA_ADDR}" 64 $DSDT
wr "$B4 + {mem.REG_DMA_LEN}" 32 {DMA_LEN}
wr "$B4 + {mem.REG_DMA_CMD}" 32 {mem.DMA_CMD_FROM_HOST}
echo "DMA_STATUS=$(rd "$B4 + {mem.REG_DMA_STATUS}" 32)"
# DMA to an address QEMU never mapped: a fault the function reports, nothing more.
wr "$B4 + {mem.REG_DMA_ADDR}" 64 {UNMAPPED_IOVA:#x}
wr "$B4 + {mem.REG_DMA_CMD}" 32 {mem.DMA_CMD_TO_HOST}
echo "FAULT_STATUS=$(rd "$B4 + {mem.REG_DMA_STATUS}" 32)"
echo "MAGIC_AFTER_FAULT=$(rd "$B4 + {mem.REG_MAGIC}" 32)"
{pattern}
echo GUEST-BODY-END
"""


@dataclasses.dataclass
class Boot:
    """The QEMU session against the function, and BAR0's backing file after it."""

    s: Session
    ram: bytes


async def _session(qemu: qh.QemuInstall, workdir: Path, sock: str) -> Boot:
    backing = workdir / "bar0.ram"
    # iomem=relaxed: the kernel's IO_STRICT_DEVMEM must not stand between
    # /dev/mem and BARs (no driver claims them, but be explicit).
    boot = functools.partial(qh.run_guest, qemu, "x86_64", qh.guest_script(_guest_body()),
                             qemu_args=["-device", harness.vfio_user_device(sock, "zpcid0")],
                             append="iomem=relaxed", timeout=BOOT_TIMEOUT)
    # By type name and options, as a configuration file would ask for it.
    fn = harness.function_types()["memory"]("qemu0", ram_size=RAM_SIZE, backing=str(backing),
                                            vendor=VENDOR, device=DEVICE)
    # The host side writes through the shared backing file, as any other process would.
    with open(backing, "r+b") as f:
        f.seek(HOST_OFFSET)
        f.write(struct.pack("<I", HOST_VALUE))

    def scratch(fn) -> dict[str, int]:
        return {"scratch": struct.unpack_from("<I", fn.regs, mem.REG_SCRATCH)[0]}

    async def next_client(c) -> dict[str, int]:
        return {"magic": int.from_bytes(await c.region_read(4, mem.REG_MAGIC, 4), "little"),
                "scratch": int.from_bytes(await c.region_read(4, mem.REG_SCRATCH, 4), "little"),
                "host_word": int.from_bytes(await c.region_read(0, HOST_OFFSET, 4), "little")}

    try:
        s = await harness.serve_one_boot(fn, sock, workdir / "zpcid.log", boot, next_client,
                                         after=scratch)
    finally:
        fn.close()
    return Boot(s, backing.read_bytes())


@pytest.fixture(scope="module")
def boot(qemu, tmp_path_factory) -> Boot:
    workdir = tmp_path_factory.mktemp("vfio-user-x86")
    return harness.run_with_socket(functools.partial(_session, qemu, workdir))


def test_guest_ran_to_completion(boot: Boot) -> None:
    r = boot.s.result
    assert not r.timed_out, boot.s.diag
    assert r.done and r.exit_status() == 0, boot.s.diag
    assert r.returncode == 0, boot.s.diag
    assert "GUEST-BODY-END" in r.guest_output(), boot.s.diag
    # QEMU reports vfio-user trouble on its stderr as "qemu-system-...: ..." lines.
    assert not [l for l in r.lines if l.startswith("qemu-system-")], boot.s.diag
    bad = {"protocol_error", "handler_failed", "session_failed", "unexpected_reply"}
    assert not [e for e in boot.s.events if e["event"] in bad], boot.s.diag


def test_guest_sees_configured_identity(boot: Boot) -> None:
    kv = boot.s.kv
    assert kv.get("VENDOR") == f"{VENDOR:#06x}", boot.s.diag
    assert kv.get("DEVICE") == f"{DEVICE:#06x}", boot.s.diag
    assert int(kv["CLASS"], 16) == CLASS, boot.s.diag


def test_guest_sees_bars(boot: Boot) -> None:
    """BAR0 RAM (prefetchable), BAR2 MSI-X, BAR4 registers: 64-bit memory BARs."""
    rows = []
    for i in range(7):  # six BARs and the expansion ROM
        start, end, flags = (int(x, 16) for x in boot.s.kv[f"RES{i}"].split())
        rows.append((start, end - start + 1 if end else 0, flags))
    for index, size, prefetch in ((0, RAM_SIZE, True), (2, MSIX_BAR_SIZE, False),
                                  (4, REGS_BAR_SIZE, False)):
        start, got, flags = rows[index]
        assert got == size, (index, rows, boot.s.diag)
        assert start and start % size == 0, (index, rows)
        assert flags & IORESOURCE_MEM and not flags & IORESOURCE_IO, (index, hex(flags))
        assert flags & IORESOURCE_MEM_64, (index, hex(flags))
        assert bool(flags & IORESOURCE_PREFETCH) == prefetch, (index, hex(flags))
        assert rows[index + 1] == (0, 0, 0), (index, rows)  # upper half of a 64-bit BAR
    assert rows[6][1] == 0, rows  # no expansion ROM


def test_trapped_registers_reach_the_function(boot: Boot) -> None:
    kv = boot.s.kv
    assert "ENABLE" not in kv, boot.s.diag
    assert int(kv["COMMAND"], 16) & PCI_COMMAND_MEMORY, boot.s.diag
    assert int(kv["MAGIC"], 16) == mem.MAGIC, boot.s.diag
    assert int(kv["VERSION"], 16) == 1, boot.s.diag
    assert int(kv["REG_RAM_SIZE"], 16) == RAM_SIZE, boot.s.diag
    assert int(kv["SCRATCH"], 16) == SCRATCH_VALUE, boot.s.diag
    # The function itself saw the guest's write (its own event, not QEMU's echo).
    writes = [int(e["value"], 16) for e in boot.s.named("scratch_write")]
    assert writes == [SCRATCH_VALUE], boot.s.diag


def test_bar0_is_the_shared_backing_file(boot: Boot) -> None:
    kv = boot.s.kv
    assert int(kv["HOST_WORD"], 16) == HOST_VALUE, boot.s.diag
    assert len(boot.ram) == RAM_SIZE
    for off, val in GUEST_PATTERN:
        assert int(kv[f"RAM_{off:X}"], 16) == val, boot.s.diag
        assert struct.unpack_from("<I", boot.ram, off)[0] == val, (hex(off), boot.s.diag)


def test_guest_ram_arrives_as_fd_dma_maps(boot: Boot) -> None:
    maps = [c for c in boot.s.dma_changes if c[0] == "map"]
    # All guest RAM (512 MiB memfd) is mapped writable through descriptors...
    assert any(fd and writable and size >= 256 << 20 for _, _, size, _, fd, writable in maps), maps
    logged = boot.s.protocol_maps()  # the endpoint's events
    assert len(logged) == len(maps) and any(e["fd"] for e in logged), boot.s.diag
    # ...and the function reached it by DMA: BAR0 starts with what the guest
    # kernel reads at that physical address.
    kv = boot.s.kv
    assert int(kv["DMA_STATUS"], 16) == 0, boot.s.diag
    head = bytes.fromhex(kv["DSDT_HEAD"])
    assert head[:4] == b"DSDT" and len(head) == DMA_LEN, boot.s.diag
    assert boot.ram[:DMA_LEN] == head, boot.s.diag


def test_dma_outside_the_maps_is_a_fault_not_a_failure(boot: Boot) -> None:
    kv = boot.s.kv
    assert int(kv["FAULT_STATUS"], 16) == 1, boot.s.diag
    assert int(kv["MAGIC_AFTER_FAULT"], 16) == mem.MAGIC, boot.s.diag
    faults = boot.s.named("dma_fault")
    assert len(faults) == 1 and f"{UNMAPPED_IOVA:#x}" in faults[0]["error"], boot.s.diag


def test_function_is_reset_and_serves_the_next_client(boot: Boot) -> None:
    # While attached QEMU had DMA maps and eventfds (SET_IRQS with descriptors)...
    assert boot.s.peaks.get("dma_maps", 0) > 0, boot.s.peaks
    assert boot.s.peaks.get("irq_eventfds", 0) > 0, boot.s.peaks
    # ...and its exit left nothing behind: maps, mmaps, eventfds, decoding, registers.
    assert boot.s.after_detach == {"dma_maps": 0, "dma_files": 0, "irq_eventfds": 0,
                                   "command": 0, "msix_enabled": False, "scratch": 0,
                                   "attaches": 1}, boot.s.diag
    # The reference client attaches to the same socket and finds a fresh function
    # (RAM contents are the function's, not the client's, so they persist).
    assert boot.s.next_client == {"magic": mem.MAGIC, "scratch": 0, "host_word": HOST_VALUE,
                                  "attaches": 2}
    assert [e["event"] for e in boot.s.events].count("detach") == 2, boot.s.diag
