"""Entry point of the ``zpcid`` command: the daemon's ``serve`` and the tools' subcommands.

This module composes the two; nothing imports it.
"""

import sys

from zpcid.service.cli import main
from zpcid.tools import cli as _tools  # noqa: F401  (registers demo and bench)

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
