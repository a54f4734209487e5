"""Restart and upgrade the real daemon under attached VMMs (issue 13): the reference
client keeps its one connection, its DMA memory, its eventfds and the device's
state through `zpcictl restart`, `zpcictl upgrade` (re-exec) and a systemd
restart through the fd store (emulated where systemd is not PID 1)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys

import pytest
import trio

from protocol.vfio_user import consts as C
from zpcid.devices import memory as Mem
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm import client as vclient
from helpers import prepare_vmm
from fake_systemd import FakeSystemd
from .conftest import ZPCID, memfn

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


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out |= {int(p) for p in f.read().split()}
    return out


def fd_kinds(pid: int) -> list[str]:
    """What each open descriptor is (socket, pipe, memfd, ...), without inode numbers."""
    kinds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        kinds.append(target.split(":")[0] if ":" in target else target)
    return sorted(kinds)


async def test_upgrade_serves_the_vmm_while_the_new_process_starts(daemons, tmp_path):
    """The workers keep serving their VMMs through the supervisor's exec (held here until
    we let it go on) and are then replaced by pre-started ones; a client that never stops
    sending sees every answer, the same state and a connection that never closes."""
    d = daemons().start()
    marker, wrapper = held_zpcid(tmp_path)
    mem = Memfd(1 << 20)
    try:
        async with vclient.connect(d.socket("f1")) as c:
            fds = await prepare_vmm(c, mem)
            await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0x600D))
            before, daemon_pid = pids(d), d.proc.pid
            await trio.sleep(0.2)  # the server closes its end of that `list`
            fds_before = fd_kinds(daemon_pid)
            answered = [0]
            stop = trio.Event()

            async def keep_asking():
                while not stop.is_set():
                    assert await c.region_read(4, Mem.REG_SCRATCH, 4) == struct.pack("<I", 0x600D)
                    answered[0] += 1
                    await trio.sleep(0.001)

            async with trio.open_nursery() as n:
                n.start_soon(keep_asking)
                result = []
                n.start_soon(lambda: _run_into(result, d.ctl, "upgrade", "--binary", str(wrapper)))
                await exec_reached(daemon_pid, wrapper)
                # No supervisor at all now, yet the function answers, DMAs and interrupts.
                seen = answered[0]
                await works(c, mem, fds, 0x600D, 1)
                with trio.fail_after(10):
                    while answered[0] < seen + 20:
                        await trio.sleep(0.01)
                marker.touch()
                with trio.fail_after(60):
                    while not result:
                        await trio.sleep(0.05)
                stop.set()
            rc, out, err = result[0]
            assert rc == 0, err + out + d.log()[-3000:]
            assert d.ctl_json("stats")["pid"] == daemon_pid
            after = pids(d)
            assert after[1] != before[1] and after[2] != before[2]  # new code in every worker
            assert not c._eof.is_set()
            await works(c, mem, fds, 0x600D, 2)
            handover = d.ctl_json("stats")["last_handover"]
            assert handover["kind"] == "upgrade" and handover["replaced"] == 2 and not handover["failed"]
            # The old workers and their zygote are gone (reaped, not left as zombies): the
            # supervisor has one child again, and exactly the descriptors it had before.
            # (A control connection just answered may still be closing: hence "until".)
            with trio.fail_after(20):
                while len(children(daemon_pid)) != 1 or any(
                        os.path.exists(f"/proc/{p}") for p in before.values()) \
                        or fd_kinds(daemon_pid) != fds_before:
                    await trio.sleep(0.05)
            for fd in fds:
                os.close(fd)
        assert d.stop() == 0
    finally:
        mem.close()


async def test_a_successor_that_cannot_start_leaves_the_old_worker_serving(daemons, tmp_path):
    backing = tmp_path / "bar0"
    d = daemons(functions=[memfn(1, backing=str(backing)), memfn(2)]).start()
    mem = Memfd(1 << 20)
    try:
        async with vclient.connect(d.socket("f1")) as c:
            fds = await prepare_vmm(c, mem)
            await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0xB0B))
            before = pids(d)
            # The running worker has the file open; a new one cannot open a directory.
            backing.unlink()
            backing.mkdir()
            rc, out, err = await trio.to_thread.run_sync(d.ctl, "restart", "1")
            assert rc != 0 and "backing" in err
            assert pids(d) == before
            await works(c, mem, fds, 0xB0B, 0)
            # An upgrade replaces what it can; fid 1 goes on in its old worker.
            rc, out, err = await trio.to_thread.run_sync(d.ctl, "upgrade")
            assert rc == 0, err + out
            assert "fid 0x1: still the old worker" in out and "backing" in out
            after = pids(d)
            assert after[1] == before[1] and after[2] != before[2]
            handover = d.ctl_json("stats")["last_handover"]
            assert handover["replaced"] == 1 and list(handover["failed"]) == ["0x1"]
            await works(c, mem, fds, 0xB0B, 1)
            events = [e.get("event") for e in d.events()]
            assert "worker_upgrade_failed" in events
            # once the cause is gone, the adopted worker is replaced like any other
            backing.rmdir()
            rc, out, err = await trio.to_thread.run_sync(d.ctl, "restart", "1")
            assert rc == 0, err
            assert pids(d)[1] != before[1]
            await works(c, mem, fds, 0xB0B, 2)
            for fd in fds:
                os.close(fd)
        assert d.stop() == 0
    finally:
        mem.close()


def held_zpcid(tmp_path):
    """An executable for `zpcictl upgrade --binary` that holds the upgrade between the
    old supervisor's exec and the new one's start, until the returned marker exists."""
    marker = tmp_path / "go"
    wrapper = tmp_path / "zpcid-held"
    wrapper.write_text(
        f"#!{sys.executable}\nimport os, sys, time\n"
        f"while not os.path.exists({str(marker)!r}):\n    time.sleep(0.02)\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'zpcid.cli', *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    return marker, wrapper


async def exec_reached(daemon_pid: int, wrapper) -> None:
    with trio.fail_after(30):  # the old supervisor is gone: the held wrapper runs
        while str(wrapper) not in _cmdline(daemon_pid):
            await trio.sleep(0.02)


async def test_worker_killed_while_the_supervisor_re_executes(daemons, tmp_path):
    """The crash rule holds in an upgrade's window without a supervisor: the VMM of a
    killed worker sees end of file at once, the other function is untouched, and the
    new supervisor starts the killed one afresh (the old zygote reports why it died)."""
    d = daemons().start()
    marker, wrapper = held_zpcid(tmp_path)
    mem = Memfd(1 << 20)
    try:
        async with vclient.connect(d.socket("f1")) as c1, vclient.connect(d.socket("f2")) as c2:
            fds1 = await prepare_vmm(c1, mem)
            fds2 = await prepare_vmm(c2, mem)
            await c1.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0x11))
            before, daemon_pid = pids(d), d.proc.pid
            async with trio.open_nursery() as n:
                result = []
                n.start_soon(lambda: _run_into(result, d.ctl, "upgrade", "--binary", str(wrapper)))
                await exec_reached(daemon_pid, wrapper)
                os.kill(before[2], signal.SIGKILL)
                with trio.fail_after(5):  # generous: EOF arrives as the process dies
                    await c2._eof.wait()
                await works(c1, mem, fds1, 0x11, 0)
                marker.touch()
            rc, out, err = result[0]
            assert rc == 0, err + out + d.log()[-3000:]
            assert not c1._eof.is_set()
            await works(c1, mem, fds1, 0x11, 1)
            died = [e for e in d.events() if e.get("event") == "worker_died" and e.get("fid") == 2]
            assert died and died[0]["reason"] == "killed by signal SIGKILL"
            with trio.fail_after(20):
                while pids(d).get(2) in (None, before[2]):
                    await trio.sleep(0.05)
            for fd in fds1 + fds2:
                os.close(fd)
        async with vclient.connect(d.socket("f2")) as c3:  # the next attach works
            fds3 = await prepare_vmm(c3, mem)
            await c3.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 3))
            await works(c3, mem, fds3, 3, 2)
            for fd in fds3:
                os.close(fd)
        assert d.stop() == 0
    finally:
        mem.close()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


async def _run_into(result: list, fn, *args) -> None:
    result.append(await trio.to_thread.run_sync(fn, *args))
