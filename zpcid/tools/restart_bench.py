"""Live restart benchmark: how long attached VMMs wait while zpcid restarts under them.

    python -m zpcid.tools.restart_bench [--functions 1 16] [--rounds 5]

Starts ``zpcid serve`` with N ``memory`` functions, attaches one reference
client per function (each keeps reading a register in a loop), then
alternates, round by round (A B A B):

* baseline: the same loops, no restart, for as long as a restart takes;
* ``zpcictl restart`` of every function, one after another (a new worker
  process per function, new code);
* ``zpcictl upgrade`` (the supervisor re-executes itself, then replaces every
  worker by a pre-started one, one function at a time).

Reported per kind: the daemon's pause (stop reading -> reading again, from its
own clock: ``pause_ms``; for 16 functions the longest single-function pause)
and the longest single request any client saw in that window (what a guest
would notice), min/median/max over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import trio

from zpcid.service import ctl
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm import client as vclient

REG_SCRATCH = 0x08


def _config(base: str, n: int) -> str:
    lines = ["[daemon]", f'runtime-dir = "{base}/run"', 'log-level = "warning"']
    for fid in range(1, n + 1):
        lines += ["", "[[function]]", 'type = "memory"', f"fid = {fid}", f"uid = {fid}",
                  f'name = "f{fid:x}"', "ram-size = 65536"]
    path = os.path.join(base, "zpcid.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _ctl(control: str, cmd: str, args=None, timeout: float = 120.0):
    return ctl.request(control, cmd, args or {}, timeout)


def _upgrade(control: str) -> float:
    asked = time.monotonic()
    _ctl(control, "upgrade")
    while True:
        time.sleep(0.02)
        try:
            st = _ctl(control, "stats", timeout=5)
        except ctl.CtlError:
            continue
        h = st.get("last_handover") or {}
        if h.get("kind") == "upgrade" and st["uptime_seconds"] < time.monotonic() - asked:
            return float(h["pause_ms"])


async def _measure(n: int, rounds: int, log) -> dict[str, dict[str, list[float]]]:
    base = tempfile.mkdtemp(prefix="zpcid-rb")
    config = _config(base, n)
    control = os.path.join(base, "run", "control.sock")
    proc = subprocess.Popen([sys.executable, "-m", "zpcid.cli", "serve", "--config", config],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mems = [Memfd(1 << 20) for _ in range(n)]
    out: dict[str, dict[str, list[float]]] = {k: {"pause_ms": [], "worst_request_ms": []}
                                              for k in ("baseline", "restart", "upgrade")}
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(control) or not _try_list(control, n):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("zpcid did not start")
            await trio.sleep(0.1)
        worst = [0.0]
        stop = trio.Event()

        async def loop(c):
            while not stop.is_set():
                t = time.monotonic()
                try:
                    await c.region_read(4, REG_SCRATCH, 4)
                except trio.TooSlowError:
                    pass  # longer than the client's 5 s timeout (QEMU would fail the access)
                worst[0] = max(worst[0], time.monotonic() - t)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            clients = []
            for i in range(n):
                c = await nursery.start(_client, os.path.join(base, "run", f"f{i + 1:x}.sock"), mems[i])
                clients.append(c)
                nursery.start_soon(loop, c)
            for r in range(rounds):
                for kind in ("baseline", "restart", "upgrade"):
                    await trio.sleep(0.2)
                    worst[0] = 0.0
                    t0 = time.monotonic()
                    if kind == "restart":
                        pauses = [float((await trio.to_thread.run_sync(_ctl, control, "restart",
                                                                       {"fid": fid}))["pause_ms"])
                                  for fid in range(1, n + 1)]
                        pause = max(pauses)
                    elif kind == "upgrade":
                        pause = await trio.to_thread.run_sync(_upgrade, control)
                    else:
                        await trio.sleep(0.5)
                        pause = 0.0
                    await trio.sleep(0.05)  # every loop has had a round trip since
                    out[kind]["pause_ms"].append(pause)
                    out[kind]["worst_request_ms"].append(worst[0] * 1e3)
                    log(f"  {n:2d} fn  round {r + 1}  {kind:8s} pause {pause:8.1f} ms  "
                        f"worst request {worst[0] * 1e3:8.1f} ms  ({time.monotonic() - t0:.1f} s)")
            stop.set()
            nursery.cancel_scope.cancel()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for m in mems:
            m.close()
        shutil.rmtree(base, ignore_errors=True)
    return out


def _try_list(control: str, n: int) -> bool:
    try:
        return len(_ctl(control, "list", timeout=5)) == n
    except ctl.CtlError:
        return False


async def _client(path: str, mem: Memfd, task_status=trio.TASK_STATUS_IGNORED):
    async with vclient.connect(path) as c:
        await c.dma_map(0, mem.size, mem.fd, 0)
        await c.region_write(4, REG_SCRATCH, struct.pack("<I", 1))
        task_status.started(c)
        await trio.sleep_forever()


def _stats(xs: list[float]) -> str:
    return f"{min(xs):8.1f} {statistics.median(xs):8.1f} {max(xs):8.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zpcid.tools.restart_bench", description=__doc__.splitlines()[0])
    p.add_argument("--functions", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    log = (lambda s: print(s, file=sys.stderr)) if a.json else print
    results = {}
    for n in a.functions:
        results[n] = trio.run(_measure, n, a.rounds, log)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print("\nfunctions  kind      pause ms (min median max)    worst request ms (min median max)")
    for n, kinds in results.items():
        for kind, v in kinds.items():
            print(f"{n:9d}  {kind:8s}  {_stats(v['pause_ms'])}    {_stats(v['worst_request_ms'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
