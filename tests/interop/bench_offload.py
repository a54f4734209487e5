#!/usr/bin/env python3
"""Three-way benchmark of the s390x zPCI paths (run by hand, not a test).

Same guest (Debian sid's s390x kernel, busybox initramfs), same patched
qemu-system-s390x, same zpcid daemon and virtio-blk function, in the order
A B C A B C:

  A  offload=off           QEMU's stock emulated path (one DMA_MAP per page)
  R  offload, default IOMMU, function property tlb-refresh = true: the
     group's refresh bit on, one RPCIT per guest mapping (zpcid before
     compat level 3; with --refresh)
  B  offload, default IOMMU  zpcid shadows the guest's tables, filled on a
     miss (refresh bit off, RPCIT only invalidates)
  C  offload, iommu.passthrough=1   zpcid maps directly (no RPCIT)

The guest measures with busybox dd and direct I/O: sequential 1 MiB writes and
reads, and 4 KiB reads and writes at scattered offsets (one dd per request,
so the 4 KiB figures include a process start each). vfio-user messages are
the daemon's per-session count, minus an idle boot of the same configuration
(the boot's own messages), divided by the MiB the workload moved.

    python tests/interop/bench_offload.py [--mib 32] [--ops 200] [--refresh] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import qemu as qh  # noqa: E402
from test_zpci_offload import FID, PASSTHROUGH, RFID, RUID, UID, Daemon, boot  # noqa: E402

# key: (name, zpci device options, kernel command line, (fid, uid))
CONFIGS = {
    "A": ("offload=off (stock)", ",offload=off", "", (FID, UID)),
    "R": ("offload, default IOMMU, refresh bit on", "", "", (RFID, RUID)),
    "B": ("offload, default IOMMU", "", "", (FID, UID)),
    "C": ("offload, iommu.passthrough=1", "", PASSTHROUGH, (FID, UID)),
}


def body(mib: int, ops: int, workload: bool) -> str:
    if not workload:
        return "dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; echo IDLE=1\n"
    blocks = (mib << 20) // 4096
    return f"""\
t() {{ cut -d' ' -f1 /proc/uptime; }}
a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null; b=$(t)
echo "SEQ_WRITE_S=$a $b"
a=$(t); dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; b=$(t)
echo "SEQ_READ_S=$a $b"
x=12345; i=0
a=$(t)
while [ $i -lt {ops} ]; do
  x=$(( (x * 1103515245 + 12345) % 2147483648 )); o=$(( x % {blocks} ))
  dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$o iflag=direct 2>/dev/null
  i=$((i + 1))
done
b=$(t); echo "RAND_READ_S=$a $b"
i=0; a=$(t)
while [ $i -lt {ops} ]; do
  x=$(( (x * 1103515245 + 12345) % 2147483648 )); o=$(( x % {blocks} ))
  dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$o oflag=direct 2>/dev/null
  i=$((i + 1))
done
b=$(t); echo "RAND_WRITE_S=$a $b"
"""


def seconds(kv: dict, key: str) -> float:
    a, b = kv[key].split()
    return max(float(b) - float(a), 0.01)


def session(daemon: Daemon, run, fid: int, before: dict) -> dict:
    detach = [e for e in run.events if e.get("event") == "detach" and e.get("function") == f"vblk{fid:x}"]
    maps = run.maps(fid)
    after = daemon.show(fid)["counters"]
    return {"messages": detach[-1]["messages"] if detach else None, "dma_maps": len(maps),
            "rpcit": after["rpcit_calls"] - before["rpcit_calls"],
            "fills": after.get("shadow_fills", 0) - before.get("shadow_fills", 0)}


def boot_config(q, d: Daemon, key: str, script: str, **kw):
    """Boot configuration ``key``; returns (run, session figures)."""
    _, zpci, append, (fid, uid) = CONFIGS[key]
    before = d.show(fid)["counters"]
    run = boot(q, d, script, fid=fid, uid=uid, zpci=zpci, append=append, **kw)
    return run, session(d, run, fid, before)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=32, help="MiB per sequential pass")
    ap.add_argument("--ops", type=int, default=200, help="4 KiB requests per random pass")
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--refresh", action="store_true",
                    help="also run R (refresh bit on): A R B C A R B C")
    a = ap.parse_args()
    keys = "ARBC" if a.refresh else "ABC"
    base = qh.find_qemu()
    q = base.offload() if base else None
    if q is None:
        print("run .ci/provision-qemu and .ci/provision-qemu-offload first", file=sys.stderr)
        return 2
    moved_mib = 2 * a.mib + 2 * a.ops * 4096 / (1 << 20)
    d = Daemon(Path(tempfile.mkdtemp(prefix="zpcid-bench-")), disk_size=max(64, 2 * a.mib) << 20,
               props={RFID: {"tlb-refresh": True}})
    results: dict[str, list[dict]] = {k: [] for k in keys}
    idle: dict[str, dict] = {}
    try:
        for key in keys:
            run, idle[key] = boot_config(q, d, key, body(a.mib, a.ops, False))
            assert run.kv.get("IDLE") == "1", run.diag
            print(f"idle boot {key}: {idle[key]}", flush=True)
        for key in keys * 2:
            name = CONFIGS[key][0]
            start = time.monotonic()
            run, s = boot_config(q, d, key, body(a.mib, a.ops, True), timeout=1800)
            kv = run.kv
            assert run.result.done, run.diag
            r = {
                "seq_write_mib_s": a.mib / seconds(kv, "SEQ_WRITE_S"),
                "seq_read_mib_s": a.mib / seconds(kv, "SEQ_READ_S"),
                "rand_read_iops": a.ops / seconds(kv, "RAND_READ_S"),
                "rand_write_iops": a.ops / seconds(kv, "RAND_WRITE_S"),
                "messages": s["messages"],
                "workload_messages": s["messages"] - idle[key]["messages"],
                "dma_maps": s["dma_maps"],
                "workload_dma_maps": s["dma_maps"] - idle[key]["dma_maps"],
                "rpcit": s["rpcit"],
                "workload_rpcit": s["rpcit"] - idle[key]["rpcit"],
                "workload_fills": s["fills"] - idle[key]["fills"],
                "wall_s": time.monotonic() - start,
            }
            r["messages_per_mib"] = r["workload_messages"] / moved_mib
            results[key].append(r)
            print(f"{key} {name}: " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in r.items()), flush=True)
    finally:
        d.stop()

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in results[key])

    fields = ["seq_write_mib_s", "seq_read_mib_s", "rand_read_iops", "rand_write_iops",
              "messages_per_mib", "workload_dma_maps", "workload_rpcit", "workload_fills"]
    print(f"\nmoved per run: {moved_mib:.1f} MiB; medians of 2 runs each")
    print("| | " + " | ".join(fields) + " |")
    print("|---" * (len(fields) + 1) + "|")
    for key in keys:
        print(f"| {key} {CONFIGS[key][0]} | " + " | ".join(f"{med(key, f):.1f}" for f in fields) + " |")
    a_mpm = med("A", "messages_per_mib")
    for key in keys[1:]:
        print(f"messages/MiB {key}/A = {med(key, 'messages_per_mib') / a_mpm:.4f}")
    for f in ("seq_write_mib_s", "seq_read_mib_s", "rand_read_iops", "rand_write_iops"):
        print(f"{f}: B/A = {med('B', f) / med('A', f):.2f}, C/A = {med('C', f) / med('A', f):.2f}, "
              f"C/B = {med('C', f) / med('B', f):.2f}")
    if a.json:
        a.json.write_text(json.dumps({"moved_mib": moved_mib, "idle": idle, "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
