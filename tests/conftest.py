import os

import pytest
from hypothesis import settings

from zpcid import log

log.configure(fmt="json", level="warning")

# CI replays a fixed set of examples (a red CI blocks landing, so it must not
# depend on the draw); developers' runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def sock_dir(tmp_path_factory):
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp paths can be long.
    import tempfile, shutil
    d = tempfile.mkdtemp(prefix="zpcid-t")
    yield d
    shutil.rmtree(d, ignore_errors=True)
