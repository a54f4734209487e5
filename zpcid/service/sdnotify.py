"""sd_notify(3) over $NOTIFY_SOCKET in a few lines (READY=1, STATUS=, WATCHDOG=1)."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends datagrams to the service manager; a no-op outside systemd."""

    def __init__(self, environ=os.environ):
        addr = environ.get("NOTIFY_SOCKET", "")
        # '@' names a socket in the abstract namespace (leading NUL on the wire).
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self.watchdog_usec = 0
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; never blocks, never raises."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(assignments).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
