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


# The first connection of this seed opens with a DMA_MAP carrying a memfd
# instead of VERSION (the 3 % hostile-first-message branch).
FIRST_MESSAGE_WITH_FD_SEED = 1154


async def test_hostile_first_message_leaves_no_descriptor(tmp_path):
    """Regression for the long run's leak: a session opened by a command with a
    descriptor (refused before VERSION) leaves no descriptor open in this process,
    neither the daemon's received copy nor the harness's own."""
    import gc
    import random

    import trio

    from zpcid.devices.memory import MemoryFunction
    from zpcid.zpci.properties import ZpciProperties

    rng = random.Random(FIRST_MESSAGE_WITH_FD_SEED)
    probe = fuzz.MessageFuzzer(random.Random(FIRST_MESSAGE_WITH_FD_SEED))
    try:
        assert probe.rng.random() >= 0.97
        _, fds = probe.one()
        assert fds  # the seed still exercises a first message with a descriptor
        fuzz.close_fds(fds)
    finally:
        probe.close()

    before = fuzz.open_fds()
    stats = fuzz._new_stats()
    fn = MemoryFunction("fz-first", zpci=ZpciProperties(fid=0x20, uid=0x2000))
    async with fuzz.served(fn, str(tmp_path), "mem") as server:
        await fuzz.fuzz_messages(server.path, rng, 20, stats)
        with trio.fail_after(fuzz.ANSWER_TIMEOUT):
            while server.attached:
                await trio.sleep(0.01)
    gc.collect()
    assert fuzz._describe(fuzz.open_fds() - before) == []
