"""Smoke tests: the provisioned QEMU boots x86_64 and s390x Linux guests.

Each boot takes a few seconds under TCG.
"""

from __future__ import annotations

import re
import subprocess

import pytest

import qemu as qh

BOOT_TIMEOUT = 120.0


def _kv(result: qh.GuestResult) -> dict[str, str]:
    """KEY=VALUE lines printed by the guest body."""
    out = {}
    for line in result.guest_output().splitlines():
        m = re.match(r"^([A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _check_done(result: qh.GuestResult) -> None:
    assert not result.timed_out, f"guest timed out:\n{result.output}"
    assert result.done, f"no {qh.DONE_MARKER} in console:\n{result.output}"
    assert result.exit_status() == 0, result.output
    assert result.returncode == 0, result.output


VERSION_BODY = 'echo "KVER=$(uname -r)"\necho "PROC_VERSION=$(cat /proc/version)"'


@pytest.mark.parametrize("arch", qh.ARCHES)
def test_qemu_has_vfio_user_pci(qemu: qh.QemuInstall, arch: str) -> None:
    out = subprocess.run(
        [str(qemu[arch].qemu), "-device", "help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert '"vfio-user-pci"' in out
    if arch == "s390x":
        assert '"zpci"' in out
    version = subprocess.run(
        [str(qemu[arch].qemu), "--version"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()[0]  # fmt: skip
    assert version == qemu.version_string
    assert qemu.version.startswith("11."), qemu.version


def test_boot_x86_64(qemu: qh.QemuInstall) -> None:
    ga = qemu["x86_64"]
    body = VERSION_BODY + "\n" + (
        "for d in /sys/bus/pci/devices/*; do\n"
        '  echo "PCI=${d##*/} $(cat $d/vendor) $(cat $d/device) $(cat $d/class)"\n'
        "done"
    )
    r = qh.run_guest(qemu, "x86_64", qh.guest_script(body), timeout=BOOT_TIMEOUT)
    _check_done(r)
    kv = _kv(r)
    assert kv["KVER"] == ga.kernel_version
    if ga.kernel_package_version:
        assert ga.kernel_package_version in kv["PROC_VERSION"]
    pci = [l.split() for l in r.guest_output().splitlines() if l.startswith("PCI=")]
    devices = {fields[0][4:]: fields[1:] for fields in pci}
    # q35: the MCH host bridge (class 0x060000) at 0000:00:00.0
    assert "0000:00:00.0" in devices, r.guest_output()
    assert devices["0000:00:00.0"][2] == "0x060000"


def test_boot_s390x(qemu: qh.QemuInstall) -> None:
    ga = qemu["s390x"]
    # also exercise the tmpfs + mdev -s /dev variant
    script = qh.guest_script(VERSION_BODY + "\n[ -c /dev/null ] && echo DEVNULL=ok", devtmpfs=False)
    r = qh.run_guest(qemu, "s390x", script, timeout=BOOT_TIMEOUT)
    _check_done(r)
    kv = _kv(r)
    assert kv["KVER"] == ga.kernel_version
    if ga.kernel_package_version:
        assert ga.kernel_package_version in kv["PROC_VERSION"]
    assert kv.get("DEVNULL") == "ok"


def test_s390x_zpci_uid_fid(qemu: qh.QemuInstall) -> None:
    """QEMU's own zpci device: the guest sees the configured uid/fid.

    sysfs format seen: uid "0x1234", function_id "0x00000010"; with unique
    UIDs the PCI domain is the UID, so the function is 1234:00:00.0.
    """
    body = (
        "for d in /sys/bus/pci/devices/*; do\n"
        '  echo "ZPCI=${d##*/} $(cat $d/vendor) $(cat $d/device) '
        '$(cat $d/uid) $(cat $d/function_id) $(cat $d/uid_is_unique)"\n'
        "done"
    )
    r = qh.run_guest(
        qemu, "s390x", qh.guest_script(body),
        qemu_args=["-device", "zpci,uid=0x1234,fid=0x10,target=n0",
                   "-device", "virtio-net-pci,id=n0"],
        timeout=BOOT_TIMEOUT,
    )  # fmt: skip
    _check_done(r)
    rows = [l.split() for l in r.guest_output().splitlines() if l.startswith("ZPCI=")]
    assert len(rows) == 1, r.guest_output()
    addr, vendor, device, uid, fid, unique = rows[0]
    assert vendor == "0x1af4" and device == "0x1041"  # virtio 1.0 net
    assert int(uid, 16) == 0x1234 and uid == "0x1234"
    assert int(fid, 16) == 0x10 and fid == "0x00000010"
    assert unique == "1"
    assert addr == "ZPCI=1234:00:00.0"


@pytest.mark.parametrize("arch", qh.ARCHES)
def test_virtio_blk_module(qemu: qh.QemuInstall, arch: str, tmp_path) -> None:
    """Modules from the packaged kernel load from the initramfs, and QEMU
    reads a disk image from the host filesystem."""
    image = tmp_path / "disk.img"
    payload = b"ZPCID-DISK-PAYLOAD"
    image.write_bytes(payload + b"\0" * (1024 * 1024 - len(payload)))
    qemu_args = ["-drive", f"if=none,id=d0,format=raw,file={image}"]
    if arch == "s390x":
        qemu_args += ["-device", "zpci,uid=0x7,fid=0x7,target=blk0",
                      "-device", "virtio-blk-pci,id=blk0,drive=d0"]  # fmt: skip
    else:
        qemu_args += ["-device", "virtio-blk-pci,drive=d0"]
    body = 'echo "DISK=$(head -c 18 /dev/vda)"\necho "MODS=$(cut -d" " -f1 /proc/modules)"'
    script = qh.guest_script_for(qemu, arch, body, modules=["virtio_blk"])
    r = qh.run_guest(qemu, arch, script, qemu_args=qemu_args, modules=["virtio_blk"],
                     timeout=BOOT_TIMEOUT)  # fmt: skip
    _check_done(r)
    assert "ZPCID-INSMOD-FAILED" not in r.output, r.output
    kv = _kv(r)
    assert "virtio_blk" in kv["MODS"].split()
    assert kv["DISK"] == payload.decode()


def test_resolve_modules_order(tmp_path) -> None:
    """Dependencies come first; built-ins are skipped (no QEMU needed)."""
    mdir = tmp_path / "6.0-test"
    mdir.mkdir()
    (mdir / "modules.dep").write_text(
        "kernel/a.ko.xz: kernel/b.ko.xz kernel/c-d.ko.xz\n"
        "kernel/b.ko.xz: kernel/c-d.ko.xz\n"
        "kernel/c-d.ko.xz:\n"
    )
    (mdir / "modules.builtin").write_text("kernel/virtio_pci.ko\n")
    order = qh.resolve_modules(mdir, ["a", "virtio_pci"])
    assert order == ["kernel/c-d.ko.xz", "kernel/b.ko.xz", "kernel/a.ko.xz"]
    assert qh.guest_module_path(mdir, order[0]) == "/lib/modules/6.0-test/kernel/c-d.ko"
    with pytest.raises(KeyError):
        qh.resolve_modules(mdir, ["nope"])
