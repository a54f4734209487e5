"""Indicator bits: a real atomic OR on shared memory, and a loud error without libatomic."""

import ctypes
import mmap

import pytest

from zpcid.zpci.atomic import LIBATOMIC_PACKAGE, LibatomicMissing, load_fetch_or, set_indicator_bit


def test_missing_library_is_a_loud_error_naming_the_package():
    with pytest.raises(LibatomicMissing) as info:
        load_fetch_or("libzpcid-no-such-atomic.so.1")
    msg = str(info.value)
    assert "libzpcid-no-such-atomic.so.1" in msg
    assert f"apt-get install {LIBATOMIC_PACKAGE}" in msg and LIBATOMIC_PACKAGE == "libatomic1"


def test_library_without_the_symbol_is_refused():
    # libc loads but has no __atomic_fetch_or_1: not a silent fallback either.
    with pytest.raises(LibatomicMissing):
        load_fetch_or("libc.so.6")


def test_bits_are_msb_first_and_report_whether_they_were_clear():
    mm = mmap.mmap(-1, 4096)
    holder = ctypes.c_char.from_buffer(mm)
    base = ctypes.addressof(holder)
    try:
        assert set_indicator_bit(base + 3, 0) is True
        assert mm[3] == 0x80
        assert set_indicator_bit(base + 3, 0) is False  # already set
        assert set_indicator_bit(base + 3, 7) is True
        assert mm[3] == 0x81 and mm[:3] == b"\0\0\0" and mm[4] == 0
        mm[3] = 0x7F  # "guest" cleared bit 0 and set the rest
        assert set_indicator_bit(base + 3, 0) is True and mm[3] == 0xFF
    finally:
        del holder
        mm.close()
