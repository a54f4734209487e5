"""`zpcid demo`: one command that shows a guest's zPCI life cycle end to end.

Starts a daemon (in this process) serving one dma-engine function, attaches
the reference client as the VMM and walks the scenario a Linux guest goes
through, checking every step.  Exit code 0 only if everything behaved.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import time

import trio

from protocol.zpci import formats as Z
from zpcid.vmm import client as vclient
from zpcid import log
from protocol.zpci import region as Zr
from crc32c import crc32c
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.zpci.properties import ZpciProperties
from zpcid.vfio_user.server import FunctionServer
from zpcid.vmm.model import attach

SDMA = 0x1_0000_0000
GUEST_MEMORY = 256 << 20
TABLES = (192 << 20, 32 << 20)  # guest memory reserved for translation tables
PAGE = 4096


class Steps:
    def __init__(self, out):
        self.out = out
        self.rows: list[tuple[str, bool, str]] = []
        self.tty = out.isatty()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, bool(ok), detail))
        mark = ("\033[32mok\033[0m" if ok else "\033[31mFAIL\033[0m") if self.tty else ("ok" if ok else "FAIL")
        self.out.write(f"[{len(self.rows):2d}] {name:<52} {mark:>4}  {detail}\n")
        self.out.flush()
        return ok

    def summary(self, elapsed: float) -> int:
        failed = [r for r in self.rows if not r[1]]
        w = max(len(r[0]) for r in self.rows)
        self.out.write("\nsummary\n")
        self.out.write(f"  {'step'.ljust(w)}  result\n")
        for name, ok, _ in self.rows:
            self.out.write(f"  {name.ljust(w)}  {'ok' if ok else 'FAIL'}\n")
        self.out.write(f"\n{len(self.rows) - len(failed)}/{len(self.rows)} steps behaved "
                       f"in {elapsed:.2f} s\n")
        return 1 if failed else 0


async def _dma(vmm, op, src, dst, length, pattern=0) -> tuple[bool, int]:
    st = await Driver(vmm.client).run(op, src, dst, length, pattern)
    return bool(st & D.STATUS_DONE and not st & D.STATUS_ERROR), st


async def scenario(path: str, steps: Steps) -> None:
    async with attach(path, guest_memory=GUEST_MEMORY, enable=False) as vmm:
        box, mem = vmm.box, vmm.mem
        g = Z.ClpQueryPciFnGrpResponse.unpack(box.clp_block("group"))
        q = Z.ClpQueryPciFnResponse.unpack(box.clp_block("query"))
        rtr = bool(g.flags & Z.CLP_FNGRP_RTR)
        refresh = bool(g.flags & Z.CLP_FNGRP_REFRESH)
        steps.check("CLP Query PCI Function Group", rtr,
                    f"RTR={'on' if rtr else 'off'} refresh={'on' if refresh else 'off'} "
                    f"maxstbl={g.maxstbl} pfgid={q.pfgid:#x}")
        steps.check("CLP Query PCI Function", q.uid == 0x1234 and q.fid == 0x10,
                    f"fid={q.fid:#x} uid={q.uid:#x} sdma={q.sdma:#x} edma={q.edma:#x}")
        fh = await vmm.enable_function()
        steps.check("CLP Set PCI Function: enable", fh & Z.FH_MASK_ENABLE and box.state == Zr.State.ENABLED,
                    f"fh={fh:#010x}")

        # adapter interruptions: AIBV/AISB in guest memory, as Linux registers them
        aibv, aisb = 0x8000, 0x8100
        r = await box.mpcifc(Z.ZPCI_MOD_FC_REG_INT,
                             vmm.fib(isc=2, noi=vmm.nvec, aibvo=0, sum=1, aisbo=5, aibv=aibv, aisb=aisb))
        steps.check("MPCIFC register adapter interruptions", r.cc == 0, f"isc=2 noi={vmm.nvec}")

        gt = vmm.tables(*TABLES)
        pal = SDMA + (128 << 20) - 1
        r = await vmm.register_translation(SDMA, pal, gt.iota)
        steps.check("MPCIFC register I/O translation (T=1)", r.cc == 0 and not r.exception,
                    f"iota={gt.iota:#x} [{SDMA:#x}, {pal:#x}]")
        src_gpa, dst_gpa, n = 0x100_0000, 0x200_0000, 256 * PAGE
        src_iova, dst_iova = SDMA + 0x40_0000, SDMA + 0x80_0000
        gt.map(src_iova, src_gpa, n // PAGE, writable=False)
        gt.map(dst_iova, dst_gpa, n // PAGE)
        steps.check("guest builds region/segment/page tables", True,
                    f"{2 * n // PAGE} pages, src read-only")
        if refresh:
            t0 = time.perf_counter()
            r1 = await box.rpcit(src_iova, n)
            r2 = await box.rpcit(dst_iova, n)
            dt = time.perf_counter() - t0
            mapped = box.u32(Zr.HDR_SHADOW)
            steps.check("RPCIT shadows the new mappings", r1.cc == 0 and r2.cc == 0 and mapped == 2 * n // PAGE,
                        f"{mapped} pages in shadow IOTLB, {dt * 1e3:.2f} ms")
        else:
            steps.check("no RPCIT for new mappings (refresh bit off)", box.u32(Zr.HDR_SHADOW) == 0,
                        "zpcid walks the tables on the first DMA")

        payload = os.urandom(n)
        mem.write(src_gpa, payload)
        await vmm.client.region_write(0, D.REG_VECTOR, struct.pack("<I", 1))
        await vmm.client.region_write(0, D.REG_CTRL, struct.pack("<I", D.CTRL_IRQ))
        ok, st = await _dma(vmm, D.OP_COPY, src_iova, dst_iova, n)
        same = mem.read(dst_gpa, n) == payload
        mapped = box.u32(Zr.HDR_SHADOW)
        steps.check("dma-engine copy through the shadow IOMMU", ok and same and mapped == 2 * n // PAGE,
                    f"{n >> 10} KiB verified byte for byte, {mapped} pages in shadow IOTLB")
        fired = vclient.read_eventfd(vmm.msix_fds[1])
        bit = mem.read(aibv, 1)[0] & (0x80 >> 1)
        summary = mem.read(aisb, 1)[0] & (0x80 >> 5)
        steps.check("completion interrupt: AIBV bit, AISB bit, eventfd", fired and bit and summary,
                    "vector 1 -> AIBV bit 1, summary bit 5")
        ok, _ = await _dma(vmm, D.OP_CRC32C, dst_iova, 0, n)
        crc = struct.unpack("<I", await vmm.client.region_read(0, D.REG_RESULT, 4))[0]
        steps.check("dma-engine CRC32C through the shadow IOMMU", ok and crc == crc32c(payload),
                    f"crc32c={crc:#010x}")

        r = await vmm.deregister_translation()
        steps.check("MPCIFC deregister I/O translation", r.cc == 0 and box.u32(Zr.HDR_SHADOW) == 0,
                    "shadow IOTLB emptied")
        r = await vmm.register_translation(SDMA, SDMA + GUEST_MEMORY - 1, 0)
        direct = box.u32(Zr.HDR_IOAT) & 2
        steps.check("re-register without translation (T=0): direct map", r.cc == 0 and direct,
                    f"IOVA = guest address + {SDMA:#x}, no per-page work")
        payload2 = os.urandom(n)
        mem.write(0x300_0000, payload2)
        ok, _ = await _dma(vmm, D.OP_COPY, SDMA + 0x300_0000, SDMA + 0x400_0000, n)
        steps.check("dma-engine copy through the direct map", ok and mem.read(0x400_0000, n) == payload2,
                    f"{n >> 10} KiB verified byte for byte")

        bad = SDMA + GUEST_MEMORY + 0x1000
        ok, st = await _dma(vmm, D.OP_FILL, 0, bad, 64)
        fault = struct.unpack("<Q", await vmm.client.region_read(0, D.REG_FAULT_ADDR, 8))[0]
        steps.check("deliberate bad IOVA is refused", not ok and fault == bad,
                    f"status={st:#x} fault address={fault:#x}")
        events = box.events()
        err = vclient.read_eventfd(vmm.err_fd)
        pec = events[0][1] if events else None
        steps.check("function enters the error state, event queued",
                    box.state == Zr.State.ERROR and pec == Z.ZPCI_PEC_OUT_OF_RANGE and err,
                    f"state=error PEC={pec:#04x} ERR eventfd signalled" if pec is not None else "no event")
        s = Z.Fib.unpack((await box.stpcifc()).fib)
        steps.check("STPCIFC reports error and blocked bits", s.fc & Z.ZPCI_FIB_FC_ERROR and
                    s.fc & Z.ZPCI_FIB_FC_LS_BLOCKED, f"fc={s.fc:#04x}")
        r1 = await box.mpcifc(Z.ZPCI_MOD_FC_RESET_BLOCK, vmm.fib())
        r2 = await box.mpcifc(Z.ZPCI_MOD_FC_RESET_ERROR, vmm.fib())
        ok, _ = await _dma(vmm, D.OP_COPY, SDMA + 0x300_0000, SDMA + 0x500_0000, PAGE)
        steps.check("recovery: reset block, reset error, DMA again",
                    r1.cc == 0 and r2.cc == 0 and box.state == Zr.State.ENABLED and ok,
                    "state=enabled")


async def run_demo(out=sys.stdout) -> int:
    steps = Steps(out)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zpcid-demo-") as d:
        path = os.path.join(d, "dma-engine.sock")
        fn = D.DmaEngine("demo0", zpci=ZpciProperties(fid=0x10, uid=0x1234, pfgid=0x01))
        out.write(f"zpcid demo: dma-engine function fid=0x10 uid=0x1234 on {path}\n\n")
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(FunctionServer(fn, path).serve)
                steps.check("daemon serves the function socket", os.path.exists(path), "")
                try:
                    with trio.fail_after(60):
                        await scenario(path, steps)
                except Exception as exc:  # report, don't traceback
                    steps.check("scenario completed", False, f"{type(exc).__name__}: {exc}")
                nursery.cancel_scope.cancel()
        finally:
            fn.close()
    return steps.summary(time.perf_counter() - start)


def main(argv=None) -> int:
    log.configure(fmt="auto", level="error")
    return trio.run(run_demo)


if __name__ == "__main__":
    sys.exit(main())
