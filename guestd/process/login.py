"""The login environment of `bash -l`, computed once per user and kept.

A shell command used to start as `bash -l -c CMD`: /etc/profile,
/etc/profile.d/*.sh and ~/.profile ran again for every command (three
quarters of a short command's cost in a TCG guest). guestd now runs them once
per (user, base environment), keeps what they export and the umask, and starts
each shell command as `bash -c CMD` in that environment. Before each use the
kept result is checked with stats of the files a login shell reads (plus the
entries of /etc/profile.d) and computed again when any changed. When the
login shell fails (a profile that exits non-zero, hangs or prints no
environment), commands fall back to `bash -l -c` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, replace

from guestd.process.spawn import Spec, User, _as_user, build_env, resolve_user
from guestd.process.watch_files import DirWatch

BASH = "/bin/bash"
SYSTEM_FILES = ("/etc/profile", "/etc/bash.bashrc")
PROFILE_DIR = "/etc/profile.d"
HOME_FILES = (".bash_profile", ".bash_login", ".profile", ".bashrc")
# Set by every bash for itself; a kept value would be stale in the command's shell.
NOT_KEPT = frozenset({"PWD", "OLDPWD", "SHLVL", "_"})
MARK = b"\0moru-login-env\0"
CAPTURE = r"printf '\0moru-login-env\0'; umask; exec env -0"
CAPTURE_TIMEOUT = 30.0
MAX_KEPT = 64

Stamp = tuple[tuple[str, int, int, int, int] | None, ...]


@dataclass(frozen=True)
class Login:
    """What a login shell set up: its exported environment and umask."""

    env: dict[str, str]
    umask: int


@dataclass
class _Kept:
    stamp: Stamp
    login: Login | None  # None: the login shell failed; use `bash -l -c`
    checked: int = -1  # the DirWatch generation in which `stamp` was last found current


def _stat(path: str) -> tuple[str, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def parse_capture(out: bytes) -> Login | None:
    """The capture script's output (after anything the profile printed)."""
    at = out.rfind(MARK)
    if at < 0:
        return None
    rest = out[at + len(MARK):]
    line, sep, body = rest.partition(b"\n")
    try:
        umask = int(line.strip() or b"x", 8)
    except ValueError:
        return None
    if not sep:
        return None
    env: dict[str, str] = {}
    for entry in body.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            continue
        key = os.fsdecode(name)
        if key not in NOT_KEPT:
            env[key] = os.fsdecode(value)
    return Login(env, umask)


class LoginEnvs:
    """Kept login environments, keyed by user and the environment they started from."""

    def __init__(self, init_env: Callable[[], dict[str, str]]) -> None:
        self._init_env = init_env
        self._kept: dict[tuple[object, ...], _Kept] = {}
        self._running: dict[tuple[object, ...], asyncio.Future[_Kept]] = {}
        self._dir_stat: tuple[str, int, int, int, int] | None = None
        self._dir_entries: tuple[str, ...] = ()
        # Spares the stats while nothing changed in /etc, /etc/profile.d or a home.
        self._watch = DirWatch()
        self._homes: dict[str, None] = {}  # watched homes, oldest first

    def _profile_d(self) -> list[tuple[str, int, int, int, int] | None]:
        """The directory's stat and its *.sh entries' (listed again only when it changed)."""
        st = _stat(PROFILE_DIR)
        if st != self._dir_stat:
            self._dir_stat = st
            names: list[str] = []
            if st is not None:
                with contextlib.suppress(OSError):
                    names = sorted(n for n in os.listdir(PROFILE_DIR) if n.endswith(".sh"))
            self._dir_entries = tuple(os.path.join(PROFILE_DIR, n) for n in names)
        return [st, *(_stat(p) for p in self._dir_entries)]

    def stamp(self, home: str) -> Stamp:
        """Stats of every file a login shell of this user reads (missing ones too)."""
        out = [_stat(p) for p in SYSTEM_FILES]
        out += self._profile_d()
        if home:
            out += [_stat(os.path.join(home, n)) for n in HOME_FILES]
        return tuple(out)

    async def prepare(self, spec: Spec) -> Spec:
        """`spec` with the kept login environment of its user (shell commands only)."""
        if not spec.shell or not os.access(BASH, os.X_OK):
            return spec
        user = resolve_user(spec.user)
        base = build_env(user, self._init_env(), {})
        login = await self.get(user, base)
        if login is None:
            return spec
        return replace(spec, login_env=login.env, umask=login.umask)

    def _watch_dirs(self, home: str) -> frozenset[str]:
        return frozenset({*(os.path.dirname(p) for p in SYSTEM_FILES), PROFILE_DIR,
                          *([home] if home else [])})

    def _watchable(self, stamp: Stamp) -> bool:
        """No symlinked file (its target's directory is not watched)."""
        return all(s is None or not os.path.islink(s[0]) for s in stamp)

    async def get(self, user: User, base: dict[str, str]) -> Login | None:
        key = (user.name, user.uid, user.gid, tuple(sorted(base.items())))
        home = base.get("HOME", "")
        kept = self._kept.get(key)
        dirs = self._watch_dirs(home)
        if (kept is not None and kept.checked == self._watch.generation
                and self._watch.quiet(dirs)):
            return kept.login  # nothing changed since its stamp was found current
        if not self._watch.quiet(dirs):
            # Arm before taking the stats, so a change after them is an event.
            if home and home not in self._homes:
                self._homes[home] = None
                if len(self._homes) > MAX_KEPT:
                    self._homes.pop(next(iter(self._homes)))
            self._watch.arm(dirs | set(self._homes))
        stamp = self.stamp(home)
        if kept is not None and kept.stamp == stamp:
            if self._watchable(stamp):
                kept.checked = self._watch.generation
            return kept.login
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(self._compute(user, base, stamp))
            self._running[key] = running
            running.add_done_callback(lambda _f: self._running.pop(key, None))
        kept = await asyncio.shield(running)
        if len(self._kept) >= MAX_KEPT and key not in self._kept:
            self._kept.pop(next(iter(self._kept)))
        self._kept[key] = kept
        return kept.login

    async def _compute(self, user: User, base: dict[str, str], stamp: Stamp) -> _Kept:
        # The generation before the capture: a change while it runs re-arms the
        # watch, and the stamp is then compared again.
        generation = self._watch.generation
        login = await asyncio.to_thread(capture, user, base)
        return _Kept(stamp, login, generation if self._watchable(stamp) else -1)


def capture(user: User, base: dict[str, str]) -> Login | None:
    """Runs the user's login shell once (as that user, in their home) and reads
    the environment it exports; None when it fails."""
    argv = [BASH, "-l", "-c", CAPTURE]
    if user.uid != os.getuid():
        argv = _as_user(user, argv)
    home = base.get("HOME", "")
    cwd = home if home and os.path.isdir(home) else "/"
    try:
        done = subprocess.run(argv, env=base, cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=CAPTURE_TIMEOUT, start_new_session=True, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_capture(done.stdout)
