"""QEMU's vfio-user-pci behind a ``zpci`` device, s390x guest, against zpcid functions.

The daemon serves in the test's trio loop, QEMU runs in a worker thread (the
boot helper blocks). One boot serves all the tests of one scenario:

* a ``memory`` function: the guest finds it as a zPCI function with the
  configured UID/FID and reaches its BARs through the s390 PCI MMIO system
  calls (a tiny static s390x program generated below: busybox cannot do it,
  and /dev/mem does not lead to PCI BARs on s390);
* a ``virtio-blk`` function, once with the guest's default IOMMU mode and once
  with ``iommu.passthrough=1``: the guest's virtio_blk driver writes a 4 MiB
  pattern with O_DIRECT, reads it back and compares checksums; QEMU turns each
  guest IOMMU mapping into per-page DMA_MAP messages.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import struct
from pathlib import Path

import pytest

import harness
import qemu as qh
from harness import PCI_COMMAND, Session
from zpcid.devices import memory as mem
from zpcid.zpci.properties import ZpciProperties

ZPCI_UID, ZPCI_FID = 0x1234, 0x10
GUEST_MEM = 512 << 20  # qh.run_guest's default guest RAM
# QEMU's default start of the guest DMA aperture (sdma); the guest kernel ends it
# at the size of its memory.
APERTURE_START = 1 << 32
PAGE = 4096

BOOT_TIMEOUT = 60.0

PCI_COMMAND_MEMORY = 0x2
# <linux/ioport.h> flags, as printed in /sys/bus/pci/devices/*/resource.
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000

# What the daemon logs when a client or the daemon itself misbehaves.
BAD_EVENTS = {"protocol_error", "handler_failed", "session_failed", "unexpected_reply",
              "device_task_failed", "detach_forced"}


# ------------------------------------------------------------------ s390x MMIO program
# The kernel lets a process reach a PCI BAR it has mmapped from sysfs
# (resourceN) only through s390_pci_mmio_read/write: without MIO (QEMU's TCG
# has none) the mapping holds the BAR's I/O cookie, not memory, and the kernel
# issues PCILG/PCISTG for the process. No s390x toolchain is at hand, so the
# program is assembled here: straight-line code, no branches; each system
# call's return value is stored and the whole result area written to stdout.

S390_SYS_EXIT, S390_SYS_WRITE, S390_SYS_OPEN, S390_SYS_MMAP = 1, 4, 5, 90  # mmap: old_mmap
S390_SYS_PCI_MMIO_WRITE, S390_SYS_PCI_MMIO_READ = 352, 353
O_RDWR = 2
PROT_READ_WRITE, MAP_SHARED = 3, 1
EM_S390 = 22
LOAD_ADDRESS = 0x0100_0000
ELF_HEADERS = 64 + 56  # ELF64 header + one program header


class _S390Asm:
    """The handful of z/Architecture instructions the program needs."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.fixups: list[tuple[int, str]] = []  # (offset of a LARL, data label)

    def larl(self, r: int, label: str) -> None:  # RIL-b, halfword-relative address
        self.fixups.append((len(self.code), label))
        self.code += bytes([0xC0, r << 4]) + bytes(4)

    def lghi(self, r: int, imm: int) -> None:  # RI-a
        self.code += bytes([0xA7, (r << 4) | 0x9]) + struct.pack(">h", imm)

    def agfi(self, r: int, imm: int) -> None:  # RIL-a
        self.code += bytes([0xC2, (r << 4) | 0x8]) + struct.pack(">i", imm)

    def lgr(self, r1: int, r2: int) -> None:  # RRE
        self.code += bytes([0xB9, 0x04, 0x00, (r1 << 4) | r2])

    def _rxy(self, op: int, r: int, base: int, disp: int) -> None:
        self.code += bytes([0xE3, r << 4, (base << 4) | (disp >> 8), disp & 0xFF, 0, op])

    def lg(self, r: int, base: int, disp: int) -> None:
        self._rxy(0x04, r, base, disp)

    def stg(self, r: int, base: int, disp: int) -> None:
        self._rxy(0x24, r, base, disp)

    def syscall(self, nr: int) -> None:
        # Arguments in r2..r7, result in r2; numbers above 255 go in r1 with SVC 0.
        if nr < 256:
            self.code += bytes([0x0A, nr])
        else:
            self.lghi(1, nr)
            self.code += bytes([0x0A, 0])


@dataclasses.dataclass(frozen=True)
class MmioOp:
    bar: int  # index into the program's list of mapped BARs
    offset: int
    read: int = 0  # bytes to read, or
    write: bytes = b""  # bytes to write (device byte order: little-endian)


@dataclasses.dataclass
class MmioResult:
    """What the program printed: open/mmap results per BAR, then one per op."""

    fds: list[int]
    addrs: list[int]
    rcs: list[int]
    data: list[bytes]  # bytes read by each op (b"" for writes)


class MmioProgram:
    """A static s390x ELF that mmaps BAR resource files and runs MMIO ops on them."""

    def __init__(self, bars: list[tuple[str, int]], ops: list[MmioOp]):
        self.bars, self.ops = bars, ops
        nbars = len(bars)
        layout = bytearray()
        labels: dict[str, int] = {}

        def put(label: str, blob: bytes) -> None:
            layout.extend(bytes(-len(layout) % 8))
            labels[label] = len(layout)
            layout.extend(blob)

        put("res", bytes(8 * (2 * nbars + len(ops))))
        for i, op in enumerate(ops):
            put(f"buf{i}", op.write or bytes(op.read))
        self.output_size = len(layout)  # results and buffers, the program's output
        for b, (path, size) in enumerate(bars):
            put(f"mmap{b}", struct.pack(">6Q", 0, size, PROT_READ_WRITE, MAP_SHARED, 0, 0))
            put(f"path{b}", path.encode() + b"\0")
        self.labels = labels

        a = _S390Asm()
        res_fd = lambda b: 16 * b  # noqa: E731
        res_addr = lambda b: 16 * b + 8  # noqa: E731
        for b in range(nbars):
            a.larl(2, f"path{b}")
            a.lghi(3, O_RDWR)
            a.lghi(4, 0)
            a.syscall(S390_SYS_OPEN)
            a.larl(9, "res")
            a.stg(2, 9, res_fd(b))
            a.larl(9, f"mmap{b}")
            a.stg(2, 9, 32)  # the fd field of struct mmap_arg_struct
            a.lgr(2, 9)
            a.syscall(S390_SYS_MMAP)
            a.larl(9, "res")
            a.stg(2, 9, res_addr(b))
        for i, op in enumerate(ops):
            a.larl(9, "res")
            a.lg(2, 9, res_addr(op.bar))
            a.agfi(2, op.offset)
            a.larl(3, f"buf{i}")
            a.lghi(4, op.read or len(op.write))
            a.syscall(S390_SYS_PCI_MMIO_READ if op.read else S390_SYS_PCI_MMIO_WRITE)
            a.larl(9, "res")
            a.stg(2, 9, 16 * nbars + 8 * i)
        a.lghi(2, 1)
        a.larl(3, "res")
        a.lghi(4, self.output_size)
        a.syscall(S390_SYS_WRITE)
        a.lghi(2, 0)
        a.syscall(S390_SYS_EXIT)

        code = a.code
        code += bytes([0x07, 0x07]) * (-(ELF_HEADERS + len(code)) % 8 // 2)  # NOPR padding
        data_start = ELF_HEADERS + len(code)
        for pos, label in a.fixups:
            target = data_start + labels[label]
            code[pos + 2 : pos + 6] = struct.pack(">i", (target - (ELF_HEADERS + pos)) // 2)
        size = ELF_HEADERS + len(code) + len(layout)
        ehdr = (b"\x7fELF\x02\x02\x01\x00" + bytes(8)  # 64-bit, big-endian, SysV
                + struct.pack(">HHIQQQIHHHHHH", 2, EM_S390, 1, LOAD_ADDRESS + ELF_HEADERS,
                              64, 0, 0, 64, 56, 1, 0, 0, 0))
        phdr = struct.pack(">IIQQQQQQ", 1, 7, 0, LOAD_ADDRESS, LOAD_ADDRESS, size, size, 0x1000)
        self.elf = ehdr + phdr + bytes(code) + bytes(layout)
        self.fixups, self.data_start = a.fixups, data_start

    def parse(self, out: bytes) -> MmioResult:
        if len(out) != self.output_size:
            raise ValueError(f"program wrote {len(out)} bytes, expected {self.output_size}")
        nbars = len(self.bars)
        words = struct.unpack_from(f">{2 * nbars + len(self.ops)}q", out)
        data = []
        for i, op in enumerate(self.ops):
            start = self.labels[f"buf{i}"]
            data.append(out[start : start + op.read] if op.read else b"")
        return MmioResult(fds=list(words[0 : 2 * nbars : 2]), addrs=list(words[1 : 2 * nbars : 2]),
                          rcs=list(words[2 * nbars :]), data=data)


def test_mmio_program_layout() -> None:
    """The generated ELF is a static big-endian s390x executable (no QEMU needed)."""
    prog = MmioProgram([("/tmp/fn/resource4", 0x1000)],
                       [MmioOp(0, 0, read=4), MmioOp(0, 8, write=b"\x01\x02\x03\x04")])
    elf = prog.elf
    assert elf[:6] == b"\x7fELF\x02\x02"
    e_type, e_machine, _, e_entry = struct.unpack_from(">HHIQ", elf, 16)
    assert (e_type, e_machine, e_entry) == (2, EM_S390, LOAD_ADDRESS + ELF_HEADERS)
    p_type, p_flags, p_offset, p_vaddr, _, p_filesz, p_memsz = struct.unpack_from(">IIQQQQQ", elf, 64)
    assert (p_type, p_offset, p_vaddr) == (1, 0, LOAD_ADDRESS) and p_filesz == p_memsz == len(elf)
    # Every LARL (C0 r0 i32) lands on its label's data; the path labels hold the paths.
    for pos, label in prog.fixups:
        insn = ELF_HEADERS + pos
        assert elf[insn] == 0xC0 and elf[insn + 1] & 0xF == 0
        target = insn + 2 * struct.unpack_from(">i", elf, insn + 2)[0]
        assert target == prog.data_start + prog.labels[label] and target % 8 == 0
        if label.startswith("path"):
            assert elf[target:].startswith(b"/tmp/fn/resource4\0")
    out = bytes(prog.output_size)
    assert prog.parse(out).rcs == [0, 0]
    with pytest.raises(ValueError):
        prog.parse(out[:-1])


# ------------------------------------------------------------------ common to both functions


def _device_arg(sock: str) -> list[str]:
    vfu = harness.vfio_user_device(sock, "vfu0")
    return ["-device", f"zpci,uid={ZPCI_UID:#x},fid={ZPCI_FID:#x},target=vfu0", "-device", vfu]


def _find_function(vendor: int, device: int) -> str:
    """busybox sh: set D to the function's sysfs directory and print its zPCI identity."""
    return harness.find_function_sh(vendor, device) + """\
echo "UID=$(cat $D/uid)"
echo "FUNCTION_ID=$(cat $D/function_id)"
echo "UID_IS_UNIQUE=$(cat $D/uid_is_unique)"
echo "FUNCTION_HANDLE=$(cat $D/function_handle)"
echo "PFGID=$(cat $D/pfgid)"
echo "PCHID=$(cat $D/pchid)"
echo "MIO_ENABLED=$(cat $D/mio_enabled)"
echo "IOMMU_TYPE=$(cat $D/iommu_group/type)"
"""


def _check_common(s: Session) -> None:
    r = s.result
    assert not r.timed_out, s.diag
    assert r.done and r.exit_status() == 0, s.diag
    assert r.returncode == 0, s.diag
    assert "GUEST-BODY-END" in r.guest_output(), s.diag
    # QEMU reports vfio-user trouble on its stderr as "qemu-system-...: ..." lines.
    assert not [l for l in r.lines if l.startswith("qemu-system-")], s.diag
    assert not [e for e in s.events if e["event"] in BAD_EVENTS or e.get("level") == "error"], s.diag
    detach = s.named("detach")
    assert detach and detach[0]["errors"] == 0, s.diag


def _check_identity(s: Session, vendor: int, device: int) -> None:
    kv = s.kv
    assert kv.get("VENDOR") == f"{vendor:#06x}" and kv.get("DEVICE") == f"{device:#06x}", s.diag
    # With unique UIDs the PCI domain is the UID; sysfs formats as QEMU's own zpci devices.
    assert kv["FN"] == f"{ZPCI_UID:04x}:00:00.0", s.diag
    assert kv["UID"] == f"{ZPCI_UID:#x}" and kv["UID_IS_UNIQUE"] == "1", s.diag
    assert kv["FUNCTION_ID"] == f"{ZPCI_FID:#010x}", s.diag


def _check_emulated_zpci_path(s: Session) -> None:
    """Stock QEMU treats vfio-user-pci as an emulated device: a handle with the
    emulated bit (0x8002....), its default function group, no CLP data or
    instructions from zpcid, and QEMU walks the guest's IOMMU tables itself."""
    kv = s.kv
    assert kv["FUNCTION_HANDLE"].startswith("0x8002"), s.diag
    assert kv["PFGID"] == "0xff", s.diag  # not the function's configured pfgid
    assert s.fn.props.pfgid != 0xFF
    assert kv["MIO_ENABLED"] == "0", s.diag
    assert s.fn.zpci.describe()["mode"] == "vmm-translates"
    assert s.fn.counters.rpcit_calls == 0 and s.fn.zpci.shadow.mapped == 0


# ------------------------------------------------------------------ memory function

MEM_VENDOR, MEM_DEVICE = 0x1014, 0xFE01
MEM_CLASS = 0x050000
RAM_SIZE = 1 << 20
MSIX_BAR_SIZE = 0x4000
REGS_BAR_SIZE = 0x1000
SCRATCH_VALUE = 0x5A17C0DE
HOST_OFFSET, HOST_VALUE = 0x2000, 0x600DF00D  # the host writes, the guest reads
# (offset, value) words the guest writes into BAR0; the last word of the BAR
# shows all of the RAM is reachable, not just its first page.
GUEST_PATTERN = ((0x100, 0x11223344), (0x1000, 0xCAFEF00D), (RAM_SIZE - 4, 0x0BADC0DE))
# The bottom of the guest's DMA aperture: no driver mapped anything, so QEMU
# has sent no DMA_MAP and the function's DMA there must fault.
UNMAPPED_IOVA = APERTURE_START
DMA_LEN = 64

BAR0, BAR4 = 0, 1  # indexes into the program's BAR list
DMA_STATUS_POLLS = 16


def _le(value: int, n: int = 4) -> bytes:
    return value.to_bytes(n, "little")


MEM_OPS: dict[str, MmioOp] = {
    "magic": MmioOp(BAR4, mem.REG_MAGIC, read=4),
    "version": MmioOp(BAR4, mem.REG_VERSION, read=4),
    "ram_size": MmioOp(BAR4, mem.REG_RAM_SIZE, read=8),
    "scratch_w": MmioOp(BAR4, mem.REG_SCRATCH, write=_le(SCRATCH_VALUE)),
    "scratch": MmioOp(BAR4, mem.REG_SCRATCH, read=4),
    "host_word": MmioOp(BAR0, HOST_OFFSET, read=4),
    **{f"ram_w{off:x}": MmioOp(BAR0, off, write=_le(val)) for off, val in GUEST_PATTERN},
    **{f"ram{off:x}": MmioOp(BAR0, off, read=4) for off, _ in GUEST_PATTERN},
    "dma_addr_w": MmioOp(BAR4, mem.REG_DMA_ADDR, write=_le(UNMAPPED_IOVA, 8)),
    "dma_len_w": MmioOp(BAR4, mem.REG_DMA_LEN, write=_le(DMA_LEN)),
    "dma_cmd_w": MmioOp(BAR4, mem.REG_DMA_CMD, write=_le(mem.DMA_CMD_FROM_HOST)),
    "magic_after_dma": MmioOp(BAR4, mem.REG_MAGIC, read=4),
    # The copy runs after the command write is answered (status busy until
    # then): the guest reads the status several times, as a driver would poll.
    **{f"dma_status{i}": MmioOp(BAR4, mem.REG_DMA_STATUS, read=4) for i in range(DMA_STATUS_POLLS)},
}
MEM_PROGRAM = MmioProgram([("/tmp/fn/resource0", RAM_SIZE), ("/tmp/fn/resource4", REGS_BAR_SIZE)],
                          list(MEM_OPS.values()))


def _memory_body() -> str:
    return _find_function(MEM_VENDOR, MEM_DEVICE) + f"""\
# No driver binds the function: 'enable' has the kernel turn on memory decoding
# (a config space write QEMU forwards to the function).
echo 1 > $D/enable || echo ENABLE=failed
# Bytes, not od -tx2: the guest is big-endian, config space little-endian.
echo "COMMAND_BYTES=$(od -An -tx1 -j{PCI_COMMAND} -N2 $D/config | tr -d ' ')"
# read() of a memory BAR's resource file is refused; only mmap is offered.
dd if=$D/resource4 of=/dev/null bs=4 count=1 2>/dev/null && echo RESOURCE_READ=ok || echo RESOURCE_READ=refused
ln -s $D /tmp/fn
chmod 0755 /bin/zmmio
/bin/zmmio > /tmp/mmio
echo "MMIO_RC=$?"
echo "MMIO=$(od -An -v -tx1 /tmp/mmio | tr -d ' \\n')"
echo GUEST-BODY-END
"""


@dataclasses.dataclass
class MemoryBoot:
    s: Session
    mmio: MmioResult | None
    ram: bytes  # BAR0's backing file after QEMU left

    def read(self, name: str) -> int:
        assert self.mmio is not None, self.s.diag
        i = list(MEM_OPS).index(name)
        assert self.mmio.rcs[i] == 0, (name, self.mmio.rcs, self.s.diag)
        return int.from_bytes(self.mmio.data[i], "little")


async def _memory_session(qemu: qh.QemuInstall, workdir: Path, sock: str) -> MemoryBoot:
    backing = workdir / "bar0.ram"
    fn = harness.function_types()["memory"]("m0", vendor=MEM_VENDOR, device=MEM_DEVICE,
                                     ram_size=RAM_SIZE, backing=str(backing),
                                     zpci=ZpciProperties(fid=ZPCI_FID, uid=ZPCI_UID))
    # The host side writes through the shared backing file, as any other process would.
    with open(backing, "r+b") as f:
        f.seek(HOST_OFFSET)
        f.write(_le(HOST_VALUE))
    boot = functools.partial(
        qh.run_guest, qemu, "s390x", qh.guest_script(_memory_body()), qemu_args=_device_arg(sock),
        timeout=BOOT_TIMEOUT, extra_files={"bin/zmmio": MEM_PROGRAM.elf})

    async def next_client(c) -> dict[str, int]:
        return {"magic": int.from_bytes(await c.region_read(4, mem.REG_MAGIC, 4), "little"),
                "scratch": int.from_bytes(await c.region_read(4, mem.REG_SCRATCH, 4), "little"),
                "host_word": int.from_bytes(await c.region_read(0, HOST_OFFSET, 4), "little")}

    try:
        s = await harness.serve_one_boot(fn, sock, workdir / "zpcid.log", boot, next_client)
    finally:
        fn.close()
    mmio = None
    if "MMIO" in s.kv:
        try:
            mmio = MEM_PROGRAM.parse(bytes.fromhex(s.kv["MMIO"]))
        except ValueError:
            pass
    return MemoryBoot(s, mmio, backing.read_bytes())


@pytest.fixture(scope="module")
def memory_boot(qemu, tmp_path_factory) -> MemoryBoot:
    workdir = tmp_path_factory.mktemp("vfio-user-s390x-memory")
    return harness.run_with_socket(functools.partial(_memory_session, qemu, workdir))


def test_memory_guest_ran_cleanly(memory_boot: MemoryBoot) -> None:
    _check_common(memory_boot.s)


def test_memory_enumerates_as_zpci_function(memory_boot: MemoryBoot) -> None:
    s = memory_boot.s
    _check_identity(s, MEM_VENDOR, MEM_DEVICE)
    assert int(s.kv["CLASS"], 16) == MEM_CLASS, s.diag
    _check_emulated_zpci_path(s)


def test_memory_bars(memory_boot: MemoryBoot) -> None:
    """BAR0 RAM (prefetchable), BAR2 MSI-X, BAR4 registers: 64-bit memory BARs,
    at s390 I/O cookie addresses rather than physical ones."""
    kv = memory_boot.s.kv
    rows = []
    for i in range(7):  # six BARs and the expansion ROM
        start, end, flags = (int(x, 16) for x in kv[f"RES{i}"].split())
        rows.append((start, end - start + 1 if end else 0, flags))
    for index, size, prefetch in ((0, RAM_SIZE, True), (2, MSIX_BAR_SIZE, False),
                                  (4, REGS_BAR_SIZE, False)):
        start, got, flags = rows[index]
        assert got == size, (index, rows, memory_boot.s.diag)
        assert start >= 1 << 62, (index, hex(start))  # beyond any memory: an iomap cookie
        assert flags & IORESOURCE_MEM and flags & IORESOURCE_MEM_64, (index, hex(flags))
        assert bool(flags & IORESOURCE_PREFETCH) == prefetch, (index, hex(flags))
        assert rows[index + 1][1] == 0, (index, rows)  # upper half of a 64-bit BAR
    assert rows[6][1] == 0, rows
    assert kv["RESOURCE_READ"] == "refused", memory_boot.s.diag


def test_memory_config_space_writes_reach_the_function(memory_boot: MemoryBoot) -> None:
    s = memory_boot.s
    assert "ENABLE" not in s.kv, s.diag
    command = int.from_bytes(bytes.fromhex(s.kv["COMMAND_BYTES"]), "little")
    assert command & PCI_COMMAND_MEMORY, s.diag
    # The function's own config space had decoding on while the guest ran.
    assert s.peaks.get("command", 0) & PCI_COMMAND_MEMORY, s.peaks


def test_memory_registers_through_pci_mmio_syscalls(memory_boot: MemoryBoot) -> None:
    b = memory_boot
    assert b.s.kv.get("MMIO_RC") == "0" and b.mmio is not None, b.s.diag
    assert all(fd >= 0 for fd in b.mmio.fds) and all(a > 0 for a in b.mmio.addrs), (b.mmio, b.s.diag)
    assert b.read("magic") == mem.MAGIC
    assert b.read("version") == 1
    assert b.read("ram_size") == RAM_SIZE
    assert b.read("scratch_w") == 0 and b.read("scratch") == SCRATCH_VALUE
    # The function itself saw the guest's PCISTG (its own event, not QEMU's echo).
    writes = [int(e["value"], 16) for e in b.s.named("scratch_write")]
    assert writes == [SCRATCH_VALUE], b.s.diag


def test_memory_bar0_is_the_shared_backing_file(memory_boot: MemoryBoot) -> None:
    b = memory_boot
    assert b.read("host_word") == HOST_VALUE
    assert len(b.ram) == RAM_SIZE
    for off, val in GUEST_PATTERN:
        assert b.read(f"ram_w{off:x}") == 0 and b.read(f"ram{off:x}") == val, hex(off)
        assert struct.unpack_from("<I", b.ram, off)[0] == val, (hex(off), b.s.diag)


def test_memory_dma_needs_a_guest_iommu_mapping(memory_boot: MemoryBoot) -> None:
    """QEMU sends no DMA_MAP until a guest driver maps memory for the device, so
    on s390x the function's DMA into the aperture faults; the function lives on."""
    b = memory_boot
    assert not b.s.protocol_maps() and b.s.peaks.get("dma_maps", 0) == 0, b.s.diag
    assert b.read("dma_cmd_w") == 0
    assert b.read("magic_after_dma") == mem.MAGIC
    polls = [b.read(f"dma_status{i}") for i in range(DMA_STATUS_POLLS)]
    # Busy until the deferred copy has run, then the fault, and it stays.
    done = [st for st in polls if st != mem.DMA_STATUS_BUSY]
    assert done and set(done) == {mem.DMA_STATUS_FAULT}, polls
    assert polls[polls.index(mem.DMA_STATUS_FAULT):] == done, polls
    faults = b.s.named("dma_fault")
    assert len(faults) == 1 and f"{UNMAPPED_IOVA:#x}" in faults[0]["error"], b.s.diag


def test_memory_function_is_reset_and_serves_the_next_client(memory_boot: MemoryBoot) -> None:
    s = memory_boot.s
    # QEMU hands over its REQ (and ERR) eventfds at attach, whatever the guest does.
    assert s.peaks.get("irq_eventfds", 0) >= 1, s.peaks
    assert s.after_detach == {"dma_maps": 0, "dma_files": 0, "irq_eventfds": 0, "command": 0,
                              "msix_enabled": False, "attaches": 1}, s.diag
    assert s.next_client == {"magic": mem.MAGIC, "scratch": 0, "host_word": HOST_VALUE,
                             "attaches": 2}
    assert [e["event"] for e in s.events].count("detach") == 2, s.diag


# ------------------------------------------------------------------ virtio-blk function

VBLK_VENDOR, VBLK_DEVICE = 0x1AF4, 0x1042
VBLK_CLASS = 0x010000
DISK_SIZE = 16 << 20
GUEST_OFFSET = 1 << 20  # where the guest writes its pattern (bytes)
GUEST_LEN = 4 << 20
HOST_OFFSET_BLK = 12 << 20  # where the host wrote before boot
HOST_LEN = 64 << 10
DD_BS = 1 << 20
SERIAL = "zpcid-s390x-0001"
PASSTHROUGH = "iommu.passthrough=1"


GUEST_DATA = harness.pattern(b"s390x-guest", GUEST_LEN)
HOST_DATA = harness.pattern(b"s390x-host", HOST_LEN)


def _vblk_body() -> str:
    return _find_function(VBLK_VENDOR, VBLK_DEVICE) + harness.WAIT_FOR_VDA + f"""\
echo "DRIVER=$(basename $(readlink $D/driver))"
echo "SIZE=$(cat /sys/block/vda/size)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "HOSTMD5=$(dd if=/dev/vda bs=4096 skip={HOST_OFFSET_BLK // 4096} count={HOST_LEN // 4096} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
dd if=/pattern.bin of=/dev/vda bs={DD_BS} seek={GUEST_OFFSET // DD_BS} oflag=direct conv=fsync 2>/dev/null && echo DD=ok
echo 3 > /proc/sys/vm/drop_caches
echo "BACKMD5=$(dd if=/dev/vda bs={DD_BS} skip={GUEST_OFFSET // DD_BS} count={GUEST_LEN // DD_BS} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "PATTERNMD5=$(md5sum /pattern.bin | cut -d' ' -f1)"
grep "PCI-MSIX-${{D##*/}}" /proc/interrupts | while read irq count rest; do echo "MSIX ${{rest##* }} $count"; done
dmesg | grep -i iommu | sed 's/^\\[[ 0-9.]*\\] /IOMMU_LOG /'
echo GUEST-BODY-END
"""


@dataclasses.dataclass
class VblkBoot:
    s: Session
    append: str
    disk: bytes
    stats: dict[str, int]

    def msix_counts(self) -> dict[str, int]:
        out = {}
        for line in self.s.result.guest_output().splitlines():
            if line.startswith("MSIX "):
                _, name, count = line.split()
                out[name] = int(count)
        return out

    def iommu_log(self) -> list[str]:
        return [l[len("IOMMU_LOG "):] for l in self.s.result.guest_output().splitlines()
                if l.startswith("IOMMU_LOG ")]


async def _vblk_session(qemu: qh.QemuInstall, workdir: Path, sock: str, append: str) -> VblkBoot:
    disk = workdir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(HOST_OFFSET_BLK)
        f.write(HOST_DATA)
    fn = harness.function_types()["virtio-blk"]("vblk0", path=str(disk), serial=SERIAL,
                                         zpci=ZpciProperties(fid=ZPCI_FID, uid=ZPCI_UID))
    script = qh.guest_script_for(qemu, "s390x", _vblk_body(), modules=["virtio_blk"])
    boot = functools.partial(
        qh.run_guest, qemu, "s390x", script, qemu_args=_device_arg(sock), append=append,
        modules=["virtio_blk"], extra_files={"pattern.bin": GUEST_DATA}, timeout=BOOT_TIMEOUT)

    async def next_client(c) -> dict[str, int]:
        cfg = await c.region_read(7, 0, 4)  # config space: vendor and device IDs
        return {"vendor": int.from_bytes(cfg[:2], "little"),
                "device": int.from_bytes(cfg[2:], "little")}

    try:
        s = await harness.serve_one_boot(fn, sock, workdir / "zpcid.log", boot, next_client,
                                         after=lambda fn: {"virtio_status": fn.transport.status})
    finally:
        fn.close()
    return VblkBoot(s, append, disk.read_bytes(), dict(fn.stats))


@pytest.fixture(scope="module", params=["", PASSTHROUGH], ids=["default-iommu", "passthrough"])
def vblk_boot(request, qemu, tmp_path_factory) -> VblkBoot:
    if "virtio-blk" not in harness.function_types():
        pytest.skip("the virtio-blk function type is not available (zpcid.devices.virtio_blk)")
    workdir = tmp_path_factory.mktemp("vfio-user-s390x-vblk")
    return harness.run_with_socket(
        functools.partial(_vblk_session, qemu, workdir, append=request.param))


def test_vblk_guest_ran_cleanly(vblk_boot: VblkBoot) -> None:
    _check_common(vblk_boot.s)
    assert "ZPCID-INSMOD-FAILED" not in vblk_boot.s.result.output, vblk_boot.s.diag


def test_vblk_driver_binds_the_zpci_function(vblk_boot: VblkBoot) -> None:
    s = vblk_boot.s
    _check_identity(s, VBLK_VENDOR, VBLK_DEVICE)
    assert int(s.kv["CLASS"], 16) == VBLK_CLASS, s.diag
    _check_emulated_zpci_path(s)
    assert s.kv.get("DRIVER") == "virtio-pci", s.diag
    assert s.kv.get("SIZE") == str(DISK_SIZE // 512), s.diag
    assert s.kv.get("SERIAL") == SERIAL, s.diag


def test_vblk_pattern_round_trip(vblk_boot: VblkBoot) -> None:
    s, kv = vblk_boot.s, vblk_boot.s.kv
    assert kv.get("HOSTMD5") == hashlib.md5(HOST_DATA).hexdigest(), s.diag
    assert kv.get("DD") == "ok", s.diag
    assert kv.get("PATTERNMD5") == hashlib.md5(GUEST_DATA).hexdigest(), s.diag
    assert kv.get("BACKMD5") == kv["PATTERNMD5"], s.diag
    disk = vblk_boot.disk
    assert disk[GUEST_OFFSET : GUEST_OFFSET + GUEST_LEN] == GUEST_DATA
    assert disk[HOST_OFFSET_BLK : HOST_OFFSET_BLK + HOST_LEN] == HOST_DATA
    assert disk[:GUEST_OFFSET] == bytes(GUEST_OFFSET)  # nothing written out of place
    st = vblk_boot.stats
    assert st["bytes_written"] == GUEST_LEN and st["flushes"] >= 1, st
    assert st["bytes_read"] >= GUEST_LEN + HOST_LEN, st
    assert st["ioerr"] == 0 and st["needs_reset"] == 0, st


def test_vblk_msix_interrupts_reach_the_guest(vblk_boot: VblkBoot) -> None:
    s = vblk_boot.s
    counts = vblk_boot.msix_counts()
    # One vector for configuration changes, one per request queue.
    assert set(counts) == {"virtio0-config", "virtio0-req.0"}, s.diag
    assert counts["virtio0-req.0"] > 0, counts
    assert s.peaks.get("msix_enabled") == 1 and s.peaks.get("irq_eventfds", 0) >= 3, s.peaks


def test_vblk_guest_iommu_domain(vblk_boot: VblkBoot) -> None:
    """The guest always ends up with a translating DMA domain: with stock QEMU
    relaxed translation is off for vfio-user devices, so the identity domain
    that iommu.passthrough=1 asks for cannot be had."""
    s, logs = vblk_boot.s, "\n".join(vblk_boot.iommu_log())
    if vblk_boot.append == PASSTHROUGH:
        assert "Default domain type: Passthrough" in logs, logs
        assert "Failed to allocate default IOMMU domain of type 4" in logs, logs
        assert "Falling back to IOMMU_DOMAIN_DMA" in logs, logs
        assert s.kv["IOMMU_TYPE"] == "DMA", s.diag
    else:
        assert "Default domain type: Translated" in logs, logs
        assert s.kv["IOMMU_TYPE"] in ("DMA", "DMA-FQ"), s.diag


def test_vblk_guest_dma_arrives_as_per_page_maps(vblk_boot: VblkBoot) -> None:
    """Each page the guest's IOMMU maps becomes one 4 KiB DMA_MAP with an fd,
    at an IOVA in the guest's aperture; offset = guest physical address."""
    s = vblk_boot.s
    maps = [c for c in s.dma_changes if c[0] == "map"]
    logged = s.protocol_maps()
    assert len(maps) == len(logged), s.diag
    # The 4 MiB written and read back each cross the IOMMU page by page.
    assert len(maps) >= 2 * GUEST_LEN // PAGE, len(maps)
    for _, iova, size, offset, fd, _ in maps:
        assert size == PAGE and fd and iova % PAGE == 0 and offset % PAGE == 0, (hex(iova), size)
        assert APERTURE_START <= iova < APERTURE_START + GUEST_MEM, hex(iova)
        assert offset < GUEST_MEM, hex(offset)
    flags = collections.Counter(e["flags"] for e in logged)
    # Buffers the device only reads (the guest's writes) are mapped read-only.
    assert set(flags) == {1, 3} and min(flags.values()) >= GUEST_LEN // PAGE, flags
    unmaps = s.protocol_unmaps()
    # Shown with -s: the figures for docs and reports.
    print("FIGURES", json.dumps({
        "append": vblk_boot.append, "boot_s": round(s.result.duration, 2),
        "dma_map": len(logged), "dma_map_ro": flags[1], "dma_map_rw": flags[3],
        "dma_unmap": len(unmaps), "pages_unmapped_by_qemu": sum(e["removed"] for e in unmaps),
        "unmap_sizes": collections.Counter(e["size"] for e in unmaps).most_common(4),
        "peak_live_maps": s.peaks.get("dma_maps"), "messages": s.named("detach")[0]["messages"],
        "iova_lo": hex(min(c[1] for c in maps)), "iova_hi": hex(max(c[1] + c[2] for c in maps)),
        "iommu_type": s.kv["IOMMU_TYPE"], "handle": s.kv["FUNCTION_HANDLE"],
        "msix": vblk_boot.msix_counts()}))


def test_vblk_unmaps_and_detach(vblk_boot: VblkBoot) -> None:
    s = vblk_boot.s
    maps = [c for c in s.dma_changes if c[0] == "map"]
    unmaps = s.protocol_unmaps()
    assert unmaps and not any(e["all"] for e in unmaps), s.diag
    # QEMU's DMA_UNMAPs removed what they covered; whatever it left went at detach.
    removed = sum(e["removed"] for e in unmaps)
    assert 0 < removed <= len(maps), (removed, len(maps))
    assert sum(1 for c in s.dma_changes if c[0] == "unmap") == len(maps)
    assert s.peaks.get("dma_maps", 0) >= 1, s.peaks
    assert {k: s.after_detach[k] for k in ("dma_maps", "dma_files", "irq_eventfds", "command",
                                           "msix_enabled", "virtio_status", "attaches")} == {
        "dma_maps": 0, "dma_files": 0, "irq_eventfds": 0, "command": 0, "msix_enabled": False,
        "virtio_status": 0, "attaches": 1}, s.diag
    assert s.next_client == {"vendor": VBLK_VENDOR, "device": VBLK_DEVICE, "attaches": 2}
    assert s.fn.dma.file_count == 0
