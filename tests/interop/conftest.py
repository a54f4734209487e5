"""Fixtures for the interop tests that boot guests under a real QEMU.

The ``qemu`` fixture skips (or, with ZPCID_REQUIRE_QEMU=1, fails) when
.ci/provision-qemu has not been run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Make `import qemu` (tests/interop/qemu.py) work under any pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import qemu as qemu_helpers  # noqa: E402


@pytest.fixture(scope="session")
def qemu() -> qemu_helpers.QemuInstall:
    info = qemu_helpers.find_qemu()
    if info is None:
        reason = qemu_helpers.missing_reason()
        if os.environ.get("ZPCID_REQUIRE_QEMU") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return info


@pytest.fixture(scope="session")
def qemu_offload(qemu: qemu_helpers.QemuInstall) -> qemu_helpers.QemuInstall:
    """The install with the patched qemu-system-s390x (.ci/provision-qemu-offload)."""
    info = qemu.offload()
    if info is None:
        reason = ("patched QEMU not provisioned: run .ci/provision-qemu-offload "
                  f"(no usable {qemu_helpers.qemu_root() / qemu_helpers.OFFLOAD_ENV_NAME})")
        if os.environ.get("ZPCID_REQUIRE_QEMU_OFFLOAD") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return info


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that use the ``qemu`` fixture are ``interop`` tests."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "qemu" in names or "qemu_offload" in names:
            item.add_marker(pytest.mark.interop)
