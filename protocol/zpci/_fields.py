"""attrs validators and length checks shared by the block layouts."""

from __future__ import annotations

from protocol.errors import ProtocolError


def _u(bits: int):
    def check(inst, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
            raise ValueError(f"{attribute.name} must be an integer in [0, {(1 << bits) - 1}]")
    return check


def _flag(inst, attribute, value):
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ValueError(f"{attribute.name} must be 0/1 or a bool")


def _nbytes(n: int):
    def check(inst, attribute, value):
        if not isinstance(value, bytes) or len(value) != n:
            raise ValueError(f"{attribute.name} must be {n} bytes")
    return check


def _ints(n: int, bits: int):
    def check(inst, attribute, value):
        if len(value) != n or any(
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < (1 << bits) for v in value
        ):
            raise ValueError(f"{attribute.name} must be {n} integers in [0, {(1 << bits) - 1}]")
    return check


def _need(data, n: int, what: str) -> None:
    if len(data) < n:
        raise ProtocolError(f"{what}: {len(data)} bytes, need {n}")
