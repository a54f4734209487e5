"""zpcid restarted five times under a real guest doing virtio-blk I/O (issue 13).

The daemon (``zpcid serve``, started as a service manager would, by
tests/fake_systemd.py) serves one virtio-blk function to QEMU's vfio-user-pci.
The guest loops write / fsync / O_DIRECT read back / compare over sixteen
slots of the disk while the host restarts zpcid five times, alternating the
systemd fd-store path (SIGTERM, store, start with LISTEN_FDS) and the re-exec
path (``zpcictl upgrade``). Then the host writes a stop mark into the image;
the guest sees it and reports its counts: zero I/O errors, zero mismatches,
no virtio/PCI error in its kernel log, and every slot it wrote holds the
pattern in the host file.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

import harness
import qemu as qh
from zpcid.service import ctl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_systemd import FakeSystemd  # noqa: E402

RESTARTS = 5
DISK_SIZE = 16 << 20
SLOT = 64 * 1024  # bytes per slot; the guest cycles over SLOTS of them
SLOTS = 16
STOP_AT = 12 << 20  # the host's stop mark (one sector)
PATTERN = harness.pattern(b"live-restart", SLOT)
ZPCI_UID, ZPCI_FID = 0x2345, 0x21
TIMEOUT = 600.0

ZPCID = [sys.executable, "-m", "zpcid.cli"]

GUEST_LOOP = harness.WAIT_FOR_VDA + f"""\
errs=0; bad=0; i=0
while [ $i -lt 20000 ]; do
  i=$((i + 1))
  s=$(( (i % {SLOTS}) * {SLOT // 4096} ))
  dd if=/pattern.bin of=/dev/vda bs=4096 seek=$s conv=fsync 2>/dev/null || {{ errs=$((errs + 1)); echo "WERR $i"; }}
  dd if=/dev/vda of=/tmp/back bs=4096 skip=$s count={SLOT // 4096} iflag=direct 2>/dev/null || {{ errs=$((errs + 1)); echo "RERR $i"; }}
  cmp -s /pattern.bin /tmp/back || {{ bad=$((bad + 1)); echo "MISMATCH $i"; }}
  [ "$(dd if=/dev/vda bs=512 skip={STOP_AT // 512} count=1 iflag=direct 2>/dev/null | head -c 4)" = STOP ] && break
done
echo "ITER=$i"
echo "ERRS=$errs"
echo "BAD=$bad"
echo "KLOG=$(dmesg | grep -icE 'I/O error|blk_update_request|virtio.*(error|fail|broken|reset)|pci.*(error|fail)|vfio|timeout')"
dmesg | grep -iE 'I/O error|blk_update_request|virtio.*(error|fail|broken|reset)|pci.*(error|fail)|vfio|timeout' | head -20
"""


def _config(base: str, disk: str, sock: str) -> str:
    path = os.path.join(base, "zpcid.toml")
    with open(path, "w") as f:
        f.write(f"""[daemon]
runtime-dir = "{base}/run"
log-level = "info"

[[function]]
type = "virtio-blk"
fid = 1
uid = 1
name = "vblk0"
socket = "{sock}"
path = "{disk}"
num-queues = 2
""")
    return path


def _ctl(control: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = ctl.run(["--socket", control, "--timeout", "60", *argv], out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


class Service:
    """zpcid as systemd would run it, with its fd store (FileDescriptorStoreMax=)."""

    def __init__(self, base: str, config: str):
        self.sd = FakeSystemd(os.path.join(base, "notify"))
        self.config = config
        self.control = os.path.join(base, "run", "control.sock")
        self.log = open(os.path.join(base, "zpcid.log"), "ab")
        self.env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env["FDSTORE"] = "1024"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.sd.start([*ZPCID, "serve", "--config", self.config, "--log-format", "json"],
                                  env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.sd.pump(60, until="READY=1", proc=self.proc)

    def restart_through_fd_store(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while self.proc.poll() is None:
            self.sd.pump()
            if time.monotonic() > deadline:
                raise AssertionError("zpcid did not stop")
            time.sleep(0.002)
        assert self.proc.returncode == 0
        self.sd.pump()
        assert "zpcid-state" in self.sd.names()
        self.start()

    def upgrade(self) -> None:
        rc, out, err = _ctl(self.control, "upgrade")
        assert rc == 0, err
        self.sd.pump()

    def attached(self) -> bool:
        rc, out, _ = _ctl(self.control, "--json", "list")
        return rc == 0 and any(f["attached"] for f in json.loads(out))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while self.proc.poll() is None and time.monotonic() < deadline:
                self.sd.pump()
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.sd.close()  # a real stop: the manager closes what is stored
        self.log.close()

    def tail(self, n: int = 6000) -> str:
        with open(self.log.name, errors="replace") as f:
            return "VMM no longer attached; zpcid log:\n" + f.read()[-n:]

    def events(self) -> list[str]:
        with open(self.log.name, errors="replace") as f:
            return [json.loads(line).get("event", "") for line in f if line.startswith("{")]


async def _run(qemu, arch: str, sock_dir: str, tmp_path, qemu_args_for):
    disk = str(tmp_path / "disk.img")
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    sock = os.path.join(sock_dir, "vblk.sock")
    svc = Service(sock_dir, _config(sock_dir, disk, sock))
    device = harness.vfio_user_device(sock, "zpcid0")
    script = qh.guest_script_for(qemu, arch, GUEST_LOOP, modules=["virtio_blk"])
    try:
        await trio.to_thread.run_sync(svc.start)
        result = {}

        def boot():
            result["r"] = qh.run_guest(qemu, arch, script, qemu_args=[*qemu_args_for(device)],
                                       modules=["virtio_blk"], extra_files={"pattern.bin": PATTERN},
                                       timeout=TIMEOUT)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, boot)
            with trio.fail_after(TIMEOUT):
                while not await trio.to_thread.run_sync(svc.attached):
                    await trio.sleep(0.5)
                await trio.sleep(5)  # the guest's loop is running
                for n in range(RESTARTS):
                    await trio.to_thread.run_sync(svc.restart_through_fd_store if n % 2 == 0 else svc.upgrade)
                    assert await trio.to_thread.run_sync(svc.attached), svc.tail()
                    await trio.sleep(2)  # I/O continues between restarts
                with open(disk, "r+b") as f:
                    f.seek(STOP_AT)
                    f.write(b"STOP")
        r = result["r"]
        kv = harness.kv(r.guest_output())
        detail = r.output[-4000:]
        assert r.done, detail
        assert int(kv.get("ITER", "0")) > RESTARTS, detail
        assert kv.get("ERRS") == "0" and kv.get("BAD") == "0", detail
        assert kv.get("KLOG") == "0", detail
        events = svc.events()
        assert events.count("handover_restored") == RESTARTS and "restore_refused" not in events
        written = {i % SLOTS for i in range(1, int(kv["ITER"]) + 1)}
        with open(disk, "rb") as f:
            for slot in sorted(written):
                f.seek(slot * SLOT)
                assert f.read(SLOT) == PATTERN, f"slot {slot}"
    finally:
        await trio.to_thread.run_sync(svc.close)


async def test_x86_64_guest_io_survives_five_restarts(qemu, sock_dir, tmp_path):
    await _run(qemu, "x86_64", sock_dir, tmp_path, lambda device: ["-smp", "2", "-device", device])


async def test_s390x_guest_io_survives_five_restarts(qemu, sock_dir, tmp_path):
    await _run(qemu, "s390x", sock_dir, tmp_path,
               lambda device: ["-device", f"zpci,uid={ZPCI_UID:#x},fid={ZPCI_FID:#x},target=zpcid0",
                               "-device", device])
