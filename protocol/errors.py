"""Errors that are answered to the peer with an errno.

Every error a vfio-user reply can report (malformed protocol input, a DMA map
that cannot be honoured, a DMA access outside the mappings, a bad IRQ or region
request) derives from ``ErrnoError``; the endpoint answers any of them with the
errno it carries, so that rule exists once.
"""

import errno as _errno


class ErrnoError(Exception):
    """A request that fails with ``errno`` (what the peer is answered with)."""

    default_errno = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = self.default_errno if errno is None else errno


class ProtocolError(ErrnoError):
    """Malformed input.

    ``fatal`` marks errors after which the byte stream cannot be trusted any
    more (framing is lost), so the connection has to be dropped.
    """

    def __init__(self, message: str, errno: int = _errno.EINVAL, *, fatal: bool = False):
        super().__init__(message, errno)
        self.fatal = fatal
