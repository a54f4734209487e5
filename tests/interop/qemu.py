"""Helpers to boot Linux guests under the real QEMU provisioned by
``.ci/provision-qemu`` (Debian sid's QEMU with the ``vfio-user-pci`` device).

Standard library only; does not import zpcid.

* :func:`find_qemu` reads ``$ZPCID_QEMU_ROOT/zpcid-qemu.env`` (default root
  ``/var/cache/zpcid/sid``) and returns a :class:`QemuInstall`, or ``None``.
* :func:`build_initramfs` writes a gzip'd newc cpio (pure Python) holding a
  static busybox, an ``/init`` script and optional kernel modules.
* :func:`guest_script` makes an ``/init`` that mounts proc/sys/dev, loads the
  modules, runs a shell body, prints :data:`DONE_MARKER` and powers off.
* :func:`run_guest` boots a guest and captures its whole serial console.
"""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import os
import shlex
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

DEFAULT_ROOT = "/var/cache/zpcid/sid"
ENV_NAME = "zpcid-qemu.env"
# Written by .ci/provision-qemu-offload: the patched qemu-system-s390x.
OFFLOAD_ENV_NAME = "zpcid-qemu-offload.env"
START_MARKER = "ZPCID-GUEST-START"
DONE_MARKER = "ZPCID-GUEST-DONE"

ARCHES = ("x86_64", "s390x")

# Per-architecture defaults: machine, serial console device, env-file suffix.
_MACHINE = {"x86_64": "q35", "s390x": "s390-ccw-virtio"}
_CONSOLE = {"x86_64": "ttyS0", "s390x": "ttysclp0"}
_ENV_SUFFIX = {"x86_64": "X86_64", "s390x": "S390X"}


@dataclasses.dataclass(frozen=True)
class GuestArch:
    """What is needed to boot one guest architecture."""

    arch: str
    qemu: Path  # launcher (a shell script) for qemu-system-<arch>
    kernel: Path  # vmlinuz
    kernel_version: str  # uname -r of that kernel, e.g. 7.2.13+deb14-amd64
    modules_dir: Path  # .../lib/modules/<kernel_version> (has modules.dep)
    busybox: Path  # static busybox for that arch
    kernel_package_version: str = ""  # Debian version, e.g. 7.2.13-1


@dataclasses.dataclass(frozen=True)
class QemuInstall:
    root: Path
    version: str  # e.g. "11.1.3"
    version_string: str  # first line of `qemu-system-x86_64 --version`
    arches: dict[str, GuestArch]
    env: dict[str, str]

    def __getitem__(self, arch: str) -> GuestArch:
        return self.arches[arch]

    def offload(self) -> "QemuInstall | None":
        """The same install with s390x's QEMU replaced by the patched build
        (zPCI offload, contrib/qemu), or None when it was not provisioned."""
        path = self.env.get("ZPCID_QEMU_S390X_OFFLOAD")
        if not path or not os.access(path, os.X_OK):
            return None
        s390x = dataclasses.replace(self.arches["s390x"], qemu=Path(path))
        return dataclasses.replace(
            self, arches={**self.arches, "s390x": s390x},
            version_string=self.env.get("ZPCID_QEMU_OFFLOAD_VERSION_STRING", ""))


@dataclasses.dataclass
class GuestResult:
    output: str  # everything QEMU wrote (serial console + its own stderr)
    returncode: int | None  # QEMU's exit status (None if it had to be killed)
    timed_out: bool
    duration: float  # seconds
    cmd: list[str]

    @property
    def done(self) -> bool:
        """True when the guest's init reached its final marker."""
        return any(line.startswith(DONE_MARKER) for line in self.lines)

    @property
    def lines(self) -> list[str]:
        return [line.rstrip("\r") for line in self.output.split("\n")]

    def guest_output(self) -> str:
        """Console text printed by the guest script between the markers."""
        lines = self.lines
        start = next((i for i, l in enumerate(lines) if l.startswith(START_MARKER)), -1)
        end = next(
            (i for i, l in enumerate(lines) if l.startswith(DONE_MARKER)), len(lines)
        )
        return "\n".join(lines[start + 1 : end])

    def exit_status(self) -> int | None:
        """The guest body's exit status, as printed after the done marker."""
        for line in self.lines:
            if line.startswith(DONE_MARKER):
                for word in line.split():
                    if word.startswith("rc="):
                        return int(word[3:])
        return None


# --------------------------------------------------------------------- locate


def qemu_root() -> Path:
    return Path(os.environ.get("ZPCID_QEMU_ROOT") or DEFAULT_ROOT)


def parse_env_file(path: Path) -> dict[str, str]:
    """Parse the KEY=VALUE file written by .ci/provision-qemu (%q quoting)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = "".join(shlex.split(value)) if value else ""
    return env


def find_qemu(root: str | os.PathLike[str] | None = None) -> QemuInstall | None:
    """Locate the provisioned QEMU; None when absent or incomplete."""
    base = Path(root) if root is not None else qemu_root()
    env_path = base / ENV_NAME
    if not env_path.is_file():
        return None
    try:
        env = parse_env_file(env_path)
        offload_env = base / OFFLOAD_ENV_NAME
        if offload_env.is_file():
            env |= parse_env_file(offload_env)
        if os.environ.get("ZPCID_QEMU_S390X_OFFLOAD"):  # a development build
            env["ZPCID_QEMU_S390X_OFFLOAD"] = os.environ["ZPCID_QEMU_S390X_OFFLOAD"]
        arches = {}
        for arch in ARCHES:
            sfx = _ENV_SUFFIX[arch]
            ga = GuestArch(
                arch=arch,
                qemu=Path(env[f"ZPCID_QEMU_{sfx}"]),
                kernel=Path(env[f"ZPCID_KERNEL_{sfx}"]),
                kernel_version=env[f"ZPCID_KERNEL_VERSION_{sfx}"],
                modules_dir=Path(env[f"ZPCID_MODULES_{sfx}"]),
                busybox=Path(env[f"ZPCID_BUSYBOX_{sfx}"]),
                kernel_package_version=env.get(f"ZPCID_KERNEL_PACKAGE_VERSION_{sfx}", ""),
            )
            if not (
                os.access(ga.qemu, os.X_OK)
                and ga.kernel.is_file()
                and ga.busybox.is_file()
                and (ga.modules_dir / "modules.dep").is_file()
            ):
                return None
            arches[arch] = ga
        return QemuInstall(
            root=Path(env.get("ZPCID_QEMU_ROOT", str(base))),
            version=env.get("ZPCID_QEMU_VERSION", ""),
            version_string=env.get("ZPCID_QEMU_VERSION_STRING", ""),
            arches=arches,
            env=env,
        )
    except (KeyError, OSError, ValueError):
        return None


def missing_reason(root: str | os.PathLike[str] | None = None) -> str:
    base = Path(root) if root is not None else qemu_root()
    return (
        f"QEMU not provisioned: run .ci/provision-qemu "
        f"(no usable {base / ENV_NAME}; set ZPCID_QEMU_ROOT to use another root)"
    )


# -------------------------------------------------------------------- modules


def _mod_name(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    name = name.split(".ko", 1)[0]
    return name.replace("-", "_")


def read_modules_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """{module name: (relative path, [relative paths of direct deps])}."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, _, rest = line.partition(":")
        deps[_mod_name(path)] = (path, rest.split())
    return deps


def _builtin_modules(modules_dir: Path) -> set[str]:
    f = modules_dir / "modules.builtin"
    if not f.is_file():
        return set()
    return {_mod_name(l) for l in f.read_text().split()}


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> list[str]:
    """Relative .ko paths (as in modules.dep) in insmod order, dependencies
    first. Built-in modules are skipped; unknown ones raise KeyError."""
    deps = read_modules_dep(modules_dir)
    builtin = _builtin_modules(modules_dir)
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in deps:
            if name in builtin:
                seen.add(name)
                return
            raise KeyError(f"module {name!r} not in {modules_dir}/modules.dep")
        if name in stack:
            raise ValueError(f"module dependency cycle: {' -> '.join(stack + (name,))}")
        path, direct = deps[name]
        for dep in direct:
            visit(_mod_name(dep), stack + (name,))
        seen.add(name)
        order.append(path)

    for n in names:
        visit(n, ())
    return order


_DECOMPRESS = {".ko.xz": lzma.decompress, ".ko.gz": gzip.decompress}


def guest_module_path(modules_dir: Path, rel: str) -> str:
    """Where build_initramfs puts module ``rel`` (a modules.dep path) in the
    guest: /lib/modules/<version>/<rel>, '.ko.xz'/'.ko.gz' becoming '.ko'."""
    for suffix in _DECOMPRESS:
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)] + ".ko"
    return f"/lib/modules/{Path(modules_dir).name}/{rel}"


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed when stdlib can (busybox insmod hands the
    file to init_module(), which wants a plain ELF). Others (.ko.zst: no zstd
    in Python 3.11) are kept as they are."""
    data = path.read_bytes()
    for suffix, decompress in _DECOMPRESS.items():
        if path.name.endswith(suffix):
            return decompress(data)
    return data


# ---------------------------------------------------------------------- cpio


class CpioWriter:
    """Minimal SVR4 'newc' (070701) cpio archive writer."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/") or "."
        if name in self._names:
            return
        self._names.add(name)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._chunks.append(header + encoded)
        self._pad()
        if data:
            self._chunks.append(data)
            self._pad()

    def _pad(self) -> None:
        size = sum(len(c) for c in self._chunks)
        if size % 4:
            self._chunks.append(b"\0" * (4 - size % 4))

    def _parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def build_initramfs(
    dest: str | os.PathLike[str],
    busybox: str | os.PathLike[str],
    init_script: str,
    modules_dir: str | os.PathLike[str] | None = None,
    modules: Sequence[str] = (),
    extra_files: dict[str, bytes] | None = None,
) -> list[str]:
    """Write a gzip'd newc cpio initramfs to ``dest``.

    Contents: /bin/busybox (+ sh/busybox links; init runs ``busybox --install``),
    /init (the given script, mode 0755), /dev/console, and the listed kernel
    modules with their dependencies (from modules.dep), decompressed, under
    /lib/modules/<version>/<path as in modules.dep> with a matching
    modules.dep. ``extra_files`` maps guest paths to contents (mode 0755 if
    the path ends with '.sh', else 0644).

    Returns the guest paths of the modules in insmod order.
    """
    cpio = CpioWriter()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "etc", "root",
              "usr/bin", "usr/sbin", "mnt"):  # fmt: skip
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", init_script.encode(), 0o755)

    insmod_order: list[str] = []
    if modules:
        if modules_dir is None:
            raise ValueError("modules given without modules_dir")
        mdir = Path(modules_dir)
        base = f"/lib/modules/{mdir.name}/"
        order = resolve_modules(mdir, modules)
        # guest path relative to base, as modules.dep wants it
        renamed = {rel: guest_module_path(mdir, rel)[len(base) :] for rel in order}
        for rel in order:
            cpio.file(base + renamed[rel], _read_module(mdir / rel))
            insmod_order.append(base + renamed[rel])
        deps = read_modules_dep(mdir)
        dep_lines = [
            f"{renamed[rel]}: "
            + " ".join(renamed[d] for d in deps[_mod_name(rel)][1] if d in renamed)
            for rel in order
        ]
        cpio.file(base + "modules.dep", ("\n".join(dep_lines) + "\n").encode())
    for path, data in (extra_files or {}).items():
        cpio.file(path, data, 0o755 if path.endswith(".sh") else 0o644)

    Path(dest).write_bytes(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    return insmod_order


# ---------------------------------------------------------------- guest init


def guest_script(
    body: str,
    insmod: Sequence[str] = (),
    devtmpfs: bool = True,
    poweroff: bool = True,
) -> str:
    """An /init for busybox: mount proc, sysfs, /dev (devtmpfs, or tmpfs +
    ``mdev -s`` when ``devtmpfs`` is False or unavailable), insmod the given
    modules in order, print START_MARKER, run ``body`` in a subshell, print
    ``DONE_MARKER rc=<status of body>`` and ``poweroff -f``."""
    mods = "\n".join(f"insmod {shlex.quote(m)} || echo 'ZPCID-INSMOD-FAILED {m}'" for m in insmod)
    dev_mount = (
        "mount -t devtmpfs devtmpfs /dev 2>/dev/null || "
        "{ mount -t tmpfs -o mode=0755 tmpfs /dev && mdev -s; }"
        if devtmpfs
        else "mount -t tmpfs -o mode=0755 tmpfs /dev && mdev -s"
    )
    tail = "poweroff -f\n" if poweroff else "exec sh\n"
    return f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sysfs /sys
{dev_mount}
[ -e /dev/console ] || mknod /dev/console c 5 1
[ -e /dev/null ] || mknod /dev/null c 1 3
mount -t tmpfs tmpfs /tmp
{mods}
echo {START_MARKER}
(
{body}
)
echo "{DONE_MARKER} rc=$?"
sync
{tail}"""


# ----------------------------------------------------------------------- run


def base_args(arch: str, memory_mb: int = 512, shared_memory: bool = True,
              reboot: bool = False) -> list[str]:
    """Machine/memory/console arguments common to every guest.

    With ``shared_memory`` guest RAM is a shareable memfd, which
    vfio-user-pci needs to hand the guest memory to the server."""
    args = ["-machine", _MACHINE[arch], "-m", f"{memory_mb}M"]
    if shared_memory:
        args += [
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-machine", "memory-backend=mem",
        ]  # fmt: skip
    # No default NIC (and no VGA on x86): the guest's PCI topology then only
    # holds the machine's own functions plus what the caller adds.
    args += ["-nographic", "-nic", "none"]
    if not reboot:
        args.append("-no-reboot")
    if arch == "x86_64":
        args += ["-vga", "none"]
    return args


def run_guest(qemu: QemuInstall, arch: str, init_script: str, *, timeout: float = 120.0,
              **options: Any) -> GuestResult:
    """Boot ``arch`` ('x86_64' or 's390x') with an initramfs holding
    ``init_script`` (see :func:`guest_script`) and capture the console.

    ``options`` are :func:`guest_command`'s. QEMU is killed after ``timeout``
    seconds.
    """
    with tempfile.TemporaryDirectory(prefix="zpcid-guest-") as tmp:
        return run_command(guest_command(qemu, arch, init_script, tmp, **options), timeout)


def guest_command(
    qemu: QemuInstall,
    arch: str,
    init_script: str,
    tmp: str | os.PathLike[str],
    qemu_args: Sequence[str] = (),
    append: str = "",
    modules: Sequence[str] = (),
    memory_mb: int = 512,
    shared_memory: bool = True,
    quiet: bool = True,
    initrd: str | os.PathLike[str] | None = None,
    extra_files: dict[str, bytes] | None = None,
    reboot: bool = False,
) -> list[str]:
    """The QEMU command line for a guest (the initramfs is built in ``tmp``).

    ``modules`` are put into the initramfs with their dependencies; the init
    script is responsible for loading them — pass ``modules`` and build the
    script with :func:`guest_script_for` to do both. ``qemu_args`` are
    appended to the command line (e.g. ``-device ...``), ``append`` to the
    kernel command line. With ``reboot`` a guest reboot restarts it (no
    ``-no-reboot``).
    """
    ga = qemu[arch]
    if initrd is None:
        initrd = Path(tmp) / "initrd.gz"
        build_initramfs(initrd, ga.busybox, init_script, ga.modules_dir, modules, extra_files)
    cmdline = f"console={_CONSOLE[arch]} panic=-1 rdinit=/init"
    if quiet:
        cmdline += " quiet"
    if append:
        cmdline += " " + append
    return [str(ga.qemu), *base_args(arch, memory_mb, shared_memory, reboot),
            "-kernel", str(ga.kernel), "-initrd", str(initrd),
            "-append", cmdline, *qemu_args]  # fmt: skip


def guest_script_for(
    qemu: QemuInstall, arch: str, body: str, modules: Sequence[str] = (), **kw: object
) -> str:
    """:func:`guest_script` with the insmod lines for ``modules`` filled in
    (same order that :func:`build_initramfs` will lay them out)."""
    mdir = qemu[arch].modules_dir
    order = resolve_modules(mdir, modules) if modules else []
    paths = [guest_module_path(mdir, rel) for rel in order]
    return guest_script(body, insmod=paths, **kw)  # type: ignore[arg-type]


def run_command(cmd: Sequence[str], timeout: float) -> GuestResult:
    """Run QEMU, capturing stdout+stderr; kill it (and its group) on timeout."""
    start = time.monotonic()
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        out, _ = proc.communicate()
    rc = None if timed_out else proc.returncode
    return GuestResult(
        output=out.decode("utf-8", "replace"),
        returncode=rc,
        timed_out=timed_out,
        duration=time.monotonic() - start,
        cmd=list(cmd),
    )
