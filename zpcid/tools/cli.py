"""The ``zpcid demo`` and ``zpcid bench`` subcommands.

The tools are imported when their subcommand runs, so ``zpcid serve`` never
loads the VMM-side toolkit.
"""

from __future__ import annotations

import argparse

import trio

from zpcid import log
from zpcid.service.cli import subcommand


def _no_arguments(p: argparse.ArgumentParser) -> None:
    pass


@subcommand("demo", "walk a guest's zPCI life cycle against a dma-engine function, checking each step",
            _no_arguments)
def demo_command(args: argparse.Namespace) -> int:
    from zpcid.tools import demo

    log.configure("auto", "error")
    return trio.run(demo.run_demo)


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from zpcid.tools import bench

    bench.add_arguments(p)


@subcommand("bench", "measure the hot paths, each next to a baseline (docs/performance.md)",
            _bench_arguments)
def bench_command(args: argparse.Namespace) -> int:
    from zpcid.tools import bench

    log.configure("json", "error")
    return bench.run(args.quick, args.json, args.quiet, args.compare, tuple(args.only or bench.SECTIONS))
