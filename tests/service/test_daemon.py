"""The real daemon as a subprocess: notify, control commands, lifecycle, signals, metrics."""

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from protocol.vfio_user import consts as C
from zpcid.vmm import client as zclient
from zpcid.devices.memory import MAGIC, REG_MAGIC, REG_SCRATCH

from .conftest import ZPCICTL, memfn

NOBODY = 65534


def metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Samples by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_detached(d, fid: int, timeout: float = 10.0) -> None:
    """Poll until the daemon has noticed a client left (it learns that asynchronously)."""
    deadline = time.monotonic() + timeout
    while d.ctl_json("show", hex(fid))["attached"]:
        assert time.monotonic() < deadline, "client still attached"
        time.sleep(0.01)


async def magic(c) -> int:
    return struct.unpack("<I", await c.region_read(4, REG_MAGIC, 4))[0]


async def scratch_roundtrip(c, value: int) -> int:
    await c.region_write(4, REG_SCRATCH, struct.pack("<I", value))
    return struct.unpack("<I", await c.region_read(4, REG_SCRATCH, 4))[0]


# ---------------------------------------------------------------------- start-up, notify
def test_ready_and_status_on_real_notify_socket(daemons):
    d = daemons(functions=[memfn(1), memfn(2), memfn(3)])
    d.start()  # waits for READY=1
    ready = next(m for m in d.notify.messages if m.get("READY") == "1")
    assert ready["STATUS"] == "serving 3 functions, 0 attached"
    assert ready["MAINPID"] == str(d.proc.pid)
    # READY=1 comes only after every function socket listens.
    for name in ("f1", "f2", "f3"):
        assert stat.S_ISSOCK(os.lstat(d.socket(name)).st_mode)
    assert stat.S_IMODE(os.stat(d.control).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.rdir).st_mode) == 0o700
    assert d.stop() == 0
    assert d.notify.wait_for("STOPPING", "1")


def test_abstract_notify_socket_and_watchdog(daemons):
    d = daemons(functions=[memfn(1)], notify=f"@zpcid-test-{os.getpid()}")
    d.start(env={"WATCHDOG_USEC": "200000"})
    assert d.notify.wait_for("WATCHDOG", "1", timeout=5)
    assert d.stop() == 0


# ---------------------------------------------------------------------- control commands
def test_control_commands_human_and_json(daemons):
    d = daemons(functions=[memfn(1), memfn(0x20, uid=0x21, **{"dma-limit": 100})]).start()
    rc, out, err = d.ctl("list")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["FID", "UID", "NAME", "TYPE", "STATE", "PID", "RESTARTS", "ATTACHED",
                                "SOCKET"]
    listed = d.ctl_json("list")
    pid20 = listed[1]["pid"]
    assert lines[2].split() == ["0x20", "0x21", "f20", "memory", "serving", str(pid20), "0", "no",
                                d.socket("f20")]
    # aligned: every column starts at the same offset in each row
    assert lines[1].index("0x1 ") == 0 and lines[0].index("SOCKET") == lines[2].index(d.socket("f20"))

    listed = d.ctl_json("list")
    assert [(f["fid"], f["uid"], f["attached"]) for f in listed] == [(1, 1, False), (0x20, 0x21, False)]

    shown = d.ctl_json("show", "0x20")
    assert shown["fid"] == 0x20 and shown["type"] == "memory" and shown["attached"] is False
    assert shown["config"]["dma-limit"] == 100 and shown["socket"] == d.socket("f20")
    assert "rpcit_calls" in shown["counters"]
    rc, out, _ = d.ctl("show", "32")
    assert rc == 0 and any(line.split() == ["config.dma-limit", "100"] for line in out.splitlines())

    stats = d.ctl_json("stats")
    assert stats["functions"] == 2 and stats["attached"] == 0 and stats["pid"] == d.proc.pid
    assert d.ctl_json("version")["version"] == __import__("zpcid").__version__
    assert d.ctl_json("reset", "1") == {"fid": 1, "reset": True}

    rc, out, err = d.ctl("show", "0x99")
    assert rc == 1 and "no function with fid 0x99" in err
    rc, out, err = d.ctl("--json", "show", "0x99")
    assert rc == 1 and json.loads(out)["exit_code"] == 1
    # zPCI state: no translations registered yet, then an injected error event
    assert d.ctl_json("mappings", "1") == []
    assert d.ctl("mappings", "1")[1].strip() == "(none)"
    rc, out, err = d.ctl("inject-error", "1", "--pec", "0x2")
    assert rc == 0, err
    events = d.ctl_json("events", "1")
    assert [(e["type"], e["pec"], e["reason"]) for e in events] == [("error", 2, "injected")]
    rc, out, _ = d.ctl("events", "1", "--clear")
    header, row = out.splitlines()
    assert row.split()[header.split().index("PEC")] == "0x2"
    assert d.ctl_json("events", "1") == []
    assert d.ctl_json("stats")["errors"] == {"pec_0x02": 1}
    # (detached, the function stayed disabled: there is no error state to end)
    rc, out, err = d.ctl("clear-error", "1")
    assert rc == 1 and "not in the error state" in err

    # properties of a detached function
    rc, out, err = d.ctl("set", "1", "dma-limit=5", "relaxed-translation=false")
    assert rc == 0, err
    assert out.strip() == "fid 0x1: dma-limit=5, relaxed-translation=no"
    shown = d.ctl_json("show", "1")
    assert shown["zpci"]["dma_limit"] == 5 and shown["zpci"]["relaxed_translation"] is False
    assert shown["config"]["dma-limit"] == 5
    for argv, expect in ((["set", "1", "fid=5"], "key 'fid': not a property that can be set"),
                         (["set", "1", "dma-limit=0"], "key 'dma-limit': out of range"),
                         (["set", "1", "uid=0x21"], "key 'uid': duplicate uid 0x21"),
                         (["set", "1", "compat=yes"], "key 'compat': expected an integer")):
        rc, _, err = d.ctl(*argv)
        assert rc == 1 and expect in err, (argv, err)

    # The console script itself, as an operator runs it.
    res = subprocess.run([*ZPCICTL, "--socket", d.control, "version"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("zpcictl ")
    assert d.stop() == 0


def test_ctl_when_daemon_not_running(sock_dir):
    path = os.path.join(sock_dir, "control.sock")
    res = subprocess.run([*ZPCICTL, "--socket", path, "list"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 3
    assert f"zpcid is not running (no control socket {path})" in res.stderr
    # a stale socket file nobody listens on
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    res = subprocess.run([*ZPCICTL, "--socket", path, "list"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 3 and "nothing listens on" in res.stderr


def test_control_socket_survives_bad_requests(daemons):
    d = daemons(functions=[memfn(1)]).start()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(d.control)
        f = s.makefile("rwb")
        for line, code in ((b"not json", "bad-request"), (b"[1,2]", "bad-request"),
                           (b'{"command": "launch"}', "unknown-command"),
                           (b'{"command": "show", "args": {"fid": "zz"}}', "bad-request"),
                           (b'{"command": "show", "args": []}', "bad-request"),
                           (b'{"command": "remove", "args": {"fid": 1, "timeout": -1}}', "invalid"),
                           (b'{"command": "add", "args": {"function": {"type": "memory"}}}', "invalid"),
                           (b"\xff\xfe", "bad-request")):
            f.write(line + b"\n")
            f.flush()
            resp = json.loads(f.readline())
            assert resp["ok"] is False and resp["error"]["code"] == code, (line, resp)
        f.write(b'{"id": 7, "command": "list"}\n')
        f.flush()
        resp = json.loads(f.readline())
        assert resp["id"] == 7 and resp["ok"] and resp["result"][0]["fid"] == 1
    assert d.ctl_json("list")[0]["state"] == "serving"
    assert d.stop() == 0


# ---------------------------------------------------------------------- permissions
def _ctl_as(uid: int, gid: int, argv: list[str]) -> tuple[int, str]:
    """Run zpcictl (in a forked child) as another user; returns (exit code, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            import io
            from zpcid.service import ctl
            err = io.StringIO()
            code = ctl.run(argv, out=io.StringIO(), err=err)
            os.write(w, err.getvalue().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_permission_refused_for_other_uid(daemons, sock_dir):
    # Default: the control socket is 0600 in a 0700 directory, the kernel refuses.
    d = daemons(functions=[memfn(1)], name="p").start()
    rc, err = _ctl_as(NOBODY, NOBODY, ["--socket", d.control, "list"])
    assert rc == 4 and f"access denied to {d.control}" in err
    assert d.stop() == 0

    # A socket others can reach: the daemon's SO_PEERCRED check refuses.
    os.chmod(sock_dir, 0o711)  # mkdtemp made it 0700
    open_dir = os.path.join(sock_dir, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o755)
    path = os.path.join(open_dir, "ctl.sock")
    d = daemons(functions=[memfn(1)], name="q",
                daemon={"control-socket": path, "control-mode": 0o666}).start()
    rc, err = _ctl_as(NOBODY, NOBODY, ["--socket", path, "list"])
    assert rc == 4 and f"uid {NOBODY} may not control this daemon" in err
    assert d.ctl_json("stats")["control_refused"] == 1
    assert d.stop() == 0

    # Members of the admin group are allowed.
    d = daemons(functions=[memfn(1)], name="r",
                daemon={"control-socket": path, "control-mode": 0o666, "admin-group": NOBODY}).start()
    rc, err = _ctl_as(NOBODY, NOBODY, ["--socket", path, "list"])
    assert rc == 0, err
    assert d.stop() == 0


# ---------------------------------------------------------------------- add / remove
async def test_add_and_remove_at_run_time(daemons):
    d = daemons(functions=[memfn(1)]).start()
    rc, out, err = d.ctl("add", "type=memory", "fid=0x30", "uid=0x30", "name=extra", "ram-size=4096")
    assert rc == 0, err
    assert out.strip() == f"added fid 0x30 (extra, memory) on {d.socket('extra')}"
    rc, _, err = d.ctl("add", "type=memory", "fid=0x31", "uid=0x30")
    assert rc == 1 and "key 'uid': duplicate uid 0x30" in err
    rc, _, err = d.ctl("add", "type=memory", "fid=0x30", "uid=0x32")
    assert rc == 1 and "fid 0x30 is already served" in err

    async with zclient.connect(d.socket("extra")) as c:
        assert await magic(c) == MAGIC
        assert d.ctl_json("show", "0x30")["attached"] is True
        rc, _, err = d.ctl("set", "0x30", "dma-limit=7")
        assert rc == 1 and "fid 0x30 has a VMM attached" in err
    # a client that left: removal is immediate
    wait_detached(d, 0x30)
    assert d.ctl_json("remove", "0x30") == {"fid": 0x30, "was_attached": False, "released": True,
                                             "forced": False}
    assert not os.path.exists(d.socket("extra"))
    assert [f["fid"] for f in d.ctl_json("list")] == [1]
    # one event per attach/detach, each with fid and uid (the endpoint's too)
    mine = [e["event"] for e in d.events() if e.get("fid") == 0x30 and e.get("uid") == 0x30]
    for event in ("function_started", "listening", "attach", "client_disconnected", "detach",
                  "function_stopped"):
        assert mine.count(event) == 1, (event, mine)
    rc, _, err = d.ctl("remove", "0x30")
    assert rc == 1 and "no function with fid 0x30" in err
    assert d.stop() == 0


async def test_remove_attached_signals_req_then_forces(daemons):
    d = daemons(functions=[memfn(1), memfn(2)]).start()
    async with zclient.connect(d.socket("f1")) as c:
        (req_fd,) = await c.enable_irq_eventfds(C.VFIO_PCI_REQ_IRQ_INDEX, 1)
        result = {}
        try:
            async with trio.open_nursery() as nursery:
                async def remove():
                    result["rc"] = await trio.to_thread.run_sync(
                        d.ctl, "--json", "remove", "1", "--timeout", "0.5")
                nursery.start_soon(remove)
                # The VMM is told through the REQ IRQ ...
                assert await zclient.wait_eventfd(req_fd, timeout=10) == 1
                # ... and, as it does not let go, is detached after the timeout.
        finally:
            os.close(req_fd)
        rc, out, err = result["rc"]
        assert rc == 0, err
        assert json.loads(out) == {"fid": 1, "was_attached": True, "released": False, "forced": True}
        with pytest.raises((ConnectionError, OSError, zclient.VfioUserError)):
            await magic(c)
    assert not os.path.exists(d.socket("f1"))
    assert [f["fid"] for f in d.ctl_json("list")] == [2]
    assert any(e["event"] == "detach_forced" and e.get("fid") == 1 and e.get("uid") == 1 for e in d.events())
    assert d.stop() == 0


async def test_remove_attached_client_that_releases(daemons):
    d = daemons(functions=[memfn(1)]).start()
    result = {}
    async with trio.open_nursery() as nursery:
        async with zclient.connect(d.socket("f1")) as c:
            (req_fd,) = await c.enable_irq_eventfds(C.VFIO_PCI_REQ_IRQ_INDEX, 1)

            async def remove():
                result["rc"] = await trio.to_thread.run_sync(d.ctl, "remove", "1", "--timeout", "20")
            nursery.start_soon(remove)
            await zclient.wait_eventfd(req_fd, timeout=10)
            os.close(req_fd)
        # leaving the block closes the connection: the VMM released the function
    rc, out, err = result["rc"]
    assert rc == 0, err
    assert out.strip() == "removed fid 0x1 (the VMM released it)"
    assert d.stop() == 0


# ---------------------------------------------------------------------- reload (SIGHUP)
async def test_sighup_applies_only_changed_entries(daemons):
    a, b, gone = memfn(1), memfn(2), memfn(3)
    d = daemons(functions=[a, b, gone]).start()
    async with zclient.connect(d.socket("f1")) as c:
        assert await scratch_roundtrip(c, 0x1234) == 0x1234
        d.write_config([a, memfn(2, **{"ram-size": 8192}), memfn(4)])
        ready = await trio.to_thread.run_sync(d.reload)
        assert ready["STATUS"] == "serving 3 functions, 1 attached"
        # The untouched function kept its client session, state and all.
        assert struct.unpack("<I", await c.region_read(4, REG_SCRATCH, 4))[0] == 0x1234
        assert await scratch_roundtrip(c, 0x5678) == 0x5678
        shown = d.ctl_json("show", "1")
        assert shown["attached"] is True and shown["counters"]["attaches"] == 1
    assert [f["fid"] for f in d.ctl_json("list")] == [1, 2, 4]
    assert d.ctl_json("show", "2")["config"]["ram-size"] == 8192
    assert not os.path.exists(d.socket("f3"))
    assert os.path.exists(d.socket("f4"))
    done = [e for e in d.events() if e["event"] == "reload_done"]
    assert done[-1]["stopped"] == [2, 3] and done[-1]["started"] == [2, 4]
    assert d.stop() == 0


async def test_sighup_with_bad_config_keeps_old_running(daemons):
    d = daemons(functions=[memfn(1), memfn(2)]).start()
    async with zclient.connect(d.socket("f1")) as c:
        assert await scratch_roundtrip(c, 0xABCD) == 0xABCD
        for bad in ([memfn(1), memfn(2, uid=1)],           # duplicate uid
                    [memfn(1), memfn(2, bogus=True)]):     # option the type does not take
            d.write_config(bad)
            ready = await trio.to_thread.run_sync(d.reload)
            assert ready["STATUS"].startswith("reload rejected, old configuration kept:")
            assert d.config_path in ready["STATUS"]
        with open(d.config_path, "w") as f:
            f.write("[[function]\n")                       # not TOML at all
        ready = await trio.to_thread.run_sync(d.reload)
        assert "not valid TOML" in ready["STATUS"]
        rc, _, err = await trio.to_thread.run_sync(d.ctl, "reload")  # the same through zpcictl
        assert rc == 1 and "reload rejected" in err
        assert await scratch_roundtrip(c, 0x4321) == 0x4321
        assert [f["fid"] for f in d.ctl_json("list")] == [1, 2]
        stats = d.ctl_json("stats")
        assert stats["reload_failures"] == 4 and stats["attached"] == 1
    rejected = [e for e in d.events() if e["event"] == "reload_rejected"]
    assert len(rejected) == 4 and "duplicate uid 0x1" in rejected[0]["error"]
    assert d.stop() == 0


# ---------------------------------------------------------------------- shutdown, sockets
async def test_sigterm_detaches_and_removes_sockets(daemons):
    d = daemons(functions=[memfn(1), memfn(2)], daemon={"metrics-listen": "metrics.sock"}).start()
    paths = [d.socket("f1"), d.socket("f2"), d.control, os.path.join(d.rdir, "metrics.sock")]
    assert all(os.path.exists(p) for p in paths)
    async with zclient.connect(d.socket("f1")) as c:
        assert await magic(c) == MAGIC
        d.signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(d.proc.wait, 10) == 0
        with pytest.raises((ConnectionError, OSError, zclient.VfioUserError)):
            await magic(c)
    assert [p for p in paths if os.path.exists(p)] == []
    assert d.notify.wait_for("STOPPING", "1")
    events = [e["event"] for e in d.events()]
    assert "detach" in events and events[-1] == "stopped"


def test_sigint_exits_zero(daemons):
    d = daemons(functions=[memfn(1)]).start()
    d.signal(signal.SIGINT)
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.control)


def test_stale_socket_replaced_live_socket_refused(daemons):
    first = daemons(functions=[memfn(1)], name="one")
    os.makedirs(first.rdir, mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(first.socket("f1"))  # left behind as if by a crash: nobody listens
    stale.close()
    first.start()
    assert d_list_fids(first) == [1]

    # A second daemon wanting the same function socket is refused, the first unharmed.
    second = daemons(functions=[memfn(1, socket=first.socket("f1"))], name="two")
    second.start(wait=False)
    assert second.proc.wait(30) == 1
    assert f"{first.socket('f1')} is served by a live process" in second.log()
    assert not os.path.exists(second.control)  # it cleaned up what it had created
    assert d_list_fids(first) == [1] and os.path.exists(first.socket("f1"))
    assert first.stop() == 0


def d_list_fids(d) -> list[int]:
    return [f["fid"] for f in d.ctl_json("list")]


# ---------------------------------------------------------------------- metrics
async def test_metrics_from_control_and_listener(daemons):
    d = daemons(functions=[memfn(1), memfn(2, **{"dma-limit": 300})],
                daemon={"metrics-listen": "metrics.sock"}).start()
    assert d.ctl("inject-error", "2")[0] == 0  # default PEC: system error (0x0b)
    async with zclient.connect(d.socket("f1")) as c:
        assert await magic(c) == MAGIC
        rc, text, err = d.ctl("metrics")
        assert rc == 0, err
        m = metrics(text)
        assert m[("zpcid_functions", ())] == 2
        assert m[("zpcid_attached_clients", (("fid", "0x1"),))] == 1
        assert m[("zpcid_attached_clients", (("fid", "0x2"),))] == 0
        assert m[("zpcid_attaches_total", (("fid", "0x1"),))] == 1
        assert m[("zpcid_attaches_total", (("fid", "0x2"),))] == 0
        assert m[("zpcid_shadow_mappings", (("fid", "0x1"),))] == 0
        assert m[("zpcid_dma_limit_remaining", (("fid", "0x2"),))] == 300
        assert m[("zpcid_errors_total", (("fid", "0x2"), ("kind", "pec_0x0b")))] == 1
        for name in ("zpcid_rpcit_calls_total", "zpcid_shadow_fills_total", "zpcid_pages_mapped_total",
                     "zpcid_pages_unmapped_total",
                     "zpcid_dma_read_bytes_total", "zpcid_dma_written_bytes_total",
                     "zpcid_interrupts_total"):
            assert (name, (("fid", "0x2"),)) in m, name
        # every zpcid_ series is labelled by fid only (errors also by kind)
        for (name, labels) in m:
            if name.startswith("zpcid_") and labels:
                assert {k for k, _ in labels} <= {"fid", "kind"}, name

    wait_detached(d, 1)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(d.rdir, "metrics.sock"))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    m = metrics(body.decode())
    assert m[("zpcid_attaches_total", (("fid", "0x1"),))] == 1
    assert m[("zpcid_attached_clients", (("fid", "0x1"),))] == 0
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(d.rdir, "metrics.sock"))
        s.sendall(b"GET /nope HTTP/1.0\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 404")
    assert d.stop() == 0


def test_metrics_on_loopback_tcp(daemons):
    # Find a free loopback port; the tiny race with other processes is acceptable here.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemons(functions=[memfn(1)], daemon={"metrics-listen": port}).start()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert metrics(data.partition(b"\r\n\r\n")[2].decode())[("zpcid_functions", ())] == 1
    assert d.stop() == 0


async def test_stalled_vmm_does_not_stall_other_functions(daemons):
    d = daemons(functions=[memfn(1), memfn(2)]).start()
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(d.socket("f1"))
        stalled.sendall(b"\x01\x00\x01")  # a third of a header, then silence
        async with zclient.connect(d.socket("f2")) as c:
            assert await magic(c) == MAGIC
            assert await scratch_roundtrip(c, 0xFEED) == 0xFEED
        assert [f["attached"] for f in d.ctl_json("list")][0] is True
    assert d.stop() == 0
