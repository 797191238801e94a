"""1 GB of stdout through guestd at full speed with constant memory (VmHWM)."""

from __future__ import annotations

import time

from guestd_harness import Guestd, argv

GB = 1024**3


def test_1gb_stdout_stream_with_bounded_rss(guestd: Guestd) -> None:
    # Warm up so the baseline includes gRPC's own buffers.
    for _ in guestd.process.Start(argv("head", "-c", str(32 * 1024 * 1024), "/dev/zero")):
        pass
    base = guestd.vm_hwm_kib()
    total = 0
    dropped = 0
    t0 = time.monotonic()
    end = None
    for ev in guestd.process.Start(argv("head", "-c", str(GB), "/dev/zero")):
        if ev.HasField("data"):
            total += len(ev.data.stdout)
        elif ev.HasField("dropped"):
            dropped += ev.dropped.stdout_bytes
        elif ev.HasField("end"):
            end = ev.end
    secs = time.monotonic() - t0
    grown_mib = (guestd.vm_hwm_kib() - base) / 1024
    print(f"1 GiB in {secs:.2f} s = {GB / secs / 1e6:.0f} MB/s; guestd VmHWM +{grown_mib:.1f} MiB"
          f" (baseline {base / 1024:.0f} MiB)")
    assert (total, dropped) == (GB, 0)
    assert end is not None and end.exit_code == 0
    assert grown_mib < 32, f"guestd peak RSS grew by {grown_mib:.1f} MiB for 1 GiB of output"
