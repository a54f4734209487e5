"""The benchmark command runs end to end (figures are recorded, never asserted)."""

import json
import os
import subprocess
import sys

import pytest

from zpcid.tools import bench, floor


def test_bench_quick_json(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zpcid.cli", "bench", "--quick", "--json", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["version"] == bench.JSON_VERSION
    rows = {f"{r['group']}: {r['name']}": r for r in doc["rows"]}
    for name in ("message path: REGION_READ config space, round trip",
                 "message path: one-page RPCIT intercept, round trip",
                 "server CPU: zpcid per REGION_READ",
                 "server CPU: zpcid per one-page RPCIT",
                 "server CPU: zpcid per one-page RPCIT, refresh bit off (invalidate)",
                 "RPCIT: shadow 64 MiB",
                 "direct map: enable for a 64 GiB guest",
                 "DMA copy: 16 MiB via direct",
                 "DMA copy: 16 MiB via shadow",
                 "pipelined: DMA_MAP burst with fd (boot)",
                 "isolation: REGION_READ, 2 functions, one process each (aggregate)",
                 "memory: PSS per additional idle function"):
        assert name in rows, sorted(rows)
    for r in doc["rows"]:
        assert r["value"] > 0 and all(s > 0 for s in r["samples"])
        assert r["min"] <= r["value"] <= r["max"]
        if r["baseline"] is not None:
            assert r["ratio"] > 0
            if r["group"] in ("message path", "server CPU", "pipelined", "RPCIT", "direct map", "DMA copy"):
                # Interleaved: one baseline batch per figure batch.
                assert len(r["baseline_samples"]) == len(r["samples"]), r["name"]
    # The server's CPU time was measured, not the client's: the daemon did work.
    assert rows["server CPU: zpcid per REGION_READ"]["value"] > 0
    old = tmp_path / "old.json"
    old.write_text(out.stdout)
    rep = bench.Report(quiet=True)
    for r in doc["rows"]:
        rep.add(bench.Row(r["group"], r["name"], r["unit"], [v * 2 for v in r["samples"]],
                          r["baseline_samples"], r["baseline_name"], r["higher_is_better"], r["target"]))
    text = bench.compare(json.loads(old.read_text()), rep)
    line = next(line for line in text.splitlines() if line.startswith("server CPU: zpcid per REGION_READ"))
    assert "+100.0%" in line and "WORSE" in line  # twice the CPU time
    line = next(line for line in text.splitlines() if line.startswith("RPCIT: shadow 64 MiB"))
    assert "+100.0%" in line and "better" in line  # twice the rate


def test_against_another_tree_measures_the_same_three_messages(tmp_path):
    """``--against SRC`` runs that tree's daemon in the same rounds: REGION_READ,
    REGION_WRITE and the one-page RPCIT, each next to zpcid's own figure."""
    src = os.path.abspath(os.path.join(os.path.dirname(bench.__file__), "..", ".."))  # this tree
    out = subprocess.run([sys.executable, "-m", "zpcid.cli", "bench", "--quick", "--json", "--quiet",
                          "--only", "message", "--against", src],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = {f"{r['group']}: {r['name']}": r for r in json.loads(out.stdout)["rows"]}
    for what in ("REGION_READ", "REGION_WRITE to a register", "one-page RPCIT"):
        theirs = rows[f"server CPU: --against daemon per {what}"]
        vs = rows[f"server CPU: zpcid per {what} vs the --against daemon"]
        assert theirs["value"] > 0 and vs["ratio"] > 0
        assert len(vs["baseline_samples"]) == len(vs["samples"])  # interleaved, batch for batch
    assert "message path: --against daemon: one-page RPCIT intercept, round trip" in rows


def test_rows_report_cost_against_the_baseline():
    t = bench.Row("g", "time", "us", [10, 30, 20], [10, 10, 10])
    assert t.value == 20 and t.ratio == 2.0 and t.spread == 100.0
    r = bench.Row("g", "rate", "msg/s", [50, 50], [100, 100], higher_is_better=True)
    assert r.ratio == 2.0  # half the rate costs twice the time
    assert bench.Row("g", "alone", "bytes", [8]).ratio is None


def test_interleave_alternates_figure_and_baseline():
    calls = []
    a, b = bench.interleave(3, lambda: calls.append("A") or 1.0, lambda: calls.append("B") or 2.0)
    assert calls == ["A", "B"] * 3 and a == [1.0] * 3 and b == [2.0] * 3


@pytest.mark.parametrize("kind", ["echo", "blocking", "trio"])
def test_responders_answer_a_blocking_client_and_spend_cpu(kind, tmp_path):
    r = floor.Responder(kind, str(tmp_path))
    try:
        peer = floor.BlockingPeer.connect(r.path)
        peer.negotiate()
        before = floor.cpu_seconds(r.pid)
        reply = bytes(peer.call(floor.REGION_READ, floor.region_read(7, 0x10, 4)))
        if kind != "echo":
            assert reply == floor.region_read(7, 0x10, 4) + bytes(4)
        floor.round_trips(peer, floor.REGION_READ, floor.region_read(7, 0, 4), 200)
        assert floor.cpu_seconds(r.pid) > before
        peer.close()
    finally:
        r.close()


async def test_virtio_randread_pairs_alternate_baseline_and_zpcid(tmp_path):
    from zpcid.tools.virtio_bench import run_randread_pairs

    out = await run_randread_pairs(runs=2, duration=0.05, size=4 << 20, depth=4, directory=str(tmp_path))
    assert len(out["baseline"]) == len(out["virtio"]) == len(out["virtio_batch"]) == 2
    assert all(x > 0 for x in out["baseline"] + out["virtio"] + out["virtio_batch"])
    assert out["where"] not in ("", "?")  # the filesystem under the test file was found
    assert out["notifications"] > 0
    assert not any(tmp_path.iterdir())  # the disk image is removed afterwards


@pytest.mark.parametrize("shared", [True, False], ids=["memfd", "dma-messages"])
async def test_virtio_bench_measures_every_figure_next_to_its_baseline(tmp_path, shared):
    from zpcid.tools.virtio_bench import run_virtio_bench

    res = await run_virtio_bench(size=4 << 20, duration=0.05, depth=4, num_queues=2, io_threads=2,
                                 directory=str(tmp_path), shared=shared)
    assert res["guest_memory"] == ("memfd" if shared else "dma-messages")
    assert set(res["virtio"]) >= {"randread_4k_iops", "seqread_1m_mib_s", "seqwrite_1m_mib_s"}
    assert all(res["virtio"][k] > 0 for k in ("randread_4k_iops", "seqread_1m_mib_s", "seqwrite_1m_mib_s"))
    assert set(res["ratio"]) == set(res["baseline"])
    for k, ratio in res["ratio"].items():  # figure / baseline, rounded to 3 places
        assert res["baseline"][k] > 0 and abs(ratio - res["virtio"][k] / res["baseline"][k]) <= 5e-4
    assert res["virtio"]["notifications"] > 0
    assert not any(tmp_path.iterdir())


def test_restart_bench_reports_each_kind_per_round(capsys):
    from zpcid.tools import restart_bench

    assert restart_bench.main(["--functions", "1", "--rounds", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"1"} and set(res["1"]) == {"baseline", "restart", "upgrade"}
    for kind, figures in res["1"].items():
        assert len(figures["pause_ms"]) == len(figures["worst_request_ms"]) == 1, kind
        assert all(w > 0 for w in figures["worst_request_ms"]), kind  # the clients kept reading
    # A restart really paused the daemon; the baseline by definition did not.
    assert res["1"]["baseline"]["pause_ms"] == [0.0]
    assert res["1"]["restart"]["pause_ms"][0] > 0 and res["1"]["upgrade"]["pause_ms"][0] > 0
