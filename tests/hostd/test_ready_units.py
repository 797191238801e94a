"""Ready snapshot store without VMs: shapes, lookup, pruning, leftovers, config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hostd_framework import IMAGES

from hostd.config import Config, ConfigError, load
from hostd.ready_snapshots import META, ReadySnapshots, initramfs_has_virtio_pci, shape_of
from images.manifest import TemplateManifest, TemplateNotFound, load_manifest


def manifest(content_hash: str = "h1", name: str = "base") -> TemplateManifest:
    return TemplateManifest(
        name=name, content_hash=content_hash, kernel="/k", kernel_version="6.1",
        initramfs="/i", rootfs="/r", kernel_cmdline="console=ttyS0",
    )  # fmt: skip


def store(tmp_path: Path, templates: str = "base", network: object = None) -> ReadySnapshots:
    cfg = Config(state_dir=str(tmp_path), ready_snapshot_templates=templates)

    def load_template(name: str) -> TemplateManifest:
        raise TemplateNotFound(name)

    return ReadySnapshots(cfg, None, None, network, load_template)


def complete(rs: ReadySnapshots, name: str) -> Path:
    d: Path = rs.root / name
    d.mkdir(parents=True)
    (d / "mem.snap").write_bytes(b"QEVM")
    (d / META).write_text("{}")
    return d


def test_a_shape_key_changes_with_everything_a_restore_depends_on() -> None:
    base = shape_of(manifest(), 2, 512, 2048, True, "auto")
    assert base.key == shape_of(manifest(), 2, 512, 2048, True, "auto").key
    others = [
        shape_of(manifest("h2"), 2, 512, 2048, True, "auto"),  # template rebuilt
        shape_of(manifest(), 1, 512, 2048, True, "auto"),
        shape_of(manifest(), 2, 256, 2048, True, "auto"),
        shape_of(manifest(), 2, 512, 4096, True, "auto"),
        shape_of(manifest(), 2, 512, 2048, False, "auto"),  # no network device
        shape_of(manifest(), 2, 512, 2048, True, "tcg"),
        dataclasses.replace(base, cmdline="console=ttyS0 quiet"),
        dataclasses.replace(base, initramfs="/i2"),
    ]
    assert len({base.key, *(s.key for s in others)}) == len(others) + 1
    assert base.dirname == f"base-{base.key}"


def test_find_sees_only_complete_snapshots(tmp_path: Path) -> None:
    rs = store(tmp_path, network=object())
    shape = rs.shape(manifest(), 2, 512, 2048)
    assert shape.net is True
    assert rs.find(shape) is None
    half = rs.root / shape.dirname
    half.mkdir(parents=True)
    (half / "mem.snap").write_bytes(b"QEVM")  # no ready.json: not finished
    assert rs.find(shape) is None
    (half / META).write_text("{}")
    assert rs.find(shape) == half


def test_prune_removes_stale_snapshots_but_not_listed_or_in_use_ones(tmp_path: Path) -> None:
    rs = store(tmp_path)
    old = rs.shape(manifest("h1"), 2, 512, 2048)
    new = rs.shape(manifest("h2"), 2, 512, 2048)
    busy = rs.shape(manifest("h0"), 2, 512, 2048)
    for s in (old, new, busy):
        complete(rs, s.dirname)
    with rs.using(rs.root / busy.dirname):
        assert rs.prune({new.dirname}) == [old.dirname]
    assert rs.find(old) is None and rs.find(new) and rs.find(busy)
    assert rs.prune({new.dirname}) == [busy.dirname]
    assert sorted(p.name for p in rs.root.iterdir()) == [new.dirname]


def test_unfinished_snapshots_are_removed_at_start(tmp_path: Path) -> None:
    rs = store(tmp_path)
    done = complete(rs, "base-0123456789abcdef")
    (rs.root / ".tmp-base-0123456789abcdef-1a2b3c4d" / "vm").mkdir(parents=True)
    rs.remove_partial()
    assert [p for p in rs.root.iterdir()] == [done]


def test_refresh_skips_templates_that_are_not_built(tmp_path: Path) -> None:
    rs = store(tmp_path, templates="nope, ")
    assert rs.templates == ["nope"]
    stale = complete(rs, "nope-0123456789abcdef")
    import asyncio

    assert asyncio.run(rs.refresh()) == []
    assert not stale.exists()  # nothing current for it: stale


def test_config_fields_are_checked() -> None:
    cfg = load(None, overrides={"ready_snapshot_templates": "base,python"}, environ={})
    assert cfg.ready_snapshot_templates == "base,python"
    assert load(None, environ={}).ready_snapshot_templates == ""  # off unless asked
    with pytest.raises(ConfigError, match="ready_snapshot"):
        load(None, overrides={"ready_snapshot_restore_seconds": "0"}, environ={})


def test_the_built_initramfs_loads_virtio_pci(tmp_path: Path) -> None:
    """A ready snapshot's vsock device is hot-plugged on PCIe: the guest needs virtio_pci."""
    if not (IMAGES / "templates" / "base" / "manifest.json").is_file():
        pytest.fail(f"template 'base' is not built in {IMAGES}")
    m = load_manifest("base", IMAGES)
    assert initramfs_has_virtio_pci(Path(m.initramfs)) is True
    plain = tmp_path / "i.img"
    plain.write_bytes(b"070701" + b"0" * 100)
    assert initramfs_has_virtio_pci(plain) is False
    plain.write_bytes(b"\x1f\x8b compressed")
    assert initramfs_has_virtio_pci(plain) is None


def test_the_background_loop_survives_a_failing_pass_and_forgets_stale_retries(
    tmp_path: Path,
) -> None:
    import asyncio

    calls = []

    def broken(name: str) -> TemplateManifest:
        calls.append(name)
        raise ValueError("manifest.json is not JSON")

    cfg = Config(state_dir=str(tmp_path), ready_snapshot_templates="base",
                 ready_snapshot_check_seconds=0.05)  # fmt: skip
    rs = ReadySnapshots(cfg, None, None, None, broken)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rs.run(), 0.5)

    asyncio.run(main())
    assert len(calls) >= 3  # kept going after the first failure

    rs = store(tmp_path, templates="nope")
    rs._retry_at["base-0123456789abcdef"] = 0.0  # a shape of an older build
    rs._failures["base-0123456789abcdef"] = 2
    asyncio.run(rs.refresh())
    assert not rs._retry_at and not rs._failures


def test_the_maker_vm_counts_against_capacity_and_waits_when_the_node_is_full(
    tmp_path: Path,
) -> None:
    """No VM is booted here: the maker stops at the capacity check, before any cgroup."""
    import asyncio
    import time

    from hostd.resources import Capacity

    cfg = Config(state_dir=str(tmp_path), ready_snapshot_templates="base", max_sandboxes=1,
                 ready_snapshot_check_seconds=30)  # fmt: skip
    capacity = Capacity(cfg)
    capacity.reserve("sbx_running", 256)
    rs = ReadySnapshots(cfg, None, None, None, lambda name: manifest(), capacity)
    assert asyncio.run(rs.refresh()) == []
    (shape_dir,) = rs._retry_at
    assert 25 < rs._retry_at[shape_dir] - time.monotonic() <= 30  # the next check, no backoff
    assert rs._failures == {}
    assert capacity._used == {"sbx_running": 256}  # nothing reserved is left behind
    assert [p.name for p in rs.root.iterdir()] == []
