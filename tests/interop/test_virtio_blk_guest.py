"""A real guest's virtio_blk driver on a zpcid ``virtio-blk`` function (QEMU vfio-user-pci).

The daemon runs in the test's trio loop, QEMU in a worker thread. The guest
writes a known pattern with dd, syncs, drops its caches, reads it back with
O_DIRECT and compares; it also reads a block the host wrote. The host then
checks the backing file.
"""

from __future__ import annotations

import functools
import hashlib
import os

import pytest

import harness
import qemu as qh
from zpcid.devices.virtio_blk import VirtioBlkFunction

BOOT_TIMEOUT = 150.0
DISK_SIZE = 16 << 20
GUEST_OFFSET = 64 * 4096  # where the guest writes (bytes)
GUEST_LEN = 1 << 20
HOST_OFFSET = 8 << 20  # where the host wrote before boot
HOST_LEN = 64 * 1024
SERIAL = "zpcid-vblk-0001"
ZPCI_UID, ZPCI_FID = 0x1234, 0x10


GUEST_DATA = harness.pattern(b"guest", GUEST_LEN)
HOST_DATA = harness.pattern(b"host", HOST_LEN)


def _body(arch: str) -> str:
    zpci = ""
    if arch == "s390x":
        zpci = 'for d in /sys/bus/pci/devices/*; do echo "ZPCI ${d##*/} $(cat $d/uid 2>/dev/null) $(cat $d/function_id 2>/dev/null) $(cat $d/vendor) $(cat $d/device)"; done'
    return zpci + "\n" + harness.WAIT_FOR_VDA + f"""\
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


async def _run(qemu, arch: str, sock_dir: str, tmp_path, qemu_args_for, append: str = ""):
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(HOST_OFFSET)
        f.write(HOST_DATA)
    fn = VirtioBlkFunction("vblk0", path=str(disk), num_queues=2, serial=SERIAL)
    sock = os.path.join(sock_dir, "vblk.sock")
    device = harness.vfio_user_device(sock, "zpcid0")
    script = qh.guest_script_for(qemu, arch, _body(arch), modules=["virtio_blk"])
    boot = functools.partial(qh.run_guest, qemu, arch, script,
                             qemu_args=[*qemu_args_for(device)], modules=["virtio_blk"],
                             extra_files={"pattern.bin": GUEST_DATA}, append=append,
                             timeout=BOOT_TIMEOUT)
    try:
        s = await harness.serve_one_boot(fn, sock, tmp_path / "zpcid.log", boot)
    finally:
        fn.close()
    kv, result, detail = s.kv, s.result, s.diag
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
