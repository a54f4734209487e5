"""The benchmark command runs end to end (figures are recorded, never asserted)."""

import json
import subprocess
import sys


def test_bench_quick_json():
    out = subprocess.run([sys.executable, "-m", "zpcid.cli", "bench", "--quick", "--json", "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = {f"{r['group']}: {r['name']}": r for r in doc["rows"]}
    for name in ("baseline: raw socketpair round trip (2 processes)",
                 "round trip: one-page RPCIT via mailbox",
                 "RPCIT: shadow 64 MiB",
                 "direct map: enable for 64 GiB guest",
                 "DMA copy: 16 MiB via direct",
                 "DMA copy: 16 MiB via shadow",
                 "DMA_MAP: pipelined burst with fd (same memfd)"):
        assert name in rows, sorted(rows)
    for r in doc["rows"]:
        assert r["value"] > 0 and all(s > 0 for s in r["samples"])
        if r["baseline"] is not None:
            assert r["baseline"] > 0 and r["ratio"] > 0
