"""Guest self-protection: the processes guestd starts run where they cannot take it down.

The guest init (images/guest/rc.sh) makes two cgroup v2 groups:
`moru-agent` (guestd and its restart loop, OOM-exempt, a high cpu.weight)
and `moru-user` (memory.max and pids.max below the guest's totals). Every
command guestd starts gets a group of its own under `moru-user` (`p<pid>`,
at most 3/4 of the user memory and pids) and an ordinary oom_score_adj back
(it inherits guestd's -1000). A fork bomb or a memory hog then meets its own
group's limits and OOM killer, never guestd; and since CPU is shared between
groups, not processes, the next command still gets its share.

The move happens right after posix_spawn returns (it returns once the child
has exec'd), before the child's program has had time to fork: in practice
nothing escapes, but it is not atomic the way clone3(CLONE_INTO_CGROUP) is.
Off the guest (a dev host, tests) the group does not exist and this does
nothing.
"""

from __future__ import annotations

import contextlib
import os

CGROUP_ROOT = "/sys/fs/cgroup"
USER_GROUP = f"{CGROUP_ROOT}/moru-user"
AGENT_GROUP = f"{CGROUP_ROOT}/moru-agent"
OOM_EXEMPT = -1000
SWEEP_EVERY = 32  # spawns between removals of emptied command groups


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


def _share(name: str) -> str:
    """3/4 of moru-user's limit `name` ("max" when it has none)."""
    try:
        with open(f"{USER_GROUP}/{name}") as f:
            v = f.read().strip()
    except OSError:
        return "max"
    return str(int(v) * 3 // 4) if v.isdigit() else "max"


class _UserGroups:
    """Looked up once: the guest init made the groups before guestd started."""

    def __init__(self) -> None:
        self.on = os.path.isdir(USER_GROUP)
        self.pids = _share("pids.max") if self.on else "max"
        self.memory = _share("memory.max") if self.on else "max"
        self.spawns = 0


_groups = _UserGroups()


def confine(pid: int) -> None:
    """Moves a child guestd started into a group of its own, OOM-killable again."""
    g = _groups
    if not g.on:
        return
    d = f"{USER_GROUP}/p{pid}"
    try:
        os.mkdir(d)
    except FileExistsError:
        pass  # left by an earlier command with this pid, its processes still running
    except OSError:
        d = USER_GROUP
    if d != USER_GROUP:
        _write(f"{d}/pids.max", g.pids)
        _write(f"{d}/memory.max", g.memory)
    _write(f"{d}/cgroup.procs", str(pid))
    _write(f"/proc/{pid}/oom_score_adj", "0")
    g.spawns += 1
    if g.spawns % SWEEP_EVERY == 0:
        sweep()


def release(pid: int) -> None:
    """Removes an ended command's group unless processes it left behind still run."""
    if _groups.on:
        with contextlib.suppress(OSError):
            os.rmdir(f"{USER_GROUP}/p{pid}")


def sweep() -> None:
    """Removes the groups whose last process has gone (rmdir refuses populated ones)."""
    with contextlib.suppress(OSError), os.scandir(USER_GROUP) as it:
        for e in it:
            if e.name.startswith("p") and e.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rmdir(e.path)


def protect_self() -> None:
    """guestd as the guest's agent: exempt from the OOM killer, in the agent group.

    The restart loop does the same for itself (and so for guestd); this holds
    for a guestd started some other way too.
    """
    _write("/proc/self/oom_score_adj", str(OOM_EXEMPT))
    if os.path.isdir(AGENT_GROUP):
        _write(f"{AGENT_GROUP}/cgroup.procs", str(os.getpid()))
