"""The per-user runtime directory for sockets: $XDG_RUNTIME_DIR/zpcid, else /tmp/zpcid-$UID.

Under systemd (RuntimeDirectory=) the directory it created wins.
"""

from __future__ import annotations

import os
import stat

CONTROL_SOCKET_NAME = "control.sock"
# Where the system unit (RuntimeDirectory=zpcid) keeps the control socket;
# zpcictl falls back to it when the caller's own default does not exist.
SYSTEM_RUNTIME_DIR = "/run/zpcid"


class RuntimeDirError(Exception):
    """The runtime directory exists but is not safe to use."""


def default_dir() -> str:
    # systemd's RuntimeDirectory= (the units use it) exports the path it created.
    managed = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if managed:
        return managed
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "zpcid")
    return f"/tmp/zpcid-{os.getuid()}"


def default_control_socket(runtime_dir: str | None = None) -> str:
    return os.path.join(runtime_dir or default_dir(), CONTROL_SOCKET_NAME)


def ensure_dir(path: str) -> str:
    """Create ``path`` 0700; refuse one another user owns or a symlink (shared /tmp)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise RuntimeDirError(f"{path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise RuntimeDirError(f"{path} is owned by uid {st.st_uid}, not by us ({os.geteuid()})")
    if st.st_mode & 0o022:
        # Others could replace our sockets in a group/world-writable directory.
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o022)
    return path
