"""Guest self-protection: the processes guestd starts run where they cannot take it down.

The guest init (images/guest/rc.sh) makes two cgroup v2 groups:
`moru-agent` (guestd and its restart loop, OOM-exempt, a high cpu.weight)
and `moru-user` (memory.max and pids.max below the guest's totals). Every
child guestd spawns is moved into `moru-user` and gets an ordinary
oom_score_adj back (it inherits guestd's -1000). A fork bomb or a memory hog
then hits its own group's limits and the group's OOM killer, never guestd.

The move happens right after posix_spawn returns (it returns once the child
has exec'd), before the child's program has had time to fork: in practice
nothing escapes, but it is not atomic the way clone3(CLONE_INTO_CGROUP) is.
Off the guest (a dev host, tests) the group does not exist and this does
nothing.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"
USER_GROUP = f"{CGROUP_ROOT}/moru-user"
AGENT_GROUP = f"{CGROUP_ROOT}/moru-agent"
OOM_EXEMPT = -1000


def _write(path: str, value: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, value.encode())
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# Looked up once: the guest init made the group before guestd started.
_user_procs: str | None = f"{USER_GROUP}/cgroup.procs" if os.path.isdir(USER_GROUP) else None


def confine(pid: int) -> None:
    """Moves a child guestd started into the user group, OOM-killable again."""
    if _user_procs is None:
        return
    _write(_user_procs, str(pid))
    _write(f"/proc/{pid}/oom_score_adj", "0")


def protect_self() -> None:
    """guestd as the guest's agent: exempt from the OOM killer, in the agent group.

    The restart loop does the same for itself (and so for guestd); this holds
    for a guestd started some other way too.
    """
    _write("/proc/self/oom_score_adj", str(OOM_EXEMPT))
    if os.path.isdir(AGENT_GROUP):
        _write(f"{AGENT_GROUP}/cgroup.procs", str(os.getpid()))
