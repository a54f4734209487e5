"""Configuration validation through `zpcid serve --check-config` and a failing start-up."""

import os
import subprocess

import pytest

from zpcid.service import cli

from .conftest import ZPCID, memfn, render_config


def check(tmp_path, capsys, daemon: dict, functions: list[dict], text: str | None = None):
    path = tmp_path / "zpcid.toml"
    path.write_text(text if text is not None else
                    render_config({"runtime-dir": str(tmp_path / "run")} | daemon, functions))
    rc = cli.main(["serve", "--check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err, str(path)


def test_valid_config_checks_ok_and_builds_nothing_lasting(tmp_path, capsys):
    rc, out, err, path = check(tmp_path, capsys, {}, [memfn(1), memfn(2, **{"dma-limit": 100})])
    assert rc == 0, err
    assert f"{path}: OK (2 functions" in out
    assert not (tmp_path / "run").exists()  # checking does not create sockets or directories


@pytest.mark.parametrize("functions, daemon, where, key, expect", [
    # unknown keys: a type option the type does not take, a near miss of a common key
    ([memfn(1, bogus=1)], {}, "function[0] (fid 0x1)", "bogus", "unknown key for type 'memory'"),
    ([memfn(1, dma_limit=5)], {}, "function[0] (fid 0x1)", "dma_limit", "did you mean 'dma-limit'"),
    ([memfn(1)], {"log-levle": "info"}, "[daemon]", "log-levle", "did you mean 'log-level'"),
    # wrong types
    ([memfn(1, uid="one")], {}, "function[0] (fid 0x1)", "uid", "expected an integer, got str"),
    ([memfn(1, **{"relaxed-translation": 1})], {}, "function[0] (fid 0x1)", "relaxed-translation",
     "expected a boolean"),
    ([memfn(1, **{"tlb-refresh": "no"})], {}, "function[0] (fid 0x1)", "tlb-refresh", "expected a boolean"),
    ([memfn(1)], {"release-timeout": "soon"}, "[daemon]", "release-timeout", "expected a number"),
    ([memfn(1, type=3)], {}, "function[0] (fid 0x1)", "type", "expected a string"),
    # out of range
    ([memfn(1, uid=0x10000)], {}, "function[0] (fid 0x1)", "uid", "out of range: uid must be an integer in [0, 65535]"),
    ([memfn(1, **{"dma-limit": 0})], {}, "function[0] (fid 0x1)", "dma-limit", "out of range"),
    ([memfn(1, compat=9)], {}, "function[0] (fid 0x1)", "compat", "compat must be one of (1, 2, 3)"),
    ([memfn(1, pfgid=256)], {}, "function[0] (fid 0x1)", "pfgid", "[0, 255]"),
    ([memfn(1)], {"log-level": "loud"}, "[daemon]", "log-level", "expected one of debug"),
    ([memfn(1)], {"metrics-listen": "192.0.2.1:9000"}, "[daemon]", "metrics-listen", "not a loopback"),
    ([memfn(1)], {"control-mode": 0o1777}, "[daemon]", "control-mode", "permission mode"),
    # duplicates
    ([memfn(1), memfn(1, uid=2, name="b")], {}, "function[1] (fid 0x1)", "fid",
     "duplicate fid 0x1 (already used by function[0] (fid 0x1))"),
    ([memfn(1), memfn(2, uid=1)], {}, "function[1] (fid 0x2)", "uid", "duplicate uid 0x1"),
    ([memfn(1, socket="x.sock"), memfn(2, socket="x.sock")], {}, "function[1] (fid 0x2)", "socket",
     "duplicate socket"),
    ([memfn(1, socket="control.sock")], {}, "function[0] (fid 0x1)", "socket",
     "is also the [daemon] control-socket"),
    ([memfn(1, type="warp-drive")], {}, "function[0] (fid 0x1)", "type", "unknown function type 'warp-drive'"),
])
def test_config_errors_name_file_entry_and_key(tmp_path, capsys, functions, daemon, where, key, expect):
    rc, out, err, path = check(tmp_path, capsys, daemon, functions)
    assert rc == 1
    assert err.startswith(f"zpcid: {path}: {where} key '{key}':"), err
    assert expect in err
    assert err.count("\n") == 1  # one clear message, no traceback


def test_type_option_rejected_by_value_names_the_options(tmp_path, capsys):
    rc, _, err, path = check(tmp_path, capsys, {}, [memfn(1, **{"ram-size": -4096})])
    assert rc == 1
    assert err.startswith(f"zpcid: {path}: function[0] (fid 0x1): type 'memory' rejected its "
                          "options (ram-size=-4096):"), err


def test_missing_required_key_and_bad_toml(tmp_path, capsys):
    f = memfn(1)
    del f["uid"]
    rc, _, err, path = check(tmp_path, capsys, {}, [f])
    assert rc == 1 and f"{path}: function[0] (fid 0x1): missing required key 'uid'" in err
    rc, _, err, path = check(tmp_path, capsys, {}, [], text="[[function]\nfid = 1\n")
    assert rc == 1 and f"{path}: not valid TOML" in err
    rc, _, err, path = check(tmp_path, capsys, {}, [], text="[deamon]\n")
    assert rc == 1 and "unknown top-level key 'deamon' (did you mean 'daemon'?)" in err


def test_embedded_default_in_per_user_runtime_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    res = subprocess.run([*ZPCID, "serve", "--check-config"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "<embedded default>: OK (1 functions" in res.stdout
    assert os.path.join(str(tmp_path), "zpcid", "control.sock") in res.stdout


def test_bad_config_stops_startup_with_one_message(daemons):
    d = daemons(functions=[memfn(1), memfn(2, uid=1)])
    d.start(wait=False)
    assert d.proc.wait(30) == 1
    log = d.log()
    assert f"{d.config_path}: function[1] (fid 0x2) key 'uid': duplicate uid 0x1" in log
    assert "Traceback" not in log
    assert not os.path.exists(d.rdir)
