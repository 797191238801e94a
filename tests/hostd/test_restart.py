"""hostd restarts, kill -9 included: every sandbox is found again; dead ones and orphans go."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import require_images
from hostd_framework import Hostd, pb, running_hostd

pytestmark = pytest.mark.vm

ORPHAN = "sbx_" + "9" * 20


def vmm_pid(h: Hostd, sid: str) -> int:
    for cg in h.sandbox_cgroups():
        if cg.name == sid and (cg / "cgroup.procs").exists():
            for p in (cg / "cgroup.procs").read_text().split():
                if Path(f"/proc/{p}/comm").read_text().startswith("qemu"):
                    return int(p)
    raise AssertionError(f"no VMM process found for {sid}")


def test_kill9_restart_reattaches_and_cleans_up() -> None:
    require_images()
    with running_hostd(max_sandboxes=4) as h:
        with ThreadPoolExecutor(2) as ex:
            a, b = ex.map(lambda _: h.create(timeout_seconds=1800), range(2))
        assert h.run(a, "echo one > /root/f; sleep 3600 & echo started")[0] == 0
        h.sandboxes.Pause(pb.PauseRequest(sandbox_id=b.sandbox_id), metadata=h.md())
        # Leftovers of a crash that no store row names: a run dir and a cgroup.
        orphan_dir = h.state / "sandboxes" / ORPHAN
        orphan_dir.mkdir(parents=True)
        from hostd.cgroups import CgroupManager

        CgroupManager(h.cgroup_root).create(ORPHAN, 1, 128 << 20)

        h.kill9()
        h.start()
        states = {s.sandbox_id: s.state for s in h.list_all()}
        assert states == {
            a.sandbox_id: pb.SANDBOX_STATE_RUNNING,
            b.sandbox_id: pb.SANDBOX_STATE_PAUSED,
        }
        # Files and processes of the running one survived; it answers at once.
        code, out, _ = h.run(a, "cat /root/f; pgrep -c -x sleep")
        assert code == 0 and out.split() == ["one", "1"]
        h.sandboxes.Resume(pb.ResumeRequest(sandbox_id=b.sandbox_id), metadata=h.md())
        assert h.run(b, "echo ok")[1] == "ok\n"
        assert not orphan_dir.exists()
        assert ORPHAN not in {p.name for p in h.sandbox_cgroups()}
        info = h.sandboxes.Get(pb.GetRequest(sandbox_id=a.sandbox_id), metadata=h.md())
        assert info.end_at.ToSeconds() == a.end_at.ToSeconds()  # nothing lost

        # A VMM that dies while hostd is down: cleaned up on the next start.
        h.kill9()
        os.kill(vmm_pid(h, a.sandbox_id), signal.SIGKILL)  # a VM this test created
        h.start()
        with pytest.raises(grpc.RpcError) as ei:
            h.sandboxes.Get(pb.GetRequest(sandbox_id=a.sandbox_id), metadata=h.md())
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gone after restart" in h.log_tail(20000)
        assert a.sandbox_id not in {p.name for p in h.sandbox_cgroups()}
        assert not (h.state / "sandboxes" / a.sandbox_id).exists()
        assert h.run(b, "echo still")[1] == "still\n"

        # A graceful stop (SIGTERM) leaves the VM running too.
        h.stop()
        h.start()
        assert h.run(b, "echo again")[1] == "again\n"
