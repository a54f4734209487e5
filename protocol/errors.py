"""The single error type raised for malformed or unacceptable protocol input."""

import errno as _errno


class ProtocolError(Exception):
    """Malformed input; ``errno`` is what the peer should be answered with.

    ``fatal`` marks errors after which the byte stream cannot be trusted any
    more (framing is lost), so the connection has to be dropped.
    """

    def __init__(self, message: str, errno: int = _errno.EINVAL, *, fatal: bool = False):
        super().__init__(message)
        self.errno = errno
        self.fatal = fatal
