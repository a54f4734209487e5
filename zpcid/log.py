"""structlog set-up: console renderer on a TTY, JSON lines otherwise."""

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


_settings = ("auto", "info")


def settings() -> tuple[str, str]:
    """(format, level) as last configured: what a child process should configure too."""
    return _settings


def configure(fmt: str = "auto", level: str = "info", stream=None) -> None:
    """Configure structlog once for the process; ``fmt`` is auto, console or json."""
    global _settings
    _settings = (fmt, level)
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def debug_enabled() -> bool:
    """Whether debug events are written: per-message events check this first, because
    even a filtered call through a lazy logger costs about two microseconds."""
    return _LEVELS.get(_settings[1], logging.INFO) <= logging.DEBUG


def get(name: str = "zpcid", **kw):
    # A lazy proxy: loggers made at import time still follow configure() calls.
    return structlog.get_logger(name, **kw)
