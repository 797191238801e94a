"""Shell commands run in a kept login environment: same result as `bash -l -c`,
the profile run once, and run again when its files change.

guestd runs in a private mount namespace whose /etc/profile.d is a copy of the
host's (bind-mounted), so the test can add and change scripts there without
touching the host; ~/.profile lives in a temporary HOME set by Init.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from guestd_harness import Guestd, argv, collect, shell

from guestd.process.login import MARK, parse_capture
from moru_proto.guest.v1 import guest_pb2

BIND = 'mount --bind "$0" /etc/profile.d && exec "$@"'


class LoginGuestd:
    def __init__(self) -> None:
        self.profile_d = Path(tempfile.mkdtemp(dir="/tmp", prefix="mgpd"))
        shutil.copytree("/etc/profile.d", self.profile_d, dirs_exist_ok=True, symlinks=True)
        self.g = Guestd("--keepalive-seconds", "0.5", prefix=(
            "unshare", "-m", "--propagation", "private", "sh", "-c", BIND,
            str(self.profile_d)))
        self.home = Path(self.g.dir) / "home"
        self.home.mkdir()
        self.runs = self.home / "runs"  # one line per run of the profile
        self.g.guest.Init(guest_pb2.InitRequest(env={"HOME": str(self.home)}))

    def run(self, cmd: str, **kw: object) -> str:
        r = collect(self.g.process.Start(shell(cmd, **kw)))
        assert r.end is not None and r.end.exit_code == 0, r
        return r.stdout.decode()

    def profile_runs(self) -> int:
        return len(self.runs.read_text().splitlines()) if self.runs.exists() else 0

    def close(self) -> None:
        self.g.close()
        shutil.rmtree(self.profile_d, ignore_errors=True)


@pytest.fixture
def lg() -> Iterator[LoginGuestd]:
    g = LoginGuestd()
    yield g
    g.close()


def test_profile_d_and_home_profile_exports_are_seen_and_changes_picked_up(
        lg: LoginGuestd) -> None:
    x = lg.profile_d / "x.sh"
    x.write_text("export FROM_PROFILE_D=one\n")
    (lg.home / ".profile").write_text(f"echo run >> {lg.runs}\nexport FROM_HOME=a\n")
    assert lg.run('echo "$FROM_PROFILE_D|$FROM_HOME"') == "one|a\n"
    assert lg.run('echo "$FROM_PROFILE_D|$FROM_HOME"') == "one|a\n"
    assert lg.profile_runs() == 1  # computed once, kept
    x.write_text("export FROM_PROFILE_D=second\n")
    assert lg.run('echo "$FROM_PROFILE_D|$FROM_HOME"') == "second|a\n"
    (lg.home / ".profile").write_text(f"echo run >> {lg.runs}\nexport FROM_HOME=bb\n")
    assert lg.run('echo "$FROM_PROFILE_D|$FROM_HOME"') == "second|bb\n"
    (lg.profile_d / "y.sh").write_text("export NEW_FILE=yes\n")  # a new file in profile.d
    assert lg.run('echo "$NEW_FILE"') == "yes\n"
    x.unlink()
    assert lg.run('echo "${FROM_PROFILE_D-unset}"') == "unset\n"
    assert lg.profile_runs() == 5  # once per change


def test_same_environment_as_bash_l_c(lg: LoginGuestd) -> None:
    (lg.profile_d / "x.sh").write_text(
        "export XS=1 PATH=$PATH:/opt/x\nexport -f true 2>/dev/null; f() { :; }; export -f f\n")
    (lg.home / ".profile").write_text("export HP='two words'\numask 027\n")
    script = "umask; env -0"
    ours = collect(lg.g.process.Start(shell(script))).stdout
    login = collect(lg.g.process.Start(argv("bash", "-l", "-c", script))).stdout
    ignore = {"_", "SHLVL", "PWD", "OLDPWD"}

    def parsed(out: bytes) -> tuple[str, set[str]]:
        mask, _, env = out.partition(b"\n")
        return mask.decode(), {e.decode() for e in env.split(b"\0")
                               if e and e.split(b"=")[0].decode() not in ignore}

    assert parsed(ours) == parsed(login)
    assert parsed(ours)[0] == "0027"
    assert "HP=two words" in parsed(ours)[1]


def test_users_are_kept_apart_and_process_env_wins(lg: LoginGuestd) -> None:
    (lg.profile_d / "x.sh").write_text('export WHO="$(id -un)" OVERRIDE=profile\n')
    assert lg.run('echo "$WHO|$OVERRIDE"') == "root|profile\n"
    assert lg.run('echo "$WHO"', user="nobody") == "nobody\n"
    # /etc/profile sets PATH by uid: each user gets their own login PATH.
    root_path = lg.run('echo "$PATH"')
    nobody_path = lg.run('echo "$PATH"', user="nobody")
    assert "/sbin" in root_path and "/sbin" not in nobody_path
    assert lg.run('echo "$OVERRIDE"', env={"OVERRIDE": "process"}) == "process\n"


def test_profile_output_is_not_repeated_and_failing_profile_falls_back(
        lg: LoginGuestd) -> None:
    (lg.home / ".profile").write_text("echo hello from profile\n")
    assert lg.run("echo cmd") == "cmd\n"
    (lg.home / ".profile").write_text("echo broken; exit 3\n")
    r = collect(lg.g.process.Start(shell("echo cmd")))
    old = collect(lg.g.process.Start(argv("bash", "-l", "-c", "echo cmd")))
    assert r.end is not None and old.end is not None
    assert (r.stdout, r.end.exit_code) == (old.stdout, old.end.exit_code) == (b"broken\n", 3)


def test_parse_capture_takes_what_follows_the_last_mark() -> None:
    out = b"noise" + MARK + b"\n" + MARK + b"0022\nA=1\0B=x=y\0PWD=/\0_=/usr/bin/env\0"
    login = parse_capture(out)
    assert login is not None
    assert (login.umask, login.env) == (0o022, {"A": "1", "B": "x=y"})
    assert parse_capture(b"no mark") is None
    assert parse_capture(MARK + b"zz\n") is None


def test_kept_per_base_environment() -> None:
    """An Init that changes the environment computes the login environment again."""
    g = LoginGuestd()
    try:
        (g.profile_d / "x.sh").write_text('export SEEN="$FROM_INIT"\n')
        g.g.guest.Init(guest_pb2.InitRequest(env={"HOME": str(g.home), "FROM_INIT": "1"}))
        assert g.run('echo "$SEEN"') == "1\n"
        g.g.guest.Init(guest_pb2.InitRequest(env={"HOME": str(g.home), "FROM_INIT": "2"}))
        assert g.run('echo "$SEEN"') == "2\n"
    finally:
        g.close()
    assert not os.path.exists(g.profile_d)


def test_unchanged_files_are_not_stat_ed_again(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """While nothing changed, a command costs no stats of the profile files
    (an inotify watch answers); a change is still picked up at the next command."""
    import asyncio

    from guestd.process import login as mod
    from guestd.process.spawn import resolve_user

    etc, profile_d, home = tmp_path / "etc", tmp_path / "etc" / "profile.d", tmp_path / "home"
    profile_d.mkdir(parents=True)
    home.mkdir()
    (etc / "profile").write_text("export A=1\n")
    monkeypatch.setattr(mod, "SYSTEM_FILES", (str(etc / "profile"),))
    monkeypatch.setattr(mod, "PROFILE_DIR", str(profile_d))
    captures: list[int] = []
    monkeypatch.setattr(mod, "capture", lambda u, b: captures.append(1) or mod.Login({}, 0o22))
    stats: list[str] = []
    real = mod._stat
    monkeypatch.setattr(mod, "_stat", lambda p: stats.append(p) or real(p))
    envs = mod.LoginEnvs(dict)
    user, base = resolve_user(""), {"HOME": str(home)}

    async def run() -> None:
        await envs.get(user, base)
        await envs.get(user, base)  # stats once more to find the stamp current
        stats.clear()
        for _ in range(3):
            await envs.get(user, base)
        assert stats == [] and len(captures) == 1
        for path in (profile_d / "x.sh", home / ".profile", etc / "profile"):
            path.write_text("export B=2\n")
            await envs.get(user, base)
            assert stats, path
            stats.clear()
        assert len(captures) == 4

    asyncio.run(run())
