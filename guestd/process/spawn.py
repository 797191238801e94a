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
import signal
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass, field
from functools import cached_property

from guestd.errors import InvalidArgument, NotFound, path_error
from guestd.limits import confine

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIPE_SIZE = 1024 * 1024
DEFAULT_PIPE_SIZE = 64 * 1024  # Linux's; a read of half of it: a child that writes a lot


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
    # The kept login environment for `shell` (guestd.process.login): run it with
    # `bash -c` in this environment and umask instead of `bash -l -c`.
    login_env: dict[str, str] | None = None
    umask: int | None = None


@dataclass
class Child:
    """A started child and guestd's ends of its stdio (guestd reaps it by pid)."""

    pid: int
    fds: dict[str, int]  # kind -> readable fd (non-blocking)
    stdin_fd: int | None  # writable fd (the pty master for pty processes)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @cached_property
    def groups(self) -> list[int]:
        """Supplementary groups (read from /etc/group only when switching user)."""
        try:
            return os.getgrouplist(self.name, self.gid)
        except OSError:
            return [self.gid]


_users: dict[str, User] = {}
_users_key: tuple[int, ...] | None = None


def _passwd_key() -> tuple[int, ...] | None:
    try:
        pw, gr = os.stat("/etc/passwd"), os.stat("/etc/group")  # groups are cached too
    except OSError:
        return None
    return pw.st_ino, pw.st_mtime_ns, pw.st_size, gr.st_ino, gr.st_mtime_ns, gr.st_size


def resolve_user(user: str) -> User:
    """A user name or numeric uid -> its passwd entry (root when empty).

    Cached until /etc/passwd or /etc/group changes (stats instead of a parse)."""
    global _users_key
    key = _passwd_key()
    if key is None or key != _users_key:
        _users.clear()
        _users_key = key
    found = _users.get(user)
    if found is not None:
        return found
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user or "root")
    except KeyError:
        raise NotFound(f"user: no such user {user!r}") from None
    found = User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell or "/bin/sh")
    if key is not None and len(_users) < 256:
        _users[user] = found
    return found


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


_image_env: dict[str, str] | None = None


def image_env() -> dict[str, str]:
    """guestd's own environment (the image's), read once: copying os.environ
    decodes every variable, a cost on each Start. guestd never changes it;
    what Init sets is kept apart (GuestState.env)."""
    global _image_env
    if _image_env is None:
        _image_env = dict(os.environ)
        _image_env.setdefault("PATH", DEFAULT_PATH)
    return _image_env


def which(name: str, path: str) -> str | None:
    """shutil.which for a bare command name (shutil would load zlib, bz2 and lzma
    at every guest boot)."""
    for d in path.split(os.pathsep):
        full = os.path.join(d, name)
        if os.access(full, os.X_OK) and not os.path.isdir(full):
            return full
    return None


def build_env(user: User, init_env: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """Image env (guestd's own) < the user's passwd defaults < Init env < process env."""
    out = image_env().copy()
    out.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell)
    out.update(init_env)
    out.update(env)
    return out


def command_line(spec: Spec) -> list[str]:
    if spec.shell:
        bash = "/bin/bash"
        if spec.login_env is not None:
            return [bash, "-c", spec.shell]
        if os.access(bash, os.X_OK):
            return [bash, "-l", "-c", spec.shell]
        return ["/bin/sh", "-c", spec.shell]
    return list(spec.argv)


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w


def grow_pipe(fd: int) -> None:
    """Bigger pipe for a child that writes a lot: fewer wakeups per byte.
    Done on the first full read rather than per spawn (most commands print little)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


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
    setpriv = which("setpriv", DEFAULT_PATH)
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
    setsid = which("setsid", DEFAULT_PATH)
    if setsid:
        return [setsid, "--ctty", "--", *argv]
    return [sys.executable, "-c", _CTTY_TRAMPOLINE, *argv]


# The signals Python ignores or handles that a child must get at their default
# (subprocess's restore_signals does the same for SIGPIPE and SIGXFSZ).
_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)


_inherited_closed = False


def _cloexec_inherited() -> None:
    """Marks the fds guestd inherited (above stderr) close-on-exec, once: what
    guestd, Python and gRPC open later is close-on-exec already, so children
    get only their stdio (Popen's close_fds, without a scan per spawn)."""
    global _inherited_closed
    if _inherited_closed:
        return
    _inherited_closed = True
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.set_inheritable(fd, False)


def _posix_spawn(path: str, argv: list[str], env: dict[str, str], cwd: str,
                 stdin: int | None, out_w: int, err_w: int) -> int:
    """posix_spawn (vfork + exec in libc, no Python between them) in a new session.

    About 20% cheaper than subprocess.Popen for a short command (measured on
    the dev host: no Python-level fork bookkeeping, no error pipe to read).
    posix_spawn has no chdir action in Python 3.11, so guestd changes its own working
    directory around the call: guestd's other threads (gRPC's, to_thread
    helpers) use absolute paths only. Every fd guestd opens is close-on-exec,
    so the child gets just the three below."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_DUP2, stdin, 0) if stdin is not None
        else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    _cloexec_inherited()
    try:
        here = os.getcwd() if cwd else ""
    except OSError:  # guestd's own directory was removed: come back to /
        here = "/"
    if cwd and cwd != here:
        os.chdir(cwd)
    try:
        return os.posix_spawn(path, argv, env, file_actions=actions, setsid=True,
                              setsigdef=_SIGDEF)
    finally:
        if cwd and cwd != here:
            os.chdir(here)


def spawn(spec: Spec, init_env: dict[str, str]) -> Child:
    """Starts the child in its own session (and so process group)."""
    user = resolve_user(spec.user)
    cwd = spec.cwd or (user.home if os.path.isdir(user.home) else "/")
    if not os.path.isdir(cwd):
        if os.path.exists(cwd):
            raise InvalidArgument(f"cwd: {cwd} is not a directory")
        raise NotFound(f"cwd: no such directory {cwd}")
    if spec.login_env is not None:
        env = {**spec.login_env, **spec.env}
    else:
        env = build_env(user, init_env, spec.env)
    argv = command_line(spec)
    exe = argv[0]
    if "/" not in exe:
        found = which(exe, env["PATH"])
        if found is None:
            raise NotFound(f"argv[0]: command not found: {exe!r}")
        exe = found
    if user.uid != os.getuid():
        argv = _as_user(user, argv)
        exe = argv[0]
    mine: list[int] = []  # guestd's ends, closed on failure
    theirs: list[int] = []  # the child's ends, always closed in guestd after spawn
    # The child inherits guestd's umask (posix_spawn has no umask action): set
    # the login shell's around the spawn.
    umask = os.umask(spec.umask) if spec.umask is not None else None
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
            popen.returncode = 0  # guestd reaps it by pid; keep Popen.__del__ out of it
            confine(popen.pid)
            return Child(popen.pid, {"pty": master}, master)
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        mine += [out_r, err_r]
        theirs += [out_w, err_w]
        stdin: int | None = None
        in_w: int | None = None
        if spec.stdin:
            in_r, in_w = os.pipe2(os.O_CLOEXEC)
            mine.append(in_w)
            theirs.append(in_r)
            os.set_blocking(in_w, False)
            stdin = in_r
        pid = _posix_spawn(exe, argv, env, cwd, stdin, out_w, err_w)
        confine(pid)
        return Child(pid, {"stdout": out_r, "stderr": err_r}, in_w)
    except OSError as exc:
        for fd in mine:
            os.close(fd)
        raise path_error(exc, f"argv[0] {argv[0]!r}") from None
    except BaseException:
        for fd in mine:
            os.close(fd)
        raise
    finally:
        if umask is not None:
            os.umask(umask)
        for fd in theirs:
            os.close(fd)
