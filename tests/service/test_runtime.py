"""The runtime directory: where it is, and refusing one that is not safe to use."""

from __future__ import annotations

import os
import stat

import pytest

from zpcid.service import runtime


def test_default_dir_prefers_systemd_then_xdg_then_tmp(monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/zpcid/vm1:/run/other")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert runtime.default_dir() == "/run/zpcid/vm1"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert runtime.default_dir() == "/run/user/1000/zpcid"
    assert runtime.default_control_socket() == "/run/user/1000/zpcid/control.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime.default_dir() == f"/tmp/zpcid-{os.getuid()}"
    assert runtime.default_control_socket("/srv/z") == "/srv/z/control.sock"


def test_ensure_dir_creates_a_private_directory(tmp_path):
    path = str(tmp_path / "a" / "zpcid")
    assert runtime.ensure_dir(path) == path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert runtime.ensure_dir(path) == path  # idempotent


def test_ensure_dir_takes_write_access_away_from_group_and_others(tmp_path):
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(0o777)
    runtime.ensure_dir(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o755


def test_ensure_dir_refuses_a_file_and_a_symlink(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(runtime.RuntimeDirError, match="not a directory"):
        runtime.ensure_dir(str(tmp_path / "file"))
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(runtime.RuntimeDirError, match="not a directory"):
        runtime.ensure_dir(str(tmp_path / "link"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_ensure_dir_refuses_a_directory_another_user_owns(tmp_path):
    path = tmp_path / "theirs"
    path.mkdir(mode=0o700)
    os.chown(path, 65534, 65534)
    with pytest.raises(runtime.RuntimeDirError, match="owned by uid 65534"):
        runtime.ensure_dir(str(path))
