"""Daemon side of the interop tests: serve a zpcid function in-process while QEMU
boots a guest in a worker thread, and keep what the run left behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import structlog
import trio

import qemu as qh
from zpcid.vmm import client as zclient
from zpcid import devices, log
from zpcid.vfio_user.server import FunctionServer

DETACH_TIMEOUT = 10.0
LOG_TAIL = 12000
PCI_COMMAND = 0x04

# kind ("map"/"unmap"), iova, size, offset, has an fd, writable
DmaChange = tuple[str, int, int, int, bool, bool]
T = TypeVar("T")


@dataclasses.dataclass
class Session:
    """Everything one QEMU run against one function left behind."""

    result: qh.GuestResult
    kv: dict[str, str]  # KEY=VALUE lines the guest printed
    events: list[dict]  # the daemon's structlog events (JSON lines)
    log_text: str
    dma_changes: list[DmaChange]
    peaks: dict[str, int]  # the function's state while QEMU was attached
    after_detach: dict[str, Any]  # its state once QEMU was gone
    next_client: dict[str, int] | None  # what the reference client read afterwards
    fn: Any

    @property
    def diag(self) -> str:
        return (f"\n--- QEMU console (tail) ---\n{self.result.output[-LOG_TAIL:]}"
                f"\n--- zpcid log (tail) ---\n{self.log_text[-LOG_TAIL:]}")

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]

    def protocol_maps(self) -> list[dict]:
        # The endpoint's DMA_MAP events (the DMA space logs its own without "flags").
        return [e for e in self.named("dma_map") if "flags" in e]

    def protocol_unmaps(self) -> list[dict]:
        return [e for e in self.named("dma_unmap") if "all" in e]


def kv(text: str) -> dict[str, str]:
    """The ``KEY=value`` lines of a guest's console output."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z0-9_]+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def pattern(seed: bytes, n: int) -> bytes:
    """``n`` reproducible bytes that differ from page to page (chained SHA-256)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(seed + i.to_bytes(4, "little")).digest()
        i += 1
    return bytes(out[:n])


def function_types() -> dict[str, Callable[..., Any]]:
    """The function types by configuration name."""
    devices.load_all()
    return devices.TYPES


def vfio_user_device(sock: str, dev_id: str) -> str:
    """QEMU's ``-device`` argument for a vfio-user-pci device on ``sock``."""
    return json.dumps({"driver": "vfio-user-pci", "id": dev_id,
                       "socket": {"type": "unix", "path": sock}})


def function_state(fn) -> dict[str, Any]:
    """What a detach must have reset: DMA maps and their mmaps, eventfds, decoding, MSI-X."""
    return {
        "dma_maps": len(fn.dma),
        "dma_files": fn.dma.file_count,
        "irq_eventfds": fn.irqs.installed(),
        "command": fn.config.u16(PCI_COMMAND),
        "msix_enabled": bool(fn.msix and fn.msix.enabled),
        "attaches": fn.counters.attaches,
    }


async def watch(fn, peaks: dict[str, int]) -> None:
    """Record what the function looked like while a client was attached."""
    while True:
        if fn.session is not None:
            peaks["dma_maps"] = max(peaks.get("dma_maps", 0), len(fn.dma))
            peaks["irq_eventfds"] = max(peaks.get("irq_eventfds", 0), fn.irqs.installed())
            peaks["command"] = peaks.get("command", 0) | fn.config.u16(PCI_COMMAND)
            peaks["msix_enabled"] = peaks.get("msix_enabled", 0) | int(bool(fn.msix and fn.msix.enabled))
        await trio.sleep(0.01)


async def wait_detached(server: FunctionServer) -> None:
    with trio.fail_after(DETACH_TIMEOUT):
        while server.attached:
            await trio.sleep(0.02)


async def serve_one_boot(
    fn, sock: str, logfile: Path, boot: Callable[[], qh.GuestResult],
    next_client: Callable[[zclient.Client], Awaitable[dict[str, int]]] | None = None,
    after: Callable[[Any], dict[str, Any]] | None = None,
) -> Session:
    """Serve ``fn`` while ``boot`` runs QEMU, then (with ``next_client``) once more
    for the reference client; ``after(fn)`` adds to the state read after detach."""
    saved = structlog.get_config()
    changes: list[DmaChange] = []
    fn.dma.listeners.append(lambda kind, r: changes.append(
        (kind, r.iova, r.size, r.offset, r.file is not None, r.writable)))
    nxt = None
    with open(logfile, "w") as stream:
        # Every daemon event, as JSON lines, into a file the tests read.
        log.configure(fmt="json", level="debug", stream=stream)
        try:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(FunctionServer(fn, sock).serve)
                peaks: dict[str, int] = {}
                nursery.start_soon(watch, fn, peaks)
                result = await trio.to_thread.run_sync(boot)
                await wait_detached(server)
                state = function_state(fn) | (after(fn) if after else {})
                if next_client is not None:
                    async with zclient.connect(sock) as c:
                        nxt = await next_client(c)
                    await wait_detached(server)
                    nxt["attaches"] = fn.counters.attaches
                nursery.cancel_scope.cancel()
        except Exception as exc:
            # The tests cannot look at a session that never finished: show why.
            stream.flush()
            raise AssertionError(f"daemon side failed: {exc!r}\n--- zpcid log (tail) ---\n"
                                 f"{logfile.read_text()[-LOG_TAIL:]}") from exc
        finally:
            structlog.configure(**saved)
    text = logfile.read_text()
    return Session(
        result=result, kv=kv(result.guest_output()),
        events=[json.loads(line) for line in text.splitlines() if line.startswith("{")],
        log_text=text, dma_changes=changes, peaks=peaks, after_detach=state,
        next_client=nxt, fn=fn,
    )


def run_with_socket(session: Callable[[str], Awaitable[T]]) -> T:
    """``trio.run(session, sock)`` with ``sock`` in a short temporary directory:
    AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer."""
    sock_dir = tempfile.mkdtemp(prefix="zpcid-q")
    try:
        return trio.run(session, os.path.join(sock_dir, "fn.sock"))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# ------------------------------------------------------------------ guest side (busybox sh)


def find_function_sh(vendor: int, device: int) -> str:
    """Set D to the function's sysfs directory; print its identity and resources."""
    return f"""\
D=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = "{vendor:#06x}" ] && [ "$(cat $d/device)" = "{device:#06x}" ]; then D=$d; fi
done
if [ -z "$D" ]; then
  echo FN=missing
  for d in /sys/bus/pci/devices/*; do echo "PCI ${{d##*/}} $(cat $d/vendor) $(cat $d/device)"; done
  exit 1
fi
echo "FN=${{D##*/}}"
echo "VENDOR=$(cat $D/vendor)"
echo "DEVICE=$(cat $D/device)"
echo "CLASS=$(cat $D/class)"
i=0
while read start end flags; do echo "RES$i=$start $end $flags"; i=$((i + 1)); done < $D/resource
"""


# The virtio_blk driver probes asynchronously: give /dev/vda up to 5 s.
WAIT_FOR_VDA = """\
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda ] || { echo VDA=missing; ls /sys/block; exit 1; }
"""
