"""RunDir names every file of a sandbox's run directory once, and removes all of it."""

from __future__ import annotations

from pathlib import Path

from hostd.rundir import SHM_DIR, RunDir, partial, snapshot_meta, snapshot_ram

NAMED = ("spec", "overlay", "vhost_user_sock", "vsock_uds", "qmp_sock", "relay_sock",
         "console_log", "vmm_pid", "vsock_pid", "vmm_err", "vsock_err", "snapshot",
         "pausing")  # fmt: skip


def test_every_file_is_distinct_and_inside_the_directory(tmp_path: Path) -> None:
    f = RunDir(tmp_path / "sbx_a")
    paths = [getattr(f, n) for n in NAMED]
    assert len(set(paths)) == len(paths)
    assert all(p.parent == f.path for p in paths)
    assert f.ram.parent == SHM_DIR and f.ram not in paths


def test_ram_file_is_unique_per_directory_path() -> None:
    """Two hostds (two state dirs) may hold the same sandbox id, never the same RAM file."""
    a, b = RunDir("/var/lib/a/sandboxes/sbx_x"), RunDir("/tmp/b/sandboxes/sbx_x")
    assert a.ram != b.ram and "sbx_x" in a.ram.name
    assert RunDir("/var/lib/a/sandboxes/sbx_x").ram == a.ram  # stable: found again after restart


def test_socket_paths_are_checked_against_the_unix_limit() -> None:
    assert RunDir("/var/lib/moru/sandboxes/sbx_" + "a" * 20).sockets_fit()
    assert not RunDir("/" + "d" * 100).sockets_fit()


def test_remove_takes_the_directory_and_the_ram_file_outside_it(tmp_path: Path) -> None:
    f = RunDir(tmp_path / "sbx_rm")
    f.path.mkdir()
    f.console_log.write_text("x")
    f.ram.write_bytes(b"\0" * 4096)
    try:
        f.remove()
        assert not f.path.exists() and not f.ram.exists()
        f.remove()  # twice is fine
    finally:
        f.ram.unlink(missing_ok=True)


def test_remove_snapshot_leaves_the_rest(tmp_path: Path) -> None:
    f = RunDir(tmp_path)
    s = f.snapshot
    for p in (s, snapshot_meta(s), snapshot_ram(s), partial(s), partial(snapshot_ram(s)),
              f.overlay):  # fmt: skip
        p.write_bytes(b"x")
    f.remove_snapshot()
    assert [p.name for p in tmp_path.iterdir()] == [f.overlay.name]
