"""One worker process per function: a worker's death touches only its own function."""

import os
import signal
import stat
import struct
import time

import pytest
import trio

from zpcid.vmm import client as zclient
from zpcid.devices.memory import MAGIC, REG_SCRATCH

from .conftest import memfn
from .test_daemon import magic, metrics, scratch_roundtrip

GENEROUS = 20.0  # seconds: a loaded 2-core CI machine, never a measure of speed


def wait_serving(d, fid: int, not_pid: int | None = None, timeout: float = GENEROUS) -> dict:
    """Poll `list` until fid's worker serves (with a pid other than ``not_pid``)."""
    deadline = time.monotonic() + timeout
    while True:
        row = next(f for f in d.ctl_json("list") if f["fid"] == fid)
        if row["state"] == "serving" and row["pid"] not in (None, not_pid):
            return row
        assert time.monotonic() < deadline, f"fid {fid:#x} not serving again: {row}"
        time.sleep(0.02)


def proc_ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


async def test_sigkill_worker_only_its_vmm_notices(daemons):
    d = daemons(functions=[memfn(1), memfn(2)]).start()
    listed = d.ctl_json("list")
    pids = [f["pid"] for f in listed]
    # One process per function, none of them the supervisor, all of them alive.
    assert len(set(pids)) == 2 and d.proc.pid not in pids
    for pid in pids:
        os.kill(pid, 0)
        assert proc_ppid(pid) != d.proc.pid  # forked by the zygote, not by the supervisor
    sock_f1 = d.socket("f1")
    inode = os.stat(sock_f1).st_ino

    async with zclient.connect(d.socket("f2")) as other:
        assert await scratch_roundtrip(other, 0x5151) == 0x5151
        async with zclient.connect(sock_f1) as victim:
            assert await magic(victim) == MAGIC
            os.kill(pids[0], signal.SIGKILL)
            # The connected socket lived only in the dead worker: end of file, at once.
            with trio.fail_after(GENEROUS):
                with pytest.raises((ConnectionError, OSError, zclient.VfioUserError)):
                    await magic(victim)
            # The other function's VMM never noticed: same session, same state.
            assert struct.unpack("<I", await other.region_read(4, REG_SCRATCH, 4))[0] == 0x5151
            assert await scratch_roundtrip(other, 0x6262) == 0x6262
            # The function's socket never went away (same file: the supervisor kept it).
            assert stat.S_ISSOCK(os.lstat(sock_f1).st_mode) and os.stat(sock_f1).st_ino == inode

        row = await trio.to_thread.run_sync(wait_serving, d, 1, pids[0])
        assert row["restarts"] == 1 and row["pid"] != pids[0]
        # The VMM reconnects to the same path and gets a fresh function.
        async with zclient.connect(sock_f1) as again:
            assert await magic(again) == MAGIC
            assert await scratch_roundtrip(again, 0x7373) == 0x7373
        assert await scratch_roundtrip(other, 0x8484) == 0x8484

    f2 = next(f for f in d.ctl_json("list") if f["fid"] == 2)
    assert f2["pid"] == pids[1] and f2["restarts"] == 0
    m = metrics(d.ctl("metrics")[1])
    assert m[("zpcid_worker_restarts_total", (("fid", "0x1"),))] == 1
    assert m[("zpcid_worker_restarts_total", (("fid", "0x2"),))] == 0
    # Each worker reports its own process's memory (not the supervisor's).
    with open(f"/proc/{pids[1]}/statm") as f:
        rss2 = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 0.5 * rss2 < m[("zpcid_worker_resident_memory_bytes", (("fid", "0x2"),))] < 2 * rss2
    assert d.ctl_json("stats")["worker_restarts"] == 1
    died = [e for e in d.events() if e["event"] == "worker_died"]
    assert len(died) == 1
    assert (died[0]["fid"], died[0]["uid"], died[0]["pid"]) == (1, 1, pids[0])
    assert died[0]["reason"] == "killed by signal SIGKILL"
    assert d.stop() == 0


async def test_worker_death_with_vmm_queued_in_backlog(daemons):
    """A VMM that connects while the worker is down is served by the next worker."""
    d = daemons(functions=[memfn(1)]).start()
    pid = d.ctl_json("list")[0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # frozen: cannot accept
    try:
        async with trio.open_nursery() as nursery:
            result = {}

            async def attach():
                async with zclient.connect(d.socket("f1")) as c:
                    result["magic"] = await magic(c)
            nursery.start_soon(attach)
            await trio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert result["magic"] == MAGIC
    assert d.ctl_json("list")[0]["restarts"] == 1
    assert d.stop() == 0


async def test_control_state_survives_worker_restart(daemons):
    d = daemons(functions=[memfn(1), memfn(2)]).start()
    rc, _, err = d.ctl("set", "1", "dma-limit=9")
    assert rc == 0, err
    pid = d.ctl_json("show", "1")["pid"]
    os.kill(pid, signal.SIGKILL)
    await trio.to_thread.run_sync(wait_serving, d, 1, pid)
    shown = d.ctl_json("show", "1")
    # The supervisor rebuilt the function from its configuration as last set.
    assert shown["zpci"]["dma_limit"] == 9 and shown["config"]["dma-limit"] == 9
    assert shown["restarts"] == 1 and shown["pid"] != pid and shown["state"] == "serving"
    # Commands reach the new worker.
    assert d.ctl_json("reset", "1") == {"fid": 1, "reset": True}
    assert d.ctl("inject-error", "1", "--pec", "0x3")[0] == 0
    assert [e["pec"] for e in d.ctl_json("events", "1")] == [3]
    assert d.ctl_json("events", "2") == []  # another process, another state
    assert d.stop() == 0


async def test_reload_keeps_unchanged_workers_and_the_changed_socket(daemons):
    a, b, gone = memfn(1), memfn(2), memfn(3)
    d = daemons(functions=[a, b, gone]).start()
    before = {f["fid"]: f["pid"] for f in d.ctl_json("list")}
    inode = os.stat(d.socket("f2")).st_ino
    d.write_config([a, memfn(2, **{"ram-size": 8192}), memfn(4)])
    await trio.to_thread.run_sync(d.reload)
    after = {f["fid"]: f["pid"] for f in d.ctl_json("list")}
    assert sorted(after) == [1, 2, 4]
    assert after[1] == before[1]  # untouched: same process
    assert after[2] != before[2]  # changed: a new worker ...
    assert os.stat(d.socket("f2")).st_ino == inode  # ... on the very same listening socket
    assert len(set(after.values())) == 3
    for pid in (before[2], before[3]):  # the replaced and removed workers are gone
        deadline = time.monotonic() + GENEROUS
        while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            assert time.monotonic() < deadline, f"worker {pid} still running"
            time.sleep(0.02)
    async with zclient.connect(d.socket("f4")) as c:
        assert await magic(c) == MAGIC
    assert d.stop() == 0


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


async def test_zygote_death_does_not_stop_functions(daemons):
    d = daemons(functions=[memfn(1), memfn(2)]).start()
    pids = {f["fid"]: f["pid"] for f in d.ctl_json("list")}
    zygote = proc_ppid(pids[1])
    assert proc_ppid(zygote) == d.proc.pid
    os.kill(zygote, signal.SIGKILL)
    # Running workers keep serving; a worker that dies afterwards is forked by a new zygote.
    async with zclient.connect(d.socket("f2")) as c:
        assert await scratch_roundtrip(c, 0x1111) == 0x1111
    os.kill(pids[1], signal.SIGKILL)
    row = await trio.to_thread.run_sync(wait_serving, d, 1, pids[1])
    assert proc_ppid(row["pid"]) not in (zygote, d.proc.pid)
    async with zclient.connect(d.socket("f1")) as c:
        assert await magic(c) == MAGIC
    assert d.stop() == 0
