"""A real guest's virtio_blk driver on a zpcid ``virtio-blk`` function (QEMU vfio-user-pci).

The daemon runs in the test's trio loop, QEMU in a worker thread. The guest
writes a known pattern with dd, syncs, drops its caches, reads it back with
O_DIRECT and compares; it also reads a block the host wrote. The host then
checks the backing file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re

import pytest
import trio

import qemu as qh
from zpcid.devices.virtio_blk import VirtioBlkFunction
from zpcid.server import FunctionServer

BOOT_TIMEOUT = 150.0
DETACH_TIMEOUT = 10.0
DISK_SIZE = 16 << 20
GUEST_OFFSET = 64 * 4096  # where the guest writes (bytes)
GUEST_LEN = 1 << 20
HOST_OFFSET = 8 << 20  # where the host wrote before boot
HOST_LEN = 64 * 1024
SERIAL = "zpcid-vblk-0001"
ZPCI_UID, ZPCI_FID = 0x1234, 0x10


def _pattern(seed: bytes, n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(4, "little")).digest()
        i += 1
    return bytes(out[:n])


GUEST_DATA = _pattern(b"guest", GUEST_LEN)
HOST_DATA = _pattern(b"host", HOST_LEN)


def _body(arch: str) -> str:
    zpci = ""
    if arch == "s390x":
        zpci = 'for d in /sys/bus/pci/devices/*; do echo "ZPCI ${d##*/} $(cat $d/uid 2>/dev/null) $(cat $d/function_id 2>/dev/null) $(cat $d/vendor) $(cat $d/device)"; done'
    return f"""\
{zpci}
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || {{ echo VDA=missing; ls /sys/block; exit 1; }}
echo "SIZE=$(cat /sys/block/vda/size)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "RO=$(cat /sys/block/vda/ro)"
echo "NQ=$(ls /sys/block/vda/mq | wc -l)"
echo "HOSTMD5=$(dd if=/dev/vda bs=4096 skip={HOST_OFFSET // 4096} count={HOST_LEN // 4096} iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
dd if=/pattern.bin of=/dev/vda bs=4096 seek={GUEST_OFFSET // 4096} conv=fsync 2>/dev/null && echo DD=ok
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip={GUEST_OFFSET // 4096} count={GUEST_LEN // 4096} iflag=direct 2>/dev/null
cmp /pattern.bin /tmp/back && echo VERIFY=ok
"""


def _kv(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


async def _run(qemu, arch: str, sock_dir: str, tmp_path, qemu_args_for, append: str = ""):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(HOST_OFFSET)
        f.write(HOST_DATA)
    fn = VirtioBlkFunction("vblk0", path=str(disk), num_queues=2, serial=SERIAL)
    sock = os.path.join(sock_dir, "vblk.sock")
    device = json.dumps({"driver": "vfio-user-pci", "id": "zpcid0",
                         "socket": {"type": "unix", "path": sock}})
    script = qh.guest_script_for(qemu, arch, _body(arch), modules=["virtio_blk"])
    boot = functools.partial(qh.run_guest, qemu, arch, script,
                             qemu_args=[*qemu_args_for(device)], modules=["virtio_blk"],
                             extra_files={"pattern.bin": GUEST_DATA}, append=append,
                             timeout=BOOT_TIMEOUT)
    try:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(FunctionServer(fn, sock).serve)
            result = await trio.to_thread.run_sync(boot)
            with trio.fail_after(DETACH_TIMEOUT):
                while server.attached:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    finally:
        fn.close()
    kv = _kv(result.guest_output())
    detail = result.output[-6000:]
    assert result.done, detail
    assert kv.get("SIZE") == str(DISK_SIZE // 512), detail
    assert kv.get("SERIAL") == SERIAL, detail
    assert kv.get("RO") == "0", detail
    assert kv.get("HOSTMD5") == hashlib.md5(HOST_DATA).hexdigest(), detail
    assert kv.get("DD") == "ok" and kv.get("VERIFY") == "ok", detail
    with open(disk, "rb") as f:
        f.seek(GUEST_OFFSET)
        assert f.read(GUEST_LEN) == GUEST_DATA
    assert fn.stats["flushes"] >= 1 and fn.stats["writes"] >= 1
    return kv, result, fn


async def test_x86_64_guest_virtio_blk_writes_and_reads(qemu, sock_dir, tmp_path):
    kv, result, fn = await _run(qemu, "x86_64", sock_dir, tmp_path,
                                lambda device: ["-smp", "2", "-device", device])
    assert kv.get("NQ") == "2", result.output[-3000:]


@pytest.mark.parametrize("append", ["", "iommu.passthrough=1"], ids=["default-iommu", "passthrough"])
async def test_s390x_zpci_guest_virtio_blk_writes_and_reads(qemu, sock_dir, tmp_path, append):
    kv, result, fn = await _run(
        qemu, "s390x", sock_dir, tmp_path,
        lambda device: ["-device", f"zpci,uid={ZPCI_UID:#x},fid={ZPCI_FID:#x},target=zpcid0",
                        "-device", device],
        append=append)
    zpci = [line.split() for line in result.guest_output().splitlines() if line.startswith("ZPCI ")]
    assert any(row[2:] == [f"{ZPCI_UID:#06x}", f"{ZPCI_FID:#010x}", "0x1af4", "0x1042"] for row in zpci), zpci
