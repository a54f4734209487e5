"""`zpcid bench`, isolation section: scaling across cores and memory per idle function.

Both run the real daemon (``zpcid serve``: supervisor, zygote, one worker per
function). Scaling: each function is driven by its own client process doing
sequential REGION_READ round trips; 1 function, N functions (one worker
each) and N functions served by one process (the design before workers)
alternate, and the figure is the N workers' aggregate rate next to both. Memory:
PSS/RSS from ``/proc/PID/smaps_rollup`` of every process of the daemon, with 1
idle function and after adding more at run time; the marginal cost of one more
function is the PSS growth divided by the functions added.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import trio

from zpcid.devices.memory import REG_MAGIC
from zpcid.service import ctl

MiB = 1 << 20
START_TIMEOUT = 60.0


def _toml(rdir: str, functions: list[dict]) -> str:
    lines = ["[daemon]", f'runtime-dir = "{rdir}"', 'log-level = "error"', 'log-format = "json"']
    for f in functions:
        lines += ["", "[[function]]"] + [f'{k} = "{v}"' if isinstance(v, str) else
                                         f"{k} = {str(v).lower()}" if isinstance(v, bool) else f"{k} = {v!r}"
                                         for k, v in f.items()]
    return "\n".join(lines) + "\n"


def memfn(fid: int) -> dict:
    return {"type": "memory", "fid": fid, "uid": fid, "name": f"f{fid:x}", "ram-size": 65536}


def dmafn(fid: int) -> dict:
    return {"type": "dma-engine", "fid": fid, "uid": fid, "name": f"f{fid:x}"}


CRC_GUEST = 64 * MiB  # guest RAM of each CRC client
CRC_LENGTH = 16 * MiB  # bytes per CRC-32C request: the worker computes, the client waits
SDMA = 1 << 32  # start of the DMA aperture the client registers (direct mapping)


class Daemon:
    """``zpcid serve`` in a temporary runtime directory."""

    def __init__(self, base: str, functions: list[dict]):
        self.rdir = os.path.join(base, "run")
        path = os.path.join(base, "zpcid.toml")
        with open(path, "w") as f:
            f.write(_toml(self.rdir, functions))
        self.control = os.path.join(self.rdir, "control.sock")
        self.log = open(os.path.join(base, "zpcid.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "zpcid.cli", "serve", "--config", path],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_serving(len(functions))

    def wait_serving(self, n: int) -> list[dict]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}")
            try:
                rows = ctl.request(self.control, "list")
                if len(rows) == n and all(r["state"] == "serving" for r in rows):
                    return rows
            except ctl.CtlError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("daemon functions did not come up")
            time.sleep(0.05)

    def socket(self, fid: int) -> str:
        return os.path.join(self.rdir, f"f{fid:x}.sock")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# ---------------------------------------------------------------- scaling
def client_main(path: str, seconds: float) -> None:
    """One VMM stand-in: REGION_READ round trips for ``seconds``; prints how many."""
    from zpcid.vmm import client as vclient

    async def main() -> int:
        async with vclient.connect(path) as c:
            for _ in range(200):  # warm-up: attach done, caches hot
                await c.region_read(4, REG_MAGIC, 4)
            n = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                for _ in range(50):
                    await c.region_read(4, REG_MAGIC, 4)
                n += 50
            return n

    print(trio.run(main), flush=True)


def crc_client_main(path: str, seconds: float) -> None:
    """One VMM stand-in keeping its function's worker busy: back-to-back dma-engine CRC-32C
    requests over guest memory (direct mapping); prints how many bytes were checksummed."""
    from zpcid.devices import dma_engine as D
    from zpcid.vmm.dma_engine_driver import Driver
    from zpcid.vmm.model import attach

    async def main() -> int:
        async with attach(path, guest_memory=CRC_GUEST, bars=False) as vmm:
            vmm.mem.mm[:CRC_LENGTH] = os.urandom(4096) * (CRC_LENGTH // 4096)
            await vmm.register_translation(SDMA, SDMA + CRC_GUEST - 1, 0)
            drv = Driver(vmm.client, irq_fd=vmm.msix_fds[0], vector=0)

            async def crc() -> None:
                st = await drv.run(D.OP_CRC32C, SDMA, 0, CRC_LENGTH)
                if not st & D.STATUS_DONE or st & D.STATUS_ERROR:
                    raise RuntimeError(f"dma-engine CRC failed: status {st:#x}")
            await crc()  # warm-up
            n = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                await crc()
                n += CRC_LENGTH
            return n

    print(trio.run(main), flush=True)


def _drive(paths: list[str], seconds: float, mode: str = "--client") -> float:
    """Aggregate rate (round trips or bytes per second) of one client process per path, run together."""
    procs = [subprocess.Popen([sys.executable, "-m", "zpcid.tools.bench_isolation", mode, p,
                               str(seconds)], stdout=subprocess.PIPE, text=True) for p in paths]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=START_TIMEOUT + seconds)
        if p.returncode != 0:
            raise RuntimeError("benchmark client failed")
        total += int(out.strip())
    return total / seconds


def single_process_main(directory: str, n: int, kind: str = "memory") -> None:
    """The baseline: ``n`` memory functions served by one trio loop in one process (the
    design before one worker per function)."""
    from zpcid import log
    from zpcid.service import config as cfg
    from zpcid.vfio_user.server import FunctionServer

    log.configure("json", "error")
    daemon = cfg.DaemonConfig(runtime_dir=directory, control_socket=os.path.join(directory, "c.sock"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                fc = cfg.parse_function((memfn if kind == "memory" else dmafn)(i + 1), "bench", daemon)
                await nursery.start(FunctionServer(fc.create(), os.path.join(directory, f"f{i + 1:x}.sock")).serve)
            print("READY", flush=True)
            await trio.sleep_forever()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass


def _scaling(rep, quick: bool, kind: str, n_functions: int) -> tuple[list, list, list]:
    """(1 function, N workers, N functions in one process) samples, interleaved."""
    rounds, seconds = (2, 1.0) if quick else (5, 3.0)
    make, mode = (memfn, "--client") if kind == "memory" else (dmafn, "--crc-client")
    with tempfile.TemporaryDirectory(prefix="zpcid-iso-") as base:
        single_dir = os.path.join(base, "single")
        os.mkdir(single_dir)
        single = subprocess.Popen([sys.executable, "-m", "zpcid.tools.bench_isolation", "--single-process",
                                   single_dir, str(n_functions), kind], stdout=subprocess.PIPE, text=True)
        d = None
        try:
            if single.stdout.readline().strip() != "READY":
                raise RuntimeError("single-process baseline server did not start")
            d = Daemon(base, [make(i + 1) for i in range(n_functions)])
            paths = [d.socket(i + 1) for i in range(n_functions)]
            single_paths = [os.path.join(single_dir, f"f{i + 1:x}.sock") for i in range(n_functions)]
            one, many, shared, load = [], [], [], [os.getloadavg()[0]]
            for r in range(rounds):
                rep.progress(f"scaling ({kind}): 1 vs {n_functions} functions, round {r + 1}/{rounds}")
                one.append(_drive(paths[:1], seconds, mode))
                many.append(_drive(paths, seconds, mode))
                shared.append(_drive(single_paths, seconds, mode))
                load.append(os.getloadavg()[0])
        finally:
            if d is not None:
                d.close()
            single.terminate()
            single.wait(30)
    # Other processes competing for the cores distort these figures more than any other.
    rep.progress(f"scaling: load average during the runs {min(load):.1f}..{max(load):.1f}")
    return one, many, shared


def _scaling_rows(rep, what: str, unit: str, n: int, one, many, shared, scale: float = 1.0) -> None:
    one, many, shared = ([x / scale for x in xs] for xs in (one, many, shared))
    rep.add("isolation", f"{what}, 1 function (baseline samples)", statistics.median(one), unit,
            samples=one)
    rep.add("isolation", f"{what}, {n} functions in 1 process (baseline samples)",
            statistics.median(shared), unit, samples=shared)
    rep.add("isolation", f"{what}, {n} functions, one process each (aggregate)",
            statistics.median(many), unit, baseline=statistics.median(one),
            baseline_name="1 function", samples=many,
            target=f"~{min(n, os.cpu_count() or 1)}x on {os.cpu_count()} cores")
    rep.add("isolation", f"{what}, {n} functions, one process each (aggregate)",
            statistics.median(many), unit, baseline=statistics.median(shared),
            baseline_name=f"{n} fns in 1 process", samples=many)


def bench_scaling(rep, quick: bool, n_functions: int = 2) -> None:
    # Busy functions: the worker computes (CRC-32C over 16 MiB of guest memory per request)
    # while its client waits for the interrupt.
    _scaling_rows(rep, "dma-engine CRC-32C", "GB/s", n_functions,
                  *_scaling(rep, quick, "dma-engine", n_functions), scale=1e9)
    # Ping-pong: bound by each round trip's wake-ups more than by CPU.
    _scaling_rows(rep, "REGION_READ", "msg/s", n_functions, *_scaling(rep, quick, "memory", n_functions))


# ---------------------------------------------------------------- memory
def _rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def daemon_memory(supervisor: int, workers: list[int]) -> dict[str, float]:
    zygotes = [p for p in _children(supervisor) if p not in workers]
    sup, wk = _rollup(supervisor), [_rollup(p) for p in workers]
    zy = [_rollup(p) for p in zygotes]
    return {"total_pss": sup["Pss"] + sum(z["Pss"] for z in zy) + sum(w["Pss"] for w in wk),
            "supervisor_pss": sup["Pss"], "zygote_pss": sum(z["Pss"] for z in zy),
            "worker_pss": statistics.mean(w["Pss"] for w in wk),
            "worker_rss": statistics.mean(w["Rss"] for w in wk)}


def measure_memory(extra: int = 8, settle: float = 1.0) -> dict[str, float]:
    """PSS of the whole daemon with 1 idle function and with 1 + ``extra``."""
    with tempfile.TemporaryDirectory(prefix="zpcid-iso-") as base:
        d = Daemon(base, [memfn(1)])
        try:
            time.sleep(settle)
            rows = d.wait_serving(1)
            before = daemon_memory(d.proc.pid, [r["pid"] for r in rows])
            for i in range(extra):
                ctl.request(d.control, "add", {"function": memfn(2 + i)})
            rows = d.wait_serving(1 + extra)
            time.sleep(settle)
            after = daemon_memory(d.proc.pid, [r["pid"] for r in rows])
        finally:
            d.close()
    return {"one": before, "many": after, "extra": extra,
            "marginal_pss": (after["total_pss"] - before["total_pss"]) / extra}


def bench_memory(rep, quick: bool) -> None:
    rep.progress("memory per idle function")
    m = measure_memory(extra=4 if quick else 8)
    rep.add("memory", "PSS per additional idle function", m["marginal_pss"] / MiB, "MiB",
            higher_is_better=False, target="<= 25 MiB")
    many = m["many"]
    rep.add("memory", f"worker PSS (idle, {1 + m['extra']} workers)", many["worker_pss"] / MiB, "MiB",
            higher_is_better=False)
    rep.add("memory", "worker RSS (idle)", many["worker_rss"] / MiB, "MiB", higher_is_better=False)
    rep.add("memory", "supervisor PSS", many["supervisor_pss"] / MiB, "MiB", higher_is_better=False)
    rep.add("memory", "zygote PSS", many["zygote_pss"] / MiB, "MiB", higher_is_better=False)
    rep.add("memory", "whole daemon PSS, 1 idle function", m["one"]["total_pss"] / MiB, "MiB",
            higher_is_better=False)
    rep.add("memory", f"whole daemon PSS, {1 + m['extra']} idle functions", many["total_pss"] / MiB,
            "MiB", higher_is_better=False)


def run(rep, quick: bool) -> None:
    bench_scaling(rep, quick)
    bench_memory(rep, quick)


def main(argv: list[str]) -> int:
    """The helper processes of this section (``zpcid bench`` runs the section itself)."""
    if len(argv) == 3 and argv[0] == "--client":
        client_main(argv[1], float(argv[2]))
        return 0
    if len(argv) == 3 and argv[0] == "--crc-client":
        crc_client_main(argv[1], float(argv[2]))
        return 0
    if len(argv) == 4 and argv[0] == "--single-process":
        single_process_main(argv[1], int(argv[2]), argv[3])
        return 0
    print("usage: python -m zpcid.tools.bench_isolation --client|--crc-client SOCKET SECONDS | "
          "--single-process DIR N memory|dma-engine", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
