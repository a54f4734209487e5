"""Restart and upgrade the real daemon under attached VMMs (issue 13): the reference
client keeps its one connection, its DMA memory, its eventfds and the device's
state through `zpcictl restart`, `zpcictl upgrade` (re-exec) and a systemd
restart through the fd store (emulated where systemd is not PID 1)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess

import pytest
import trio

from protocol.vfio_user import consts as C
from zpcid.devices import memory as Mem
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm import client as vclient
from helpers import prepare_vmm
from fake_systemd import FakeSystemd
from .conftest import ZPCID

MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX


async def works(client, mem, fds, token: int, vector: int):
    """The function still has its state, interrupts and DMA (through the same connection)."""
    assert await client.region_read(4, Mem.REG_SCRATCH, 4) == struct.pack("<I", token)
    await client.region_write(4, Mem.REG_DOORBELL, struct.pack("<I", vector))
    assert await vclient.wait_eventfd(fds[vector], 10) == 1
    data = os.urandom(64)
    mem.write(0x2000, data)
    await client.region_write(4, Mem.REG_DMA_ADDR, struct.pack("<QI", 0x2000, 64))
    await client.region_write(4, Mem.REG_DMA_CMD, struct.pack("<I", Mem.DMA_CMD_FROM_HOST))
    with trio.fail_after(10):
        while (await client.region_read(4, Mem.REG_DMA_STATUS, 4))[0] == Mem.DMA_STATUS_BUSY:
            await trio.sleep(0.005)
    assert await client.region_read(0, 0, 64, via_mmap=False) == data


def pids(d) -> dict[int, int]:
    return {f["fid"]: f["pid"] for f in d.ctl_json("list")}


async def test_restart_and_upgrade_keep_the_vmm_attached(daemons):
    d = daemons().start()
    mem = Memfd(1 << 20)
    try:
        async with vclient.connect(d.socket("f1")) as c:
            fds = await prepare_vmm(c, mem)
            await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0xABC))
            before = pids(d)
            rc, out, err = await trio.to_thread.run_sync(d.ctl, "restart", "1")
            assert rc == 0, err
            after = pids(d)
            assert after[1] != before[1] and after[2] == before[2]  # only fid 1's worker changed
            await works(c, mem, fds, 0xABC, 1)
            daemon_pid = d.proc.pid
            rc, out, err = await trio.to_thread.run_sync(d.ctl, "upgrade")
            assert rc == 0, err + out + d.log()[-3000:]
            assert "upgraded" in out
            assert d.proc.poll() is None and d.ctl_json("stats")["pid"] == daemon_pid  # same pid: exec
            assert set(pids(d)) == {1, 2}
            listed = {f["fid"]: f for f in d.ctl_json("list")}
            assert listed[1]["attached"] and not listed[2]["attached"]
            await works(c, mem, fds, 0xABC, 2)
            events = [e.get("event") for e in d.events()]
            assert "handover_restored" in events and "restore_refused" not in events
            for fd in fds:
                os.close(fd)
        # an unattached function handed over still takes a new VMM
        async with vclient.connect(d.socket("f2")) as c2:
            fds2 = await prepare_vmm(c2, mem)
            await c2.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 7))
            await works(c2, mem, fds2, 7, 3)
            for fd in fds2:
                os.close(fd)
        assert d.stop() == 0
    finally:
        mem.close()


async def test_systemd_fd_store_restart_keeps_the_vmm(daemons, sock_dir):
    d = daemons()  # for its config and paths; started through the fake manager
    sd = FakeSystemd(os.path.join(sock_dir, "sd-notify"))
    mem = Memfd(1 << 20)
    log = open(d.log_path, "ab")
    procs = []
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["FDSTORE"] = "1024"  # FileDescriptorStoreMax= of the unit

    def start():
        p = sd.start([*ZPCID, "serve", "--config", d.config_path, "--log-format", "json"],
                     env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        sd.pump(20, until="READY=1", proc=p)
        return p

    try:
        proc = await trio.to_thread.run_sync(start)
        async with vclient.connect(d.socket("f1")) as c:
            fds = await prepare_vmm(c, mem)
            await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0x51))
            for round_ in range(2):
                proc.send_signal(signal.SIGTERM)  # systemctl restart: stop ...
                # the manager reads the fd store messages while the service stops
                await trio.to_thread.run_sync(sd.pump, 20, "STOPPING=1", None)
                with trio.fail_after(20):
                    while proc.poll() is None:
                        sd.pump()
                        await trio.sleep(0.01)
                assert proc.returncode == 0, d.log()[-3000:]
                await trio.to_thread.run_sync(sd.pump)
                assert "zpcid-state" in sd.names()
                proc = await trio.to_thread.run_sync(start)  # ... and start with the store
                await works(c, mem, fds, 0x51, round_)
                await trio.to_thread.run_sync(sd.pump, 0.2)
                assert sd.names() == []  # taken out of the store again
            for fd in fds:
                os.close(fd)
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        log.close()
        sd.close()
        mem.close()


async def test_killed_worker_closes_its_vmm_at_once_others_untouched(daemons):
    d = daemons().start()
    mem = Memfd(1 << 20)
    try:
        async with vclient.connect(d.socket("f1")) as c1, vclient.connect(d.socket("f2")) as c2:
            fds1 = await prepare_vmm(c1, mem)
            fds2 = await prepare_vmm(c2, mem)
            await c2.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 2))
            victim = pids(d)[1]
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(5):  # generous: EOF arrives as the process dies
                await c1._eof.wait()
            await works(c2, mem, fds2, 2, 0)
            for fd in fds1 + fds2:
                os.close(fd)
        with trio.fail_after(20):
            while pids(d).get(1) in (None, victim):
                await trio.sleep(0.05)
        async with vclient.connect(d.socket("f1")) as c3:  # the next attach works
            fds3 = await prepare_vmm(c3, mem)
            await c3.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 3))
            await works(c3, mem, fds3, 3, 1)
            for fd in fds3:
                os.close(fd)
    finally:
        mem.close()


def _real_systemd() -> str | None:
    """Why the real-systemd test cannot run here, or None if it can."""
    try:
        with open("/proc/1/comm") as f:
            if f.read().strip() != "systemd":
                return "systemd is not PID 1 on this machine"
    except OSError:
        return "cannot tell what PID 1 is"
    if os.geteuid() != 0:
        return "needs root to start a transient system unit"
    out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split()
    if len(out) < 2 or not out[1].isdigit() or int(out[1]) < 254:
        return "needs systemd >= 254 ($FDSTORE, FileDescriptorStorePreserve=)"
    return None


@pytest.mark.skipif(_real_systemd() is not None, reason=str(_real_systemd()))
async def test_real_systemd_restart_keeps_the_vmm(daemons):
    d = daemons()
    unit = f"zpcid-live-test-{os.getpid()}"
    subprocess.run(["systemd-run", f"--unit={unit}", "-p", "Type=notify", "-p", "NotifyAccess=main",
                    "-p", "KillMode=mixed", "-p", "FileDescriptorStoreMax=1024",
                    "-p", "FileDescriptorStorePreserve=restart",
                    *ZPCID, "serve", "--config", d.config_path, "--log-format", "json"], check=True)
    mem = Memfd(1 << 20)
    try:
        async with vclient.connect(d.socket("f1")) as c:
            fds = await prepare_vmm(c, mem)
            await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0x5D))
            await trio.to_thread.run_sync(
                lambda: subprocess.run(["systemctl", "restart", unit], check=True, timeout=60))
            await works(c, mem, fds, 0x5D, 1)
            for fd in fds:
                os.close(fd)
    finally:
        subprocess.run(["systemctl", "stop", unit], timeout=60)
        mem.close()
