"""Any request line gets a documented answer from the real daemon; none hits its 'internal' path."""

import json
import shutil
import socket
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Daemon, memfn

CODES = {"bad-request", "unknown-command", "not-found", "not-supported", "invalid", "busy"}
COMMANDS = ["list", "show", "mappings", "add", "remove", "set", "reset", "inject-error", "clear-error",
            "events", "stats", "version", "metrics", "reload", "frobnicate"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(1 << 70), max_value=1 << 70)
           | st.floats(allow_nan=True) | st.text(max_size=20)
           | st.sampled_from(["memory", "0x1", "dma-limit", "x\0y", "../../x", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(["fid", "uid", "type", "pec", "timeout", "force", "clear", "properties",
                        "function", "socket", "name", "dma-limit", "ram-size", "compat"]) | st.text(max_size=8)
args = st.dictionaries(keys, values | st.dictionaries(keys, values, max_size=5), max_size=5)
# Mostly well-formed commands with odd arguments, plus arbitrary JSON values.
requests = st.fixed_dictionaries({"command": st.sampled_from(COMMANDS), "args": args}) | values


@pytest.fixture(scope="module")
def control():
    base = tempfile.mkdtemp(prefix="zpcid-f")
    d = Daemon(base, functions=[memfn(1), memfn(2)], daemon={"log-level": "error"})
    d.start()
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.control)
    f = s.makefile("rwb")
    yield d, f
    f.close()
    s.close()
    assert d.stop() == 0
    d.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests)
def test_any_request_gets_a_documented_answer(control, req):
    d, f = control
    f.write(json.dumps(req).encode() + b"\n")
    f.flush()
    resp = json.loads(f.readline())
    assert isinstance(resp["ok"], bool)
    if not resp["ok"]:
        assert resp["error"]["code"] in CODES, resp
    assert d.proc.poll() is None
