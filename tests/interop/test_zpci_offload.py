"""Real s390x guests whose zPCI instructions zpcid serves (patched QEMU, zpci offload).

QEMU is the qemu-system-s390x that ``.ci/provision-qemu-offload`` builds from
Debian's source package with ``contrib/qemu``; the guest is Debian sid's s390x
kernel; the daemon is a real ``zpcid serve`` with two virtio-blk functions,
controlled through ``zpcictl`` (in-process, the console script's code). One
daemon serves every boot of this module.

* default IOMMU: zpcid shadows the guest's tables, filling the shadow on a
  miss (the refresh bit is off, so the guest's RPCITs only invalidate), and
  the only DMA_MAP is guest RAM (keyed by guest address);
* ``iommu.passthrough=1``: the guest gets its identity domain, zpcid maps
  directly, no RPCIT at all;
* ``relaxed-translation=off`` and an older machine type: no RTR for the
  guest, which falls back to a DMA domain and still works;
* ``zpcictl inject-error`` during I/O: the guest's zPCI error handling runs,
  ``zpcictl clear-error`` ends the error state, the guest recovers the function
  in place (sysfs ``recover``), the VM keeps running (QMP), nothing is lost;
* ``zpcictl remove``: the guest sees the function go away;
* 20 reboots against the same daemon;
* ``offload=off`` on the same binary: QEMU's stock emulated path.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import harness
import qemu as qh
from zpcid.service import ctl

FID, UID = 0x10, 0x1234  # the function most boots use
RFID, RUID = 0x11, 0x1235  # the function the removal test takes away
MEM_MB = 512
SDMA = 0x1_0000_0000
DISK = 16 << 20
PASSTHROUGH = "iommu.passthrough=1"
BOOT_TIMEOUT = 300.0
START_TIMEOUT = 30.0
PATTERN = harness.pattern(b"offload", 1 << 20)
PATTERN_SEEK = 64  # 4 KiB blocks
FALLBACK = "Falling back to IOMMU_DOMAIN_DMA"


def _command(name: str, module: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


class Daemon:
    """One ``zpcid serve`` with a virtio-blk function per FID."""

    def __init__(self, base: Path, disk_size: int = DISK, props: dict[int, dict] | None = None):
        """``props``: extra TOML keys per FID (e.g. ``{RFID: {"tlb-refresh": True}}``)."""
        self.base = base
        self.rdir = base / "run"
        self.log_path = base / "zpcid.log"
        self.disks = {fid: base / f"disk-{fid:x}.img" for fid in (FID, RFID)}
        funcs = []
        for fid, uid in ((FID, UID), (RFID, RUID)):
            funcs.append(f'[[function]]\ntype = "virtio-blk"\nfid = {fid}\nuid = {uid}\n'
                         f'name = "vblk{fid:x}"\npath = "{self.disks[fid]}"\nsize = {disk_size}\n'
                         f'serial = "offload-{fid:x}"\n'
                         + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (props or {}).get(fid, {}).items()))
        config = base / "zpcid.toml"
        config.write_text(f'[daemon]\nruntime-dir = "{self.rdir}"\nlog-level = "debug"\n\n'
                          + "\n".join(funcs))
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "RUNTIME_DIRECTORY", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self._log = open(self.log_path, "ab")
        # ZPCID_OFFLOAD_DAEMON: another zpcid (e.g. a branch's build) to test against.
        daemon = os.environ.get("ZPCID_OFFLOAD_DAEMON")
        cmd = [daemon] if daemon else _command("zpcid", "zpcid.cli")
        self.proc = subprocess.Popen([*cmd, "serve", "--config", str(config),
                                      "--log-format", "json"],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not all(os.path.exists(p) for p in (self.control, self.socket(FID), self.socket(RFID))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"zpcid did not start:\n{self.log_text()[-4000:]}")
            time.sleep(0.1)

    @property
    def control(self) -> str:
        return str(self.rdir / "control.sock")

    def socket(self, fid: int) -> str:
        return str(self.rdir / f"vblk{fid:x}.sock")

    def ctl(self, *argv: str) -> tuple[int, str]:
        """``zpcictl ARGV`` against this daemon (the console script's code, in-process)."""
        out, err = io.StringIO(), io.StringIO()
        rc = ctl.run(["--socket", self.control, *argv], out=out, err=err)
        return rc, out.getvalue() + err.getvalue()

    def show(self, fid: int) -> dict:
        rc, out = self.ctl("--json", "show", hex(fid))
        assert rc == 0, out
        return json.loads(out)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, since: int = 0) -> list[dict]:
        out = []
        with open(self.log_path, "rb") as f:
            f.seek(since)
            for line in f.read().decode(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def daemon(qemu_offload, tmp_path_factory):
    base = Path(tempfile.mkdtemp(prefix="zpcid-off-"))  # short: AF_UNIX paths
    d = Daemon(base)
    try:
        yield d
    finally:
        d.stop()
        keep = tmp_path_factory.mktemp("offload-daemon")
        (keep / "zpcid.log").write_bytes(d.log_path.read_bytes())
        for p in base.rglob("*"):
            if p.is_file() or p.is_socket():
                p.unlink()


class Qmp:
    """Just enough QMP to ask a running QEMU for its run state."""

    def __init__(self, path: str):
        self.path = path

    def status(self, timeout: float = 30.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.path)
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in ("qmp_capabilities", "query-status"):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                while True:
                    msg = json.loads(f.readline())
                    if "return" in msg or "error" in msg:
                        break
            return msg["return"]["status"]


def _script(qemu_offload, body: str) -> str:
    return qh.guest_script_for(qemu_offload, "s390x", body, modules=["virtio_blk"])


FIND = """\
D=
for d in /sys/bus/pci/devices/*; do [ -e $d/function_id ] && D=$d; done
[ -n "$D" ] || { echo FN=missing; exit 1; }
echo "ZPCI=$(cat $D/uid) $(cat $D/function_id) $(cat $D/function_handle) $(cat $D/vendor) $(cat $D/device)"
"""

ROUND_TRIP = f"""\
dd if=/pattern.bin of=/dev/vda bs=4096 seek={PATTERN_SEEK} conv=fsync 2>/dev/null && echo DD=ok
sync
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip={PATTERN_SEEK} count={len(PATTERN) // 4096} iflag=direct 2>/dev/null
cmp /pattern.bin /tmp/back && echo VERIFY=ok
"""

KLOG = 'dmesg | grep -i -E "iommu|zpci|pci 0|virtio" | sed "s/^/KLOG /"\n'


class Run:
    """One QEMU run against the daemon, with what zpcictl showed meanwhile."""

    def __init__(self, result: qh.GuestResult, events: list[dict], shows: list[dict],
                 before: dict, after: dict):
        self.result = result
        self.kv = harness.kv(result.guest_output())
        self.events = events
        self.shows = shows
        self.before = before
        self.after = after

    @property
    def klog(self) -> str:
        return "\n".join(line[5:] for line in self.result.guest_output().splitlines()
                         if line.startswith("KLOG "))

    def counter(self, name: str) -> int:
        return self.after["counters"][name] - self.before["counters"][name]

    def maps(self, fid: int = FID) -> list[dict]:
        return [e for e in self.events if e.get("event") == "dma_map" and "flags" in e
                and e.get("function") == f"vblk{fid:x}"]

    def seen(self, key: str) -> list:
        return [s["zpci"][key] for s in self.shows]

    @property
    def diag(self) -> str:
        return (f"\n--- QEMU console (tail) ---\n{self.result.output[-8000:]}"
                f"\n--- zpcictl show (last) ---\n{json.dumps(self.shows[-1:], indent=1)[-3000:]}")


def boot(qemu_offload, daemon: Daemon, body: str, *, fid: int = FID, uid: int = UID,
         zpci: str = "", machine: str | None = None, append: str = "", reboot: bool = False,
         timeout: float = BOOT_TIMEOUT, during=None) -> Run:
    """Boot the guest against function ``fid``; ``during(show, qmp)`` runs on
    the test thread while QEMU runs and may poll or act."""
    qmp_path = os.path.join(daemon.base, f"qmp-{time.monotonic_ns()}.sock")
    args = ["-device", f"zpci,uid={uid:#x},fid={fid:#x},target=zpcid0{zpci}",
            "-device", harness.vfio_user_device(daemon.socket(fid), "zpcid0"),
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if machine:
        args += ["-machine", machine]
    before = daemon.show(fid)
    offset = daemon.log_size()
    shows: list[dict] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(qh.run_guest, qemu_offload, "s390x", _script(qemu_offload, body),
                          qemu_args=args, append=append, timeout=timeout, memory_mb=MEM_MB,
                          modules=["virtio_blk"], extra_files={"pattern.bin": PATTERN},
                          reboot=reboot)

        def show() -> dict:
            s = daemon.show(fid)
            shows.append(s)
            return s

        if during is not None:
            during(show, Qmp(qmp_path), fut)
        while not fut.done():
            if daemon.proc.poll() is None:
                try:
                    show()
                except (AssertionError, ValueError):
                    pass  # the function was removed
            time.sleep(0.3)
        result = fut.result()
    after = daemon.show(fid) if fid == FID else before
    return Run(result, daemon.events(offset), shows, before, after)


def _check_round_trip(run: Run) -> None:
    assert run.result.done and run.result.exit_status() == 0, run.diag
    assert run.kv.get("DD") == "ok" and run.kv.get("VERIFY") == "ok", run.diag


def _check_guest_view(run: Run) -> None:
    # QEMU's numbering (UID, FID, an emulated-range handle), the device's IDs.
    uid, fid, fh, vendor, device = run.kv["ZPCI"].split()
    assert (int(uid, 16), int(fid, 16), vendor, device) == (UID, FID, "0x1af4", "0x1042"), run.diag
    assert int(fh, 16) & 0x00FF0000 == 0x00020000, run.diag


def _num(v) -> int:
    """A number from the daemon's JSON log (an int, or a hex string)."""
    return v if isinstance(v, int) else int(v, 0)


def _check_ram_only_maps(run: Run) -> None:
    """The only DMA_MAPs are guest RAM, keyed by guest address, with its memfd."""
    maps = run.maps()
    assert maps, run.diag
    for m in maps:
        iova, size = _num(m["iova"]), _num(m["size"])
        assert m["fd"] is True and iova + size <= MEM_MB << 20, (m, run.diag)
    assert len(maps) <= 4, maps
    assert sum(_num(m["size"]) for m in maps) >= (MEM_MB << 20) // 2, maps


BODY = FIND + harness.WAIT_FOR_VDA + ROUND_TRIP + KLOG


def test_offload_default_iommu_rpcit_and_shadow_mappings(qemu_offload, daemon):
    run = boot(qemu_offload, daemon, BODY)
    _check_round_trip(run)
    _check_guest_view(run)
    assert "zpcid-translates" in run.seen("mode"), run.diag
    # The group's refresh bit is off (compat 3): the guest issues RPCITs only to
    # invalidate (its flush queue), and zpcid fetches new translations itself
    # when the device misses the shadow.
    assert not any(s["zpci"]["tlb_refresh"] for s in run.shows
                   if s["zpci"]["mode"] == "zpcid-translates"), run.diag
    requests = sum(run.after["virtio"][k] - run.before["virtio"][k] for k in ("reads", "writes"))
    assert requests >= 2 * len(PATTERN) // (128 << 10), run.diag  # at least the round trip's
    # With the bit on every request costs at least one RPCIT (its mapping); the
    # flush queue's count depends on its timer, i.e. on how fast TCG runs here.
    assert 0 < run.counter("rpcit_calls") < requests, (run.counter("rpcit_calls"), requests, run.diag)
    assert run.counter("shadow_fills") > run.counter("rpcit_calls"), run.diag
    # Shadow mappings live from a miss to the next flush (milliseconds), so the
    # cumulative counter shows them, not a sample of the header.
    assert run.counter("pages_mapped") > 0, run.diag
    assert not any(run.seen("direct_map")), run.diag
    _check_ram_only_maps(run)
    assert "Default domain type: Translated" in run.klog, run.diag


def test_offload_passthrough_identity_domain_and_direct_map(qemu_offload, daemon):
    run = boot(qemu_offload, daemon, BODY, append=PASSTHROUGH)
    _check_round_trip(run)
    assert "Default domain type: Passthrough" in run.klog, run.diag
    assert FALLBACK not in run.result.output, run.diag
    assert any(run.seen("direct_map")), run.diag
    # No translation on the data path: not one RPCIT, nothing shadowed.
    assert run.counter("rpcit_calls") == 0, run.diag
    assert run.counter("pages_mapped") == 0, run.diag
    _check_ram_only_maps(run)


@pytest.mark.parametrize("variant", ["relaxed-translation-off", "machine-9.2"])
def test_offload_without_rtr_falls_back_to_dma_domain(qemu_offload, daemon, variant):
    kw = ({"zpci": ",relaxed-translation=off"} if variant == "relaxed-translation-off"
          else {"machine": "s390-ccw-virtio-9.2"})
    run = boot(qemu_offload, daemon, BODY, append=PASSTHROUGH, **kw)
    _check_round_trip(run)
    assert FALLBACK in run.result.output, run.diag
    assert not any(run.seen("direct_map")), run.diag
    assert run.counter("rpcit_calls") > 0, run.diag
    _check_ram_only_maps(run)


def test_offload_off_keeps_the_stock_emulated_path(qemu_offload, daemon):
    run = boot(qemu_offload, daemon, BODY, zpci=",offload=off")
    _check_round_trip(run)
    _check_guest_view(run)
    assert "zpcid-translates" not in run.seen("mode"), run.diag
    assert run.counter("rpcit_calls") == 0, run.diag
    # QEMU translates and maps page by page inside the DMA aperture.
    per_page = [m for m in run.maps() if _num(m["iova"]) >= SDMA]
    assert len(per_page) > 50, run.diag


LOOP_SEEK = 1024  # 4 KiB blocks: where the writer runs while the error hits (clear of the pattern)
RECOVERY_BODY = FIND + harness.WAIT_FOR_VDA + f"""\
# The data written before the error: it must survive the error and the recovery.
dd if=/pattern.bin of=/dev/vda bs=4096 seek={PATTERN_SEEK} conv=fsync 2>/dev/null && echo BEFORE_DD=ok
# I/O in the background while zpcictl injects the error.
( while true; do
    dd if=/pattern.bin of=/dev/vda bs=4096 seek={LOOP_SEEK} count=64 conv=fsync 2>/dev/null
    dd if=/dev/vda of=/dev/null bs=4096 skip={LOOP_SEEK} count=64 iflag=direct 2>/dev/null
  done ) &
W=$!
n=0
while ! dmesg | grep -q "reports an error" && [ $n -lt 600 ]; do sleep 0.5; n=$((n + 1)); done
# The workload stops; the request the error caught waits for the function
# (its DMA is held back, not failed) and completes once the host clears the
# error state.
kill $W
n=0
while pidof dd >/dev/null && [ $n -lt 600 ]; do sleep 0.5; n=$((n + 1)); done
pidof dd >/dev/null || echo IO_DRAINED=1
dmesg | grep -E "zpci|virtio" | sed "s/^/ERRLOG /"
# The admin's recovery: unbind, disable, enable, re-register, rescan.
RECOVER_CMD && echo RECOVER=ok
n=0
while [ ! -b /dev/vda ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
D=
for d in /sys/bus/pci/devices/*; do [ -e $d/function_id ] && D=$d; done
echo "AFTER_FH=$(cat $D/function_handle)"
dd if=/dev/vda of=/tmp/before bs=4096 skip={PATTERN_SEEK} count={len(PATTERN) // 4096} iflag=direct 2>/dev/null
cmp /pattern.bin /tmp/before && echo BEFORE_VERIFY=ok
dmesg | grep -E "zpci|virtio" | sed "s/^/RECLOG /"
""" + ROUND_TRIP + KLOG


RECOVER_CMDS = {
    # zPCI's own: unbind, CLP disable and enable, IOAT registration, rescan
    "recover": "echo 1 > $D/recover",
    # the hotplug slot: unbind, disable, SCLP deconfigure; configure, enable, scan
    "slot-power": f"S=/sys/bus/pci/slots/{FID:08x}/power; echo 0 > $S && echo 1 > $S",
}


@pytest.mark.parametrize("how", sorted(RECOVER_CMDS))
def test_offload_inject_error_during_io_recovers_in_place(qemu_offload, daemon, how):
    """The guest's zPCI error handling takes the error event; virtio-pci has no
    PCI error handlers, so the guest cannot end the error state itself: the
    host clears it (zpcictl clear-error), the I/O the error caught completes,
    and the guest's admin recovers the function in place (sysfs ``recover``,
    or the hotplug slot's power off and on) — no guest reset, the VM running
    throughout, the data written before the error intact."""
    with open(daemon.disks[FID], "r+b") as f:
        f.seek(PATTERN_SEEK * 4096)
        f.write(bytes(len(PATTERN)))
    states: list[str] = []
    done: list[tuple[str, int, str]] = []
    seen: list[str] = []

    def during(show, qmp, fut):
        start = show()["counters"]["dma_bytes_read"]
        deadline = time.monotonic() + BOOT_TIMEOUT
        # Inject while the guest writes: once the device has read 2 MiB more.
        while not fut.done() and time.monotonic() < deadline:
            if show()["counters"]["dma_bytes_read"] - start >= 2 << 20:
                done.append(("inject", *daemon.ctl("inject-error", hex(FID))))
                break
            time.sleep(0.2)
        seen.append(show()["zpci"]["state"])
        # Let the guest take the event (it logs it either way), then clear.
        t = time.monotonic() + 5
        while not fut.done() and time.monotonic() < t:
            states.append(qmp.status(timeout=10))
            time.sleep(1)
        done.append(("clear", *daemon.ctl("clear-error", hex(FID))))
        seen.append(show()["zpci"]["state"])
        while not fut.done():
            try:
                states.append(qmp.status(timeout=10))
            except (OSError, ValueError):
                break
            time.sleep(1)

    run = boot(qemu_offload, daemon, RECOVERY_BODY.replace("RECOVER_CMD", RECOVER_CMDS[how]),
               during=during)
    assert [(what, rc) for what, rc, _ in done] == [("inject", 0), ("clear", 0)], (done, run.diag)
    assert seen == ["error", "enabled"], (seen, run.diag)
    assert len(states) >= 3 and set(states) == {"running"}, (states, run.diag)
    errlog = [line for line in run.result.lines if line.startswith("ERRLOG ")]
    # The guest's zPCI event handling saw the error on its function (QEMU's FID)
    # and tried its recovery, which virtio-pci cannot take part in.
    assert any(f"reports an error for PCI function {FID:#x}" in line for line in errlog), run.diag
    assert any("does not support error recovery" in line for line in errlog), run.diag
    assert run.kv.get("BEFORE_DD") == "ok" and run.kv.get("IO_DRAINED") == "1", run.diag
    # In-place recovery: the function re-enabled (QEMU's handle, enable bit on)
    # and virtio-blk probed again on it.
    assert run.kv.get("RECOVER") == "ok", run.diag
    assert int(run.kv["AFTER_FH"], 16) & 0x80000000, run.diag
    reclog = [line for line in run.result.lines if line.startswith("RECLOG ")]
    assert sum("[vda]" in line for line in reclog) == 2, run.diag
    # Nothing lost: the pattern from before the error, in the guest and on the host.
    assert run.kv.get("BEFORE_VERIFY") == "ok", run.diag
    _check_round_trip(run)
    with open(daemon.disks[FID], "rb") as f:
        f.seek(PATTERN_SEEK * 4096)
        assert f.read(len(PATTERN)) == PATTERN
    assert "internal-error" not in run.result.output.lower()
    kinds = [(e.get("event"), e.get("cause") or e.get("reason")) for e in run.events
             if e.get("event") in ("zpci_event", "zpci_state")]
    # zpcid's side of the chain: error (injected), cleared, the guest's disable
    # and enable through the mailbox, and the translation registered again.
    i = kinds.index(("zpci_event", "injected"))
    assert kinds[i - 1:i + 4] == [("zpci_state", "error"), ("zpci_event", "injected"),
                                  ("zpci_state", "reset-error"), ("zpci_state", "disable"),
                                  ("zpci_state", "enable")], (kinds, run.diag)
    ioats = [e for e in run.events if e.get("event") == "zpci_ioat" and e.get("registered")]
    assert len(ioats) == 2, run.diag  # at boot, and after the recovery's enable
    assert not [e for e in run.events if e.get("event") == "virtio_needs_reset"], run.diag


REMOVAL_BODY = FIND + harness.WAIT_FOR_VDA + f"""\
dd if=/pattern.bin of=/dev/vda bs=4096 seek={PATTERN_SEEK} count=16 conv=fsync 2>/dev/null && echo DD=ok
n=0
while [ -e $D ] && [ $n -lt 240 ]; do sleep 0.5; n=$((n + 1)); done
[ -e $D ] || echo GONE=ok
[ -b /dev/vda ] || echo VDA_GONE=ok
""" + KLOG


def test_offload_zpcictl_remove_guest_sees_function_go(qemu_offload, daemon):
    removed: list[tuple[int, str]] = []

    def during(show, qmp, fut):
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not fut.done() and time.monotonic() < deadline:
            s = show()
            if s["zpci"]["state"] == "enabled" and s["counters"]["dma_bytes_read"] >= 64 << 10:
                removed.append(daemon.ctl("remove", hex(RFID), "--timeout", "120"))
                break
            time.sleep(0.3)
        try:
            if not fut.done():
                removed.append(("status", qmp.status(timeout=10)))
        except (OSError, ValueError):
            pass  # the guest is already done and QEMU gone

    run = boot(qemu_offload, daemon, REMOVAL_BODY, fid=RFID, uid=RUID, during=during)
    assert removed and removed[0][0] == 0, (removed, run.diag)
    assert run.result.done and run.result.exit_status() == 0, run.diag
    assert run.kv.get("DD") == "ok", run.diag
    assert run.kv.get("GONE") == "ok" and run.kv.get("VDA_GONE") == "ok", run.diag
    rc, out = daemon.ctl("show", hex(RFID))
    assert rc != 0, out  # the daemon no longer has it


REBOOTS = 20
REBOOT_BODY = harness.WAIT_FOR_VDA + f"""\
n=$(dd if=/dev/vda bs=512 skip=2000 count=1 2>/dev/null | head -n1 | tr -dc 0-9)
n=$(( ${{n:-0}} + 1 ))
echo "$n" | dd of=/dev/vda bs=512 seek=2000 conv=fsync 2>/dev/null
head -c 65536 /pattern.bin > /tmp/p64
dd if=/tmp/p64 of=/dev/vda bs=4096 seek={PATTERN_SEEK} conv=fsync 2>/dev/null
dd if=/dev/vda of=/tmp/b64 bs=4096 skip={PATTERN_SEEK} count=16 iflag=direct 2>/dev/null
cmp /tmp/p64 /tmp/b64 && echo "BOOT=$n ok"
if [ "$n" -lt {REBOOTS} ]; then reboot -f; sleep 30; fi
echo REBOOTS_DONE=$n
"""


def test_offload_twenty_reboots_against_one_daemon(qemu_offload, daemon):
    # The counter lives on the disk; start from zero.
    with open(daemon.disks[FID], "r+b") as f:
        f.seek(2000 * 512)
        f.write(bytes(512))
    attaches = daemon.show(FID)["counters"]["attaches"]
    run = boot(qemu_offload, daemon, REBOOT_BODY, reboot=True, timeout=1200.0)
    boots = [line for line in run.result.lines if line.startswith("BOOT=")]
    assert boots == [f"BOOT={i} ok" for i in range(1, REBOOTS + 1)], run.diag
    assert run.kv.get("REBOOTS_DONE") == str(REBOOTS), run.diag
    after = daemon.show(FID)
    assert after["counters"]["attaches"] == attaches + 1, after  # one QEMU, one attach
    assert daemon.proc.poll() is None
