"""virtio-blk smoke test of an installed zpcid: ``zpcid serve`` with one virtio-blk
function, the reference client writes, flushes and reads back through it, the
data is checked in the backing file, and the daemon stops cleanly on SIGTERM.

Run it with the interpreter of the installation under test, outside the source
tree, so only the installed package is importable.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import trio

from zpcid.vmm import client as zclient
from zpcid.vmm.virtio_driver import GuestMemory, open_blk

SECTOR = 512
START_TIMEOUT = 30.0


async def exercise(sock: str, disk: str) -> None:
    async with zclient.connect(sock) as c:
        mem = GuestMemory(8 << 20)
        try:
            async with open_blk(c, mem) as drv:
                assert await drv.capacity() == (1 << 20) // SECTOR
                data = os.urandom(8 * SECTOR)
                await drv.write(0, 16, data)
                assert await drv.flush() == 0
                assert await drv.read(0, 16, len(data)) == data
                assert await drv.get_id() == b"smoke"
        finally:
            mem.close()
    with open(disk, "rb") as f:
        f.seek(16 * SECTOR)
        assert f.read(len(data)) == data, "data not in the backing file"


def main() -> int:
    zpcid = os.path.join(os.path.dirname(sys.executable), "zpcid")
    work = tempfile.mkdtemp(prefix="zpcid-smoke")
    try:
        disk, sock = os.path.join(work, "disk.img"), os.path.join(work, "vb.sock")
        config = os.path.join(work, "zpcid.toml")
        with open(config, "w") as f:
            f.write(f'[daemon]\nruntime-dir = "{work}"\n\n'
                    f'[[function]]\ntype = "virtio-blk"\nfid = 1\nuid = 1\nsocket = "vb.sock"\n'
                    f'path = "{disk}"\nsize = "1M"\nserial = "smoke"\n')
        daemon = subprocess.Popen([zpcid, "serve", "--config", config, "--log-format", "json", "--log-level", "warning"])
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not os.path.exists(sock):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    print("virtio-blk smoke: the daemon did not come up", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            trio.run(exercise, sock, disk)
        finally:
            daemon.send_signal(signal.SIGTERM)
            rc = daemon.wait(timeout=30)
        if rc != 0:
            print(f"virtio-blk smoke: zpcid serve exited {rc}", file=sys.stderr)
            return 1
        print("virtio-blk smoke: write, flush, read back and backing file check OK")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
