"""Function types zpcid can serve, by configuration name."""

from __future__ import annotations

from typing import Any, Callable

# Filled by load_all(): the type modules are imported only when a function is
# built, and they do not import this package back (no import cycle).
TYPES: dict[str, Callable[..., Any]] = {}


def load_all() -> None:
    """Fill TYPES: configuration name -> factory(name, **options)."""
    from zpcid.devices import dma_engine, memory, virtio_blk

    TYPES.update({"dma-engine": dma_engine.make, "memory": memory.make, "virtio-blk": virtio_blk.make})
