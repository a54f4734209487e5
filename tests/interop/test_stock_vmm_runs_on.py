"""Stock QEMU (Debian's 11.1.3) attached to a function of the real daemon:
``zpcictl inject-error`` and ``zpcictl remove`` must never stop the VM.

Stock QEMU's vfio-pci handles the vfio-user ERR IRQ with "Unrecoverable error
detected" and ``vm_stop`` (run state internal-error). A stock VMM never sets
``VMM_EVENTS`` in the control region, so zpcid must keep events in the ring
without that IRQ, and ask for removal through the REQ IRQ only (QEMU then
hot-unplugs the device, or the daemon detaches it by force).

The run state comes from QMP ``query-status``. On x86_64 the function sits
behind a pcie-root-port, so QEMU can act on the REQ IRQ with a native
hot-unplug; on s390x behind a ``zpci`` device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import harness
import qemu as qh
from service.conftest import Daemon, memfn

FID = 0x31
VENDOR, DEVICE = 0x1014, 0xFE00  # the memory type's defaults
BOOT_TIMEOUT = 90.0
GUEST_SECONDS = 120  # the guest idles this long at most; the test powers it off first


class Qmp:
    """A minimal QMP client (one command at a time; events are skipped)."""

    def __init__(self, path: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        self._read()  # greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def command(self, name: str, **args) -> dict:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._read()
            if "return" in msg or "error" in msg:
                return msg

    def status(self) -> dict:
        return self.command("query-status")["return"]

    def close(self) -> None:
        self.sock.close()


def _device_args(arch: str, sock: str) -> list[str]:
    vfu = harness.vfio_user_device(sock, "vfu0")
    if arch == "x86_64":
        return ["-device", "pcie-root-port,id=rp0,chassis=1,slot=1",
                "-device", json.dumps(json.loads(vfu) | {"bus": "rp0"})]
    return ["-device", f"zpci,uid={FID:#x},fid={FID:#x},target=vfu0", "-device", vfu]


class Guest:
    """QEMU running in the background; its console is read line by line."""

    def __init__(self, qemu, arch: str, sock: str, qmp: str, tmp: str):
        body = harness.find_function_sh(VENDOR, DEVICE) + f"""\
echo 1 > $D/enable || echo ENABLE=failed
echo GUEST=up
i=0
while [ $i -lt {GUEST_SECONDS} ]; do sleep 1; i=$((i + 1)); done
"""
        cmd = qh.guest_command(qemu, arch, qh.guest_script_for(qemu, arch, body), tmp,
                               [*_device_args(arch, sock), "-qmp", f"unix:{qmp},server=on,wait=off"])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self.up = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line.strip() == "GUEST=up":
                self.up.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 30.0) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self.reader.join(5)


@pytest.mark.parametrize("arch", ["x86_64", "s390x"])
def test_inject_error_and_remove_never_stop_a_stock_vm(qemu, arch) -> None:
    base = tempfile.mkdtemp(prefix="zpcid-s")
    d = Daemon(base, daemon={"release-timeout": 20}, functions=[memfn(FID, **{"ram-size": 1 << 20})])
    qmp_path = os.path.join(base, "qmp.sock")
    guest = None
    try:
        d.start()
        guest = Guest(qemu, arch, d.socket(f"f{FID:x}"), qmp_path, base)
        assert guest.up.wait(BOOT_TIMEOUT), guest.output[-4000:]
        assert "FN=missing" not in guest.output, guest.output[-4000:]
        assert d.ctl_json("show", str(FID))["attached"]
        q = Qmp(qmp_path)
        try:
            assert q.status()["status"] == "running"
            for pec in ("0x0b", "0x04"):
                rc, text, err = d.ctl("inject-error", str(FID), "--pec", pec)
                assert rc == 0, err
                # QMP is served by the main loop that would run the ERR handler:
                # by the time this answer comes, a signalled ERR IRQ has been seen.
                st = q.status()
                assert st["status"] == "running" and st["running"], (st, d.log()[-4000:])
            show = d.ctl_json("show", str(FID))
            assert show["zpci"]["vmm"]["events"] is False  # stock QEMU never sets VMM_EVENTS
            assert show["zpci"]["events"] >= 2

            rc, text, err = d.ctl("--timeout", "60", "remove", str(FID))
            assert rc == 0 and text.startswith("removed fid"), err
            print(f"{arch}: {text.strip()}")  # released through REQ, or detached by force
            st = q.status()
            assert st["status"] == "running" and st["running"], (st, text, d.log()[-4000:])
            assert "Unrecoverable error" not in guest.output, guest.output[-4000:]
            q.command("quit")
        finally:
            q.close()
        assert guest.stop() is not None
    finally:
        d.cleanup()
        if guest is not None and guest.proc.poll() is None:
            guest.proc.kill()
            guest.stop()
