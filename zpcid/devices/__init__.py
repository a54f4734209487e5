"""Function types zpcid can serve, by configuration name."""

from __future__ import annotations

from typing import Any, Callable

TYPES: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def deco(factory):
        TYPES[name] = factory
        return factory

    return deco


def load_all() -> None:
    # Imported for their registration side effect.
    from zpcid.devices import dma_engine, memory  # noqa: F401
    from zpcid.devices import virtio_blk  # noqa: F401
