"""The ``zpcid`` command's parser and its ``serve`` subcommand.

One entry in SUBCOMMANDS per subcommand (add_arguments, run); ``zpcid.cli``
adds the tools' subcommands, which the daemon never imports.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import trio

import zpcid
from zpcid.service import config as cfg
from zpcid import log

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, add_arguments, run); a new subcommand is one more entry.
SUBCOMMANDS: dict[str, tuple[str, AddArguments, Run]] = {}


def subcommand(name: str, help: str, add_arguments: AddArguments):
    def deco(run: Run) -> Run:
        SUBCOMMANDS[name] = (help, add_arguments, run)
        return run
    return deco


# ---------------------------------------------------------------------- serve
def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help="TOML configuration (default: the embedded one-function default)")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration (building every function) and exit 0 or 1")
    p.add_argument("--log-format", choices=cfg.LOG_FORMATS,
                   help="override [daemon] log-format (auto: console on a TTY, JSON lines otherwise)")
    p.add_argument("--log-level", choices=cfg.LOG_LEVELS, help="override [daemon] log-level")


def _load(args: argparse.Namespace) -> cfg.Config:
    return cfg.load(args.config) if args.config else cfg.load_default()


def check_config(config: cfg.Config) -> None:
    """Build (and release) every function so type options are checked too."""
    for fc in config.functions:
        fc.create().close()


@subcommand("serve", "run the daemon", _serve_arguments)
def serve(args: argparse.Namespace) -> int:
    from zpcid.service import daemon

    try:
        config = _load(args)
        if args.check_config:
            check_config(config)
            print(f"{config.source}: OK ({len(config.functions)} functions, "
                  f"control socket {config.daemon.control_socket})")
            return 0
    except cfg.ConfigError as exc:
        print(f"zpcid: {exc}", file=sys.stderr)
        return 1
    d = config.daemon
    log.configure(args.log_format or d.log_format, args.log_level or d.log_level)
    failed = False
    try:
        trio.run(daemon.serve, config, args.config)
    except* daemon.StartupError as group:
        failed = True
        for exc in group.exceptions:
            log.get("zpcid.service.daemon").error("startup_failed", error=str(exc))
            print(f"zpcid: {exc}", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zpcid", description=zpcid.__doc__)
    parser.add_argument("--version", action="version", version=f"zpcid {zpcid.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
