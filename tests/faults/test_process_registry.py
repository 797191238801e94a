"""The process registry without a VM: a guestd that dies leaves its command
running; a new ProcessManager adopts it (a process that is not its child),
lists it, signals it and sees it end. Stale records (a dead pid, a reused
pid) are dropped instead of adopted.

Before: a restarted guestd knew nothing of the processes the old one started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from guestd.process.events import End
from guestd.process.manager import ProcessManager
from guestd.process.registry import UNKNOWN, Registry, adopt_survivors

REPO = Path(__file__).resolve().parents[2]

# A "guestd" that starts a command through the manager, records it and dies at once.
DYING_GUESTD = textwrap.dedent("""
    import asyncio, os, sys
    from guestd.process.manager import ProcessManager
    from guestd.process.registry import Registry
    from guestd.process.spawn import Spec

    async def main():
        m = ProcessManager(lambda: {}, buffer_bytes=65536, keepalive=1.0)
        m.journal = Registry(sys.argv[1])
        p = m.start(Spec(argv=["sleep", "1000"], env={"K": "v"}, tag="survivor", cwd="/"))
        short = m.start(Spec(argv=["true"]))
        await asyncio.sleep(0.5)  # recorded after RECORD_AFTER; `true` ended before
        assert sorted(os.listdir(sys.argv[1])) == [f"{p.pid}.json"], short.pid
        print(p.pid, flush=True)
        os._exit(0)  # like a kill -9: no clean-up

    asyncio.run(main())
""")


def _manager() -> ProcessManager:
    return ProcessManager(lambda: {}, buffer_bytes=65536, keepalive=0.2)


async def _wait_end(m: ProcessManager, pid: int) -> End:
    proc = m.get(pid=pid)
    cursor = proc.attach()
    async for ev in proc.follow(cursor, 0.2):
        if isinstance(ev, End):
            return ev
    raise AssertionError("follow ended without an End")


def test_survivor_is_adopted_listed_signalled_and_waited_for(tmp_path: Path) -> None:
    reg_dir = tmp_path / "processes"
    out = subprocess.run(
        [sys.executable, "-c", DYING_GUESTD, str(reg_dir)], check=True, capture_output=True,
        text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    pid = int(out.stdout)
    try:
        # Stale records next to it: a pid that is gone, and a live pid whose start
        # time does not match (a reused pid).
        good = json.loads((reg_dir / f"{pid}.json").read_text())
        (reg_dir / "999999999.json").write_text(json.dumps({**good, "pid": 999999999}))
        (reg_dir / f"{os.getpid()}.json").write_text(
            json.dumps({**good, "pid": os.getpid(), "tag": "impostor"}))

        async def scenario() -> tuple[list[int], list[tuple[int, str, list[str]]], End]:
            m = _manager()
            adopted = adopt_survivors(m, Registry(str(reg_dir)))
            listed = [(p.pid, p.tag, p.spec.argv) for p in m.list(include_ended=False)]
            assert m.get(tag="survivor").spec.env == {"K": "v"}
            m.get(pid=pid).signal(signal.SIGTERM)
            end = await asyncio.wait_for(_wait_end(m, pid), 30)
            return adopted, listed, end

        adopted, listed, end = asyncio.run(scenario())
        assert adopted == [pid]
        assert listed == [(pid, "survivor", ["sleep", "1000"])]
        # Not our child: the status is read from the zombie when we are first,
        # else it is reported as unknown.
        assert (end.signal == signal.SIGTERM) or (end.exit_code == -1 and end.status == UNKNOWN)
        assert sorted(os.listdir(reg_dir)) == []  # ended and stale records are gone
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
