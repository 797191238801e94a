"""Turns a validated process spec into a running child: user, env, cwd, pipes or pty.

Kept apart from the manager so the fork/exec details (process group, user
switch, controlling terminal) are in one small place.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import shutil
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass, field

from guestd.errors import InvalidArgument, NotFound, path_error

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIPE_SIZE = 1024 * 1024


@dataclass
class Spec:
    """What to run; built from a StartRequest by the service."""

    argv: list[str] = field(default_factory=list)
    shell: str = ""
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    user: str = ""
    pty: tuple[int, int] | None = None  # (cols, rows)
    stdin: bool = False
    timeout: float = 0.0
    tag: str = ""


@dataclass
class Child:
    """A started child and guestd's ends of its stdio."""

    popen: subprocess.Popen[bytes]
    fds: dict[str, int]  # kind -> readable fd (non-blocking)
    stdin_fd: int | None  # writable fd (the pty master for pty processes)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: list[int]


def resolve_user(user: str) -> User:
    """A user name or numeric uid -> its passwd entry (root when empty)."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user or "root")
    except KeyError:
        raise NotFound(f"user: no such user {user!r}") from None
    try:
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    except OSError:
        groups = [pw.pw_gid]
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell or "/bin/sh", groups)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def build_env(user: User, init_env: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """Image env (guestd's own) < the user's passwd defaults < Init env < process env."""
    out = dict(os.environ)
    out.setdefault("PATH", DEFAULT_PATH)
    out.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell)
    out.update(init_env)
    out.update(env)
    return out


def command_line(spec: Spec) -> list[str]:
    if spec.shell:
        bash = "/bin/bash"
        if os.access(bash, os.X_OK):
            return [bash, "-l", "-c", spec.shell]
        return ["/bin/sh", "-c", spec.shell]
    return list(spec.argv)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # bigger pipes: fewer wakeups per byte
        fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    os.set_blocking(r, False)
    return r, w


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


_USER_TRAMPOLINE = (
    "import os,sys\n"
    "os.setgroups([int(g) for g in sys.argv[3].split(',') if g]); os.setgid(int(sys.argv[2]));"
    " os.setuid(int(sys.argv[1])); os.execvp(sys.argv[4], sys.argv[4:])\n"
)
_CTTY_TRAMPOLINE = (
    "import fcntl,os,sys,termios\n"
    "os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def _as_user(user: User, argv: list[str]) -> list[str]:
    """Runs argv as `user` (gid, supplementary groups, uid) via util-linux setpriv.

    Not with Popen(user=..., group=...): that makes CPython fork() instead of
    vfork(), and gRPC's fork handlers then crash the child (seen: SIGSEGV)."""
    groups = ",".join(str(g) for g in user.groups)
    setpriv = shutil.which("setpriv", path=DEFAULT_PATH)
    if setpriv:
        ids = [f"--reuid={user.uid}", f"--regid={user.gid}"]
        grp_args = [f"--groups={groups}"] if groups else ["--clear-groups"]
        return [setpriv, *ids, *grp_args, "--", *argv]
    return [sys.executable, "-c", _USER_TRAMPOLINE, str(user.uid), str(user.gid), groups, *argv]


def _with_ctty(argv: list[str]) -> list[str]:
    """Makes the pty the child's controlling terminal (job control, ^C, SIGWINCH).

    Not with Popen(preexec_fn=...): Python code between fork and exec in a
    process with gRPC's threads crashes the child (seen: SIGSEGV). util-linux
    `setsid --ctty` (Essential in Debian) does setsid + TIOCSCTTY and execs
    without forking, since the child is not a process group leader; a tiny
    Python trampoline does the same where it is missing."""
    setsid = shutil.which("setsid", path=DEFAULT_PATH)
    if setsid:
        return [setsid, "--ctty", "--", *argv]
    return [sys.executable, "-c", _CTTY_TRAMPOLINE, *argv]


def spawn(spec: Spec, init_env: dict[str, str]) -> Child:
    """Starts the child in its own session (and so process group)."""
    user = resolve_user(spec.user)
    cwd = spec.cwd or (user.home if os.path.isdir(user.home) else "/")
    if not os.path.isdir(cwd):
        if os.path.exists(cwd):
            raise InvalidArgument(f"cwd: {cwd} is not a directory")
        raise NotFound(f"cwd: no such directory {cwd}")
    env = build_env(user, init_env, spec.env)
    argv = command_line(spec)
    if not spec.shell and "/" not in argv[0] and shutil.which(argv[0], path=env["PATH"]) is None:
        raise NotFound(f"argv[0]: command not found: {argv[0]!r}")
    if user.uid != os.getuid():
        argv = _as_user(user, argv)
    mine: list[int] = []  # guestd's ends, closed on failure
    theirs: list[int] = []  # the child's ends, always closed in guestd after spawn
    try:
        if spec.pty is not None:
            master, slave = os.openpty()
            mine.append(master)
            theirs.append(slave)
            set_winsize(master, *spec.pty)
            if user.uid != os.getuid():
                os.fchown(slave, user.uid, -1)
            os.set_blocking(master, False)
            popen = subprocess.Popen(
                _with_ctty(argv), stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
            )
            return Child(popen, {"pty": master}, master)
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        mine += [out_r, err_r]
        theirs += [out_w, err_w]
        stdin: int = subprocess.DEVNULL
        in_w: int | None = None
        if spec.stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            mine.append(in_w)
            theirs.append(in_r)
            os.set_blocking(in_w, False)
            stdin = in_r
        popen = subprocess.Popen(
            argv, stdin=stdin, stdout=out_w, stderr=err_w, cwd=cwd, env=env,
            start_new_session=True,
        )
        return Child(popen, {"stdout": out_r, "stderr": err_r}, in_w)
    except OSError as exc:
        for fd in mine:
            os.close(fd)
        raise path_error(exc, f"argv[0] {argv[0]!r}") from None
    except BaseException:
        for fd in mine:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
