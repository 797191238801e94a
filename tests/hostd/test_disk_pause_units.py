"""Pause to disk when the eject script's answer is lost (no VM: the guest call
and the driver are stand-ins, because the race needs a reply slower than the
script's 0.2 s delay, which a real guest gives only under load)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from hostd import disk_pause
from hostd.vmm.base import SnapshotInfo


class _Vm:
    guest_eject_script = "echo eject"

    def __init__(self) -> None:
        self.saved_with: list[bool] = []

    async def save(self, dest: Path, *, guest_ejected: bool = False) -> SnapshotInfo:
        self.saved_with.append(guest_ejected)
        return SnapshotInfo(path=dest, size_bytes=1 << 20, memory_mb=512, vcpus=1,
                            created_at=0.0, unplug_seconds=0.01, save_seconds=0.01)  # fmt: skip


def test_a_lost_eject_answer_still_lets_the_driver_wait_for_the_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The answer travels on the vsock the script removes: losing it must not
    make the driver believe the device was never there to remove."""

    async def lost_answer(*_: Any, **__: Any) -> tuple[int, str]:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "Socket closed"
        )

    monkeypatch.setattr(disk_pause, "run_in_guest", lost_answer)
    vm = _Vm()
    rec = SimpleNamespace(sandbox_id="sbx_test", access_token="t", run_dir=str(tmp_path))
    sb: Any = SimpleNamespace(rec=rec, res=SimpleNamespace(channel=_Channel(), cgroup=None))

    async def main() -> None:
        await disk_pause._pause(sb, vm, tmp_path / "snap")  # type: ignore[arg-type]

    asyncio.run(main())
    assert vm.saved_with == [True]


class _Channel:
    async def close(self, grace: float | None) -> None:
        return None
