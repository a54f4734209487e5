import functools
import os
import inspect

import pytest
import trio
import trio.testing

from hypothesis import settings

from zpcid import log

log.configure(fmt="json", level="warning")

# CI replays a fixed set of examples (a red CI blocks landing, so it must not
# depend on the draw); developers' runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Run ``async def`` tests under trio (no plugin needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        args = {a: pyfuncitem.funcargs[a] for a in pyfuncitem._fixtureinfo.argnames}
        trio.run(functools.partial(pyfuncitem.obj, **args), clock=args.get("autojump_clock"))
        return True
    return None


@pytest.fixture
def autojump_clock():
    """A MockClock that jumps to the next deadline whenever every task waits
    (same name and meaning as pytest-trio's fixture)."""
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def sock_dir(tmp_path_factory):
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp paths can be long.
    import tempfile, shutil
    d = tempfile.mkdtemp(prefix="zpcid-t")
    yield d
    shutil.rmtree(d, ignore_errors=True)
