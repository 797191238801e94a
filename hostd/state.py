"""Sandbox lifecycle states and the one table of what each state allows.

    CREATING --ready--> RUNNING <--pause/resume--> PAUSED
        |                  |                          |
        |                  +--fail--> ERROR           |
        |                               |             |
        +------------------+---- kill / timeout / ----+--> TERMINATED
                                 VMM exited / failed

ERROR: a health check found the sandbox dead or unreachable for good
(`SandboxRecord.error` says why); it is listed until killed (by policy or a
caller) and refuses guest calls meanwhile.

Actions not in the table are refused with FAILED_PRECONDITION
("cannot pause sandbox ... in state paused").
"""

from __future__ import annotations

import enum

from hostd.errors import FailedPrecondition


class State(enum.Enum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    TERMINATED = "terminated"
    ERROR = "error"


class Action(enum.Enum):
    READY = "ready"
    PAUSE = "pause"
    RESUME = "resume"
    SET_TIMEOUT = "set timeout"
    SET_NETWORK = "set network"
    GUEST_CALL = "call the guest of"
    KILL = "kill"
    FAIL = "mark as failed"


# (state, action) -> state after it.
TRANSITIONS: dict[tuple[State, Action], State] = {
    (State.CREATING, Action.READY): State.RUNNING,
    (State.CREATING, Action.KILL): State.TERMINATED,
    (State.RUNNING, Action.PAUSE): State.PAUSED,
    (State.RUNNING, Action.SET_TIMEOUT): State.RUNNING,
    (State.RUNNING, Action.SET_NETWORK): State.RUNNING,
    (State.RUNNING, Action.GUEST_CALL): State.RUNNING,
    (State.RUNNING, Action.KILL): State.TERMINATED,
    (State.PAUSED, Action.RESUME): State.RUNNING,
    (State.PAUSED, Action.SET_TIMEOUT): State.PAUSED,
    (State.PAUSED, Action.SET_NETWORK): State.PAUSED,
    (State.PAUSED, Action.KILL): State.TERMINATED,
    (State.RUNNING, Action.FAIL): State.ERROR,
    (State.ERROR, Action.SET_TIMEOUT): State.ERROR,
    (State.ERROR, Action.KILL): State.TERMINATED,
}


def transition(sandbox_id: str, state: State, action: Action) -> State:
    """The state after `action`, or FailedPrecondition saying why it is not allowed."""
    nxt = TRANSITIONS.get((state, action))
    if nxt is not None:
        return nxt
    if state is State.PAUSED and action is Action.GUEST_CALL:
        raise FailedPrecondition(f"sandbox {sandbox_id} is paused; resume it first")
    if state is State.ERROR and action is Action.GUEST_CALL:
        raise FailedPrecondition(f"sandbox {sandbox_id} is in state error; kill it")
    if state is State.CREATING:
        raise FailedPrecondition(f"sandbox {sandbox_id} is still being created; try again")
    raise FailedPrecondition(f"cannot {action.value} sandbox {sandbox_id} in state {state.value}")
