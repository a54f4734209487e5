"""The CI slice of the fuzz campaign (zpcid.tools.fuzz; the long run is in docs/reliability.md).

At least 50 k mutated vfio-user messages with descriptors against a memory and a
dma-engine function, hostile guest table trees through the mailbox, and hostile
virtqueues; afterwards every function answers a fresh VMM, no DMA map is left
and no descriptor leaked.  ZPCID_FUZZ_SEED replays a run.
"""

import os

from zpcid.tools import fuzz

SEED = int(os.environ.get("ZPCID_FUZZ_SEED", "20261130"))


async def test_fuzz_slice():
    stats = await fuzz.campaign(seed=SEED, messages=50_000, trees=500, virtq_rounds=200)
    assert stats["messages"] >= 50_000 and stats["trees"] >= 500 and stats["virtq_rounds"] >= 200
    # The mutations reached the daemon: many were refused, some ended sessions.
    assert stats["mutated"] > 10_000 and stats["connections"] > 10 and stats["rpcits"] > 100


def test_fuzz_finds_a_planted_leak(monkeypatch):
    """The harness can fail: a daemon that keeps one descriptor per session is caught."""
    import pytest
    import trio
    from zpcid.vfio_user import dma

    kept = []
    real = dma.DmaSpace.close

    def leaky_close(self):
        kept.extend(os.dup(0) for _ in range(fuzz.MAX_LEAKED_FDS + 1))
        real(self)

    monkeypatch.setattr(dma.DmaSpace, "close", leaky_close)
    try:
        with pytest.raises(fuzz.FuzzFailure, match="descriptors leaked"):
            trio.run(lambda: fuzz.campaign(seed=SEED, messages=200, trees=2, virtq_rounds=2))
    finally:
        for fd in kept:
            os.close(fd)
