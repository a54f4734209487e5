"""Function state and handle: one transition table, one place that changes them.

Every change of a zPCI function's state goes through ``FunctionState.apply``:
it looks the (state, event) pair up in ``TRANSITIONS``, sets the enable bit of
the handle to match, logs once and calls ``on_change`` (which republishes the
control region). Pairs not in the table are not transitions: ``apply``
returns False and nothing changes.
"""

from __future__ import annotations

import enum
from typing import Callable

from protocol.zpci import formats as Z
from protocol.zpci.region import State

FH_SHM_ZPCID = 0x00040000  # SHM bits of handles zpcid hands out


class Event(enum.Enum):
    POWER_ON = "power-on"  # daemon start, VMM detach: configured and disabled
    ENABLE = "enable"  # CLP Set PCI Function, enable
    DISABLE = "disable"  # CLP Set PCI Function, disable
    RESET = "reset"  # DEVICE_RESET (system reset)
    ERROR = "error"  # an error event (DMA fault, walk error, injected, ...)
    RESET_BLOCK = "reset-block"  # MPCIFC 9
    RESET_ERROR = "reset-error"  # MPCIFC 7


_ALL = tuple(State)
TRANSITIONS: dict[tuple[State, Event], State] = {
    **{(s, Event.POWER_ON): State.DISABLED for s in _ALL},
    (State.DISABLED, Event.ENABLE): State.ENABLED,
    (State.ENABLED, Event.DISABLE): State.DISABLED,
    (State.BLOCKED, Event.DISABLE): State.DISABLED,
    (State.ERROR, Event.DISABLE): State.DISABLED,
    **{(s, Event.RESET): State.DISABLED for s in _ALL if s != State.PERMANENT_ERROR},
    (State.PERMANENT_ERROR, Event.RESET): State.PERMANENT_ERROR,
    (State.ENABLED, Event.ERROR): State.ERROR,
    (State.BLOCKED, Event.ERROR): State.ERROR,
    (State.ERROR, Event.RESET_BLOCK): State.BLOCKED,
    (State.ERROR, Event.RESET_ERROR): State.ENABLED,
    (State.BLOCKED, Event.RESET_ERROR): State.ENABLED,
}

# States with the enable bit in the handle.
ENABLED_STATES = frozenset({State.ENABLED, State.BLOCKED, State.ERROR})
# States in which instructions other than STPCIFC answer cc 3.
NOT_AVAILABLE = frozenset({State.RESERVED, State.STANDBY, State.DISABLED, State.PERMANENT_ERROR})
# States in which the function does DMA (QEMU translates in these only).
DMA_STATES = frozenset({State.ENABLED, State.BLOCKED})


class FunctionState:
    """State and function handle of one zPCI function."""

    def __init__(self, index: int, log, on_change: Callable[[], None]):
        self.index = index
        self.log = log
        self.on_change = on_change
        self.state = State.DISABLED
        self.fh = index | FH_SHM_ZPCID

    def can(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def apply(self, event: Event, **why) -> bool:
        """Make the transition ``event``; False (nothing changed) if there is none."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return False
        old, old_fh = self.state, self.fh
        self.state = new
        self.fh = (self.fh | Z.FH_MASK_ENABLE) if new in ENABLED_STATES else (self.fh & ~Z.FH_MASK_ENABLE)
        if (old, old_fh) != (new, self.fh):
            level = self.log.warning if new == State.ERROR else self.log.info
            level("zpci_state", state=new.name, previous=old.name, cause=event.value, fh=hex(self.fh),
                  **why)
        self.on_change()
        return True

    def restore(self, state: State, fh: int) -> None:
        """Take a snapshot's state and handle as they were (no transition, no log)."""
        self.state, self.fh = State(state), fh
